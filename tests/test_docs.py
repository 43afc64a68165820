"""Tests for the docs/ tutorials: the student's notebooks, their answer checker, their execution and their report.

Every tutorial is opened as a student opens it (jupytext MyST -> .ipynb), its exercises' reference solutions are
swapped in from ``docs/solutions/``, and it is executed by nbclient in a fresh kernel (``execute_tutorial``). At
every ``check(n)`` the feedback must say "correct" to the solution, and reject the blank placeholder and a slightly
wrong (perturbed) answer with a hint that spells no expected value. ``00_overview`` and ``01_gate1`` run in the
default tier (about 10 s each on one core), the others in ``-m slow``. The checker (``threegate.answers``) and the
exercise convention are also tested on synthetic inputs: a malformed tutorial or answer key is an error naming the
cell, and a checker that accepts a wrong answer, rejects the solution or reveals the value is caught.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import textwrap
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from theory.errors import CheckpointError, InputError
from threegate import answers
from threegate.answers import CORRECT, NOT_YET, AnswerChecker, Expected, answer_checker, judge, reveals, value_forms

pytest.importorskip("jupytext")
pytest.importorskip("nbclient")

from threegate import tutorials  # noqa: E402
from threegate.cli import main  # noqa: E402
from threegate.tutorials import (  # noqa: E402
    execute_tutorial, find_docs_dir, load_tutorial, read_executed, read_solutions, tutorial_paths)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
TUTORIALS = {p.stem: p for p in tutorial_paths(DOCS)}
# About 10 s each on one core; together the five are more than the default tier's share, so the rest run in slow.
DEFAULT_TIER = ("00_overview", "01_gate1_kl_anchor")
HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""
SETUP = """```{code-cell} ipython3
from threegate.answers import answer_checker
check = answer_checker("00_demo", globals())
```
"""


def cell(kind: str, source: str, tags: tuple[str, ...] = ()) -> str:
    head = "```{code-cell} ipython3" if kind == "code" else "```{raw-cell}"
    meta = f":tags: [{', '.join(tags)}]\n" if tags else ""
    return f"{head}\n{meta}{textwrap.dedent(source).strip()}\n```\n"


EXERCISE = cell("code", "answer_x = None  # an int", ("exercise",))
CHECKER = cell("code", "check(1)", ("checker",))
PLOT = cell("code", """
    import matplotlib.pyplot as plt
    plt.plot([0, 1], [1, 0])
    print("plotted")
""")
KEY = '''
from threegate.answers import Expected
SOLUTIONS = {1: "answer_x = 6 * 7"}
CHECKS = {1: lambda nb: {"answer_x": Expected(%s, hint=%r%s)}}
'''


def write_tutorial(docs: Path, *cells: str, name: str = "00_demo", title: str = "A synthetic tutorial",
                   expected: str = "42", hint: str = "six times seven", tol: str = "",
                   key: str | None = None, first: str = "") -> Path:
    """A tutorial ``docs/name.md`` with ``first`` and the setup cell first, and its answer key
    ``docs/solutions/name.py``."""
    (docs / "solutions").mkdir(parents=True, exist_ok=True)
    (docs / "solutions" / f"{name}.py").write_text(key if key is not None else KEY % (expected, hint, tol),
                                                   encoding="utf-8")
    path = docs / f"{name}.md"
    path.write_text(HEADER + f"\n# {title}\n\nSome *text*.\n\n" + first + SETUP.replace("00_demo", name)
                    + "\n".join(cells), encoding="utf-8")
    return path


# ---- the checker a student calls (no kernel) -------------------------------------------------------------------
def test_answers_module_examples_run():
    result = doctest.testmod(answers)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.parametrize("answer, expected, verdict", [
    (0.1 + 0.2, Expected(0.3, hint="h", rel_tol=1e-15), None),
    (np.float64(0.3), Expected(0.3, hint="h"), None),
    (3, Expected(3.0, hint="h"), None),  # an int is a fine float
    (np.int64(7), Expected(7, hint="h"), None),
    (np.True_, Expected(True, hint="h"), None),
    ({1: 0.5, 0: 0.25}, Expected({0: 0.25, 1: 0.5}, hint="h"), None),
    ((1.0, 2.0), Expected((1.0, 2.0 + 1e-13), hint="h", abs_tol=1e-12), None),
    (" reproduced", Expected("reproduced", hint="h"), None),
    (None, Expected(0.3, hint="h"), "still None"),
    (0.3 * 1.05 + 1e-3, Expected(0.3, hint="h", rel_tol=1e-9), "the value is off"),
    (float("nan"), Expected(0.3, hint="h", rel_tol=1.0), "not a finite number"),
    ("0.3", Expected(0.3, hint="h"), "expected a float, got a string"),
    (True, Expected(1, hint="h"), "expected an int, got a bool"),
    (1, Expected(True, hint="h"), "expected a bool, got an int"),
    (7.0, Expected(7, hint="h"), "expected an int, got a float"),
    ({0: 0.25}, Expected({0: 0.25, 1: 0.5}, hint="h"), "not the expected ones"),
    ({0: 0.25, 1: 0.6}, Expected({0: 0.25, 1: 0.5}, hint="h"), "an entry is wrong"),
    ((1.0,), Expected((1.0, 2.0), hint="h"), "expected a tuple of 2"),
])
def test_judge_says_right_or_why_not(answer, expected, verdict):
    why = judge(answer, expected)
    if verdict is None:
        assert why is None
    else:
        assert verdict in why
        assert reveals(why, value_forms(expected)) is None


@pytest.mark.parametrize("kw, problem", [
    ({"rel_tol": -1e-9}, "rel_tol"), ({"abs_tol": float("nan")}, "abs_tol"), ({"hint": "  "}, "hint"),
])
def test_expected_refuses_bad_tolerances_and_empty_hints(kw, problem):
    with pytest.raises(InputError, match=problem):
        Expected(0.5, **{"hint": "h", **kw})


def test_check_prints_correct_or_a_hint_and_never_the_value(capsys):
    key = types.SimpleNamespace(CHECKS={1: lambda nb: {
        "answer_a": Expected(nb.x * 0.1234567, hint="multiply x by the constant", rel_tol=1e-12),
        "answer_b": Expected(17, hint="count them")}})
    ns = {"x": 3.0, "answer_a": 3.0 * 0.1234567, "answer_b": None}
    check = AnswerChecker(key, ns)
    check(1)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"answer_a: {CORRECT}"
    assert out.splitlines()[1].startswith(f"answer_b: {NOT_YET} - still None") and "Hint: count them" in out
    ns.update(answer_a=0.37, answer_b=18)
    check(1)
    out = capsys.readouterr().out
    assert out.count(NOT_YET) == 2 and CORRECT + "\n" not in out
    assert reveals(out, value_forms(check.expected(1))) is None and "0.37" not in out and "18" not in out
    assert check.results(1) == {"answer_a": "the value is off", "answer_b": "the value is off"}
    del ns["answer_b"]
    assert "not defined yet" in check.results(1)["answer_b"]
    with pytest.raises(InputError, match="no exercise 2"):
        check(2)
    del ns["x"]
    with pytest.raises(InputError, match="no variable 'x' yet"):
        check(1)


def test_reveals_finds_a_value_only_as_its_own_token():
    forms = value_forms(0.0625) | value_forms(65) | value_forms(True)
    assert reveals("the threshold is 0.0625.", forms) == "0.0625"
    assert reveals("k = 65 steps", forms) == "65"
    assert reveals("it is True", forms) == "True"
    assert reveals("beta = 0.5, 2**-14, answer_65, 0.06250001, 650, Trueness", forms) is None


def test_answer_checker_finds_the_key_from_the_docs_folder_and_the_repository_root(monkeypatch):
    monkeypatch.delenv(answers.KEYS_ENV, raising=False)
    ns = {}
    for cwd in (DOCS, REPO):  # Jupyter runs a notebook's kernel in docs/; a script may run from the root
        monkeypatch.chdir(cwd)
        assert sorted(answer_checker("00_overview", ns)._checks) == [1, 2, 3]


def test_a_missing_answer_key_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(answers.KEYS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"answer key 07_none.py not found \(looked in solutions/07_none.py"):
        answer_checker("07_none", {})


# ---- the five tutorials ----------------------------------------------------------------------------------------
def student_notebook(path: Path) -> str:
    """The .ipynb a student gets from ``jupytext --to ipynb``."""
    import jupytext

    return jupytext.writes(jupytext.read(path, fmt="md:myst"), fmt="ipynb")


def test_the_five_tutorials_hold_exercises_and_no_solutions():
    assert set(TUTORIALS) == {"00_overview", "01_gate1_kl_anchor", "02_gate2_geometry", "03_gate3_precision",
                              "04_rl_vs_sft"}
    for name, path in TUTORIALS.items():
        student = json.loads(student_notebook(path))
        cells = student["cells"]
        assert not [c for c in cells if c["cell_type"] == "raw"], name
        assert not [c for c in cells if "solution" in c["metadata"].get("tags", [])], name
        exercises = [c for c in cells if "exercise" in c["metadata"].get("tags", [])]
        assert 2 <= len(exercises) <= 3, name
        for c in exercises:  # the student sees placeholders only
            assigned = re.findall(r"^(answer_\w+)\s*=\s*(.*?)\s*(?:#.*)?$", "".join(c["source"]), re.M)
            assert assigned and all(value == "None" for _, value in assigned), (name, assigned)
        solutions = read_solutions(DOCS / "solutions" / f"{name}.py")
        text = json.dumps(student)
        for sol in solutions.values():  # no line of a reference solution that computes an answer is in the notebook
            for line in sol.splitlines():
                if line.startswith("answer_"):
                    assert json.dumps(line)[1:-1] not in text, (name, line)
        _, exs = load_tutorial(path)
        assert [ex.checker.strip() for ex in exs] == [f"check({n})" for n in range(1, len(exs) + 1)], name
        md = path.read_text(encoding="utf-8")
        assert "threegate explain" in md or name == "04_rl_vs_sft", f"{name} does not point to threegate explain"
        assert "when present" not in md, name


def run_tutorial(name: str):
    t = execute_tutorial(TUTORIALS[name])
    errors = [o for c in t.notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for ex in t.exercises:
        assert ex.checked and ex.rejected == ("placeholder", "perturbed"), ex
        assert ex.revealing, "the expected values' spellings were not obtained"
        for a in ex.answers:
            assert re.search(rf"^{a}: {CORRECT}$", ex.feedback["solution"], re.M), (a, ex.feedback)
            for kind in ("placeholder", "perturbed"):
                assert re.search(rf"^{a}: {NOT_YET} - .+\. Hint: .+$", ex.feedback[kind], re.M), (a, kind)
        for kind in ("placeholder", "perturbed"):
            assert CORRECT + "\n" not in ex.feedback[kind]
            assert reveals(ex.feedback[kind], set(ex.revealing)) is None, (kind, ex.feedback[kind])
        assert "still None" in ex.feedback["placeholder"] and "still None" not in ex.feedback["perturbed"]
    assert t.notebook.metadata["threegate"]["exercises"][0]["checked"] is True
    return t


@pytest.mark.parametrize("name", DEFAULT_TIER)
def test_tutorial_runs_as_a_notebook_and_its_checker_accepts_only_the_solution(name):
    run_tutorial(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(TUTORIALS) - set(DEFAULT_TIER)))
def test_long_tutorial_runs_as_a_notebook_and_its_checker_accepts_only_the_solution(name):
    run_tutorial(name)


# ---- the exercise convention (synthetic tutorials) -------------------------------------------------------------
@pytest.mark.parametrize("cells, key, problem", [
    ((EXERCISE,), None, "exercise 1 has no 'checker' cell after it"),
    ((EXERCISE, EXERCISE, CHECKER), None, "exercise 1 has no 'checker' cell before the next"),
    ((CHECKER, EXERCISE), None, "a 'checker' cell with no exercise before it"),
    ((EXERCISE, cell("code", "check(2)", ("checker",))), None, "must be check(1), got 'check(2)'"),
    ((EXERCISE, cell("code", "assert answer_x == 42", ("checker",))), None, "must be check(1)"),
    ((cell("code", "x = 1", ("exercise",)), CHECKER), None, "must assign answer_* placeholders"),
    ((EXERCISE, cell("raw", "answer_x = 6 * 7", ("solution",)), CHECKER), None, "belong in the answer key"),
    ((EXERCISE, cell("raw", "answer_x = 42"), CHECKER), None, "belong in the answer key"),
    ((EXERCISE, CHECKER), 'SOLUTIONS = {1: "answer_y = 1"}', "SOLUTIONS[1] assigns ('answer_y',)"),
    ((EXERCISE, CHECKER), 'SOLUTIONS = {2: "answer_x = 1"}', "SOLUTIONS has no entry 1"),
    ((EXERCISE, CHECKER), 'SOLUTIONS = {1: "answer_x = 1", 2: "answer_z = 2"}', "SOLUTIONS [2] have no exercise"),
    ((EXERCISE, CHECKER), 'SOLUTIONS = dict(a="b")', "needs SOLUTIONS"),
    ((EXERCISE, CHECKER), "SOLUTIONS = {1: 'answer_x = 1'", "not valid Python"),
])
def test_malformed_tutorial_or_key_is_named(tmp_path, cells, key, problem):
    path = write_tutorial(tmp_path, *cells, key=key)
    with pytest.raises(InputError, match=re.escape(problem)):
        load_tutorial(path)


def test_missing_tutorial_or_key_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tutorial(tmp_path / "nope.md")
    path = write_tutorial(tmp_path, EXERCISE, CHECKER)
    (tmp_path / "solutions" / "00_demo.py").unlink()
    with pytest.raises(CheckpointError, match=r"answer key .*00_demo.py' does not exist"):
        load_tutorial(path)


def test_solution_is_swapped_in_and_the_placeholder_kept_for_the_page(tmp_path):
    nb, (ex,) = load_tutorial(write_tutorial(tmp_path, EXERCISE, CHECKER))
    ex_cell = next(c for c in nb.cells if "exercise" in c.metadata.get("tags", []))
    assert ex_cell.source == "answer_x = 6 * 7"
    assert ex_cell.metadata["threegate_exercise"] == "answer_x = None  # an int"
    assert ex.answers == ("answer_x",) and ex.checker == "check(1)" and ex.number == 1


def test_tutorials_module_examples_run():
    result = doctest.testmod(tutorials)
    assert result.attempted >= 2 and result.failed == 0


def test_perturbation_changes_every_kind_of_answer():
    import fractions

    ns: dict = {}
    exec(tutorials._PERTURB, ns)
    perturb = ns["_threegate_perturb"]
    for x in (True, 3, fractions.Fraction(1, 3), 0.25, 0.0, "thm3.3", (1.0, 2), [4], {"a"}, {0: 0.5},
              np.array([1.0, 2.0])):
        y = perturb(x)
        assert type(y) is type(x)
        assert not np.array_equal(y, x) if isinstance(x, np.ndarray) else y != x
    with pytest.raises(TypeError, match="NoneType"):
        perturb(None)


def test_a_checker_accepting_a_slightly_wrong_answer_is_caught(tmp_path):
    path = write_tutorial(tmp_path, EXERCISE, CHECKER, expected="42.0", tol=", abs_tol=5")  # accepts 43
    with pytest.raises(InputError, match=r"exercise 1 \(answer_x\) accepts a wrong answer \(perturbed\) for answer_x"):
        execute_tutorial(path)


@pytest.mark.parametrize("kind, text, problem", [
    ("solution", "answer_a: correct\nanswer_b: correct\n", None),
    ("solution", "answer_a: correct\n", "does not say 'correct' to the reference solution for answer_b"),
    ("solution", "answer_a: correct\nanswer_b: not right yet - the value is off. Hint: h\n", "for answer_b"),
    ("placeholder", "answer_a: not right yet - still None. Hint: h\nanswer_b: not right yet - x. Hint: h\n", None),
    ("perturbed", "answer_a: not right yet - off. Hint: h\nanswer_b: correct\n", "accepts a wrong answer (perturbed)"),
    ("perturbed", "answer_a: not right yet - off. Hint: h\n", "accepts a wrong answer (perturbed) for answer_b"),
    ("placeholder", "answer_a: not right yet - off. Hint: it is 0.0625\nanswer_b: not right yet - x. Hint: h\n",
     "reveals the expected value '0.0625' on a placeholder answer"),
    ("perturbed", "answer_a: not right yet - off. Hint: k = 65\nanswer_b: not right yet - x. Hint: h\n",
     "reveals the expected value '65'"),
])
def test_feedback_rules(kind, text, problem):
    found = tutorials.feedback_problem(("answer_a", "answer_b"), kind, text, value_forms((0.0625, 65)))
    assert found is None if problem is None else problem in found


def test_a_failing_cell_is_named(tmp_path):
    path = write_tutorial(tmp_path, EXERCISE, CHECKER, name="00_fail", first=cell("code", "1 / 0"))
    with pytest.raises(InputError, match=r"00_fail.md, cell \d+ failed: ZeroDivisionError"):
        execute_tutorial(path)


# ---- finding docs/, and the report -----------------------------------------------------------------------------
def test_docs_folder_is_the_argument_else_cwd_docs_else_the_checkout(tmp_path, monkeypatch):
    assert find_docs_dir(DOCS) == DOCS
    with pytest.raises(CheckpointError, match="does not exist"):
        find_docs_dir(tmp_path / "missing")
    with pytest.raises(InputError, match="holds no tutorial"):
        find_docs_dir(tmp_path)
    write_tutorial(tmp_path / "docs", EXERCISE, CHECKER)
    monkeypatch.chdir(tmp_path)
    assert find_docs_dir().resolve() == (tmp_path / "docs").resolve()
    monkeypatch.chdir(tmp_path / "docs")  # no ./docs here: the checkout this package runs from
    assert find_docs_dir().resolve() == DOCS.resolve()


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.sections, self.summaries, self._in_summary = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "summary":
            self._in_summary = True
            self.summaries.append("")

    def handle_endtag(self, tag):
        if tag == "summary":
            self._in_summary = False

    def handle_data(self, data):
        if self._in_summary:
            self.summaries[-1] += data


def test_figs_executes_the_tutorials_of_docs_dir_into_the_report(tmp_path, monkeypatch, capsys):
    # CI exports MPLBACKEND=Agg; the kernel must still display figures inline (this failed CI once)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    docs = tmp_path / "mydocs"
    write_tutorial(docs, PLOT, EXERCISE, CHECKER, title="Demo tutorial")
    # a second tutorial whose answer key disagrees with its own solution: named, exit 1, the first still rendered
    write_tutorial(docs, EXERCISE, CHECKER, name="01_wrong_key", expected="41")
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    assert main(["figs", str(results), "--tutorials", str(docs), "--out", str(out)]) == 1
    cap = capsys.readouterr()
    assert "1 tutorial(s) from" in cap.out
    assert re.search(r"tutorial 01_wrong_key.md failed: .*exercise 1 \(answer_x\) does not say 'correct' to the "
                     r"reference solution for answer_x", cap.err)
    assert [p.name for p in (results / "tutorials").iterdir()] == ["00_demo.ipynb"]
    page = (out / "index.html").read_text(encoding="utf-8")
    parsed = Page()
    parsed.feed(page)
    assert 'id="tutorials"' in page and "tutorial-00-demo" in parsed.sections
    summary = next(s for s in parsed.summaries if "Demo tutorial" in s)
    assert "1/1 exercises checked" in summary and "placeholder and perturbed" in summary
    assert "answer_x = None" in page and "answer_x = 6 * 7" in page  # the exercise, and its folded solution
    assert "check(1)" not in page  # the checker is left out of the page
    assert "plotted" in page and "<em>text</em>" in page
    tutorial_imgs = [s for s in parsed.imgs if s.startswith("tutorials/")]
    assert tutorial_imgs and all((out / s).stat().st_size > 1000 for s in tutorial_imgs)
    assert os.environ["MPLBACKEND"] == "Agg"  # the kernel's backend did not leak into this process
    # rendering again, without --tutorials, keeps the executed tutorials on the page
    assert main(["figs", str(results), "--out", str(tmp_path / "out2")]) == 0
    capsys.readouterr()
    assert "tutorial-00-demo" in (tmp_path / "out2" / "index.html").read_text(encoding="utf-8")


def test_report_without_executed_tutorials_says_how_to_make_them(tmp_path):
    from paper_figs.report import render_all

    (tmp_path / "results").mkdir()
    assert read_executed(tmp_path / "results") == []
    page = render_all(tmp_path / "results", tmp_path / "out", tutorials=[]).page.read_text(encoding="utf-8")
    assert "No executed tutorials" in page and "--tutorials" in page
    page = render_all(tmp_path / "results", tmp_path / "out", tutorials=None).page.read_text(encoding="utf-8")
    assert 'id="tutorials"' not in page  # e.g. a compare report: no tutorials section at all


def test_corrupt_executed_tutorial_is_listed_not_fatal(tmp_path, capsys):
    (tmp_path / "results" / "tutorials").mkdir(parents=True)
    (tmp_path / "results" / "tutorials" / "00_bad.ipynb").write_text("{not json", encoding="utf-8")
    (tmp_path / "results" / "tutorials" / "01_odd.ipynb").write_text('{"cells": 3}', encoding="utf-8")
    assert main(["figs", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err
    assert "tutorials/00_bad.ipynb: not a notebook: JSONDecodeError" in err
    assert "tutorials/01_odd.ipynb: not a notebook" in err


@pytest.mark.parametrize("results_exist, problem", [(False, "results directory"), (True, "tutorials folder")])
def test_figs_tutorials_on_a_missing_directory_is_named(tmp_path, capsys, results_exist, problem):
    results = tmp_path / "results"
    if results_exist:
        results.mkdir()
    assert main(["figs", str(results), "--tutorials", str(tmp_path / "no_docs")]) == 1
    err = capsys.readouterr().err
    assert problem in err and "does not exist" in err and "Traceback" not in err
