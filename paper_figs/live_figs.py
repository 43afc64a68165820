"""Figures of a live training run (tables written by ``threegate.callback.ThreeGateCallback``).

=====================  ==================  ===================================================================
function               table (schema)      shows
=====================  ==================  ===================================================================
fig_step_sparsity      step_sparsity       per-step bf16 update sparsity, sparsity against the base, and the
                                           Jaccard of consecutive step masks beside its Bernoulli baseline
=====================  ==================  ===================================================================

Like ``paper_figs.paper_figs``, nothing here recomputes an experiment: the table already holds pooled counts.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from paper_figs import schemas
from paper_figs.paper_figs import MATRIX_ORDER
from paper_figs.style import OKABE_ITO, colors_for, integer_ticks, new_figure, set_caption
from theory.errors import InputError

__all__ = ["LIVE_FIGURES", "fig_step_sparsity"]


def _types(d: pd.DataFrame) -> list[str]:
    vals = list(dict.fromkeys(d["matrix_type"]))
    return sorted(vals, key=lambda m: (MATRIX_ORDER.index(m) if m in MATRIX_ORDER else len(MATRIX_ORDER), str(m)))


def fig_step_sparsity(df: pd.DataFrame) -> Figure:
    """Three panels over optimizer steps, one line per matrix type (``all`` in black, thicker):
    ``1 - |M_t| / n`` (per step), ``1 - changed_base / n`` (against the base), and the consecutive-mask Jaccard
    ``J(M_t, M_{t-1})`` with the independent-Bernoulli baseline of ``all`` dashed."""
    d = schemas.validate(df, "step_sparsity", source="step_sparsity table")
    for col in ("sparsity_step", "sparsity_base"):
        if ((d[col] < 0) | (d[col] > 1)).any():
            raise InputError(f"step_sparsity table: column {col!r} must lie in [0, 1]")
    runs = list(dict.fromkeys(d["run"])) if "run" in d.columns else [None]
    d = d[d["run"] == runs[0]] if runs[0] is not None else d  # one run per figure: the first; caption says so
    types = _types(d)
    colors = colors_for([t for t in types if t not in ("all", "other")])
    fig, axes = new_figure(1, 4, width=15.0, height=4.6, gridspec_kw={"width_ratios": [1, 1, 1, 0.5]})
    panels = (("sparsity_step", "per-step sparsity  1 - |M_t| / n"),
              ("sparsity_base", "sparsity vs base  1 - changed / n"),
              ("jaccard_prev", r"Jaccard $J(M_t, M_{t-1})$"))
    for ax, (col, label) in zip(axes.flat, panels):
        for t in types:
            g = d[d["matrix_type"] == t].sort_values("step")
            y = g[col].to_numpy(np.float64)
            style = (dict(color=OKABE_ITO["black"], lw=2.2) if t == "all" else
                     dict(color="#777777", lw=1.1, ls=":") if t == "other" else dict(color=colors[t], lw=1.1))
            ax.plot(g["step"], y, marker="o" if len(g) < 12 else None, ms=3, label=t, gid=f"{col}-{t}", **style)
        if col == "jaccard_prev" and "baseline_prev" in d.columns:
            g = d[d["matrix_type"] == "all"].sort_values("step")
            ax.plot(g["step"], g["baseline_prev"], ls="--", color=OKABE_ITO["black"], lw=1.0,
                    label="Bernoulli E[J] (all)", gid="jaccard-baseline")
            if not np.isfinite(d["jaccard_prev"].to_numpy(np.float64)).any():
                ax.text(0.5, 0.5, "not enough data: needs two counted steps", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, gid="not-enough-data")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        integer_ticks(ax)
    axes[0, 0].set_title("changed at this step")
    axes[0, 1].set_title("changed since the base")
    axes[0, 2].set_title("consecutive update masks")
    legend_ax = axes[0, 3]  # the legend gets its own axes, inside the canvas
    legend_ax.axis("off")
    legend_ax.legend(*axes[0, 2].get_legend_handles_labels(), loc="center", framealpha=0.85,
                     title="matrix type")
    last = d[(d["step"] == d["step"].max()) & (d["matrix_type"] == "all")]
    summary = ""
    if not last.empty:
        r = last.iloc[0]
        jac = "" if not np.isfinite(r["jaccard_prev"]) else f", consecutive Jaccard {r['jaccard_prev']:.3f}"
        summary = (f"At step {int(r['step'])}: per-step sparsity {r['sparsity_step']:.4f}, sparsity vs base "
                   f"{r['sparsity_base']:.4f}{jac} (all {int(r['numel']):,} tracked entries).")
    more = f" Only run {runs[0]} of {len(runs)} is drawn." if len(runs) > 1 else ""
    caption = (f"Live run (threegate.callback): bf16 update masks M_t = 1[stored w_t != w_(t-1)] after every "
               f"optimizer step, pooled per matrix type. {summary}{more} {schemas.describe_run(d)}")
    return set_caption(fig, "bf16 update sparsity and mask overlap, step by step", caption)


# schema -> (figure function, label), drawn by ``threegate figs`` beside ``paper_figs.PAPER_FIGURES``.
LIVE_FIGURES: dict[str, tuple[Callable[..., Figure], str]] = {
    "step_sparsity": (fig_step_sparsity, "Live steps"),
}
