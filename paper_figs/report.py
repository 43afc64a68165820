"""``threegate figs RESULTS_DIR --out DIR``: render every figure the results directory has data for, and a static
HTML report (``index.html``).

The page opens with a summary table (per run, overall and per matrix type: bf16 sparsity, M_princ and M_low
overlaps beside their random baselines, Gate II verdict counts, the largest principal angle; ``paper_figs.summary``)
before any figure, then names the results folder, then the verdict table of ``threegate verify`` where there is
one, then the figures: Table 1 and the paper's figures in paper order, the Gate III threshold, and the theory
checks last. Several runs of one base in subfolders (``threegate compare ... --method RL --out R/RL`` and
``--method SFT --out R/SFT``) render into one report with one Table 1 and Figs. 4 / 5 per method (see
``paper_figs.collect``).

Tables are found by file name or columns (see ``paper_figs.schemas``), CSV or Parquet, anywhere under RESULTS_DIR
(the output directory itself is skipped). ``verify.csv`` / ``verify.json`` (written by ``threegate verify``) give the
verdict table. A table that cannot be drawn (missing column, NaN where none is allowed) is listed on the page with
the error that names the problem; the other figures are still written, and the command exits 1. Empty tables and the
project's tables that no figure draws (``schemas.OTHER_TABLES``, e.g. ``masked_runs_final``) are listed with a note
and are not errors.

The page shows only the figures this run drew. Rerun into a used output folder, it also removes the figure files
(PNG, PDF, tutorial images) that an earlier run of the project recorded there and this run did not draw again
(``paper_figs.outputs``); any other file in the folder stays.

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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from paper_figs import collect, outputs, schemas, summary
from theory import RESULTS
from theory.errors import CheckpointError, InputError, ThreegateError

__all__ = ["add_arguments", "run", "write_report", "render_all", "RenderedFigure", "Report", "TutorialPage",
           "tutorial_html"]

VERIFY_COLUMNS = ("result_id", "instances", "worst_ratio", "verdict", "seeds_needed", "t_test_seeds", "notes")
#: The power columns of a claim row (``threegate.verify.Row``): seeds the observed effect needs under the seed rule,
#: and under a one-sided t-test. Shown for every claim row; blank on theory rows (no seeds involved) and where
#: verify wrote no number (``seeds_needed_note``, the reason, is then shown dimmed).
SEED_COLUMNS = ("seeds_needed", "t_test_seeds")


@dataclass
class RenderedFigure:
    slug: str
    title: str
    caption: str
    png: Path
    pdf: Path
    source: str  # table file(s) the figure was drawn from
    group: str = ""  # the method or subfolder the figure is about ("" = the whole folder)


@dataclass
class Report:
    figures: list[RenderedFigure] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (source, message)
    unrecognised: list[str] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (table, why no figure): empty / project tables
    verdicts: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    verify_folder: bool = False  # the folder holds threegate verify's outputs
    results_dir: Path | None = None
    page: Path | None = None
    tutorials: str = ""  # HTML of the Tutorials section
    removed: list[str] = field(default_factory=list)  # figures an earlier run wrote into out_dir, not drawn now


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
    if rep.removed:
        print(f"threegate figs: removed {len(rep.removed)} figure file(s) an earlier run wrote into {out} and this "
              f"run did not draw: {', '.join(rep.removed)}")
    print(f"threegate figs: {len(rep.figures)} figure(s) written; report: {rep.page}")
    return 1 if rep.errors else 0


def write_report(results_dir: str | Path, out_dir: str | Path,
                 tutorials: Sequence[TutorialPage] | None = None) -> Path:
    """Render all figures found under ``results_dir`` into ``out_dir`` and return the path of ``index.html``."""
    return render_all(results_dir, out_dir, tutorials=tutorials).page  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return collect.slug(text)


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


def _is_verify_folder(found: collect.Found) -> bool:
    """``threegate verify`` writes checks with a ``source`` column and ``bf16_updates`` (and ``verify.csv``)."""
    return any(t.schema == "bf16_updates" or (t.schema == "checks" and t.folder == "." and "source" in t.df.columns)
               for t in found.tables)


def render_all(results_dir: str | Path, out_dir: str | Path,
               tutorials: Sequence[TutorialPage] | None = None) -> Report:
    """Find tables, draw every figure they support (PNG + PDF), write ``index.html``; return what was done.

    ``tutorials``: executed tutorials for the Tutorials section; ``None`` leaves the section out, an empty list
    says how to execute them."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not results_dir.is_dir():
        raise CheckpointError(f"results directory {str(results_dir)!r} does not exist or is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = Report(results_dir=results_dir.resolve())
    found = collect.read_all(results_dir, out_dir)
    rep.errors += found.errors
    rep.notes += found.notes
    rep.unrecognised += found.unrecognised
    collect.assign_methods(found)
    try:
        rep.verdicts = _load_verdicts(results_dir)
    except ThreegateError as e:
        rep.errors.append(("verify", str(e)))
    rep.verify_folder = rep.verdicts is not None or _is_verify_folder(found)
    by_name: dict[str, list[pd.DataFrame]] = {}
    for t in found.tables:
        by_name.setdefault(t.schema, []).append(t.df)
    try:
        rep.summary = summary.summary_tables(by_name)
    except (ThreegateError, KeyError, ValueError) as e:  # a summary problem must not take the figures with it
        rep.errors.append(("summary", f"{type(e).__name__}: {e}"))

    for job in collect.figure_jobs(found, rep.errors):
        try:
            fig = job.draw()
        except ThreegateError as e:
            rep.errors.append((job.source, str(e)))
            continue
        except Exception as e:  # a figure that breaks must not take the rest of the report with it
            rep.errors.append((job.source, f"{type(e).__name__}: {e}"))
            continue
        png, pdf = out_dir / f"{job.slug}.png", out_dir / f"{job.slug}.pdf"
        fig.savefig(png)
        fig.savefig(pdf)
        rep.figures.append(RenderedFigure(job.slug, getattr(fig, "threegate_title", job.slug),
                                          getattr(fig, "threegate_caption", ""), png, pdf, job.source, job.group))
    tutorial_images: list[Path] = []
    rep.tutorials = _tutorials_section(tutorials, results_dir, out_dir, rep, tutorial_images)
    rep.page = out_dir / "index.html"
    rep.page.write_text(_html(rep, results_dir), encoding="utf-8")
    rep.removed = outputs.record_written(out_dir, [p for f in rep.figures for p in (f.png, f.pdf)]
                                         + tutorial_images + [rep.page], "report")
    return rep


# --------------------------------------------------------------------------------------------------------- HTML
_CSS = """
html { -webkit-text-size-adjust: 100%; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.45; overflow-wrap: break-word; }
h1 { font-size: 1.5em; margin-bottom: .4em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.scroll { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; font-size: .9em; margin: .6em 0; }
caption { caption-side: top; text-align: left; font-size: .9em; color: #444; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.overall td { font-weight: 600; background: #fafafa; }
td.violated, .verdict-violated { color: #D55E00; font-weight: 600; }
.verdict-holds { color: #009E73; font-weight: 600; }
.verdict-other, .dim { color: #666; font-weight: normal; }
.above { color: #0072B2; } .below { color: #D55E00; }
figure { margin: 1.5em 0; border: 1px solid #e5e5e5; padding: .8em; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: .9em; margin-top: .5em; }
.error { color: #D55E00; }
code { background: #f6f6f6; padding: 0 .2em; overflow-wrap: anywhere; }
pre { background: #f8f8f8; padding: .5em; overflow-x: auto; font-size: .85em; }
pre.out { background: #fff; border-left: 3px solid #ccc; }
pre.exercise { border-left: 3px solid #0072B2; }
section.tutorial { margin: 1em 0; }
nav a { margin-right: 1em; }
p.note { font-size: .85em; color: #444; margin-top: 0; }
@media (max-width: 600px) { table { font-size: .78em; } th, td { padding: .2em .35em; } body { padding: 0 .6em; } }
"""


def _e(x: object) -> str:
    return html.escape("" if x is None or (isinstance(x, float) and x != x) else str(x))


def _verdict_class(v: str) -> str:
    return {"holds": "verdict-holds", "violated": "verdict-violated"}.get(v, "verdict-other")


def _is_claim_row(r: pd.Series) -> bool:
    return str(r.get("source", "")).startswith("claim:") and str(r.get("verdict")) != "error"


def _count(v: object) -> int | None:
    """A whole count read back from CSV / JSON (``3``, ``3.0``) or None (blank, NaN, None); never rounded."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(f) if f == f and f == int(f) else None


def _seed_cell(r: pd.Series, c: str) -> str:
    """A power cell: the count when verify wrote one; on a claim row without one, the head of
    ``seeds_needed_note`` (e.g. ``unreachable``, ``one seed``) dimmed, with the whole note as its title."""
    note = r.get("seeds_needed_note")
    note = "" if note is None or (isinstance(note, float) and note != note) else str(note)
    title = f' title="{_e(note)}"' if note and c == "seeds_needed" else ""
    n = _count(r.get(c)) if _is_claim_row(r) else None
    if n is not None:
        return f'<td class="num"{title}>{n}</td>'
    if _is_claim_row(r) and c == "seeds_needed" and note:
        return f'<td{title}><span class="dim">{_e(note.split(":")[0])}</span></td>'
    return "<td></td>"


def _verdict_table(df: pd.DataFrame) -> str:
    claims = df["source"].astype(str).str.startswith("claim:").any() if "source" in df.columns else False
    cols = ([c for c in VERIFY_COLUMNS if c in df.columns or (claims and c in SEED_COLUMNS)]
            + [c for c in ("source", "gate") if c in df.columns])
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r.get(c)
            if c in SEED_COLUMNS:
                cells.append(_seed_cell(r, c))
            elif c == "verdict":
                cells.append(f'<td class="{_verdict_class(str(v))}">{_e(v)}</td>')
            elif isinstance(v, float):
                cells.append(f'<td class="num">{_e(f"{v:.4g}" if v == v else "")}</td>')
            else:
                cells.append(f"<td>{_e(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="verdicts"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
            "</tbody></table></div>")


def _statements() -> str:
    if not RESULTS:
        return "<p>No results registered.</p>"
    rows = []
    for rid, r in sorted(RESULTS.items(), key=lambda kv: (kv[1].gate, kv[0])):
        assum = "; ".join(r.assumptions)
        rows.append(f'<tr id="stmt-{_e(_slug(rid))}"><td><code>{_e(rid)}</code></td><td>{_e(r.gate)}</td>'
                    f"<td>{_e(r.paper_ref)}</td><td>{_e(r.statement)}</td><td>{_e(assum)}</td>"
                    f"<td>{'exact' if r.exact else 'as stated (first order)'}</td></tr>")
    return ('<div class="scroll"><table id="statements"><thead><tr><th>result id</th><th>gate</th><th>paper</th>'
            "<th>statement</th><th>assumptions</th><th>kind</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></div>")


def _summary_section(rep: Report, results_dir: Path) -> str:
    """The element right after the title: ``div#summary`` holding the summary table (``table#summary-table``, in
    a horizontally scrolling box on narrow screens) and a note under it, whatever the folder holds."""
    def block(table: str, note: str) -> str:
        return f'<div id="summary"><div class="scroll">{table}</div><p class="note">{note}</p></div>'

    if rep.summary is not None and len(rep.summary):
        basis = rep.summary.attrs.get("basis", "")
        table = summary.summary_html(rep.summary, "Summary: what fine-tuning changed, per run")
        return block(table, "Per run, overall (bold) and per matrix type. Overlaps: |M<sub>•</sub> ∩ M| / |M|, "
                            "the random baseline |M<sub>•</sub>| / n beside them (blue above it, orange below); "
                            "Gate II: verdicts over matrices × Gate II results"
                            + (f"; computed from {_e(basis)}" if basis else "") + ".")
    if rep.verdicts is not None:
        v = rep.verdicts["verdict"].astype(str).value_counts()
        cells = "".join(f"<tr><td>{_e(k)}</td><td class=\"num\">{int(n)}</td></tr>" for k, n in v.items())
        return block('<table id="summary-table"><caption>Summary: verdicts of threegate verify</caption>'
                     f"<thead><tr><th>verdict</th><th>results</th></tr></thead><tbody>{cells}</tbody></table>",
                     f"{len(rep.verdicts)} result(s) of the paper, each checked on seeded instances.")
    rows = [("figures drawn", len(rep.figures)), ("tables that could not be drawn", len(rep.errors)),
            ("tables without a figure", len(rep.notes) + len(rep.unrecognised))]
    cells = "".join(f"<tr><td>{_e(k)}</td><td class=\"num\">{n}</td></tr>" for k, n in rows)
    return block('<table id="summary-table"><caption>Summary</caption><thead><tr><th>what</th><th>count</th></tr>'
                 f"</thead><tbody>{cells}</tbody></table>", "No run with sparsity, overlap or check tables here.")


def _figure_html(f: RenderedFigure) -> str:
    about = f" [{_e(f.group)}]" if f.group and f.group not in f.title else ""
    return (f'<figure id="fig-{_e(f.slug)}"><img src="{_e(f.png.name)}" alt="{_e(f.title)}" loading="eager">'
            f"<figcaption><b>{_e(f.title)}{about}.</b> {_e(f.caption)} "
            f'<span>(from <code>{_e(f.source)}</code>; <a href="{_e(f.pdf.name)}">PDF</a>)</span></figcaption>'
            "</figure>")


def _nav(rep: Report) -> str:
    links = [("figures", "Figures"), *([("verdicts-section", "Verdicts")] if rep.verify_folder else []),
             *([("tutorials", "Tutorials")] if rep.tutorials else []), ("statements-section", "Statements")]
    return "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in links) + "</nav>"


def _html(rep: Report, results_dir: Path) -> str:
    name = (rep.results_dir or results_dir).name or str(results_dir)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>threegate report: {_e(name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>threegate report: {_e(name)}</h1>",
        _summary_section(rep, results_dir),
        f"<p>Results folder: <code>{_e(rep.results_dir or results_dir)}</code>. {len(rep.figures)} figure(s). "
        "Theory vs measurement for <i>The Path Not Taken: RLVR Provably Learns Off the Principals</i> "
        "(arXiv 2511.08567).</p>",
        _nav(rep),
    ]
    if rep.verdicts is not None:
        parts += ['<h2 id="verdicts-section">Verdicts</h2>', _verdict_table(rep.verdicts)]
    elif rep.verify_folder:  # verify's other outputs are here, its verdict file is not
        parts += ['<h2 id="verdicts-section">Verdicts</h2>',
                  "<p>No <code>verify.csv</code> / <code>verify.json</code> in the results directory "
                  "(run <code>threegate verify</code>).</p>"]
    if rep.errors:
        parts.append("<h2>Tables that could not be drawn</h2><ul>")
        parts += [f'<li class="error"><code>{_e(s)}</code>: {_e(m)}</li>' for s, m in rep.errors]
        parts.append("</ul>")
    parts.append('<h2 id="figures">Figures</h2>')
    if not rep.figures:
        parts.append("<p>No table in the results directory matched a known schema.</p>")
    checks_started = False
    for f in rep.figures:
        if not checks_started and (f.slug.startswith(("check-", "thm3-3-forms-", "gate3-"))):
            parts.append('<h3 id="checks">Theory vs measurement: the checks of Gates I–III</h3>')
            checks_started = True
        parts.append(_figure_html(f))
    if rep.notes or rep.unrecognised:
        parts.append('<h2 id="other-tables">Tables without a figure</h2><ul>')
        parts += [f"<li><code>{_e(t)}</code>: {_e(why)}</li>" for t, why in rep.notes]
        parts += [f"<li><code>{_e(u)}</code>: matches no figure schema</li>" for u in rep.unrecognised]
        parts.append("</ul>")
    parts.append(rep.tutorials)
    parts.append('<h2 id="statements-section">Statements</h2>')
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


def _output_html(out: dict, img_dir: Path, stem: str, n: int, images: list[Path]) -> str:
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
        images.append(img_dir / name)
        return f'<img src="{_e(img_dir.name)}/{_e(name)}" alt="output of {_e(stem)}" loading="eager">'
    if "text/html" in data and "<table" in "".join(data["text/html"]):  # pandas tables, written by pandas
        return f'<div class="out">{"".join(data["text/html"])}</div>'
    if "text/plain" in data:
        return f'<pre class="out">{_e("".join(data["text/plain"]))}</pre>'
    return ""


def tutorial_html(page: TutorialPage, img_dir: Path, images: list[Path] | None = None) -> str:
    """An executed tutorial as an HTML fragment: Markdown rendered, code with its outputs (PNG outputs written to
    ``img_dir``), each exercise as the student sees it with its reference solution folded below; checker cells and
    cells tagged ``remove-cell`` left out. The paths of the PNGs written are appended to ``images`` when given."""
    parts, n = [], 0
    images = [] if images is None else images
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
            parts.append(_output_html(out, img_dir, page.stem, n, images))
    return "\n".join(parts)


def _tutorials_section(pages: Sequence[TutorialPage] | None, results_dir: Path, out_dir: Path, rep: Report,
                       images: list[Path]) -> str:
    """HTML of the Tutorials section: every executed tutorial rendered in full (inside a collapsed <details>) with
    the status of its exercise checks (the PNGs written appended to ``images``); nothing when ``pages`` is None."""
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
        body = tutorial_html(p, out_dir / "tutorials", images)
        parts.append(f'<section class="tutorial" id="tutorial-{_e(_slug(p.stem))}"><details>'
                     f"<summary><b>{_e(p.title)}</b> — <code>{_e(p.source)}</code>: {_e(p.status)}</summary>"
                     f"{body}</details></section>")
    return "\n".join(parts)
