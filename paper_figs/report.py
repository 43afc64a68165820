"""``threegate figs RESULTS_DIR --out DIR``: render every figure the results directory has data for, and a static
HTML report (``index.html``: figures with captions, the verdict table, each result's statement).

Tables are found by file name or columns (see ``paper_figs.schemas``), CSV or Parquet, anywhere under RESULTS_DIR
(the output directory itself is skipped). ``verify.csv`` / ``verify.json`` (written by ``threegate verify``) give the
verdict table. A table that cannot be drawn (missing column, NaN where none is allowed) is listed on the page with
the error that names the problem; the other figures are still written, and the command exits 1.

Python: ``write_report(results_dir, out_dir) -> Path`` (the path of ``index.html``), called by ``threegate verify``.

Tutorials: ``render_all(..., tutorials=pages)`` renders already executed tutorials (``TutorialPage`` records: plain
dicts of cells and outputs, made by ``threegate.tutorials.read_executed``) into the page's Tutorials section. This
module never executes or grades a tutorial.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from matplotlib.figure import Figure

from paper_figs import paper_figs as pf
from paper_figs import live_figs, schemas, theory_figs
from theory.errors import CheckpointError, InputError, ThreegateError

__all__ = ["add_arguments", "run", "write_report", "render_all", "RenderedFigure", "Report", "TutorialPage",
           "tutorial_html"]

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


@dataclass
class TutorialPage:
    """An executed tutorial as the report draws it (no notebook library needed).

    ``cells`` are plain dicts: ``cell_type``, ``source`` (str), ``tags`` (list), ``outputs`` (nbformat output
    dicts: stream, error, display_data / execute_result with ``data``) and ``exercise`` (the placeholder an exercise
    cell shows the student; its ``source`` is then the reference solution, shown folded). ``error`` set: the file
    could not be read; the page lists it with the figures that could not be drawn.
    """

    stem: str  # file stem, e.g. "00_overview": section id and image names
    source: str  # where it came from, e.g. "docs/00_overview.md"
    title: str
    status: str  # one line: exercises checked, time taken
    cells: list[dict] = field(default_factory=list)
    error: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="directory with results tables (CSV / Parquet)")
    parser.add_argument("--out", default=None, help="output directory (default: RESULTS_DIR/report)")


def run(args: argparse.Namespace, tutorials: Sequence[TutorialPage] | None = None) -> int:
    """Render the report of ``args.results_dir`` (with ``tutorials``, already executed); print what was drawn and
    what could not be; 1 if anything could not."""
    out = Path(args.out) if args.out else Path(args.results_dir) / "report"
    rep = render_all(args.results_dir, out, tutorials=tutorials)
    for src, msg in rep.errors:
        print(f"threegate figs: could not draw {src}: {msg}", file=sys.stderr)
    print(f"threegate figs: {len(rep.figures)} figure(s) written; report: {rep.page}")
    return 1 if rep.errors else 0


def write_report(results_dir: str | Path, out_dir: str | Path,
                 tutorials: Sequence[TutorialPage] | None = None) -> Path:
    """Render all figures found under ``results_dir`` into ``out_dir`` and return the path of ``index.html``."""
    return render_all(results_dir, out_dir, tutorials=tutorials).page  # type: ignore[return-value]


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


def render_all(results_dir: str | Path, out_dir: str | Path,
               tutorials: Sequence[TutorialPage] | None = None) -> Report:
    """Find tables, draw every figure they support (PNG + PDF), write ``index.html``; return what was done.

    ``tutorials``: executed tutorials for the Tutorials section; ``None`` leaves the section out, an empty list
    says how to execute them."""
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
    rep.tutorials = _tutorials_section(tutorials, results_dir, out_dir, rep)
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
def _markdown_html(text: str) -> str:
    try:
        from markdown_it import MarkdownIt  # optional (the tutorials extra); without it the text is shown as written
    except ImportError:
        return f"<pre>{_e(text)}</pre>"
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _output_html(out: dict, img_dir: Path, stem: str, n: int) -> str:
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


def tutorial_html(page: TutorialPage, img_dir: Path) -> str:
    """An executed tutorial as an HTML fragment: Markdown rendered, code with its outputs (PNG outputs written to
    ``img_dir``), each exercise as the student sees it with its reference solution folded below; checker cells and
    cells tagged ``remove-cell`` left out."""
    parts, n = [], 0
    for c in page.cells:
        tags = c.get("tags", [])
        src = c.get("source", "")
        if c.get("cell_type") == "markdown":
            parts.append(_markdown_html(src))
            continue
        if c.get("cell_type") != "code" or "remove-cell" in tags or "checker" in tags:
            continue
        if c.get("exercise") is not None:
            parts.append(f'<pre class="exercise"><code>{_e(c["exercise"])}</code></pre>'
                         f'<details><summary>Solution</summary><pre><code>{_e(src)}</code></pre></details>')
        else:
            parts.append(f"<pre><code>{_e(src)}</code></pre>")
        for out in c.get("outputs", []):
            n += 1
            parts.append(_output_html(out, img_dir, page.stem, n))
    return "\n".join(parts)


def _tutorials_section(pages: Sequence[TutorialPage] | None, results_dir: Path, out_dir: Path, rep: Report) -> str:
    """HTML of the Tutorials section: every executed tutorial rendered in full (inside a collapsed <details>) with
    the status of its exercise checks; nothing when ``pages`` is None."""
    if pages is None:
        return ""
    parts = ['<h2 id="tutorials">Tutorials</h2>']
    if not pages:
        parts.append(f"<p>No executed tutorials in <code>{_e(results_dir / 'tutorials')}</code> (run "
                     f"<code>threegate figs {_e(results_dir)} --tutorials [DOCS_DIR]</code> to execute the "
                     "<code>docs/NN_name.md</code> tutorials and check their exercises).</p>")
        return "\n".join(parts)
    for p in pages:
        if p.error:  # an unreadable notebook is listed, the rest of the report still renders
            rep.errors.append((f"tutorials/{p.stem}.ipynb", p.error))
            continue
        body = tutorial_html(p, out_dir / "tutorials")
        parts.append(f'<section class="tutorial" id="tutorial-{_e(_slug(p.stem))}"><details>'
                     f"<summary><b>{_e(p.title)}</b> — <code>{_e(p.source)}</code>: {_e(p.status)}</summary>"
                     f"{body}</details></section>")
    return "\n".join(parts)
