"""The ``docs/`` tutorials: executing them and grading their exercises (the suite, ``threegate figs --tutorials``).

Layout of a tutorial (``docs/NN_name.md``, jupytext MyST Markdown, opened in Jupyter as a notebook):

- a code cell tagged ``exercise`` assigns ``answer_*`` placeholders (``None``) for the student to fill in;
- the code cell after it, tagged ``checker``, is one call ``check(n)``: it prints ``answer_x: correct`` for a right
  answer, and for a blank or wrong one ``answer_x: not right yet - <why>. Hint: <hint>`` without the expected value;
- ``check`` itself comes from ``threegate.answers.answer_checker("NN_name", globals())`` earlier in the notebook.

The answer key ``docs/solutions/NN_name.py`` is not part of the notebook: ``SOLUTIONS[n]`` holds the reference
solution of exercise n (code run in the notebook's namespace) and ``CHECKS[n](nb)`` returns the expected answers
(``threegate.answers.Expected``, computed from the notebook's variables ``nb``, by another route than the solution
where there is one). The student's kernel imports the key only to check; the suite swaps ``SOLUTIONS`` in.

:func:`execute_tutorial` is what the suite and ``threegate figs RESULTS_DIR --tutorials [DOCS_DIR]`` run: the
Markdown converted to ``.ipynb`` by jupytext (as ``jupytext --to ipynb`` does for a student), every exercise cell
replaced by its solution, then executed by nbclient in a fresh ``python3`` kernel. At each checker it checks the
feedback on three answers: the solution (must print "correct"), the unanswered placeholder and a perturbed answer
(an int + 1, a float * 1.05 + 1e-3, a bool negated, ...; both must be rejected, and the feedback must not contain
the expected value in any usual spelling). :func:`read_executed` turns the saved notebooks into the report's
``paper_figs.report.TutorialPage`` records.

The notebook tools (jupytext, nbformat, nbclient, ipykernel) are an optional extra: they are imported inside the
functions that execute tutorials, and :func:`require_notebook_tools` names the extra when one is missing. Checking
answers in a kernel needs none of them.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

from paper_figs.report import TutorialPage
from theory.errors import CheckpointError, InputError, MissingExtraError, ThreegateError
from threegate.answers import CORRECT, KEYS_ENV, NOT_YET, SOLUTIONS_DIR, reveals

__all__ = ["TUTORIAL_GLOB", "NOTEBOOK_EXTRA", "tutorial_paths", "find_docs_dir", "answer_key_path",
           "read_solutions", "require_notebook_tools", "Exercise", "ExecutedTutorial", "load_tutorial",
           "feedback_problem", "execute_tutorial", "write_tutorials", "read_executed"]

TUTORIAL_GLOB = "[0-9][0-9]_*.md"
NOTEBOOK_EXTRA = 'pip install -e ".[tutorials]"'
NOTEBOOK_MODULES = ("jupytext", "nbformat", "nbclient", "ipykernel")
_ANSWER = re.compile(r"^(answer_\w+)\s*=", re.M)
_CHECK_CALL = re.compile(r"^\s*(\w+)\((\d+)\)\s*$")
_FEEDBACK = re.compile(rf"^(answer_\w+): ({CORRECT}|{NOT_YET})\b", re.M)


# ----------------------------------------------------------------------------------- finding and reading files
def tutorial_paths(docs_dir: str | os.PathLike) -> list[Path]:
    """The tutorials ``docs_dir/NN_name.md`` in order."""
    return sorted(Path(docs_dir).glob(TUTORIAL_GLOB))


def find_docs_dir(docs_dir: str | os.PathLike | None = None) -> Path:
    """The folder of tutorials: ``docs_dir`` when given, else ``./docs``, else the ``docs/`` of the checkout this
    package runs from. A folder that is missing or holds no ``NN_name.md`` is a one-line error."""
    if docs_dir is not None:
        p = Path(docs_dir)
        if not p.is_dir():
            raise CheckpointError(f"tutorials folder {str(p)!r} does not exist or is not a directory")
        if not tutorial_paths(p):
            raise InputError(f"tutorials folder {str(p)!r} holds no tutorial ({TUTORIAL_GLOB})")
        return p
    candidates = [Path("docs")]
    checkout = Path(__file__).resolve().parent.parent  # a source checkout (not an installed wheel) has docs/ here
    if (checkout / "pyproject.toml").is_file():
        candidates.append(checkout / "docs")
    for c in candidates:
        if tutorial_paths(c):
            return c
    raise CheckpointError(f"no tutorials found in {' or '.join(repr(str(c)) for c in candidates)}; pass the folder: "
                          "threegate figs RESULTS_DIR --tutorials DOCS_DIR")


def answer_key_path(tutorial: Path) -> Path:
    """``docs/solutions/NN_name.py`` for ``docs/NN_name.md``."""
    return tutorial.parent / SOLUTIONS_DIR / f"{tutorial.stem}.py"


def read_solutions(key: Path) -> dict[int, str]:
    """``SOLUTIONS`` of an answer key, read as a literal (the key is not executed in this process)."""
    if not key.is_file():
        raise CheckpointError(f"answer key {str(key)!r} does not exist")
    try:
        tree = ast.parse(key.read_text(encoding="utf-8"), str(key))
    except SyntaxError as e:
        raise InputError(f"answer key {key.name}: not valid Python ({e.msg}, line {e.lineno})") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SOLUTIONS"]:
            try:
                sols = ast.literal_eval(node.value)
            except ValueError:
                break
            if isinstance(sols, dict) and all(isinstance(k, int) and isinstance(v, str) for k, v in sols.items()):
                return {k: v.strip("\n") for k, v in sols.items()}
            break
    raise InputError(f"answer key {key.name}: needs SOLUTIONS = {{exercise number: 'code', ...}} (a literal)")


def require_notebook_tools() -> None:
    """Raise ``MissingExtraError`` naming the extra to install when a notebook tool is missing."""
    missing = []
    for name in NOTEBOOK_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"executing the tutorials needs {', '.join(missing)} (not installed): "
                                f"{NOTEBOOK_EXTRA}")


# ------------------------------------------------------------------------------------- loading and executing
@dataclass
class Exercise:
    number: int
    answers: tuple[str, ...]  # the names the exercise cell assigns
    placeholder: str  # the exercise cell as the student sees it
    solution: str  # SOLUTIONS[number] of the answer key
    checker: str = ""  # the checker cell's source, ``check(number)``
    checked: bool = False  # the checker said "correct" to every answer of the solution
    rejected: tuple[str, ...] = ()  # wrong answers it rejected without revealing the value: "placeholder", ...
    feedback: dict[str, str] = field(default_factory=dict)  # what the checker printed, per answer kind
    revealing: tuple[str, ...] = ()  # spellings of the expected values (``value_forms``) searched in the feedback


@dataclass
class ExecutedTutorial:
    path: Path
    title: str
    notebook: Any  # nbformat notebook (solutions swapped in, outputs filled)
    exercises: list[Exercise]
    seconds: float


def _tags(cell: Mapping) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _source(cell: Mapping) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else str(s)


def _title(cells: list) -> str:
    for c in cells:
        if c.get("cell_type") == "markdown":
            for line in _source(c).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "tutorial"


def load_tutorial(path: str | os.PathLike, key: str | os.PathLike | None = None):
    """The notebook a student gets (``jupytext`` MyST -> ``.ipynb``) with every exercise cell replaced by its
    solution from the answer key (default ``docs/solutions/NN_name.py``); returns ``(notebook, exercises)``.

    Each exercise cell keeps its placeholder in ``metadata.threegate_exercise``. A solution cell inside the
    notebook, an exercise without ``answer_*`` or without its checker, a checker that is not ``check(n)`` for the
    exercise before it, or a solution assigning other names than its exercise is an ``InputError`` naming the cell.
    """
    require_notebook_tools()
    import jupytext  # notebook tools: an optional extra (see require_notebook_tools)
    import nbformat

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tutorial {str(path)!r} does not exist")
    key_path = Path(key) if key is not None else answer_key_path(path)
    solutions = read_solutions(key_path)
    nb = nbformat.reads(jupytext.writes(jupytext.read(path, fmt="md:myst"), fmt="ipynb"), as_version=4)
    exercises: list[Exercise] = []
    for i, c in enumerate(nb.cells):
        tags, where = _tags(c), f"{path.name}, cell {i}"
        if "solution" in tags or (c.cell_type == "raw" and _ANSWER.search(c.source)):
            raise InputError(f"{where}: solutions belong in the answer key {key_path.name}, not in the notebook")
        if "exercise" in tags:
            if c.cell_type != "code":
                raise InputError(f"{where}: an 'exercise' cell must be a code cell")
            if exercises and not exercises[-1].checker:
                raise InputError(f"{where}: exercise {exercises[-1].number} has no 'checker' cell before the next")
            names = tuple(_ANSWER.findall(c.source))
            if not names:
                raise InputError(f"{where}: an 'exercise' cell must assign answer_* placeholders")
            n = len(exercises) + 1
            if n not in solutions:
                raise InputError(f"{key_path.name}: SOLUTIONS has no entry {n} for the exercise in {where}")
            sol_names = tuple(_ANSWER.findall(solutions[n]))
            if set(sol_names) != set(names):
                raise InputError(f"{key_path.name}: SOLUTIONS[{n}] assigns {sol_names}, its exercise {names}")
            exercises.append(Exercise(n, names, c.source, solutions[n]))
            c.metadata["threegate_exercise"] = c.source
            c.source = solutions[n]
        elif "checker" in tags:
            m = _CHECK_CALL.match(c.source)
            if not exercises or exercises[-1].checker:
                raise InputError(f"{where}: a 'checker' cell with no exercise before it")
            if m is None or int(m.group(2)) != exercises[-1].number:
                raise InputError(f"{where}: a 'checker' cell must be check({exercises[-1].number}), got "
                                 f"{c.source.strip()!r}")
            exercises[-1].checker = c.source
    if exercises and not exercises[-1].checker:
        raise InputError(f"{path.name}: exercise {exercises[-1].number} has no 'checker' cell after it")
    extra = sorted(set(solutions) - {ex.number for ex in exercises})
    if extra:
        raise InputError(f"{key_path.name}: SOLUTIONS {extra} have no exercise in {path.name}")
    nbformat.validate(nb)
    return nb, exercises


@contextlib.contextmanager
def _kernel_env(key_dir: Path) -> Iterator[None]:
    """The environment a tutorial kernel inherits: where its answer keys are; this process's packages first on
    ``PYTHONPATH`` (the tutorials run against the code that runs them, a checkout or an install); one BLAS / OpenMP
    thread unless the caller chose otherwise (tiny matrices; threads only oversubscribe a shared CPU); and the
    inline matplotlib backend (a kernel that inherits ``MPLBACKEND=Agg`` from CI would draw every figure to
    nowhere)."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND", KEYS_ENV, "PYTHONPATH")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys[:3]:
        os.environ.setdefault(k, "1")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ[KEYS_ENV] = str(key_dir.resolve())
    packages = str(Path(__file__).resolve().parent.parent)  # the folder holding threegate/, theory/, ...
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (packages, old["PYTHONPATH"]) if p)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_PERTURB = '''
def _threegate_perturb(x):
    """A nearby wrong answer of the same kind (the checker must reject it)."""
    import fractions
    import numpy as np
    if isinstance(x, (bool, np.bool_)):
        return not x
    if isinstance(x, (int, np.integer)):
        return x + 1
    if isinstance(x, fractions.Fraction):
        return x * fractions.Fraction(21, 20) + fractions.Fraction(1, 1000)
    if isinstance(x, (float, np.floating)):
        return float(x) * 1.05 + 1e-3
    if isinstance(x, str):
        return x + "?"
    if isinstance(x, (tuple, list)) and len(x):
        return type(x)([_threegate_perturb(x[0]), *x[1:]])
    if isinstance(x, dict) and x:
        first = next(iter(x))
        return {**x, first: _threegate_perturb(x[first])}
    if isinstance(x, (set, frozenset)):
        return type(x)(x ^ {"?"})
    if isinstance(x, np.ndarray) and x.size:
        y = x.copy()
        y.flat[0] = _threegate_perturb(y.flat[0].item())
        return y
    raise TypeError(f"no perturbation for an answer of type {type(x).__name__}")
'''


def _stdout(outputs: list) -> str:
    return "".join(_source({"source": o.get("text", "")}) for o in outputs
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _verdicts(text: str) -> dict[str, str]:
    return {name: verdict for name, verdict in _FEEDBACK.findall(text)}


def feedback_problem(answers: tuple[str, ...], kind: str, text: str, revealing: Collection[str] = ()) -> str | None:
    """What is wrong with a checker's printed feedback ``text`` on the ``kind`` of answer ("solution",
    "placeholder" or "perturbed"), or None: the solution must get ``correct`` for every answer; a wrong answer
    ``not right yet`` for every answer, with none of the ``revealing`` spellings of the expected values.

    >>> feedback_problem(("answer_1",), "solution", "answer_1: correct\\n") is None
    True
    >>> feedback_problem(("answer_1",), "perturbed", "answer_1: correct\\n")
    'accepts a wrong answer (perturbed) for answer_1'
    """
    said = _verdicts(text)
    if kind == "solution":
        wrong = [a for a in answers if said.get(a) != CORRECT]
        return (f"does not say 'correct' to the reference solution for {', '.join(wrong)}: {text.strip()!r}"
                if wrong else None)
    accepted = [a for a in answers if said.get(a) != NOT_YET]
    if accepted:
        return f"accepts a wrong answer ({kind}) for {', '.join(accepted)}"
    leak = reveals(text, set(revealing))
    return None if leak is None else f"reveals the expected value {leak!r} on a {kind} answer"


def execute_tutorial(path: str | os.PathLike, *, check_wrong: bool = True, timeout: int = 600,
                     cwd: str | os.PathLike | None = None) -> ExecutedTutorial:
    """Execute a tutorial as a student's notebook with the solutions swapped in (:func:`load_tutorial`), in a
    fresh ``python3`` kernel whose working directory is ``cwd`` (default: the folder above ``docs/``).

    At each checker the printed feedback must say ``correct`` to every answer of the solution. With
    ``check_wrong`` the checker then runs on the placeholder and on a perturbed answer; each answer must be
    rejected and the feedback must not reveal the expected value (``threegate.answers.value_forms``, ``reveals``);
    the solution is restored. A failing cell or a checker breaking one of these rules raises ``InputError`` naming it.
    """
    require_notebook_tools()
    import nbformat  # notebook tools: an optional extra (see require_notebook_tools)
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb, exercises = load_tutorial(path)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(Path(cwd) if cwd else path.resolve().parent.parent)}})

    def side(source: str) -> str:  # run code in the kernel without touching the notebook's cells; its stdout
        nb.cells.append(nbformat.v4.new_code_cell(source))
        try:
            client.execute_cell(nb.cells[-1], len(nb.cells) - 1, store_history=False)
            return _stdout(nb.cells[-1].outputs)
        finally:
            nb.cells.pop()

    def fail(ex: Exercise, what: str) -> InputError:
        return InputError(f"tutorial {path.name}: the checker of exercise {ex.number} ({', '.join(ex.answers)}) "
                          f"{what}")

    by_checker = {ex.checker: ex for ex in exercises}
    t0 = time.perf_counter()
    with _kernel_env(answer_key_path(path).parent), client.setup_kernel():
        side(_PERTURB)
        for i, cell in enumerate(list(nb.cells)):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, i)
            except CellExecutionError as e:
                raise InputError(f"tutorial {path.name}, cell {i} failed: {e.ename}: {e.evalue}") from None
            ex = by_checker.get(cell.source) if "checker" in _tags(cell) else None
            if ex is None:
                continue
            ex.feedback["solution"] = _stdout(cell.outputs)
            problem = feedback_problem(ex.answers, "solution", ex.feedback["solution"])
            if problem:
                raise fail(ex, problem)
            ex.checked = True
            if not check_wrong:
                continue
            callee = _CHECK_CALL.match(ex.checker).group(1)  # type: ignore[union-attr]
            forms = side(f"import json as _j, threegate.answers as _a\nprint(_j.dumps(sorted(_a.value_forms("
                         f"{callee}.expected({ex.number})))))")
            ex.revealing = tuple(json.loads(forms))
            trials = {"placeholder": ex.placeholder,
                      "perturbed": "\n".join(f"{a} = _threegate_perturb({a})" for a in ex.answers)}
            for kind, code in trials.items():
                side(code)
                try:
                    text = side(ex.checker)
                except CellExecutionError as e:
                    raise fail(ex, f"fails on a {kind} answer: {e.ename}: {e.evalue}") from None
                ex.feedback[kind] = text
                problem = feedback_problem(ex.answers, kind, text, set(ex.revealing))
                if problem:
                    raise fail(ex, problem)
                ex.rejected += (kind,)
                side(ex.solution)  # restore the reference answers
    seconds = time.perf_counter() - t0
    nb.metadata["threegate"] = {
        "source": path.name,
        "exercises": [{"answers": list(ex.answers), "checked": ex.checked, "rejected": list(ex.rejected),
                       "solution": ex.solution} for ex in exercises],
        "seconds": seconds,
    }
    return ExecutedTutorial(path, _title(nb.cells), nb, exercises, seconds)


def write_tutorials(out_dir: str | os.PathLike, docs_dir: str | os.PathLike, *, check_wrong: bool = True,
                    ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Execute every tutorial of ``docs_dir`` and save it as ``out_dir/NN_name.ipynb``; returns the written paths
    and ``(tutorial, error)`` for those that failed."""
    require_notebook_tools()
    import nbformat  # notebook tools: an optional extra (see require_notebook_tools)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, errors = [], []
    for p in tutorial_paths(docs_dir):
        try:
            t = execute_tutorial(p, check_wrong=check_wrong)
        except ThreegateError as e:
            errors.append((p.name, str(e)))
            continue
        dest = out_dir / f"{p.stem}.ipynb"
        nbformat.write(t.notebook, dest)
        written.append(dest)
    return written, errors


# ------------------------------------------------------------------------------------ for the report (no tools)
def _status(meta: Mapping) -> str:
    exs = meta.get("exercises", [])
    ok = sum(bool(x.get("checked")) for x in exs)
    rejected = [x.get("rejected") for x in exs]
    return (f"{ok}/{len(exs)} exercises checked against the answer key"
            + (f", each checker rejected {' and '.join(rejected[0])} answers without revealing the value"
               if exs and all(rejected) else "")
            + (f"; executed in {meta['seconds']:.0f} s" if isinstance(meta.get("seconds"), (int, float)) else ""))


def _page_cells(cells: list) -> list[dict]:
    """Plain dicts for ``paper_figs.report``: an exercise cell's ``source`` is its solution, ``exercise`` the
    placeholder the student sees."""
    return [{"cell_type": c.get("cell_type", ""), "source": _source(c), "tags": _tags(c),
             "outputs": list(c.get("outputs", [])), "exercise": c.get("metadata", {}).get("threegate_exercise")}
            for c in cells]


def read_executed(results_dir: str | os.PathLike) -> list[TutorialPage]:
    """The executed tutorials saved in ``results_dir/tutorials/*.ipynb`` as report pages (plain JSON reading; no
    notebook tools needed). A file that is not a notebook becomes a page carrying the error."""
    pages = []
    for p in sorted((Path(results_dir) / "tutorials").glob("*.ipynb")):
        rel = f"tutorials/{p.name}"
        try:
            nb = json.loads(p.read_text(encoding="utf-8"))
            if not (isinstance(nb, dict) and isinstance(nb.get("cells"), list)):
                raise ValueError("no list of cells")
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            pages.append(TutorialPage(p.stem, rel, p.stem, "", [], error=f"not a notebook: {type(e).__name__}: {e}"))
            continue
        meta = nb.get("metadata", {}).get("threegate", {})
        pages.append(TutorialPage(p.stem, f"docs/{meta.get('source', p.stem + '.md')}", _title(nb["cells"]),
                                  _status(meta), _page_cells(nb["cells"])))
    return pages

