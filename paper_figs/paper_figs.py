"""The paper's figures at our scale, each drawn from one results table (schemas in ``paper_figs.schemas``).

One function per figure; each validates its table, draws, and writes a caption that names the paper's figure number
and what was run (model, steps, seeds: from the table's columns or ``attrs``). Nothing here recomputes an experiment:
aggregation is limited to what a figure shows (a max over angles, a norm over a singular-value curve).

=====================  ==================  ===================================================================
function               table (schema)      paper
=====================  ==================  ===================================================================
table1_sparsity        sparsity            Table 1: bf16 update sparsity, RL vs SFT, per matrix type
fig2_consensus         consensus           Fig. 2: consensus ratio maps over R runs
fig3_stripes           stripes             Fig. 3: row / column update ratios over training steps
fig4_spectrum          spectrum, angles    Fig. 4: singular values, principal angles, max angle and NSS by layer
fig5_mask_overlap      mask_overlap        Fig. 5: update overlap with principal / low-magnitude masks vs random
fig6_rotate_overlap    rotate_overlap      Fig. 6: overlap with a rerun after Rotate / Permute, per layer
fig9_masked_runs       masked_runs         Fig. 9: KL and reward of sparse fine-tuning runs
fig10_lora_pissa       lora_pissa          Fig. 10: LoRA vs PiSSA over rank x learning rate
fig12_jaccard          jaccard             Fig. 12: pairwise Jaccard matrix of update masks
fig15_kl_beta0         kl_beta0            Fig. 15: KL to the base with beta = 0
=====================  ==================  ===================================================================
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from paper_figs import schemas
from paper_figs.style import (
    OKABE_ITO,
    color_for,
    colors_for,
    integer_ticks,
    new_figure,
    no_data_panel,
    request_colorbar,
    set_caption,
)
from theory.errors import InputError
from theory.naming import MATRIX_TYPES

__all__ = [
    "MATRIX_ORDER",
    "PAPER_FIGURES",
    "table1_sparsity",
    "fig2_consensus",
    "fig3_stripes",
    "fig4_spectrum",
    "fig5_mask_overlap",
    "fig6_rotate_overlap",
    "fig9_masked_runs",
    "fig10_lora_pissa",
    "fig12_jaccard",
    "fig15_kl_beta0",
]

MATRIX_ORDER = (*MATRIX_TYPES, "all")
MAX_PANELS = 8  # more panels than this stop being readable; the caption says what was left out


def _matrix_sorted(values) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda m: (MATRIX_ORDER.index(m) if m in MATRIX_ORDER else len(MATRIX_ORDER), str(m)))


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


def _hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def _caption(what: str, d: pd.DataFrame, extra: str = "") -> str:
    return f"{what} {extra}{schemas.describe_run(d)}".strip()


def _method_order(methods) -> list[str]:
    """RL first, then SFT, then any other label (alphabetically): the order of Table 1's bars."""
    def key(m: str):
        u = str(m).upper()
        return (0 if "RL" in u and not u.startswith("SFT") else 1 if u.startswith("SFT") else 2, str(m))
    return sorted(dict.fromkeys(methods), key=key)


def method_of(d: pd.DataFrame, method: str | None = None) -> str | None:
    """The one training method a table is about: ``method`` if given, else ``attrs['method']``, else the single
    value of a ``method`` column; ``None`` when unknown. A table mixing methods is an ``InputError``: RL and SFT
    are never averaged together (select one with ``method=``)."""
    if method is not None:
        return method
    if d.attrs.get("method"):
        return str(d.attrs["method"])
    if "method" in d.columns:
        ms = _method_order(d["method"].dropna().astype(str))
        if len(ms) > 1:
            raise InputError(f"table mixes methods {ms}: draw one figure per method (pass method=)")
        return ms[0] if ms else None
    return None


def _select_method(d: pd.DataFrame, method: str | None) -> pd.DataFrame:
    if method is not None and "method" in d.columns:
        d = d[d["method"].astype(str) == method]
        if d.empty:
            raise InputError(f"table has no rows for method {method!r}")
    return d


def _distinct(values) -> list:
    v = pd.Series(values).dropna()
    return sorted(pd.unique(v).tolist())


def _steps_word(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------------------------- Table 1
def table1_sparsity(df: pd.DataFrame) -> Figure:
    """Table 1 as grouped bars: bf16 update sparsity (%) per matrix type, one bar per run, RL vs SFT.

    Bars = (matrix types) x (runs) present in the table, runs ordered by method (RL, SFT, others). The legend
    names each bar by its method (``method: run`` when a method has several runs) and sits inside the canvas,
    above the axes. RL runs are solid, SFT runs hatched.
    """
    d = schemas.validate(df, "sparsity", source="sparsity table")
    if ((d["sparsity"] < 0) | (d["sparsity"] > 1)).any():
        raise InputError("sparsity table: column 'sparsity' must lie in [0, 1] (a fraction, not a percentage)")
    mts = _matrix_sorted(d["matrix_type"])
    method_of_run = d.groupby("run")["method"].first().to_dict()
    methods = _method_order(method_of_run.values())
    runs = [r for m in methods for r in sorted(k for k, v in method_of_run.items() if v == m)]
    per_method = {m: sum(v == m for v in method_of_run.values()) for m in methods}
    label = {r: (method_of_run[r] if per_method[method_of_run[r]] == 1 else f"{method_of_run[r]}: {r}")
             for r in runs}
    fig, axes = new_figure(1, 1, width=min(16.0, max(6.5, 0.45 * len(mts) * len(runs) + 3.0)), height=4.8)
    ax = axes[0, 0]
    width = 0.8 / len(runs)
    x = np.arange(len(mts))
    for j, run in enumerate(runs):
        sub = d[d["run"] == run].groupby("matrix_type")["sparsity"].mean()
        xs = [x[i] + (j - (len(runs) - 1) / 2) * width for i, m in enumerate(mts) if m in sub.index]
        ys = [100 * sub[m] for m in mts if m in sub.index]
        is_sft = str(method_of_run[run]).upper().startswith("SFT")
        ax.bar(xs, ys, width=width * 0.95, color=color_for(j), hatch="//" if is_sft else None,
               edgecolor=OKABE_ITO["black"] if is_sft else "none", linewidth=0.5,
               label=label[run], gid=f"bars-{run}")
    ax.set_xticks(x, mts)
    ax.set_xlabel("matrix type")
    ax.set_ylabel("bf16 update sparsity (%)\n[1 - changed / n]")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.01), ncols=min(len(runs), 4), framealpha=0.85,
              title="method" if all(label[r] == method_of_run[r] for r in runs) else "method: run")
    means = d.groupby("method")["sparsity"].mean()
    summary = ", ".join(f"{m} mean {100 * means[m]:.1f}%" for m in methods)
    return set_caption(fig, "Paper Table 1 at our scale: bf16 update sparsity, " + " vs ".join(methods),
                       _caption(f"Paper Table 1: fraction of bf16 weights left bit-identical (Def. 2.2, eta = 1e-3); "
                                f"{summary}.", d), width=110)


# --------------------------------------------------------------------------------------------- Fig. 2
def fig2_consensus(df: pd.DataFrame) -> Figure:
    """Fig. 2: consensus ratio C_ij in [0, 1] as a heatmap per (layer, matrix type)."""
    d = schemas.validate(df, "consensus", source="consensus table")
    if ((d["consensus"] < 0) | (d["consensus"] > 1)).any():
        raise InputError("consensus table: column 'consensus' must lie in [0, 1]")
    keys = list(dict.fromkeys(zip(d["layer"], d["matrix_type"])))
    keys = sorted(keys, key=lambda k: (k[0], _matrix_sorted([m for _, m in keys]).index(k[1])))
    shown = keys[:MAX_PANELS]
    nr, nc = _grid(len(shown))
    fig, axes = new_figure(nr, nc, width=3.6 * nc + 1.2, height=3.3 * nr + 1.2)
    im = None
    for ax, (layer, mt) in zip(axes.flat, shown):
        sub = d[(d["layer"] == layer) & (d["matrix_type"] == mt)]
        C = np.full((int(sub["row"].max()) + 1, int(sub["col"].max()) + 1), np.nan)
        C[sub["row"].to_numpy(), sub["col"].to_numpy()] = sub["consensus"].to_numpy()
        im = ax.imshow(C, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"layer {layer}, {mt}")
        ax.set_xlabel("column j")
        ax.set_ylabel("row i")
        ax.grid(False)
    _hide_unused(axes, len(shown))
    request_colorbar(fig, im, r"consensus $C_{ij}$ (fraction of runs updating)")
    R = f"R = {int(d['n_runs'].iloc[0])} runs; " if "n_runs" in d.columns else ""
    left_out = f"{len(keys) - len(shown)} more matrices not shown; " if len(keys) > len(shown) else ""
    return set_caption(fig, "Paper Fig. 2 at our scale: consensus of update masks across runs",
                       _caption("Paper Fig. 2: C_ij = (1/R) sum_r M_ij^(r).", d, R + left_out))


# --------------------------------------------------------------------------------------------- Fig. 3
def fig3_stripes(df: pd.DataFrame) -> Figure:
    """Fig. 3: row (Q/K/V) or column (O) update ratios over training: index on y, step on x."""
    d = schemas.validate(df, "stripes", source="stripes table")
    if "layer" in d.columns:
        layer = d.attrs.get("layer", int(d["layer"].iloc[0]))
        d = d[d["layer"] == layer]
    keys = [(m, a) for m in _matrix_sorted(d["matrix_type"]) for a in ("row", "col")
            if ((d["matrix_type"] == m) & (d["axis"] == a)).any()]
    bad_axis = set(d["axis"]) - {"row", "col"}
    if bad_axis:
        raise InputError(f"stripes table: column 'axis' must be 'row' or 'col', found {sorted(bad_axis)}")
    shown = keys[:MAX_PANELS]
    nr, nc = _grid(len(shown))
    fig, axes = new_figure(nr, nc, width=3.6 * nc + 1.2, height=3.3 * nr + 1.2)
    im = None
    for ax, (mt, axis) in zip(axes.flat, shown):
        sub = d[(d["matrix_type"] == mt) & (d["axis"] == axis)]
        piv = sub.pivot_table(index="index", columns="step", values="update_ratio", aggfunc="mean").sort_index()
        steps = piv.columns.to_numpy()
        im = ax.imshow(piv.to_numpy(), vmin=0, vmax=1, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(-0.5, len(steps) - 0.5, piv.index.max() + 0.5, piv.index.min() - 0.5))
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).astype(int))
        ax.set_xticks(ticks, [str(int(steps[t])) for t in ticks])
        ax.set_title(f"{mt}: {'row ratio' if axis == 'row' else 'column ratio'}")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{axis} index")
        ax.grid(False)
    _hide_unused(axes, len(shown))
    request_colorbar(fig, im, "fraction of entries updated")
    lay = f"layer {d['layer'].iloc[0]}; " if "layer" in d.columns else ""
    return set_caption(fig, "Paper Fig. 3 at our scale: row / column update stripes over training",
                       _caption("Paper Fig. 3: rho_i = mean_j M_ij (rows, Q/K/V) and kappa_j = mean_i M_ij "
                                "(columns, O) at each checkpoint.", d, lay))


# --------------------------------------------------------------------------------------------- Fig. 4
def _nss(g: pd.DataFrame) -> float:
    base = g["sigma_base"].to_numpy(float)
    return float(np.linalg.norm(g["sigma_tuned"].to_numpy(float) - base) / np.linalg.norm(base))


def fig4_spectrum(spectrum: pd.DataFrame, angles: pd.DataFrame | None = None, *, layer: int | None = None,
                  matrix_type: str | None = None, method: str | None = None) -> Figure:
    """Fig. 4: for one layer, singular values before/after and the top-k principal angles; across layers, the
    maximum principal angle and NSS = ||sigma(W+) - sigma(W0)||_2 / ||sigma(W0)||_2, one line per run.

    One training method per figure (``method``, ``attrs['method']`` or the table's ``method`` column; see
    :func:`method_of`); titles name it. The across-layer panels use the blocks (layer >= 0) only and need two of
    them; with one layer, or angles that are all NaN, they say "not enough data" and give the values there are.
    """
    s = schemas.validate(spectrum, "spectrum", source="spectrum table")
    a = schemas.validate(angles, "angles", source="angles table") if angles is not None else None
    s = _select_method(s, method)
    if a is not None:
        a = _select_method(a, method)
    meth = method_of(s, method)
    tag = f" ({meth})" if meth else ""
    mt = matrix_type if matrix_type is not None else s.attrs.get("matrix_type", _matrix_sorted(s["matrix_type"])[0])
    s = s[s["matrix_type"] == mt]
    if s.empty:
        raise InputError(f"spectrum table has no rows for matrix type {mt!r}")
    layers = s["layer"][s["layer"] >= 0]  # layer -1: matrices outside the blocks (embeddings, head)
    lay = layer if layer is not None else s.attrs.get("layer", int((layers if len(layers) else s["layer"]).min()))
    one = s[s["layer"] == lay]
    if one.empty:
        raise InputError(f"spectrum table has no rows for layer {lay} (matrix type {mt!r})")
    runs = list(dict.fromkeys(s["run"]))
    cmap = colors_for(runs)
    ncols = 4 if a is not None else 2
    fig, axes = new_figure(1, ncols, width=4.0 * ncols + 0.6, height=4.6)
    ax = axes[0, 0]
    base = one[one["run"] == runs[0]].sort_values("i")
    ax.plot(base["i"], base["sigma_base"], color=OKABE_ITO["black"], lw=2.0, label="base $W_0$", gid="sigma-base")
    for run in runs:
        g = one[one["run"] == run].sort_values("i")
        ax.plot(g["i"], g["sigma_tuned"], ls="--", color=cmap[run], lw=1.3, label=f"{run} $W_+$", gid=f"sigma-{run}")
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    integer_ticks(ax)
    ax.set_ylabel(r"singular value $\sigma_i$")
    ax.set_title(f"spectrum, layer {lay} {mt}{tag}")
    ax.legend(framealpha=0.85)
    blocks = sorted(set(int(v) for v in layers))
    col = 1
    if a is not None:
        a = a[a["matrix_type"] == mt]
        ax = axes[0, 1]
        ax.set_title(f"principal angles, layer {lay} {mt}{tag}")
        drawn = 0
        for run in runs:
            for side, ls in (("U", "-"), ("V", ":")):
                g = a[(a["run"] == run) & (a["layer"] == lay) & (a["side"] == side)].sort_values("i")
                if g["angle_deg"].notna().any():
                    ax.plot(g["i"] + 1, g["angle_deg"], ls=ls, marker=".", color=cmap[run], label=f"{run} {side}",
                            gid=f"angles-{run}-{side}")
                    drawn += 1
        if drawn:
            ax.set_xlabel("angle index i (top-k)")
            integer_ticks(ax)
            ax.set_ylabel(r"principal angle $\theta_i$ (degrees)")
            ax.legend(framealpha=0.85)
        else:
            no_data_panel(ax, "angles NaN or absent", f"layer {lay}: top-k subspace not unique (sigma_k = sigma_k+1)")
        ax = axes[0, 2]
        ax.set_title(f"max angle across layers ({mt}){tag}")
        mx = a[a["layer"] >= 0].groupby(["run", "layer"])["angle_deg"].max().dropna().reset_index()
        if mx["layer"].nunique() >= 2:
            for run in runs:
                g = mx[mx["run"] == run].sort_values("layer")
                ax.plot(g["layer"], g["angle_deg"], marker="o", ms=4, color=cmap[run], label=run,
                        gid=f"maxangle-{run}")
            ax.set_xlabel("layer")
            integer_ticks(ax)
            ax.set_ylabel("max principal angle (degrees)")
            ax.legend(framealpha=0.85)
        else:
            vals = "; ".join(f"{r.run}: {r.angle_deg:.3g} deg at layer {r.layer}" for r in mx.itertuples())
            no_data_panel(ax, f"{mx['layer'].nunique()} layer with finite angles", vals)
        col = 3
    ax = axes[0, col]
    ax.set_title(f"spectrum drift across layers ({mt}){tag}")
    nss = s[s["layer"] >= 0].groupby(["run", "layer"]).apply(_nss, include_groups=False).rename("nss").reset_index()
    if len(blocks) >= 2:
        for run in runs:
            g = nss[nss["run"] == run].sort_values("layer")
            ax.plot(g["layer"], g["nss"], marker="o", ms=4, color=cmap[run], label=run, gid=f"nss-{run}")
        ax.set_xlabel("layer")
        integer_ticks(ax)
        ax.set_ylabel(r"NSS $=\|\sigma(W_+)-\sigma(W_0)\|_2/\|\sigma(W_0)\|_2$")
        ax.legend(framealpha=0.85)
    else:
        vals = "; ".join(f"{r.run}: NSS {r.nss:.3g} at layer {r.layer}" for r in nss.itertuples())
        no_data_panel(ax, f"{len(blocks)} layer", vals)
    k = f"k = {int(a['k'].iloc[0])}; " if a is not None and "k" in a.columns and len(a) else ""
    who = f"{meth} runs: " if meth else ""
    return set_caption(fig, "Paper Fig. 4 at our scale: spectrum and principal-subspace rotation" + tag,
                       _caption(f"Paper Fig. 4: {who}singular values and principal angles of {mt} at layer {lay}, "
                                f"max angle and NSS by layer.", s, k))


# --------------------------------------------------------------------------------------------- Fig. 5
def fig5_mask_overlap(df: pd.DataFrame, *, method: str | None = None) -> Figure:
    """Fig. 5: overlap |M_mask and M| / |M| per layer for each structural mask, its random baseline dashed.

    One training method per figure (``method``, ``attrs['method']`` or the ``method`` column, see :func:`method_of`;
    RL and SFT are never averaged together): the y label names whose update mask ``M`` is, and the mean over
    several runs of that method is said in the caption. Matrices outside the blocks (layer -1: embeddings, head)
    have no layer to plot against: they are left out of the panels and their overlaps given in the caption.
    A panel whose overlaps are all NaN (no entry changed) says "not enough data".

    With a ``binade_baseline`` column (``sims.claims.geometry``) each mask also gets a dotted line: the overlap that
    weight magnitude alone predicts under bf16 (entries change with their binade's measured probability). The paper
    plots only the random baseline; at our scale the measured overlap sits on the magnitude line.
    """
    d = _select_method(schemas.validate(df, "mask_overlap", source="mask overlap table"), method)
    meth = method_of(d, method)
    outside = d[d["layer"] < 0]
    d = d[d["layer"] >= 0]
    title = "Paper Fig. 5 at our scale: update overlap with principal / low-magnitude masks"
    title += f" ({meth})" if meth else ""
    if d.empty:  # e.g. compare --only lm_head: nothing to plot against layers
        fig, axes = new_figure(1, 1, width=6.4, height=4.0)
        o = outside.groupby("mask")[["overlap", "random_baseline"]].mean()
        no_data_panel(axes[0, 0], "no block layer: only matrices outside the blocks (layer -1)",
                      "; ".join(f"{m} {r.overlap:.3f} (random {r.random_baseline:.3f})" for m, r in o.iterrows()))
        return set_caption(fig, title, _caption("Paper Fig. 5 plots overlaps per layer; this table has none.",
                                                outside))
    has_binade = "binade_baseline" in d.columns and d["binade_baseline"].notna().any()
    cols = ["overlap", "random_baseline", *(["binade_baseline"] if has_binade else [])]
    mts = _matrix_sorted(d["matrix_type"]) if "matrix_type" in d.columns else [None]
    shown = mts[:MAX_PANELS]
    nr, nc = _grid(len(shown))
    fig, axes = new_figure(nr, nc)
    masks = list(dict.fromkeys(d["mask"]))
    cmap = colors_for(masks)
    whose = f"{meth} update mask" if meth else "update mask"
    for ax, mt in zip(axes.flat, shown):
        sub = d if mt is None else d[d["matrix_type"] == mt]
        ax.set_title(mt if mt is not None else "all matrices")
        if sub["overlap"].isna().all():
            no_data_panel(ax, "overlap NaN", "no entry of these matrices changed")
            continue
        one_layer = sub["layer"].nunique() == 1  # lines through one point are invisible: mark every series
        for m in masks:
            g = sub[sub["mask"] == m].groupby("layer")[cols].mean().sort_index()
            if g.empty:
                continue
            ax.plot(g.index, g["overlap"], marker="o", ms=4, color=cmap[m], label=f"{m}", gid=f"overlap-{m}")
            ax.plot(g.index, g["random_baseline"], ls="--", color=cmap[m], lw=1.0, label=f"{m}: random",
                    marker="_" if one_layer else None, ms=14, mew=1.5, gid=f"baseline-{m}")
            if has_binade and g["binade_baseline"].notna().any():
                ax.plot(g.index, g["binade_baseline"], ls=":", color=cmap[m], lw=1.4, label=f"{m}: magnitude only",
                        marker="x" if one_layer else None, gid=f"binade-{m}")
        ax.set_xlabel("layer")
        if one_layer:
            layer = int(sub["layer"].iloc[0])
            ax.set_xlim(layer - 1, layer + 1)
            ax.set_xticks([layer])
        else:
            integer_ticks(ax)
        ax.set_ylabel(f"overlap with {whose}")
    drawn = [ax for ax in axes.flat[:len(shown)] if ax.lines]
    if drawn:
        drawn[0].legend(framealpha=0.85, fontsize=7)  # one legend: the panels share masks and colours
    _hide_unused(axes, len(shown))
    below = (d["overlap"] < d["random_baseline"])[d["overlap"].notna()].groupby(d["mask"]).mean()
    summ = "; ".join(f"{m}: below random in {100 * v:.0f}% of layers" for m, v in below.items())
    magnitude = ""
    if has_binade:
        ok = d["overlap"].notna() & d["binade_baseline"].notna()
        gap = (d["overlap"] - d["binade_baseline"])[ok].groupby(d["mask"][ok]).mean()
        magnitude = (" Dotted = magnitude-only baseline (bf16 binade change rates); mean overlap minus it: "
                     + "; ".join(f"{m} {v:+.3f}" for m, v in gap.items()) + ".")
    left_out = ""
    if len(outside):
        o = outside.groupby("mask")[["overlap", "random_baseline"]].mean()
        left_out = (" Matrices outside the blocks (layer -1, not plotted): "
                    + "; ".join(f"{m} {r.overlap:.3f} (random {r.random_baseline:.3f})" for m, r in o.iterrows())
                    + ".")
    n_runs = d["run"].nunique() if "run" in d.columns else 1
    nruns = f", mean over {n_runs} {meth + ' ' if meth else ''}runs" if n_runs > 1 else ""
    return set_caption(fig, title,
                       _caption(f"Paper Fig. 5: overlap of the {whose} M with each structural mask; solid = measured "
                                f"overlap, dashed = random baseline (mask density){nruns}. {summ}.{magnitude}"
                                f"{left_out}", d))


# --------------------------------------------------------------------------------------------- Fig. 6
def fig6_rotate_overlap(df: pd.DataFrame) -> Figure:
    """Fig. 6: per-layer overlap with an untouched rerun, bars coloured by the intervention applied to the layer."""
    d = schemas.validate(df, "rotate_overlap", source="rotate overlap table")
    mts = _matrix_sorted(d["matrix_type"]) if "matrix_type" in d.columns else [None]
    shown = mts[:MAX_PANELS]
    nr, nc = _grid(len(shown), max_cols=2)
    fig, axes = new_figure(nr, nc, width=5.5 * nc + 0.6)
    kinds = list(dict.fromkeys(["none", *d["intervention"]]))
    cmap = {k: (OKABE_ITO["sky"] if k == "none" else color_for(i + 1)) for i, k in enumerate(kinds)}
    for ax, mt in zip(axes.flat, shown):
        sub = (d if mt is None else d[d["matrix_type"] == mt]).sort_values("layer")
        for k in kinds:
            g = sub[sub["intervention"] == k]
            if not g.empty:
                ax.bar(g["layer"], g["overlap"], color=cmap[k], width=0.8, label=f"layer edited: {k}",
                       gid=f"bars-{k}")
        ax.plot(sub["layer"], sub["random_baseline"], ls="none", marker="_", ms=18, mew=2, color=OKABE_ITO["black"],
                label="random baseline", gid="baseline")
        ax.set_xlabel("layer")
        integer_ticks(ax)
        ax.set_ylabel("overlap with untouched rerun")
        ax.set_title(mt if mt is not None else "all matrices")
        ax.set_ylim(0, max(1.0, float(sub["overlap"].max()) * 1.05) if len(sub) else 1.0)
        ax.legend(framealpha=0.85, fontsize=7, loc="upper left", ncols=2)
    _hide_unused(axes, len(shown))
    edited = sorted(pd.unique(d.loc[d["intervention"] != "none", "layer"]).tolist())
    return set_caption(fig, "Paper Fig. 6 at our scale: update overlap after Rotate / Permute",
                       _caption(f"Paper Fig. 6: function-preserving edits (App. D) applied to layer(s) {edited}; "
                                f"the paper expects overlap to fall to the random level there only.", d))


# --------------------------------------------------------------------------------------------- Fig. 9
def fig9_masked_runs(df: pd.DataFrame) -> Figure:
    """Fig. 9: token-wise KL to the base (left) and reward (right) against step, one line per mask."""
    d = schemas.validate(df, "masked_runs", source="masked runs table")
    masks = list(dict.fromkeys(d["mask"]))
    cmap = colors_for(masks)
    fig, axes = new_figure(1, 2, width=10.5, height=4.4)
    n_steps = d["step"].nunique()
    for ax, col, lab in ((axes[0, 0], "kl", "token-wise KL to base (nats)"), (axes[0, 1], "reward", "mean reward")):
        ax.set_title(f"{'KL' if col == 'kl' else 'reward'} trajectory")
        if n_steps < 2:  # a trajectory needs two steps
            g = d.groupby("mask")[col].mean()
            no_data_panel(ax, _steps_word(n_steps), f"{col} at step {int(d['step'].iloc[0])}: "
                          + ", ".join(f"{m} {v:.3g}" for m, v in g.items()))
            continue
        for m in masks:
            g = d[d["mask"] == m].groupby("step")[col].mean().sort_index()
            ax.plot(g.index, g.to_numpy(), color=cmap[m], lw=2.0 if m == "dense" else 1.3,
                    ls="-" if m == "dense" else "--", label=m, gid=f"{col}-{m}")
        ax.set_xlabel("training step")
        integer_ticks(ax)
        ax.set_ylabel(lab)
        ax.legend(framealpha=0.85)
    final = d[d["step"] == d["step"].max()].groupby("mask")["reward"].mean()
    summ = ", ".join(f"{m} {v:.3g}" for m, v in final.items())
    return set_caption(fig, "Paper Fig. 9 at our scale: sparse fine-tuning with structural masks",
                       _caption(f"Paper Fig. 9: only masked entries are updated. Final reward: {summ}.", d))


# --------------------------------------------------------------------------------------------- Fig. 10
def fig10_lora_pissa(df: pd.DataFrame) -> Figure:
    """Fig. 10: a rank (rows) x learning-rate (columns) grid of reward curves, LoRA vs PiSSA in each panel."""
    d = schemas.validate(df, "lora_pissa", source="LoRA/PiSSA table")
    ranks = sorted(pd.unique(d["rank"]).tolist())
    lrs = sorted(pd.unique(d["lr"]).tolist(), reverse=True)
    methods = list(dict.fromkeys(d["method"]))
    cmap = colors_for(methods)
    fig, axes = new_figure(len(ranks), len(lrs), width=3.4 * len(lrs) + 0.8, height=2.7 * len(ranks) + 1.3,
                           sharex=True, sharey=True)
    for r_i, rank in enumerate(ranks):
        for l_i, lr in enumerate(lrs):
            ax = axes[r_i, l_i]
            ax.set_title(f"rank {rank}, lr {lr:g}", fontsize=9)
            cell = d[(d["rank"] == rank) & (d["lr"] == lr)]
            if cell["step"].nunique() < 2:  # a reward curve needs two steps
                g = cell.groupby("method")["reward"].mean()
                detail = ("reward " + ", ".join(f"{m} {v:.3g}" for m, v in g.items())) if len(g) else "no run"
                no_data_panel(ax, _steps_word(cell["step"].nunique()), detail)
                continue
            for m in methods:
                g = cell[cell["method"] == m].groupby("step")["reward"].mean()
                if not g.empty:
                    ax.plot(g.index, g.to_numpy(), color=cmap[m], label=m, gid=f"reward-{m}")
            if r_i == len(ranks) - 1:
                ax.set_xlabel("training step")
            if l_i == 0:
                ax.set_ylabel("mean reward")
    with_lines = [ax for ax in axes.flat if ax.lines]
    if with_lines:
        with_lines[0].legend(framealpha=0.85)
    return set_caption(fig, "Paper Fig. 10 at our scale: LoRA vs PiSSA",
                       _caption(f"Paper Fig. 10: reward curves for ranks {ranks} x learning rates "
                                f"{[f'{x:g}' for x in lrs]}.", d))


# --------------------------------------------------------------------------------------------- Fig. 12
#: Fig. 12 writes each cell's value up to this many runs; beyond, the colour scale alone (the caption has the means).
JACCARD_VALUES_UP_TO = 14


def fig12_jaccard(df: pd.DataFrame) -> Figure:
    """Fig. 12: the pairwise Jaccard matrix J(A, B) of update masks across runs, one heatmap per matrix type."""
    d = schemas.validate(df, "jaccard", source="jaccard table")
    if ((d["jaccard"] < 0) | (d["jaccard"] > 1)).any():
        raise InputError("jaccard table: column 'jaccard' must lie in [0, 1]")
    mts = _matrix_sorted(d["matrix_type"]) if "matrix_type" in d.columns else [None]
    shown = mts[:MAX_PANELS]
    nr, nc = _grid(len(shown))
    n_max = len(set(d["run_a"]) | set(d["run_b"]))
    cell = max(3.8, 0.34 * n_max + 1.0)  # panel side (inches): run labels and values need room beyond ~8 runs
    fig, axes = new_figure(nr, nc, width=cell * nc + 1.2, height=cell * 0.95 * nr + 1.2)
    value_size = 7 if n_max <= 8 else (5.5 if n_max <= JACCARD_VALUES_UP_TO else 0)  # 0: colours only
    im = None
    parts = []
    for ax, mt in zip(axes.flat, shown):
        sub = d if mt is None else d[d["matrix_type"] == mt]
        runs = sorted(set(sub["run_a"]) | set(sub["run_b"]), key=str)
        idx = {r: i for i, r in enumerate(runs)}
        if len(runs) < 2:  # a Jaccard matrix needs a pair of runs
            no_data_panel(ax, "1 run: no pair to compare", f"{mt or 'all'}")
            parts.append(f"{mt or 'all'}: 1 run")
            continue
        J = np.eye(len(runs))
        for a, b, j in zip(sub["run_a"], sub["run_b"], sub["jaccard"]):
            J[idx[a], idx[b]] = J[idx[b], idx[a]] = j  # symmetric: either argument order fills both cells
        im = ax.imshow(J, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        for i in range(len(runs) if value_size else 0):
            for k in range(len(runs)):
                ax.text(k, i, f"{J[i, k]:.2f}", ha="center", va="center", fontsize=value_size,
                        color="white" if J[i, k] < 0.6 else "black", gid="jaccard-value")
        label_size = 8 if len(runs) <= 8 else 6.5
        ax.set_xticks(range(len(runs)), runs, rotation=60 if len(runs) > 8 else 45, ha="right", fontsize=label_size)
        ax.set_yticks(range(len(runs)), runs, fontsize=label_size)
        ax.grid(False)
        off = J[~np.eye(len(runs), dtype=bool)]
        mean_off = float(off.mean()) if off.size else float("nan")
        base = f", baseline {sub['baseline'].mean():.2f}" if "baseline" in sub.columns else ""
        ax.set_title(f"{mt or 'all'}: mean J {mean_off:.2f}{base}", fontsize=9)
        parts.append(f"{mt or 'all'} mean off-diagonal J = {mean_off:.3f}{base}")
    _hide_unused(axes, len(shown))
    if im is not None:
        request_colorbar(fig, im, r"Jaccard $|A \cap B| / |A \cup B|$")
    return set_caption(fig, "Paper Fig. 12 at our scale: cross-run Jaccard of update masks",
                       _caption(f"Paper Fig. 12 / Table 2: {'; '.join(parts)}.", d))


# --------------------------------------------------------------------------------------------- Fig. 15
def fig15_kl_beta0(df: pd.DataFrame) -> Figure:
    """Fig. 15: token-wise KL(pi || pi_ref) against step for clip-only (beta = 0) runs."""
    d = schemas.validate(df, "kl_beta0", source="KL beta=0 table")
    if "beta" in d.columns and (d["beta"] != 0).any():
        raise InputError(f"KL beta=0 table: rows with beta != 0 ({sorted(pd.unique(d.loc[d['beta'] != 0, 'beta']))});"
                         " Fig. 15 is about beta = 0")
    runs = list(dict.fromkeys(d["run"]))
    cmap = colors_for(runs)
    fig, axes = new_figure(1, 1, width=6.4, height=4.4)
    ax = axes[0, 0]
    n_steps = d["step"].nunique()
    if n_steps < 2:  # a KL trajectory needs two probed steps
        g = d.groupby("run")["kl"].mean()
        no_data_panel(ax, _steps_word(n_steps), f"KL at step {int(d['step'].iloc[0])}: "
                      + ", ".join(f"{r} {v:.3g} nats" for r, v in g.items()))
    else:
        for r in runs:
            g = d[d["run"] == r].groupby("step")["kl"].mean().sort_index()
            ax.plot(g.index, g.to_numpy(), color=cmap[r], label=r, gid=f"kl-{r}")
        ax.set_xlabel("training step")
        integer_ticks(ax)
        ax.set_ylabel(r"token-wise KL($\pi_\theta\,\|\,\pi_{ref}$) (nats)")
        ax.legend(framealpha=0.85)
    final = d[d["step"] == d["step"].max()]["kl"]
    return set_caption(fig, r"Paper Fig. 15 at our scale: KL to the base with beta = 0",
                       _caption(f"Paper Fig. 15: clip-only objective (no KL term); final KL "
                                f"{final.min():.3g} to {final.max():.3g} nats.", d))


# schema -> (figure function, paper label); fig4 also reads the 'angles' table when present.
PAPER_FIGURES: dict[str, tuple[Callable[..., Figure], str]] = {
    "sparsity": (table1_sparsity, "Table 1"),
    "consensus": (fig2_consensus, "Fig. 2"),
    "stripes": (fig3_stripes, "Fig. 3"),
    "spectrum": (fig4_spectrum, "Fig. 4"),
    "mask_overlap": (fig5_mask_overlap, "Fig. 5"),
    "rotate_overlap": (fig6_rotate_overlap, "Fig. 6"),
    "masked_runs": (fig9_masked_runs, "Fig. 9"),
    "lora_pissa": (fig10_lora_pissa, "Fig. 10"),
    "jaccard": (fig12_jaccard, "Fig. 12"),
    "kl_beta0": (fig15_kl_beta0, "Fig. 15"),
}
