"""``threegate figs RESULTS_DIR --out DIR``: render every figure the results directory has data for, and a static
HTML report (``index.html``: figures with captions, the verdict table, each result's statement).

Tables are found by file name or columns (see ``paper_figs.schemas``), CSV or Parquet, anywhere under RESULTS_DIR
(the output directory itself is skipped). ``verify.csv`` / ``verify.json`` (written by ``threegate verify``) give the
verdict table. A table that cannot be drawn (missing column, NaN where none is allowed) is listed on the page with
the error that names the problem; the other figures are still written, and the command exits 1.

Python: ``write_report(results_dir, out_dir) -> Path`` (the path of ``index.html``), called by ``threegate verify``.

Tutorials: ``threegate figs RESULTS_DIR --tutorials`` first executes the ``docs/NN_*.md`` tutorials (jupytext MyST,
exercises checked, see ``execute_tutorial``) into ``RESULTS_DIR/tutorials/*.ipynb``; every executed notebook found
there is rendered into the page's Tutorials section.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
from matplotlib.figure import Figure

from paper_figs import paper_figs as pf
from paper_figs import live_figs, schemas, theory_figs
from theory.errors import CheckpointError, InputError, ThreegateError

__all__ = ["add_arguments", "run", "write_report", "render_all", "RenderedFigure", "Report",
           "tutorial_paths", "load_tutorial", "execute_tutorial", "write_tutorials", "tutorial_html",
           "Exercise", "ExecutedTutorial"]

VERIFY_COLUMNS = ("result_id", "instances", "worst_ratio", "verdict", "notes")


@dataclass
class RenderedFigure:
    slug: str
    title: str
    caption: str
    png: Path
    pdf: Path
    source: str  # table file the figure was drawn from


@dataclass
class Report:
    figures: list[RenderedFigure] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (source, message)
    unrecognised: list[str] = field(default_factory=list)
    verdicts: pd.DataFrame | None = None
    page: Path | None = None
    tutorials: str = ""  # HTML of the Tutorials section


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="directory with results tables (CSV / Parquet)")
    parser.add_argument("--out", default=None, help="output directory (default: RESULTS_DIR/report)")
    parser.add_argument("--tutorials", action="store_true",
                        help="first execute the docs/ tutorials (exercises checked) into RESULTS_DIR/tutorials")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.results_dir) / "report"
    failed = []
    if getattr(args, "tutorials", False):
        if not Path(args.results_dir).is_dir():
            raise CheckpointError(f"results directory {str(args.results_dir)!r} does not exist or is not a directory")
        written, failed = write_tutorials(Path(args.results_dir) / "tutorials")
        for name, msg in failed:
            print(f"threegate figs: tutorial {name} failed: {msg}", file=sys.stderr)
        print(f"threegate figs: {len(written)} tutorial(s) executed")
    rep = render_all(args.results_dir, out)
    for src, msg in rep.errors:
        print(f"threegate figs: could not draw {src}: {msg}", file=sys.stderr)
    print(f"threegate figs: {len(rep.figures)} figure(s) written; report: {rep.page}")
    return 1 if rep.errors or failed else 0


def write_report(results_dir: str | Path, out_dir: str | Path) -> Path:
    """Render all figures found under ``results_dir`` into ``out_dir`` and return the path of ``index.html``."""
    return render_all(results_dir, out_dir).page  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "figure"


def _discover(results_dir: Path, out_dir: Path) -> list[Path]:
    """CSV / Parquet files under results_dir, outside out_dir; of a ``x.csv`` + ``x.parquet`` twin pair (as
    ``threegate compare`` writes) only the Parquet one, so each table is drawn once."""
    out_res = out_dir.resolve()
    found = []
    for p in sorted(results_dir.rglob("*")):
        if p.suffix not in (".csv", ".parquet") or not p.is_file():
            continue
        if out_res == p.resolve().parent or out_res in p.resolve().parents:
            continue
        if p.suffix == ".csv" and p.with_suffix(".parquet").is_file():
            continue
        found.append(p)
    return found


def _load_verdicts(results_dir: Path) -> pd.DataFrame | None:
    csv, js = results_dir / "verify.csv", results_dir / "verify.json"
    if csv.is_file():
        df = schemas.read_table(csv)
    elif js.is_file():
        try:
            df = pd.DataFrame(json.loads(js.read_text()))
        except (json.JSONDecodeError, ValueError) as e:
            raise InputError(f"verdict file {str(js)!r} is not a JSON list of rows: {e}") from e
    else:
        return None
    missing = [c for c in ("result_id", "verdict") if c not in df.columns]
    if missing:
        raise InputError(f"verdict table in {str(results_dir)!r} lacks column(s) {missing}")
    return df


def render_all(results_dir: str | Path, out_dir: str | Path) -> Report:
    """Find tables, draw every figure they support (PNG + PDF), write ``index.html``; return what was done."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not results_dir.is_dir():
        raise CheckpointError(f"results directory {str(results_dir)!r} does not exist or is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = Report()
    tables: dict[str, list[tuple[Path, pd.DataFrame]]] = {}
    for path in _discover(results_dir, out_dir):
        if path.stem == "verify":
            continue
        rel = str(path.relative_to(results_dir))
        try:
            df = schemas.read_table(path)
        except ThreegateError as e:
            rep.errors.append((rel, str(e)))
            continue
        name = schemas.identify(df, path)
        if name is None:
            rep.unrecognised.append(rel)
            continue
        tables.setdefault(name, []).append((path, df))
    try:
        rep.verdicts = _load_verdicts(results_dir)
    except ThreegateError as e:
        rep.errors.append(("verify", str(e)))

    jobs: list[tuple[str, str, Callable[[], Figure]]] = []  # (source, slug, draw)
    for path, df in tables.get("checks", []):
        jobs.extend(_check_jobs(results_dir, path, df, rep))
    for path, df in tables.get("bf16_updates", []):
        jobs.append((str(path.relative_to(results_dir)), f"gate3-threshold-{_slug(path.stem)}",
                     lambda df=df: theory_figs.fig_bf16_threshold(df)))
    angles = tables.get("angles", [])
    for name, (fn, label) in {**pf.PAPER_FIGURES, **live_figs.LIVE_FIGURES}.items():
        for path, df in tables.get(name, []):
            if name == "spectrum":
                ang = angles[0][1] if angles else None
                draw = (lambda df=df, ang=ang: pf.fig4_spectrum(df, ang))
            else:
                draw = (lambda df=df, fn=fn: fn(df))
            jobs.append((str(path.relative_to(results_dir)), f"{_slug(label)}-{_slug(path.stem)}", draw))

    used: set[str] = set()
    for source, slug, draw in jobs:
        base, n = slug, 1
        while slug in used:  # same file stem in two subdirectories: keep both figures
            n += 1
            slug = f"{base}-{n}"
        used.add(slug)
        try:
            fig = draw()
        except ThreegateError as e:
            rep.errors.append((source, str(e)))
            continue
        except Exception as e:  # a figure that breaks must not take the rest of the report with it
            rep.errors.append((source, f"{type(e).__name__}: {e}"))
            continue
        png, pdf = out_dir / f"{slug}.png", out_dir / f"{slug}.pdf"
        fig.savefig(png)
        fig.savefig(pdf)
        rep.figures.append(RenderedFigure(slug, getattr(fig, "threegate_title", slug),
                                          getattr(fig, "threegate_caption", ""), png, pdf, source))
    rep.tutorials = _tutorials_section(results_dir, out_dir, rep)
    rep.page = out_dir / "index.html"
    rep.page.write_text(_html(rep, results_dir), encoding="utf-8")
    return rep


def _check_jobs(results_dir: Path, path: Path, df: pd.DataFrame, rep: Report):
    """Scatter + tightness per result id; Thm 3.3 forms side by side. ``threegate verify`` mixes theory
    campaigns and training-step checks in one table (column ``source``): each source gets its own figures."""
    src = str(path.relative_to(results_dir))
    if "source" in df.columns and df["source"].nunique() > 1:
        parts = [(str(s), df[df["source"] == s].copy()) for s in sorted(df["source"].dropna().unique(), key=str)]
    else:
        parts = [("", df)]
    jobs = []
    for source, sub in parts:
        sub.attrs = dict(df.attrs)
        tag = _slug(path.stem) + (f"-{_slug(source)}" if source else "")
        try:
            ids = theory_figs.numeric_result_ids(sub)
        except ThreegateError as e:
            rep.errors.append((src, str(e)))
            continue
        if any(rid in ids for rid, _ in theory_figs.THM33_FORMS):
            jobs.append((src, f"thm3-3-forms-{tag}", lambda sub=sub: theory_figs.fig_thm33_forms(sub)))
        for rid in ids:
            jobs.append((src, f"check-{_slug(rid)}-{tag}",
                         lambda rid=rid, sub=sub: theory_figs.fig_theory_vs_empirical(sub, rid)))
    return jobs


# --------------------------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict-holds { color: #009E73; font-weight: 600; }
.verdict-violated { color: #D55E00; font-weight: 600; }
.verdict-other { color: #555; }
figure { margin: 1.5em 0; border: 1px solid #e5e5e5; padding: .8em; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: .9em; margin-top: .5em; }
.error { color: #D55E00; }
code { background: #f6f6f6; padding: 0 .2em; }
pre { background: #f8f8f8; padding: .5em; overflow-x: auto; font-size: .85em; }
pre.out { background: #fff; border-left: 3px solid #ccc; }
pre.exercise { border-left: 3px solid #0072B2; }
section.tutorial { margin: 1em 0; }
"""


def _e(x: object) -> str:
    return html.escape("" if x is None or (isinstance(x, float) and x != x) else str(x))


def _verdict_class(v: str) -> str:
    return {"holds": "verdict-holds", "violated": "verdict-violated"}.get(v, "verdict-other")


def _verdict_table(df: pd.DataFrame) -> str:
    cols = [c for c in VERIFY_COLUMNS if c in df.columns] + [c for c in ("source", "gate") if c in df.columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if c == "verdict":
                cells.append(f'<td class="{_verdict_class(str(v))}">{_e(v)}</td>')
            elif isinstance(v, float):
                cells.append(f'<td class="num">{_e(f"{v:.4g}" if v == v else "")}</td>')
            else:
                cells.append(f"<td>{_e(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="verdicts"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _statements() -> str:
    try:
        from theory import RESULTS
    except Exception as e:  # pragma: no cover - the report still renders without the theory package
        return f'<p class="error">theory.RESULTS could not be imported: {_e(e)}</p>'
    if not RESULTS:
        return "<p>No results registered.</p>"
    rows = []
    for rid, r in sorted(RESULTS.items(), key=lambda kv: (kv[1].gate, kv[0])):
        assum = "; ".join(r.assumptions)
        rows.append(f'<tr id="stmt-{_e(_slug(rid))}"><td><code>{_e(rid)}</code></td><td>{_e(r.gate)}</td>'
                    f"<td>{_e(r.paper_ref)}</td><td>{_e(r.statement)}</td><td>{_e(assum)}</td>"
                    f"<td>{'exact' if r.exact else 'as stated (first order)'}</td></tr>")
    return ('<table id="statements"><thead><tr><th>result id</th><th>gate</th><th>paper</th><th>statement</th>'
            "<th>assumptions</th><th>kind</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _html(rep: Report, results_dir: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>threegate report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>threegate report: <i>The Path Not Taken</i> (arXiv 2511.08567), theory vs measurement</h1>",
        f"<p>Results directory: <code>{_e(results_dir)}</code>. {len(rep.figures)} figure(s).</p>",
        "<h2>Verdicts</h2>",
    ]
    if rep.verdicts is not None:
        parts.append(_verdict_table(rep.verdicts))
    else:
        parts.append("<p>No <code>verify.csv</code> / <code>verify.json</code> in the results directory "
                     "(run <code>threegate verify</code>).</p>")
    if rep.errors:
        parts.append("<h2>Tables that could not be drawn</h2><ul>")
        parts += [f'<li class="error"><code>{_e(s)}</code>: {_e(m)}</li>' for s, m in rep.errors]
        parts.append("</ul>")
    parts.append("<h2>Figures</h2>")
    if not rep.figures:
        parts.append("<p>No table in the results directory matched a known schema.</p>")
    for f in rep.figures:
        parts.append(
            f'<figure id="fig-{_e(f.slug)}"><img src="{_e(f.png.name)}" alt="{_e(f.title)}" loading="eager">'
            f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)} "
            f'<span>(from <code>{_e(f.source)}</code>; <a href="{_e(f.pdf.name)}">PDF</a>)</span></figcaption>'
            "</figure>")
    if rep.unrecognised:
        parts.append("<p>Tables not matching any schema: " + ", ".join(f"<code>{_e(u)}</code>"
                                                                         for u in rep.unrecognised) + "</p>")
    parts.append(rep.tutorials)
    parts.append("<h2>Statements</h2>")
    parts.append(_statements())
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- Tutorials
# The tutorials are jupytext MyST Markdown files ``docs/NN_name.md`` (text diffs, no outputs in git). Exercises:
# a code cell tagged ``exercise`` assigns ``answer_*`` placeholders; the raw cell right after it, tagged
# ``solution``, holds the reference solution (raw: Jupyter never runs it, so it cannot overwrite a student's
# answer); a later code cell tagged ``checker`` (and ``remove-cell``) asserts the answers against references the
# project's functions compute. ``execute_tutorial`` runs a tutorial with the solutions swapped in and, after each
# checker passes, feeds it the unanswered placeholder and a perturbed answer, each of which it must reject.

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
TUTORIAL_GLOB = "[0-9][0-9]_*.md"
_ANSWER = re.compile(r"^(answer_\w+)\s*=", re.M)
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


@dataclass
class Exercise:
    answers: tuple[str, ...]  # the names the exercise cell assigns
    placeholder: str  # the exercise cell as the student sees it
    solution: str  # the reference solution (raw cell tagged ``solution``)
    checker: str  # the checker cell's source
    checked: bool = False  # the checker accepted the solution
    rejected: tuple[str, ...] = ()  # which wrong answers it rejected: "placeholder", "perturbed"


@dataclass
class ExecutedTutorial:
    path: Path
    title: str
    notebook: dict  # nbformat notebook (solutions swapped in, outputs filled)
    exercises: list[Exercise]
    seconds: float


def tutorial_paths(docs_dir: str | Path = DOCS_DIR) -> list[Path]:
    """The tutorials ``docs/NN_name.md`` in order."""
    return sorted(Path(docs_dir).glob(TUTORIAL_GLOB))


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _title(nb) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            for line in c.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "tutorial"


def load_tutorial(path: str | Path):
    """Read a tutorial (jupytext MyST) and pair its exercises: returns ``(notebook, exercises)`` with each
    exercise cell replaced by its solution (tag ``exercise`` kept) and the raw solution cells removed.

    A tutorial whose exercise has no solution, a solution without its exercise, an exercise without ``answer_*``
    assignments or without a later checker is an ``InputError`` naming the cell.
    """
    import jupytext
    import nbformat

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tutorial {str(path)!r} does not exist")
    nb = jupytext.read(path, fmt="md:myst")
    cells, exercises, pending = [], [], []  # pending: exercises still waiting for their checker
    for i, c in enumerate(nb.cells):
        tags = _tags(c)
        where = f"{path.name}, cell {i}"
        if "solution" in tags:
            prev = cells[-1] if cells else None
            if prev is None or "exercise" not in _tags(prev) or "threegate_exercise" in prev.metadata:
                raise InputError(f"{where}: a 'solution' cell must follow its 'exercise' cell directly")
            ex = exercises[-1]
            ex.solution = c.source
            names = tuple(_ANSWER.findall(c.source))
            if set(names) != set(ex.answers):
                raise InputError(f"{where}: the solution assigns {names}, its exercise {ex.answers}")
            prev.metadata["threegate_exercise"] = ex.placeholder
            prev.source = c.source
            continue
        if "exercise" in tags:
            if c.cell_type != "code":
                raise InputError(f"{where}: an 'exercise' cell must be a code cell")
            names = tuple(_ANSWER.findall(c.source))
            if not names:
                raise InputError(f"{where}: an 'exercise' cell must assign answer_* placeholders")
            ex = Exercise(names, c.source, "", "")
            exercises.append(ex)
            pending.append(ex)
        elif "checker" in tags:
            if not pending:
                raise InputError(f"{where}: a 'checker' cell with no exercise before it")
            for ex in pending:
                ex.checker = c.source
            pending = []
        cells.append(c)
    for ex in exercises:
        if not ex.solution:
            raise InputError(f"{path.name}: exercise {ex.answers} has no 'solution' cell after it")
        if not ex.checker:
            raise InputError(f"{path.name}: exercise {ex.answers} has no 'checker' cell after it")
    nb.cells = cells
    nbformat.validate(nb)
    return nb, exercises



def _one_thread_env():
    """Tutorial kernels inherit the environment: one BLAS / OpenMP thread unless the caller chose otherwise
    (tiny matrices; threads only oversubscribe a shared CPU), and always the inline matplotlib backend: a kernel
    that inherits ``MPLBACKEND=Agg`` (CI sets it for the figure code) would draw every tutorial figure to nowhere,
    and the report would show none of them."""
    import contextlib
    import os

    @contextlib.contextmanager
    def env():
        keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND")
        old = {k: os.environ.get(k) for k in keys}
        for k in keys[:3]:
            os.environ.setdefault(k, "1")
        os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return env()


def execute_tutorial(path: str | Path, *, check_wrong: bool = True, timeout: int = 600,
                     cwd: str | Path | None = None) -> ExecutedTutorial:
    """Execute a tutorial in a fresh ``python3`` kernel (working directory: the repository root) with every
    exercise's solution swapped in. After each checker passes, and with ``check_wrong``, the checker is run again
    on the exercise as written (the unanswered placeholder) and on a perturbed answer (``_threegate_perturb``:
    int + 1, float * 1.05 + 1e-3, bool negated, ...): it must reject both with an AssertionError; the solution is
    then restored. A failing cell, or a checker that accepts a wrong answer, raises ``InputError`` naming it.
    """
    import time

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb, exercises = load_tutorial(path)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or DOCS_DIR.parent)}})

    def side(source: str) -> None:  # run code in the kernel without touching the notebook's cells
        nb.cells.append(nbformat.v4.new_code_cell(source))
        try:
            client.execute_cell(nb.cells[-1], len(nb.cells) - 1, store_history=False)
        finally:
            nb.cells.pop()

    def rejects(setup: str, checker: str) -> bool:
        side(setup)
        try:
            side(checker)
        except CellExecutionError as e:
            return e.ename == "AssertionError"
        return False

    t0 = time.perf_counter()
    queue = list(exercises)
    with _one_thread_env(), client.setup_kernel():
        side(_PERTURB)
        for i, cell in enumerate(list(nb.cells)):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, i)
            except CellExecutionError as e:
                raise InputError(f"tutorial {path.name}, cell {i} failed: {e.ename}: {e.evalue}") from None
            if "checker" not in _tags(cell):
                continue
            done = [ex for ex in queue if ex.checker == cell.source]
            queue = [ex for ex in queue if ex.checker != cell.source]
            for ex in done:
                ex.checked = True
                if not check_wrong:
                    continue
                wrong = {"placeholder": ex.placeholder,
                         "perturbed": "\n".join(f"{a} = _threegate_perturb({a})" for a in ex.answers)}
                for kind, code in wrong.items():
                    if not rejects(code, ex.checker):
                        raise InputError(f"tutorial {path.name}: the checker of {', '.join(ex.answers)} accepts a "
                                         f"wrong answer ({kind})")
                    ex.rejected += (kind,)
                    side(ex.solution)  # restore the reference answers
                side(ex.checker)
    nb.metadata["threegate"] = {
        "source": path.name,
        "exercises": [{"answers": list(ex.answers), "checked": ex.checked, "rejected": list(ex.rejected)}
                      for ex in exercises],
        "seconds": time.perf_counter() - t0,
    }
    return ExecutedTutorial(path, _title(nb), nb, exercises, time.perf_counter() - t0)


def write_tutorials(out_dir: str | Path, docs_dir: str | Path = DOCS_DIR, *, check_wrong: bool = True,
                    ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Execute every tutorial and save it as ``out_dir/<name>.ipynb``; returns (written paths, (tutorial, error))
    for those that failed. ``render_all`` puts the notebooks of ``RESULTS_DIR/tutorials/`` into the report."""
    import nbformat

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


def _markdown_html(text: str) -> str:
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # markdown-it-py comes with jupytext; without it the text is shown as written
        return f"<pre>{_e(text)}</pre>"
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _output_html(out: dict, img_dir: Path, stem: str, n: int) -> str:
    import base64

    kind = out.get("output_type")
    if kind == "stream":
        return f'<pre class="out">{_e("".join(out.get("text", "")))}</pre>'
    if kind == "error":
        return f'<pre class="out error">{_e(out.get("ename"))}: {_e(out.get("evalue"))}</pre>'
    data = out.get("data", {})
    if "image/png" in data:
        img_dir.mkdir(parents=True, exist_ok=True)
        name = f"{stem}-{n}.png"
        (img_dir / name).write_bytes(base64.b64decode("".join(data["image/png"])))
        return f'<img src="{_e(img_dir.name)}/{_e(name)}" alt="output of {_e(stem)}" loading="eager">'
    if "text/html" in data and "<table" in "".join(data["text/html"]):  # pandas tables, written by pandas
        return f'<div class="out">{"".join(data["text/html"])}</div>'
    if "text/plain" in data:
        return f'<pre class="out">{_e("".join(data["text/plain"]))}</pre>'
    return ""


def tutorial_html(nb: dict, img_dir: Path, stem: str) -> str:
    """An executed tutorial as an HTML fragment: Markdown rendered, code with its outputs (PNG outputs written to
    ``img_dir``), each exercise as written with its solution folded below it; checker cells left out."""
    parts, n = [], 0
    for c in nb["cells"]:
        tags = c.get("metadata", {}).get("tags", [])
        src = "".join(c["source"])
        if c["cell_type"] == "markdown":
            parts.append(_markdown_html(src))
            continue
        if c["cell_type"] != "code" or "remove-cell" in tags or "checker" in tags:
            continue
        if "exercise" in tags:
            placeholder = c.get("metadata", {}).get("threegate_exercise", "")
            parts.append(f'<pre class="exercise"><code>{_e(placeholder)}</code></pre>'
                         f'<details><summary>Solution</summary><pre><code>{_e(src)}</code></pre></details>')
        else:
            parts.append(f"<pre><code>{_e(src)}</code></pre>")
        for out in c.get("outputs", []):
            n += 1
            parts.append(_output_html(out, img_dir, stem, n))
    return "\n".join(parts)


def _tutorials_section(results_dir: Path, out_dir: Path, rep: Report) -> str:
    """HTML of the Tutorials section: every executed notebook in ``results_dir/tutorials`` rendered in full
    (inside a collapsed <details>), with the status of its exercise checks."""
    import nbformat

    found = sorted((results_dir / "tutorials").glob("*.ipynb"))
    parts = ['<h2 id="tutorials">Tutorials</h2>']
    if not found:
        names = ", ".join(f"<code>docs/{_e(p.name)}</code>" for p in tutorial_paths()) or "none found"
        parts.append(f"<p>No executed tutorials in <code>{_e(results_dir / 'tutorials')}</code> "
                     f"(run <code>threegate figs {_e(results_dir)} --tutorials</code>). Sources: {names}.</p>")
        return "\n".join(parts)
    for p in found:
        try:
            nb = nbformat.read(p, as_version=4)
        except Exception as e:  # a corrupt notebook is listed, the rest of the report still renders
            rep.errors.append((str(p.relative_to(results_dir)), f"{type(e).__name__}: {e}"))
            continue
        meta = nb.metadata.get("threegate", {})
        exs = meta.get("exercises", [])
        ok = sum(bool(x.get("checked")) for x in exs)
        status = (f"{ok}/{len(exs)} exercises checked against the reference answers"
                  + (f", each checker rejected {' and '.join(exs[0].get('rejected', []))} answers"
                     if exs and all(x.get("rejected") for x in exs) else "")
                  + (f"; executed in {meta['seconds']:.0f} s" if "seconds" in meta else ""))
        body = tutorial_html(nb, out_dir / "tutorials", p.stem)
        parts.append(f'<section class="tutorial" id="tutorial-{_e(_slug(p.stem))}"><details>'
                     f"<summary><b>{_e(_title(nb))}</b> — <code>docs/{_e(meta.get('source', p.stem + '.md'))}"
                     f"</code>: {_e(status)}</summary>{body}</details></section>")
    return "\n".join(parts)
