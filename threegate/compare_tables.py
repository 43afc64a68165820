"""The tables of ``threegate compare``: per matrix, pooled per layer / type, the summary, the screen report, files.

Pooling counts, not ratios: sparsity ``1 - Σ changed / Σ n`` and overlaps ``Σ |M• ∩ M| / Σ |M|`` over the
matrices of a group (``pooled``; the one place that sums them). ``summary`` is the table a report opens with
(``compare_summary.csv`` / ``.parquet``, the columns of ``paper_figs.schemas``' ``compare_summary``): per run, one
``overall`` row and one row per matrix type with sparsity, ``M_princ`` / ``M_low`` overlaps beside their random
baselines, Gate II verdict counts and the largest principal angle. The screen report starts with the headline a researcher asks first, one line per tuned checkpoint:
``RUN: overall bf16 update sparsity 0.8127 (1,234,567 of 6,589,000 entries changed, 211 matrices)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from sims import tables as sims_tables
from theory import metrics
from theory.naming import MATRIX_TYPES
from theory.spectral import GATE2_IDS
from threegate.matrix_metrics import FAST_GATE2, FAST_SKIP_REASON, FAST_SKIPS, MatrixResult

__all__ = ["CompareTables", "collect", "aggregate", "pooled", "pooled_update_geometry", "summary_table", "headline",
           "format_report",
           "write_tables", "TYPE_ORDER", "VERDICTS", "SUMMARY_COLUMNS"]

TYPE_ORDER = (*MATRIX_TYPES, "other")
#: the columns of ``paper_figs.schemas``' ``compare_summary`` (the report's summary table), in its order
SUMMARY_COLUMNS = ("run", "method", "scope", "matrices", "numel", "changed", "sparsity", "overlap_princ",
                   "baseline_princ", "overlap_low", "baseline_low", "gate2_holds", "gate2_violated",
                   "gate2_assumption_failed", "max_angle_deg")
VERDICTS = ("holds", "violated", "assumption-failed", "indeterminate", "not-evaluated")
MASKS = ("princ", "low", "princ_not_low")


@dataclass
class CompareTables:
    """All output tables of a comparison (pandas DataFrames; empty where not applicable)."""

    matrices: pd.DataFrame
    checks: pd.DataFrame
    by_layer: pd.DataFrame
    by_type: pd.DataFrame
    summary: pd.DataFrame
    spectrum: pd.DataFrame
    angles: pd.DataFrame
    mask_overlap: pd.DataFrame
    jaccard_pairs: pd.DataFrame
    jaccard: pd.DataFrame
    sparsity: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def collect(results: Sequence[MatrixResult], *, method: str = "tuned", notes: Sequence[str] = (),
            error: str | None = None) -> CompareTables:
    """The tables from per-matrix results (in the order compared)."""

    def cat(attr: str) -> pd.DataFrame:
        return pd.DataFrame([row for r in results for row in getattr(r, attr)])

    matrices = cat("rows")
    jp = cat("jaccard")
    return CompareTables(
        matrices=matrices, checks=cat("checks"), by_layer=aggregate(matrices, "layer"),
        by_type=aggregate(matrices, "matrix_type"), summary=summary_table(matrices, method), spectrum=cat("spectrum"),
        angles=cat("angles"), mask_overlap=cat("overlaps"), jaccard_pairs=jp, jaccard=_pool_jaccard(jp),
        sparsity=_sparsity_table(matrices, method), notes=list(notes), error=error,
    )


def pooled(g: pd.DataFrame) -> dict[str, Any]:
    """Counts pooled over the matrices of ``g``: entries, changed, sparsity and each mask overlap with its baseline."""
    numel, changed = int(g["numel"].sum()), int(g["changed"].sum())
    out: dict[str, Any] = {"matrices": len(g), "numel": numel, "changed": changed,
                           "sparsity": 1.0 - changed / numel if numel else math.nan}
    for key in MASKS:
        out[f"overlap_{key}"] = float(g[f"inter_{key}"].sum() / changed) if changed else math.nan
        out[f"baseline_{key}"] = float(g[f"size_{key}"].sum() / numel) if numel else math.nan
    return out


def pooled_update_geometry(g: pd.DataFrame) -> dict[str, float]:
    """The update-geometry shares pooled over the matrices of ``g`` as one concatenated update would have them:
    ``energy_off_principal_subspace`` weighted by ||dW||_F² (sum of the off-subspace energies over the sum of the
    energies) and ``iso_residual_share`` as sqrt(sum residual²) / sqrt(sum ||dW||_F²), each over the matrices where
    it is defined (NaN when none is)."""
    out = {}
    w = g["dW_fro"].to_numpy(float) ** 2
    for col, norm_ratio in (("energy_off_principal_subspace", False), ("iso_residual_share", True)):
        if col not in g:
            continue
        v = g[col].to_numpy(float)
        ok = np.isfinite(v) & (w > 0)
        if not ok.any():
            out[col] = math.nan
        elif norm_ratio:
            out[col] = float(np.sqrt(np.sum(v[ok] ** 2 * w[ok]) / np.sum(w[ok])))
        else:
            out[col] = float(np.sum(v[ok] * w[ok]) / np.sum(w[ok]))
    return out


def _type_sorted(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    rank = df["matrix_type"].map({t: i for i, t in enumerate(TYPE_ORDER)}).fillna(len(TYPE_ORDER))
    return df.assign(_o=rank).sort_values(["run", *extra, "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def aggregate(matrices: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per-run aggregates over ``by`` ("layer" or "matrix_type"), pooling counts (not averaging ratios)."""
    if matrices.empty:
        return pd.DataFrame()
    out = []
    for (run, key), g in matrices.groupby(["run", by], sort=True):
        row: dict[str, Any] = {"run": run, by: key, **pooled(g)}
        row["dW_fro"] = float(np.sqrt((g["dW_fro"] ** 2).sum()))
        row["dW_2_max"] = float(g["dW_2"].max())
        row["nss_mean"] = float(g["nss"].mean()) if g["nss"].notna().any() else math.nan
        row.update(pooled_update_geometry(g))
        for side in ("U", "V"):
            row[f"angle_{side}_max_deg"] = float(g[f"angle_{side}_max_deg"].max())
            row[f"angle_{side}_mean_deg"] = float(g[f"angle_{side}_mean_deg"].mean())
        if "jaccard_mean" in g:
            row["jaccard_mean"] = float(g["jaccard_mean"].mean())
            row["jaccard_baseline"] = float(g["jaccard_baseline"].mean())
        for rid in GATE2_IDS:
            col = g[f"check_{rid}"]
            for v in ("violated", "assumption-failed", "indeterminate"):
                row[f"{rid}:{v}"] = int((col == v).sum())
        out.append(row)
    df = pd.DataFrame(out)
    return _type_sorted(df) if by == "matrix_type" else df


def summary_table(matrices: pd.DataFrame, method: str = "") -> pd.DataFrame:
    """Per run: an ``overall`` row, then one per matrix type, with the columns of ``paper_figs.schemas``'
    ``compare_summary`` (sparsity, overlaps beside baselines, Gate II verdict counts over every check of the group,
    the largest principal angle ``max_angle_deg``) and, after them, ``M_princ ∩ M_low^c``, the fast route's
    ``gate2_not_evaluated`` and the largest U and V angles apart."""
    if matrices.empty:
        return pd.DataFrame()
    checks = matrices[[f"check_{rid}" for rid in GATE2_IDS]]
    out = []
    for run, g in matrices.groupby("run", sort=False):
        groups = [("overall", g)] + sorted(((str(t), gg) for t, gg in g.groupby("matrix_type")),
                                           key=lambda p: TYPE_ORDER.index(p[0]) if p[0] in TYPE_ORDER else 99)
        for scope, gg in groups:
            row: dict[str, Any] = {"run": run, "method": method, "scope": scope, **pooled(gg)}
            verdicts = checks.loc[gg.index].to_numpy().ravel()
            for v in VERDICTS:
                row[f"gate2_{v.replace('-', '_')}"] = int(np.count_nonzero(verdicts == v))
            angles = gg[["angle_U_max_deg", "angle_V_max_deg"]].to_numpy(float)
            row["max_angle_deg"] = float(np.nanmax(angles)) if np.isfinite(angles).any() else math.nan
            row["angle_U_max_deg"] = float(gg["angle_U_max_deg"].max())
            row["angle_V_max_deg"] = float(gg["angle_V_max_deg"].max())
            row.update(pooled_update_geometry(gg))
            out.append(row)
    df = pd.DataFrame(out)
    first = [c for c in SUMMARY_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def _pool_jaccard(jp: pd.DataFrame) -> pd.DataFrame:
    """Pairwise Jaccard per matrix type pooled over matrices: ``Σ|A∩B| / Σ|A∪B|``, baseline from pooled densities."""
    if jp.empty:
        return pd.DataFrame()
    out = []
    for (mt, a, b), g in jp.groupby(["matrix_type", "run_a", "run_b"], sort=True):
        union = int(g["union"].sum())
        p, q = g["size_a"].sum() / g["numel"].sum(), g["size_b"].sum() / g["numel"].sum()
        out.append({"matrix_type": mt, "run_a": a, "run_b": b,
                    "jaccard": float(g["inter"].sum() / union) if union else 1.0,
                    "baseline": metrics.bernoulli_jaccard_baseline(float(p), float(q)), "matrices": len(g)})
    return pd.DataFrame(out)


def _sparsity_table(matrices: pd.DataFrame, method: str) -> pd.DataFrame:
    if matrices.empty:
        return pd.DataFrame()
    rows = [{"run": run, "method": method, "matrix_type": t, **{c: v for c, v in pooled(g).items()
                                                                  if c in ("sparsity", "changed", "numel")}}
            for (run, t), g in matrices.groupby(["run", "matrix_type"], sort=True)]
    return pd.DataFrame(rows)[["run", "method", "matrix_type", "sparsity", "changed", "numel"]]


# ----------------------------------------------------------------------------------------------- on screen


def _sparsity_text(s: float, changed: int) -> str:
    """4 decimals, more when 4 would hide a change (0.99999 reads 1.0000) or show one that is not there."""
    text = f"{s:.4f}"
    if changed and text in ("1.0000", "0.0000") or (not changed and s != 1.0):
        text = f"{s:.8f}"
    return text


def headline(t: CompareTables) -> list[str]:
    """One line per tuned run: the overall bf16 update sparsity over every compared matrix."""
    if t.summary.empty:
        return []
    rows = t.summary[t.summary["scope"] == "overall"]
    return [f"{r.run}: overall bf16 update sparsity {_sparsity_text(r.sparsity, r.changed)} "
            f"({r.changed:,} of {r.numel:,} entries changed, {r.matrices} matrices)" for r in rows.itertuples()]


SCREEN_COLUMNS = {
    "run": "run", "layer": "layer", "matrix_type": "type", "matrices": "#", "sparsity": "sparsity",
    "dW_fro": "|dW|_F", "dW_2_max": "max|dW|_2", "nss_mean": "NSS", "angle_U_max_deg": "maxθU°",
    "angle_V_max_deg": "maxθV°", "overlap_princ": "ov_princ", "baseline_princ": "rand", "overlap_low": "ov_low",
    "baseline_low": "rand ",
}


def _screen(df: pd.DataFrame) -> str:
    cols = [c for c in SCREEN_COLUMNS if c in df.columns]
    view = df[cols].rename(columns=SCREEN_COLUMNS)
    # sparsity near 1 is the interesting regime: 6 decimals so that 40 changes in 884,736 entries do not read "1"
    return view.to_string(index=False, formatters={"sparsity": lambda x: f"{x:.6f}"},
                          float_format=lambda x: f"{x:.4g}")


def format_report(t: CompareTables) -> str:
    """The screen report: headline per run, per-layer and per-type tables, Gate II verdicts, Jaccard, notes."""
    if t.matrices.empty:
        return "no matrices compared"
    lines = headline(t)
    lines += ["", "Per layer (pooled counts):", _screen(t.by_layer), "", "Per matrix type (pooled counts):",
              _screen(t.by_type)]
    m = t.matrices
    fast = m["skipped"].astype(bool) if "skipped" in m else pd.Series(False, index=m.index)
    if fast.any():
        lines += ["", f"fast route on {int(fast.sum())} of {len(m)} matrix rows (--fast; exact route where it is not "
                      f"faster): skipped there {', '.join(FAST_SKIPS)} ({FAST_SKIP_REASON}); angles within "
                      f"{m.loc[fast, 'angle_err_deg'].max():.2g} deg (certified)"]
        more = m.loc[fast, "skipped"].str.split().map(lambda s: sorted(set(s) - set(FAST_SKIPS)))
        lines.append(f"  Gate II from the certified top k+1 ({', '.join(FAST_GATE2)}): evaluated on "
                     f"{int((more.map(len) == 0).sum())} of {int(fast.sum())} fast rows; elsewhere skipped where a "
                     f"certificate does not cover them (the skipped column names them)")
    ck = t.checks
    if not ck.empty:
        counts = ck.groupby(["result_id", "verdict"]).size().unstack(fill_value=0)
        counts = counts.reindex([r for r in GATE2_IDS if r in counts.index])
        lines += ["", "Gate II checks (matrices x runs):", counts.to_string()]
        failed = ck[ck["verdict"] == "assumption-failed"]
        if not failed.empty:
            top = failed["failed_assumption"].astype(str).str.slice(0, 90).value_counts().head(3)
            lines += [f"  assumption failed: {msg} ({n}x)" for msg, n in top.items()]
        bad = ck[ck["verdict"] == "violated"]
        if not bad.empty:
            worst = bad.sort_values("ratio", ascending=False).head(3)
            lines += [f"  violated: {r.result_id} on {r.name} (lhs/rhs = {r.ratio:.4g})" for r in worst.itertuples()]
    if not t.jaccard.empty:
        lines += ["", "Cross-run Jaccard of update masks (pooled per type) vs Bernoulli baseline:",
                  t.jaccard[["matrix_type", "run_a", "run_b", "jaccard", "baseline"]].to_string(
                      index=False, float_format=lambda x: f"{x:.4f}")]
    lines += [f"note: {n}" for n in t.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- files

#: file stem of each table (``paper_figs.schemas`` reads these names)
FILE_NAMES = {
    "matrices": "matrices", "checks": "checks", "by_layer": "by_layer", "by_type": "by_type",
    "summary": "compare_summary", "spectrum": "spectrum", "angles": "angles", "mask_overlap": "mask_overlap",
    "jaccard_pairs": "jaccard_pairs", "jaccard": "jaccard", "sparsity": "sparsity",
}
_MODEL_TABLES = ("sparsity", "spectrum", "angles", "mask_overlap", "jaccard")


def write_tables(t: CompareTables, out: str | Path, *, model: str = "") -> list[Path]:
    """Write every non-empty table as CSV and Parquet under ``out`` (with a ``.meta.json`` beside each), through
    ``sims.tables.write_tables`` (the one table writer)."""
    meta = {"model": model, "description": "; ".join(t.notes)}
    if t.error:
        meta["error"] = t.error
    tables = {}
    for attr, stem in FILE_NAMES.items():
        df = getattr(t, attr)
        if df is not None and not df.empty:
            tables[stem] = df.assign(model=model) if model and attr in _MODEL_TABLES else df
    return sims_tables.write_tables(tables, out, meta=meta)
