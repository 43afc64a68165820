"""Tests for the docs/ tutorials and their rendering into the report (``paper_figs.report`` Tutorials section).

Every tutorial is executed in a fresh kernel with the reference solutions swapped in; every exercise's checker must
accept the solution and reject both the unanswered placeholder and a perturbed answer (``execute_tutorial``). The
exercise convention itself is tested on small synthetic tutorials: a malformed file is an error naming the cell, a
checker that accepts anything is caught, a failing cell names itself, and an executed tutorial lands in the report
page with its figures, its solutions folded and its checkers hidden.
"""

from __future__ import annotations

import re
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("jupytext")
pytest.importorskip("nbclient")

from paper_figs import report  # noqa: E402
from paper_figs.report import execute_tutorial, load_tutorial, render_all, tutorial_paths, write_tutorials  # noqa: E402
from theory.errors import CheckpointError, InputError  # noqa: E402
from threegate.cli import main  # noqa: E402

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
TUTORIALS = {p.stem: p for p in tutorial_paths()}
# Under a minute each on one core; together more than the default tier's share, so the longer ones run in slow.
DEFAULT_TIER = ("00_overview", "01_gate1_kl_anchor")


def cell(kind: str, source: str, tags: tuple[str, ...] = ()) -> str:
    head = "```{code-cell} ipython3" if kind == "code" else "```{raw-cell}"
    meta = f":tags: [{', '.join(tags)}]\n" if tags else ""
    return f"{head}\n{meta}{textwrap.dedent(source).strip()}\n```\n"


def write_md(path: Path, *cells: str, title: str = "A synthetic tutorial") -> Path:
    path.write_text(HEADER + f"\n# {title}\n\nSome *text*.\n\n" + "\n".join(cells), encoding="utf-8")
    return path


EXERCISE = cell("code", "answer_x = None", ("exercise",))
SOLUTION = cell("raw", "answer_x = 6 * 7", ("solution",))
CHECKER = cell("code", "assert isinstance(answer_x, int) and answer_x == 42", ("checker", "remove-cell"))
PLOT = cell("code", """
    import matplotlib.pyplot as plt
    plt.plot([0, 1], [1, 0])
    print("plotted")
""")


# ---- the tutorials themselves ----------------------------------------------------------------------------------
def test_the_five_tutorials_exist_and_each_has_checked_exercises():
    assert set(TUTORIALS) == {"00_overview", "01_gate1_kl_anchor", "02_gate2_geometry", "03_gate3_precision",
                              "04_rl_vs_sft"}
    for name, path in TUTORIALS.items():
        nb, exercises = load_tutorial(path)
        assert 2 <= len(exercises) <= 3, name
        assert all(ex.solution and ex.checker and ex.answers for ex in exercises), name
        text = path.read_text(encoding="utf-8")
        assert "threegate explain" in text or name == "04_rl_vs_sft", f"{name} does not point to threegate explain"
        # every checker is hidden from the rendered page and every solution is a raw (never executed) cell
        for c in nb.cells:
            if "checker" in c.metadata.get("tags", []):
                assert "remove-cell" in c.metadata["tags"], name
        assert not [c for c in nb.cells if c.cell_type == "raw"], name


def _run(name: str):
    t = execute_tutorial(TUTORIALS[name])
    assert t.exercises and all(ex.checked for ex in t.exercises)
    assert all(ex.rejected == ("placeholder", "perturbed") for ex in t.exercises)
    errors = [o for c in t.notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert t.notebook.metadata["threegate"]["exercises"][0]["checked"] is True
    return t


@pytest.mark.parametrize("name", DEFAULT_TIER)
def test_tutorial_executes_and_its_checkers_accept_only_the_solution(name):
    _run(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(TUTORIALS) - set(DEFAULT_TIER)))
def test_long_tutorial_executes_and_its_checkers_accept_only_the_solution(name):
    _run(name)


# ---- the exercise convention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cells, problem", [
    ((EXERCISE, CHECKER), "has no 'solution' cell"),
    ((SOLUTION, CHECKER), "must follow its 'exercise' cell"),
    ((EXERCISE, SOLUTION), "has no 'checker' cell"),
    ((CHECKER, EXERCISE, SOLUTION), "'checker' cell with no exercise"),
    ((cell("code", "x = 1", ("exercise",)), SOLUTION, CHECKER), "must assign answer_*"),
    ((EXERCISE, cell("raw", "answer_y = 1", ("solution",)), CHECKER), "the solution assigns"),
])
def test_malformed_tutorial_is_named(tmp_path, cells, problem):
    with pytest.raises(InputError, match=re.escape(problem)):
        load_tutorial(write_md(tmp_path / "00_bad.md", *cells))


def test_missing_tutorial_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tutorial(tmp_path / "nope.md")


def test_solution_is_swapped_in_and_the_placeholder_kept_for_the_page(tmp_path):
    nb, (ex,) = load_tutorial(write_md(tmp_path / "00_ok.md", EXERCISE, SOLUTION, CHECKER))
    ex_cell = next(c for c in nb.cells if "exercise" in c.metadata.get("tags", []))
    assert ex_cell.source == "answer_x = 6 * 7" and ex_cell.metadata["threegate_exercise"] == "answer_x = None"
    assert ex.answers == ("answer_x",) and "== 42" in ex.checker


def test_perturbation_changes_every_kind_of_answer():
    import fractions

    import numpy as np

    ns: dict = {}
    exec(report._PERTURB, ns)
    perturb = ns["_threegate_perturb"]
    for x in (True, 3, fractions.Fraction(1, 3), 0.25, 0.0, "thm3.3", (1.0, 2), [4], {"a"}, {0: 0.5},
              np.array([1.0, 2.0])):
        y = perturb(x)
        assert type(y) is type(x)
        assert not np.array_equal(y, x) if isinstance(x, np.ndarray) else y != x
    with pytest.raises(TypeError, match="NoneType"):
        perturb(None)


def test_a_checker_that_accepts_a_wrong_answer_is_caught(tmp_path):
    lax = cell("code", "assert answer_x is not None", ("checker", "remove-cell"))  # accepts the perturbed 43
    path = write_md(tmp_path / "00_lax.md", EXERCISE, SOLUTION, lax)
    with pytest.raises(InputError, match=r"accepts a wrong answer \(perturbed\)"):
        execute_tutorial(path)


def test_a_failing_cell_is_named(tmp_path):
    path = write_md(tmp_path / "00_fail.md", cell("code", "1 / 0"), EXERCISE, SOLUTION, CHECKER)
    with pytest.raises(InputError, match=r"00_fail.md, cell \d+ failed: ZeroDivisionError"):
        execute_tutorial(path)


# ---- rendering into the report ---------------------------------------------------------------------------------
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


def test_executed_tutorials_are_rendered_into_the_report(tmp_path, monkeypatch):
    # CI exports MPLBACKEND=Agg; the kernel must still display figures inline (this failed CI once)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    docs = tmp_path / "docs"
    docs.mkdir()
    write_md(docs / "00_demo.md", PLOT, EXERCISE, SOLUTION, CHECKER, title="Demo tutorial")
    results = tmp_path / "results"
    written, failed = write_tutorials(results / "tutorials", docs)
    assert failed == [] and [p.name for p in written] == ["00_demo.ipynb"]

    rep = render_all(results, tmp_path / "out")
    page = rep.page.read_text(encoding="utf-8")
    parsed = Page()
    parsed.feed(page)
    assert 'id="tutorials"' in page and "tutorial-00-demo" in parsed.sections
    summary = next(s for s in parsed.summaries if "Demo tutorial" in s)
    assert "1/1 exercises checked" in summary and "placeholder and perturbed" in summary
    assert "answer_x = None" in page and "answer_x = 6 * 7" in page  # the exercise, and its folded solution
    assert "== 42" not in page  # the checker is hidden
    assert "plotted" in page and "<em>text</em>" in page
    tutorial_imgs = [s for s in parsed.imgs if s.startswith("tutorials/")]
    assert tutorial_imgs and all((tmp_path / "out" / s).stat().st_size > 1000 for s in tutorial_imgs)
    assert rep.errors == []
    import os
    assert os.environ["MPLBACKEND"] == "Agg"  # the kernel's backend did not leak into this process


def test_report_without_executed_tutorials_says_how_to_make_them(tmp_path):
    (tmp_path / "results").mkdir()
    page = render_all(tmp_path / "results", tmp_path / "out").page.read_text(encoding="utf-8")
    assert "No executed tutorials" in page and "--tutorials" in page and "docs/00_overview.md" in page


def test_corrupt_executed_tutorial_is_listed_not_fatal(tmp_path):
    (tmp_path / "results" / "tutorials").mkdir(parents=True)
    (tmp_path / "results" / "tutorials" / "00_bad.ipynb").write_text("{not json", encoding="utf-8")
    rep = render_all(tmp_path / "results", tmp_path / "out")
    assert any("00_bad.ipynb" in src for src, _ in rep.errors)


def test_figs_tutorials_on_a_missing_directory_is_named(tmp_path, capsys):
    assert main(["figs", str(tmp_path / "missing"), "--tutorials"]) == 1
    assert "does not exist" in capsys.readouterr().err
