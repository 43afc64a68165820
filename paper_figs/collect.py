"""Find the tables of a results folder and decide which figures they make (for ``paper_figs.report``).

A results folder may hold several runs side by side, e.g. ``threegate compare BASE RL --method RL --out R/RL`` and
``... --method SFT --out R/SFT``: the tables of the same schema are then pooled across subfolders, each row tagged
with its training method (the table's ``method`` column, else the ``sparsity`` table of its folder, else the
folder's name) and a run label that stays unique across folders (``RL/model`` when two folders both call their
run ``model``). From the pooled tables the report draws

* one Table 1 with every method side by side;
* Figs. 4 and 5 once per method (RL and SFT are never averaged together; titles and axis labels name the method);
* every other figure once per table file, its name (slug) carrying the subfolder, so no two figures share a file
  name (no ``-2.png``);
* the Gate II / III check figures last, after the paper's figures.

Tables the project writes that no figure draws (``schemas.OTHER_TABLES``) and empty tables are kept with a note,
never an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
from matplotlib.figure import Figure

from paper_figs import paper_figs as pf
from paper_figs import live_figs, schemas, theory_figs
from theory.errors import ThreegateError

__all__ = ["Table", "Job", "discover", "read_all", "assign_methods", "figure_jobs", "slug", "POOLED", "PER_METHOD"]

#: Schemas pooled across subfolders (compare and experiment outputs of several runs of one base).
POOLED = ("sparsity", "spectrum", "angles", "mask_overlap")
#: Of those, the figures drawn once per training method.
PER_METHOD = ("spectrum", "mask_overlap")
#: Methods written when none was given (``threegate compare`` without ``--method``).
UNNAMED_METHODS = ("", "tuned", "nan", "None")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "figure"


@dataclass
class Table:
    path: Path
    rel: str  # path relative to the results folder
    folder: str  # relative folder ("." for the results folder itself)
    df: pd.DataFrame
    schema: str | None  # figure schema, or the OTHER_TABLES name, or None (unrecognised)
    other: bool = False  # a project table no figure draws


@dataclass
class Job:
    source: str  # table file(s) the figure is drawn from
    slug: str
    draw: Callable[[], Figure]
    order: tuple = ()  # sort key: paper figures first, checks last
    group: str = ""  # method or folder the figure is about ("" = all)


@dataclass
class Found:
    tables: list[Table] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (table, why it has no figure)
    unrecognised: list[str] = field(default_factory=list)

    def of(self, schema: str) -> list[Table]:
        return [t for t in self.tables if t.schema == schema]


def discover(results_dir: Path, out_dir: Path) -> list[Path]:
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


def read_all(results_dir: Path, out_dir: Path) -> Found:
    """Every table under ``results_dir``: read, classified; unreadable ones in ``errors``, empty ones and the
    project's non-figure tables in ``notes``, tables of no known schema in ``unrecognised``."""
    f = Found()
    for path in discover(results_dir, out_dir):
        stem = path.name.split(".")[0]
        if stem == "verify":
            continue
        rel = str(path.relative_to(results_dir))
        folder = str(path.parent.relative_to(results_dir))
        try:
            df = schemas.read_table(path)
        except ThreegateError as e:
            f.errors.append((rel, str(e)))
            continue
        if stem in schemas.OTHER_TABLES:
            f.tables.append(Table(path, rel, folder, df, stem, other=True))
            f.notes.append((rel, schemas.OTHER_TABLES[stem]))
            continue
        if df.empty or not len(df.columns):
            f.notes.append((rel, "empty table: nothing to draw"))
            continue
        name = schemas.identify(df, path)
        if name is None:
            f.unrecognised.append(rel)
            continue
        f.tables.append(Table(path, rel, folder, df, name))
    return f


def _is_named(method: object) -> bool:
    return str(method) not in UNNAMED_METHODS


def assign_methods(found: Found) -> None:
    """Tag every row of the tables that have a ``run`` column with ``method`` and make run labels unique.

    Method: the row's own ``method`` if named, else the method its run has in a table of the same folder (Table 1's
    ``sparsity`` says it), else the folder's name when the table sits in a subfolder, else ``"tuned"``. A run label used
    in two folders becomes ``folder/run``.
    """
    known: dict[tuple[str, str], str] = {}
    for t in found.tables:
        if {"run", "method"} <= set(t.df.columns):
            for run, meth in t.df[["run", "method"]].drop_duplicates().itertuples(index=False):
                if _is_named(meth):
                    known.setdefault((t.folder, str(run)), str(meth))
    folders_of: dict[str, set[str]] = {}
    for t in found.tables:
        if "run" in t.df.columns:
            for run in pd.unique(t.df["run"].astype(str)):
                folders_of.setdefault(run, set()).add(t.folder)
    for t in found.tables:
        if "run" not in t.df.columns:
            continue
        df = t.df.copy()
        df.attrs = dict(t.df.attrs)
        runs = df["run"].astype(str)
        # "tuned" (compare's label when no --method was given) rather than "": an empty method would leave Table 1
        # without a legend (matplotlib drops empty labels) and the report without Table 1
        fallback = "tuned" if t.folder == "." else Path(t.folder).name
        own = df["method"].astype(str) if "method" in df.columns else pd.Series("", index=df.index)
        df["method"] = [m if _is_named(m) else known.get((t.folder, r), fallback) for m, r in zip(own, runs)]
        df["run"] = [f"{t.folder}/{r}" if len(folders_of.get(r, ())) > 1 and t.folder != "." else r for r in runs]
        t.df = df


def _valid(t: Table, errors: list[tuple[str, str]]) -> bool:
    try:
        schemas.validate(t.df, t.schema, source=f"{t.schema} table {t.rel!r}")
    except ThreegateError as e:
        errors.append((t.rel, str(e)))
        return False
    return True


def _pooled(tables: list[Table]) -> tuple[pd.DataFrame, str]:
    frames = [t.df for t in tables]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].copy()
    attrs: dict = {}
    for fr in frames:  # shared metadata only (model, description) when every folder agrees
        for k, v in fr.attrs.items():
            if all(o.attrs.get(k) == v for o in frames):
                attrs[k] = v
    df.attrs = attrs
    return df, ", ".join(t.rel for t in tables)


#: Figure order on the page: Table 1, the paper's figures in paper order, Gate III, then the Gate II/I checks.
_ORDER = {name: i for i, name in enumerate(pf.PAPER_FIGURES)}


def figure_jobs(found: Found, errors: list[tuple[str, str]]) -> list[Job]:
    """The figures to draw, in page order (see the module docstring). Problems found while planning (a check
    table whose result ids cannot be read) go to ``errors``."""
    jobs: list[Job] = []
    angles = [t for t in found.of("angles") if _valid(t, errors)]
    pooled_angles = _pooled(angles)[0] if angles else None
    for name, (fn, label) in pf.PAPER_FIGURES.items():
        tabs = found.of(name)
        if not tabs:
            continue
        order = (0, _ORDER[name])
        if name in POOLED:
            tabs = [t for t in tabs if _valid(t, errors)]  # one broken table must not take the pooled figure
            if not tabs:
                continue
            df, source = _pooled(tabs)
            if name in PER_METHOD:
                methods = pf._method_order(pd.unique(df["method"].astype(str))) if "method" in df.columns else [""]
                for m in methods:
                    part = df[df["method"].astype(str) == m] if "method" in df.columns else df
                    part.attrs = dict(df.attrs, **({"method": m} if m else {}))
                    suffix = f"-{slug(m)}" if m else ""
                    if name == "spectrum":
                        ang = None
                        if pooled_angles is not None:
                            ang = pooled_angles[pooled_angles["method"].astype(str) == m] if m and \
                                "method" in pooled_angles.columns else pooled_angles
                            ang = ang if len(ang) else None
                        draw = (lambda part=part, ang=ang, m=m: pf.fig4_spectrum(part, ang, method=m or None))
                    else:
                        draw = (lambda part=part, m=m: pf.fig5_mask_overlap(part, method=m or None))
                    mine = [t.rel for t in tabs
                            if "method" not in t.df.columns or (t.df["method"].astype(str) == m).any()]
                    jobs.append(Job(", ".join(mine) or source, f"{slug(label)}-{slug(name)}{suffix}", draw, order, m))
            else:
                jobs.append(Job(source, f"{slug(label)}-{slug(name)}", lambda df=df, fn=fn: fn(df), order))
            continue
        for t in tabs:
            where = "" if t.folder == "." else f"-{slug(t.folder)}"
            jobs.append(Job(t.rel, f"{slug(label)}-{slug(t.path.name.split('.')[0])}{where}",
                            lambda df=t.df, fn=fn: fn(df), order, "" if t.folder == "." else t.folder))
    for name, (fn, label) in live_figs.LIVE_FIGURES.items():  # live runs (threegate.callback), after the paper's
        for t in found.of(name):
            where = "" if t.folder == "." else f"-{slug(t.folder)}"
            jobs.append(Job(t.rel, f"{slug(label)}-{slug(t.path.name.split('.')[0])}{where}",
                            lambda df=t.df, fn=fn: fn(df), (0, len(_ORDER)), "" if t.folder == "." else t.folder))
    for t in found.of("bf16_updates"):
        where = "" if t.folder == "." else f"-{slug(t.folder)}"
        jobs.append(Job(t.rel, f"gate3-threshold-{slug(t.path.stem)}{where}",
                        lambda df=t.df: theory_figs.fig_bf16_threshold(df), (1, 0)))
    for t in found.of("checks"):
        jobs.extend(_check_jobs(t, errors))
    used: dict[str, int] = {}
    for j in jobs:  # a last resort: two jobs with one slug keep both figures
        n = used.get(j.slug, 0)
        used[j.slug] = n + 1
        if n:
            j.slug = f"{j.slug}-{n + 1}"
    return sorted(jobs, key=lambda j: j.order)


def _check_jobs(t: Table, errors: list[tuple[str, str]]) -> list[Job]:
    """Scatter + tightness per result id; Thm 3.3 forms side by side. ``threegate verify`` mixes theory
    campaigns and training-step checks in one table (column ``source``): each source gets its own figures; so does
    each method of a table holding several."""
    df = t.df
    split = next((c for c in ("source", "method") if c in df.columns and df[c].nunique() > 1), None)
    if split is not None:
        parts = [(str(s), df[df[split] == s].copy()) for s in sorted(df[split].dropna().unique(), key=str)]
    else:
        parts = [("", df)]
    where = "" if t.folder == "." else f"-{slug(t.folder)}"
    jobs = []
    for source, sub in parts:
        sub.attrs = dict(df.attrs)
        tag = slug(t.path.name.split(".")[0]) + where + (f"-{slug(source)}" if source else "")
        methods = [m for m in pd.unique(sub["method"].astype(str)) if _is_named(m)] if "method" in sub.columns else []
        group = source or (methods[0] if len(methods) == 1 else "" if t.folder == "." else t.folder)
        try:
            ids = theory_figs.numeric_result_ids(sub)
        except ThreegateError as e:
            errors.append((t.rel, str(e)))
            continue
        if any(rid in ids for rid, _ in theory_figs.THM33_FORMS):
            jobs.append(Job(t.rel, f"thm3-3-forms-{tag}", lambda sub=sub: theory_figs.fig_thm33_forms(sub),
                            (2, 0, tag), group))
        for rid in ids:
            jobs.append(Job(t.rel, f"check-{slug(rid)}-{tag}",
                            lambda rid=rid, sub=sub: theory_figs.fig_theory_vs_empirical(sub, rid), (2, 1, tag, rid),
                            group))
    return jobs
