"""The summary a report opens with: per run, overall and per matrix type, what fine-tuning did.

One row per (run, scope), ``scope`` = ``"overall"`` (every compared matrix) or a matrix type (``q``, ``k``, ...,
``other``), with the columns of schema ``compare_summary`` (``paper_figs.schemas``):

=========================  ============================================================================
column                     meaning
=========================  ============================================================================
run, method                the tuned run and its training method (RL, SFT, ...; empty when unknown)
scope                      ``overall`` or a matrix type
matrices, numel, changed   matrices pooled, their entries, entries whose stored bf16 value changed
sparsity                   bf16 update sparsity ``1 - changed / numel`` (pooled counts, Def. 2.2)
overlap_princ, _low        ``|M_princ ∩ M| / |M|`` and ``|M_low ∩ M| / |M|`` pooled (NaN when M is empty)
baseline_princ, _low       their random baselines ``|M_princ| / numel``, ``|M_low| / numel``
gate2_holds, _violated,    Gate II check verdicts over (matrices x Gate II results): holds, violated,
gate2_assumption_failed    assumption-failed
max_angle_deg              the largest principal angle between the top-k singular subspaces (U or V)
=========================  ============================================================================

``threegate compare`` may write this table itself (``compare_summary``); otherwise :func:`summary_tables` computes
it from the per-matrix table (``matrices``: pooled counts, exact) or, for experiment folders without one, from the
figure tables (``sparsity``, ``mask_overlap``, ``angles``, ``checks``; overlaps then are means over layers, and the
table says so in its ``basis`` attribute).
"""

from __future__ import annotations

import html
import math
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from theory import RESULTS
from theory.errors import ThreegateError
from theory.naming import MATRIX_TYPES, matrix_type

__all__ = ["SUMMARY_COLUMNS", "summary_from_matrices", "summary_from_figure_tables", "summary_tables",
           "summary_html", "gate2_ids"]

SUMMARY_COLUMNS = ("run", "method", "scope", "matrices", "numel", "changed", "sparsity", "overlap_princ",
                   "baseline_princ", "overlap_low", "baseline_low", "gate2_holds", "gate2_violated",
                   "gate2_assumption_failed", "max_angle_deg")
SCOPE_ORDER = ("overall", *MATRIX_TYPES, "all", "other")
VERDICTS = ("holds", "violated", "assumption-failed")


def gate2_ids() -> tuple[str, ...]:
    """Result ids of Gate II (the spectral results) in ``theory.RESULTS``."""
    return tuple(rid for rid, r in RESULTS.items() if r.gate == "II")


def _scope_key(s: str) -> tuple[int, str]:
    return (SCOPE_ORDER.index(s) if s in SCOPE_ORDER else len(SCOPE_ORDER), str(s))


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def summary_from_matrices(matrices: pd.DataFrame, method: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Exact summary from ``threegate compare``'s per-matrix table (one row per matrix and run): counts pooled.

    ``method``: run -> training method (default: the table's ``method`` column, else empty).

    Examples
    --------
    >>> import pandas as pd
    >>> m = pd.DataFrame({"run": ["r", "r"], "matrix_type": ["q", "q"], "numel": [100, 10], "changed": [10, 9]})
    >>> s = summary_from_matrices(m)
    >>> s[["scope", "numel", "changed"]].values.tolist()
    [['overall', 110, 19], ['q', 110, 19]]
    >>> round(float(s["sparsity"].iloc[0]), 4)  # 1 - 19/110 (pooled), not the mean of 0.9 and 0.1
    0.8273
    """
    need = {"run", "matrix_type", "numel", "changed"}
    if not need <= set(matrices.columns):
        raise ThreegateError(f"matrices table lacks column(s) {sorted(need - set(matrices.columns))}")
    checks = [c for c in matrices.columns if c.startswith("check_")]
    rows = []
    for run, g_run in matrices.groupby("run", sort=False):
        meth = (method or {}).get(run) or (str(g_run["method"].iloc[0]) if "method" in g_run.columns else "")
        scopes = [("overall", g_run)] + sorted(((str(t), g) for t, g in g_run.groupby("matrix_type")),
                                               key=lambda p: _scope_key(p[0]))
        for scope, g in scopes:
            numel, changed = int(g["numel"].sum()), int(g["changed"].sum())
            row = {"run": run, "method": meth, "scope": scope, "matrices": len(g), "numel": numel,
                   "changed": changed, "sparsity": 1.0 - _ratio(changed, numel)}
            for key in ("princ", "low"):
                if f"inter_{key}" in g.columns:
                    row[f"overlap_{key}"] = _ratio(g[f"inter_{key}"].sum(), changed)
                    row[f"baseline_{key}"] = _ratio(g[f"size_{key}"].sum(), numel)
                else:
                    row[f"overlap_{key}"] = row[f"baseline_{key}"] = math.nan
            verdicts = g[checks].to_numpy().ravel() if checks else np.array([])
            for v in VERDICTS:
                row[f"gate2_{v.replace('-', '_')}"] = int((verdicts == v).sum())
            angles = [c for c in ("angle_U_max_deg", "angle_V_max_deg") if c in g.columns]
            vals = g[angles].to_numpy(float) if angles else np.array([])
            row["max_angle_deg"] = float(np.nanmax(vals)) if vals.size and np.isfinite(vals).any() else math.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def _checks_type(checks: pd.DataFrame) -> pd.Series:
    if "matrix_type" in checks.columns:
        return checks["matrix_type"].astype(str)
    for col in ("name", "matrix"):
        if col in checks.columns:  # rows without a matrix name (theory campaigns: NaN) are not a matrix type
            return checks[col].map(lambda v: matrix_type(v) if isinstance(v, str) else "other")
    return pd.Series("", index=checks.index)


def summary_from_figure_tables(tables: Mapping[str, pd.DataFrame | None]) -> pd.DataFrame:
    """Summary from the figure tables of an experiment folder (no per-matrix table): ``sparsity`` (with
    ``changed`` and ``numel``/``total`` the overall row pools counts; else its ``all`` row), ``mask_overlap`` (means
    over layers), ``angles`` (max), ``checks`` (Gate II verdicts). Missing tables leave NaN / 0."""
    sp, mo, an, ck = (tables.get(k) for k in ("sparsity", "mask_overlap", "angles", "checks"))
    runs: list[str] = []
    for t in (sp, mo, an, ck):
        if t is not None and "run" in t.columns:
            runs += [r for r in pd.unique(t["run"].astype(str)) if r not in runs]
    ids = gate2_ids()
    rows = []
    for run in runs:
        def of(t):
            return t[t["run"].astype(str) == run] if t is not None and "run" in t.columns else None
        s, o, a, c = of(sp), of(mo), of(an), of(ck)
        meth = str(s["method"].iloc[0]) if s is not None and len(s) and "method" in s.columns else ""
        scopes = {"overall"}
        for t in (s, o, a):
            if t is not None and "matrix_type" in t.columns:
                scopes |= set(t["matrix_type"].astype(str)) - {"all"}
        if c is not None:
            scopes |= set(_checks_type(c)) - {""}
        for scope in sorted(scopes, key=_scope_key):
            row = {k: math.nan for k in SUMMARY_COLUMNS}
            row.update(run=run, method=meth, scope=scope, matrices=math.nan)
            if s is not None and len(s):
                total = "numel" if "numel" in s.columns else "total" if "total" in s.columns else None
                blocks = s[s["matrix_type"] != "all"]
                part = blocks if scope == "overall" else s[s["matrix_type"] == scope]
                if scope == "overall" and total and "changed" in s.columns and len(blocks):
                    row.update(numel=int(blocks[total].sum()), changed=int(blocks["changed"].sum()))
                    row["sparsity"] = 1.0 - _ratio(row["changed"], row["numel"])
                elif scope == "overall" and (s["matrix_type"] == "all").any():
                    row["sparsity"] = float(s.loc[s["matrix_type"] == "all", "sparsity"].mean())
                elif scope != "overall" and len(part):
                    row["sparsity"] = float(part["sparsity"].mean())
                    if total and "changed" in part.columns:
                        row.update(numel=int(part[total].sum()), changed=int(part["changed"].sum()))
            if o is not None and len(o):
                part = o if scope == "overall" or "matrix_type" not in o.columns else o[o["matrix_type"] == scope]
                part = part[part["layer"] >= 0] if "layer" in part.columns and scope != "other" else part
                for key in ("princ", "low"):
                    m = part[part["mask"] == key]
                    if len(m):
                        row[f"overlap_{key}"] = float(m["overlap"].mean())
                        row[f"baseline_{key}"] = float(m["random_baseline"].mean())
            if a is not None and len(a):
                part = a if scope == "overall" else a[a["matrix_type"] == scope]
                if part["angle_deg"].notna().any():
                    row["max_angle_deg"] = float(part["angle_deg"].max())
            if c is not None and len(c):
                part = c[c["result_id"].isin(ids)]
                if scope != "overall":
                    part = part[_checks_type(part) == scope]
                for v in VERDICTS:
                    row[f"gate2_{v.replace('-', '_')}"] = int((part["verdict"] == v).sum())
            else:
                for v in VERDICTS:
                    row[f"gate2_{v.replace('-', '_')}"] = 0
            informative = [row[k] for k in ("sparsity", "overlap_princ", "overlap_low", "max_angle_deg")]
            if any(pd.notna(x) for x in informative) or any(row[f"gate2_{v.replace('-', '_')}"] for v in VERDICTS):
                rows.append(row)  # a scope no table has numbers for is left out
    out = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    out.attrs["basis"] = "figure tables (overlaps: means over layers)"
    return out


def summary_tables(found: Mapping[str, list[pd.DataFrame]]) -> pd.DataFrame | None:
    """The report's summary from the tables found (schema or table name -> frames, one per folder, each with a
    ``run`` column already made unique across folders and a ``method`` column where known): ``compare_summary``
    frames as written, else computed from ``matrices``, else from the figure tables; ``None`` if nothing applies."""
    parts = []
    for df in found.get("compare_summary", []):
        if set(SUMMARY_COLUMNS) - {"method"} <= set(df.columns):
            parts.append(df.reindex(columns=list(SUMMARY_COLUMNS)))
    done = set().union(*[set(p["run"]) for p in parts]) if parts else set()
    for df in found.get("matrices", []):
        s = summary_from_matrices(df)
        parts.append(s[~s["run"].isin(done)])
    done = set().union(*[set(p["run"]) for p in parts]) if parts else set()
    rest = {k: _concat(found.get(k, [])) for k in ("sparsity", "mask_overlap", "angles", "checks")}
    rest = {k: (v[~v["run"].astype(str).isin(done)] if v is not None and "run" in v.columns else v)
            for k, v in rest.items()}
    if any(v is not None and len(v) and "run" in v.columns for v in rest.values()):
        fig_part = summary_from_figure_tables(rest)
        if len(fig_part):
            parts.append(fig_part)
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    out = pd.concat(parts, ignore_index=True)
    if len(parts) > 1 or "basis" not in parts[-1].attrs:
        out.attrs["basis"] = "; ".join(dict.fromkeys(p.attrs.get("basis", "per-matrix counts (pooled)") for p in parts))
    else:
        out.attrs["basis"] = parts[-1].attrs["basis"]
    return out


def _concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame | None:
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else None


# ------------------------------------------------------------------------------------------------------ HTML
def _e(x: object) -> str:
    return html.escape(str(x))


def _num(x: float, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _sparsity(x: float) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.6f}" if 0.999 < x < 1 or 0 < x < 0.001 else f"{x:.4f}"


def _int(x) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{int(x):,}"


def _beside(ov: float, base: float) -> str:
    if not math.isfinite(ov if ov is not None else math.nan):
        return f'<span class="dim">– (random {_num(base, ".3f")})</span>' if math.isfinite(base) else ""
    cls = "above" if ov > base else "below" if ov < base else "dim"
    return f'<span class="{cls}">{ov:.3f}</span> <span class="dim">(random {base:.3f})</span>'


def summary_html(summary: pd.DataFrame, caption: str = "") -> str:
    """The summary as an HTML table (``id="summary-table"``), one block of rows per run (overall first);
    ``caption`` (HTML) goes into its ``<caption>``."""
    head = ("<tr><th>run</th><th>method</th><th>scope</th><th>matrices</th><th>entries</th>"
            "<th>bf16 sparsity</th><th>M<sub>princ</sub> overlap</th><th>M<sub>low</sub> overlap</th>"
            "<th>Gate II holds / violated / assumption failed</th><th>largest principal angle</th></tr>")
    rows = []
    for _, r in summary.iterrows():
        overall = r["scope"] == "overall"
        g = [r["gate2_holds"], r["gate2_violated"], r["gate2_assumption_failed"]]
        gate = "" if all(pd.isna(x) for x in g) or sum(int(x) for x in g if pd.notna(x)) == 0 else \
            " / ".join(_int(x) for x in g)
        viol = ' class="num violated"' if pd.notna(r["gate2_violated"]) and r["gate2_violated"] else ' class="num"'
        rows.append(
            f'<tr class="{"overall" if overall else "type"}"><td>{_e(r["run"])}</td><td>{_e(r["method"] or "")}</td>'
            f'<td>{_e(r["scope"])}</td><td class="num">{_int(r["matrices"])}</td>'
            f'<td class="num">{_int(r["numel"])}</td>'
            f'<td class="num">{_sparsity(r["sparsity"])}</td>'
            f'<td class="num">{_beside(r["overlap_princ"], r["baseline_princ"])}</td>'
            f'<td class="num">{_beside(r["overlap_low"], r["baseline_low"])}</td>'
            f"<td{viol}>{gate}</td><td class=\"num\">{_num(r['max_angle_deg'], '.2f')}"
            f"{'°' if pd.notna(r['max_angle_deg']) else ''}</td></tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f'<table id="summary-table">{cap}<thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
