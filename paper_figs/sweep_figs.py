"""Figures from a ``threegate sweep`` store: bounds against the regime across cells, claims across learning rates.

Both functions take the tables of a sweep store (``sims.sweep.store.load_store(path)``: a dict of DataFrames, each
concatenated over the done cells with the grid values as columns and ``cell_id``; ``"_cells"`` is the cells table)
and return a matplotlib ``Figure`` in the project style; neither reads a file nor reruns a cell.

* :func:`sweep_bounds` — for the ``checks`` table: per cell and result id, the worst tightness lhs / rhs over the
  cell's rows whose assumptions hold, against the regime (``dW_over_gap`` = ||dW||_2 / gamma_k by default), one
  line per result id (cells in regime order), cells with a violated row marked with ``style.VIOLATION_STYLE``,
  the ratio-1 line (bound attained). ``by`` splits the cells into panels by a grid column (e.g. the perturbation).
* :func:`sweep_claims` — against the learning rate (a column named ``lr`` or ending in ``.lr``): a metric per cell
  (default: the bf16 update sparsity of the pooled block matrices, ``sparsity`` table, ``matrix_type == "all"``),
  one line per run through the mean over the cells at each learning rate, every cell a point; and the computed
  verdicts of the ``verdicts`` table (one marker per cell and claim) when the cells carry them.

``python -m threegate.sweep_figs STORE --out DIR`` reads a store and writes whichever of the two it has data for.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from paper_figs.style import (
    OKABE_ITO,
    VIOLATION_LABEL,
    VIOLATION_STYLE,
    colors_for,
    new_figure,
    no_data_panel,
    set_caption,
)
from theory.errors import InputError

__all__ = ["bounds_by_cell", "sweep_bounds", "claims_by_lr", "sweep_claims", "grid_keys"]

_REGIME_PREFERENCE = ("dW_over_gap", "target_ratio")
_REGIME_LABELS = {"dW_over_gap": r"$\|\Delta W\|_2 / \gamma_k$ (measured)",
                  "target_ratio": r"target $\|\Delta W\|_2 / \gamma_k$"}
VERDICT_COLORS = {"reproduced": OKABE_ITO["green"], "not reproduced": OKABE_ITO["vermillion"],
                  "inconclusive": OKABE_ITO["sky"]}


def grid_keys(tables: Mapping[str, pd.DataFrame]) -> list[str]:
    """The grid keys of the store's cells (dotted paths), in order of first appearance."""
    cells = tables.get("_cells")
    keys: list[str] = []
    if cells is not None and "grid_json" in cells.columns:
        for g in cells["grid_json"]:
            for k in json.loads(g):
                if k not in keys:
                    keys.append(k)
    return keys


def _column_of(df: pd.DataFrame, key: str) -> str | None:
    """The column holding grid key ``key`` (``load_store`` renames a colliding one ``grid.<key>``)."""
    for col in (f"grid.{key}", key):
        if col in df.columns:
            return col
    return None


def _describe_store(tables: Mapping[str, pd.DataFrame]) -> str:
    cells = tables.get("_cells")
    if cells is None:
        return ""
    n_done = int((cells["status"] == "done").sum())
    n_failed = int((cells["status"] == "failed").sum())
    exps = ", ".join(sorted(set(cells["experiment"])))
    keys = grid_keys(tables)
    return (f"Sweep store: {n_done} done cell(s) of experiment {exps}" + (f", {n_failed} failed" if n_failed else "")
            + (f"; grid over {', '.join(keys)}." if keys else "."))


# ----------------------------------------------------------------------------------------------------------------
# Bounds vs regime


def _pick_regime(d: pd.DataFrame, tables: Mapping[str, pd.DataFrame], regime: str | None) -> str:
    if regime is not None:
        col = regime if regime in d.columns else _column_of(d, regime)
        if col is None:
            raise InputError(f"sweep_bounds: regime column {regime!r} is not in the checks table")
        return col
    for c in _REGIME_PREFERENCE:
        if c in d.columns:
            return c
    for key in grid_keys(tables):
        col = _column_of(d, key)
        if col is not None and pd.api.types.is_numeric_dtype(d[col]):
            return col
    raise InputError("sweep_bounds: no regime column (dW_over_gap, target_ratio or a numeric grid key) in the "
                     "checks table; pass regime=")


def bounds_by_cell(tables: Mapping[str, pd.DataFrame], *, regime: str | None = None,
                   ids: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (cell, result id): ``x`` (median regime over the cell's rows), ``worst_ratio`` (max lhs / rhs
    over rows whose assumptions hold; NaN if none), ``n``, ``n_violated``, ``n_assumption_failed``."""
    d = tables.get("checks")
    if d is None or d.empty:
        raise InputError("sweep_bounds: the store has no 'checks' table (run cells that produce Check rows)")
    missing = sorted({"result_id", "lhs", "rhs", "verdict", "assumptions_hold", "cell_id"} - set(d.columns))
    if missing:
        raise InputError(f"sweep_bounds: checks table lacks columns {missing}")
    col = _pick_regime(d, tables, regime)
    if ids is not None:
        d = d[d["result_id"].isin(list(ids))]
        if d.empty:
            raise InputError(f"sweep_bounds: no rows for result ids {list(ids)}")
    lhs, rhs = d["lhs"].to_numpy(float), d["rhs"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(rhs == 0, np.where(lhs == 0, 0.0, np.inf), lhs / rhs)
    d = d.assign(_ratio=np.where(d["assumptions_hold"].astype(bool), ratio, np.nan), _x=d[col].astype(float))
    g = d.groupby(["cell_id", "result_id"], sort=True)
    out = pd.DataFrame({
        "x": g["_x"].median(),
        "worst_ratio": g["_ratio"].max(),
        "n": g.size(),
        "n_violated": g["verdict"].apply(lambda v: int((v == "violated").sum())),
        "n_assumption_failed": g["assumptions_hold"].apply(lambda a: int((~a.astype(bool)).sum())),
    }).reset_index()
    out.attrs["regime"] = col
    return out


def sweep_bounds(tables: Mapping[str, pd.DataFrame], *, regime: str | None = None,
                 ids: Sequence[str] | None = None, by: str | None = None) -> Figure:
    """Worst lhs / rhs per cell against the regime, one line per result id, violations marked (see module doc)."""
    agg = bounds_by_cell(tables, regime=regime, ids=ids)
    col = agg.attrs["regime"]
    checks = tables["checks"]
    panels: list[tuple[str, pd.DataFrame]] = [("", agg)]
    if by is not None:
        bcol = _column_of(checks, by)
        if bcol is None:
            raise InputError(f"sweep_bounds: 'by' column {by!r} is not in the checks table")
        cell_by = checks.groupby("cell_id")[bcol].first()
        agg = agg.assign(_by=agg["cell_id"].map(cell_by))
        panels = [(f"{by} = {v}", agg[agg["_by"] == v]) for v in sorted(agg["_by"].unique(), key=str)]
    fig, axes = new_figure(1, len(panels), width=5.2 * len(panels) + 0.8, height=4.6, sharey=True)
    colors = colors_for(agg["result_id"])
    for ax, (title, part) in zip(axes[0], panels):
        ax.set_title(title, fontsize=9)
        fin = part[np.isfinite(part["worst_ratio"]) & np.isfinite(part["x"])]
        if fin["x"].nunique() < 2:  # a curve against the regime needs two regime values
            detail = "; ".join(f"{rid}: worst lhs/rhs {r['worst_ratio'].max():.3g}"
                               for rid, r in fin.groupby("result_id", sort=False)) or "no finite worst ratio"
            no_data_panel(ax, f"{fin['x'].nunique()} value of {col}" if len(fin) else "no finite lhs / rhs", detail)
            continue
        for rid, r in part.groupby("result_id", sort=False):
            r = r.sort_values(["x", "cell_id"])
            shown = r[np.isfinite(r["worst_ratio"]) & np.isfinite(r["x"])]
            ax.plot(shown["x"], shown["worst_ratio"], "o-", ms=4, lw=1.0, color=colors[rid], label=rid,
                    gid=f"bound-{rid}")
        v = part[(part["n_violated"] > 0) & np.isfinite(part["worst_ratio"])]
        if len(v):
            ax.scatter(v["x"], v["worst_ratio"], label=f"{VIOLATION_LABEL}: {len(v)} cell(s)", gid="violations",
                       **VIOLATION_STYLE)
        ax.axhline(1.0, ls="--", color=OKABE_ITO["black"], lw=1.0, label="bound attained (ratio = 1)",
                   gid="ratio-one")
        xs = part["x"][np.isfinite(part["x"])]
        if len(xs) and xs.min() > 0 and xs.max() / xs.min() > 20:
            ax.set_xscale("log")
        ys = part["worst_ratio"][np.isfinite(part["worst_ratio"])]
        if len(ys) and ys.min() > 0 and ys.max() / ys.min() > 50:
            ax.set_yscale("log")
        ax.set_xlabel(_REGIME_LABELS.get(col, col))
    handles: dict[str, Any] = {}  # one legend for all panels (violations may sit in any of them)
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    drawn = [ax for ax in axes[0] if ax.lines]
    if drawn:
        drawn[-1].legend(list(handles.values()), list(handles), loc="best", fontsize=7)
        drawn[0].set_ylabel("worst lhs / rhs in the cell")
    per_id = agg.groupby("result_id", sort=False).agg(cells=("cell_id", "nunique"), violated=("n_violated", "sum"),
                                                      fa=("n_assumption_failed", "sum"))
    parts = [f"{rid}: {int(r.violated)} violated and {int(r.fa)} assumption-failed row(s) in {int(r.cells)} cell(s)"
             for rid, r in per_id.iterrows()]
    caption = (f"Each point is one cell: the largest lhs/rhs over its instances whose assumptions hold, at the "
               f"cell's {col}. Points above the dashed line at 1 break the bound. " + "; ".join(parts) + ". "
               + _describe_store(tables))
    return set_caption(fig, "Bounds across the sweep's regimes", caption)


# ----------------------------------------------------------------------------------------------------------------
# Claims vs learning rate


def _lr_column(tables: Mapping[str, pd.DataFrame], df: pd.DataFrame, lr: str | None) -> str:
    if lr is not None:
        col = lr if lr in df.columns else _column_of(df, lr)
        if col is None:
            raise InputError(f"sweep_claims: learning-rate column {lr!r} is not in the table")
        return col
    for key in grid_keys(tables):
        if key == "lr" or key.endswith(".lr"):
            col = _column_of(df, key)
            if col is not None:
                return col
    if "lr" in df.columns:
        return "lr"
    raise InputError("sweep_claims: no learning-rate grid key ('lr' or '<section>.lr') in the store; pass lr=")


def claims_by_lr(tables: Mapping[str, pd.DataFrame], *, metric: str | None = None,
                 lr: str | None = None) -> pd.DataFrame:
    """One row per (cell, run): ``lr``, ``run`` and ``value`` of the metric.

    ``metric``: ``"table:column"`` (averaged over the cell's rows of each run); default ``"sparsity:sparsity"``
    restricted to ``matrix_type == "all"`` (the pooled block matrices).
    """
    table, _, column = (metric or "sparsity:sparsity").partition(":")
    df = tables.get(table)
    if df is None or df.empty:
        raise InputError(f"sweep_claims: the store has no {table!r} table")
    if column not in df.columns:
        raise InputError(f"sweep_claims: table {table!r} has no column {column!r}")
    if metric is None and "matrix_type" in df.columns:
        df = df[df["matrix_type"] == "all"]
    col = _lr_column(tables, df, lr)
    run = df["run"] if "run" in df.columns else pd.Series("all", index=df.index)
    d = pd.DataFrame({"cell_id": df["cell_id"], "lr": df[col].astype(float), "run": run.astype(str),
                      "value": df[column].astype(float)})
    out = d.groupby(["cell_id", "run"], sort=True).agg(lr=("lr", "first"), value=("value", "mean")).reset_index()
    out.attrs.update(metric=f"{table}:{column}", lr=col)
    return out


def sweep_claims(tables: Mapping[str, pd.DataFrame], *, metric: str | None = None, lr: str | None = None) -> Figure:
    """A metric per cell against the learning rate (line per run through the per-lr mean) and the verdicts."""
    has_metric = metric is not None or ("sparsity" in tables and not tables["sparsity"].empty)
    verdicts = tables.get("verdicts")
    has_verdicts = verdicts is not None and not verdicts.empty and {"claim", "verdict"} <= set(verdicts.columns)
    if not has_metric and not has_verdicts:
        raise InputError("sweep_claims: the store has neither a 'sparsity' table nor 'verdicts' (pass metric=)")
    n = int(has_metric) + int(has_verdicts)
    fig, axes = new_figure(1, n, width=5.4 * n + 0.6, height=4.6)
    parts = []
    j = 0
    if has_metric:
        ax = axes[0, j]
        j += 1
        m = claims_by_lr(tables, metric=metric, lr=lr)
        label = "bf16 update sparsity (all block matrices)" if metric is None else m.attrs["metric"]
        colors = colors_for(m["run"])
        if m["lr"].nunique() < 2:  # a curve against the learning rate needs two of them
            means = m.groupby("run")["value"].mean()
            no_data_panel(ax, "1 learning rate", f"{label} at lr {m['lr'].iloc[0]:g}: "
                          + ", ".join(f"{r} {v:.4g}" for r, v in means.items()))
            parts.append(f"Left: {label}, {m['cell_id'].nunique()} cell(s) at one learning rate.")
            m = None
        for run, r in ([] if m is None else m.groupby("run", sort=False)):
            ax.scatter(r["lr"], r["value"], s=18, alpha=0.6, color=colors[run], gid=f"cells-{run}")
            mean = r.groupby("lr")["value"].mean()
            ax.plot(mean.index, mean.to_numpy(), "-", lw=1.5, color=colors[run], label=f"{run} (mean over cells)",
                    gid=f"mean-{run}")
        if m is not None:
            if m["lr"].min() > 0 and m["lr"].max() / m["lr"].min() > 20:
                ax.set_xscale("log")
            ax.set_xlabel(f"learning rate ({m.attrs['lr']})")
            ax.set_ylabel(label)
            ax.legend(loc="best")
            parts.append(f"Left: {label} per cell (points) and the mean per learning rate (lines), "
                         f"{m['cell_id'].nunique()} cell(s).")
    if has_verdicts:
        ax = axes[0, j]
        col = _lr_column(tables, verdicts, lr)
        claims = sorted(verdicts["claim"].unique())
        ypos = {c: i for i, c in enumerate(claims)}
        counts = verdicts["verdict"].value_counts()
        for verdict, r in verdicts.groupby("verdict", sort=True):
            ax.scatter(r[col].astype(float), r["claim"].map(ypos), s=60, marker="s",
                       color=VERDICT_COLORS.get(verdict, OKABE_ITO["black"]), label=f"{verdict}: {len(r)}",
                       gid=f"verdict-{verdict}")
        ax.set_yticks(range(len(claims)), claims)
        lrs = verdicts[col].astype(float)
        if lrs.min() > 0 and lrs.max() / lrs.min() > 20:
            ax.set_xscale("log")
        levels = sorted(lrs.dropna().unique())
        if len(levels) <= 6:  # few learning rates: tick exactly those (one value would get a rounding-noise axis)
            ax.set_xticks(levels, [f"{v:g}" for v in levels])
            ax.minorticks_off()
            if len(levels) == 1:
                ax.set_xlim(levels[0] * 0.5, levels[0] * 1.5) if levels[0] > 0 else ax.set_xlim(-1, 1)
        ax.set_xlabel(f"learning rate ({col})")
        ax.legend(loc="best")
        parts.append("Verdicts per cell and claim: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    return set_caption(fig, "Claims across learning rates", " ".join(parts) + " " + _describe_store(tables))


if __name__ == "__main__":
    raise SystemExit("python -m paper_figs.sweep_figs moved: run python -m threegate.sweep_figs STORE --out DIR")
