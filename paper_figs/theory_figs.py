"""Theory-vs-empirical figures: measured side against bound, tightness curves, Thm 3.3's three forms, Gate III.

Every function takes a results table (pandas DataFrame, schemas in ``paper_figs.schemas``) and returns a matplotlib
``Figure``; none recomputes an experiment. Check tables have the columns of ``theory.check.Check.as_row()`` plus a
regime variable (``dW_over_gap`` = ||dW||_2 / gamma_k, ``beta``, ``step``, ...; see ``schemas.REGIME_COLUMNS``).

Reading the scatter: a check is ``lhs <= rhs``, so every point on or below the dashed y = x line satisfies its bound;
points above it are violations, drawn with an "x" (``style.VIOLATION_STYLE``) and labelled.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from paper_figs import schemas
from paper_figs.style import (
    ASSUMPTION_LABEL,
    NO_DATA_GID,
    OKABE_ITO,
    VIOLATION_LABEL,
    VIOLATION_STYLE,
    add_identity_line,
    colors_for,
    new_figure,
    no_data_panel,
    set_caption,
)
from theory import RESULTS
from theory.errors import InputError
from theory.precision import predict_change_mask, realization_threshold_array

__all__ = [
    "THM33_FORMS",
    "STATEMENT_TEX",
    "numeric_result_ids",
    "fig_theory_vs_empirical",
    "fig_tightness",
    "fig_thm33_forms",
    "fig_bf16_threshold",
    "bf16_threshold_curve",
]

THM33_FORMS: tuple[tuple[str, str], ...] = (
    ("thm3.3", r"as stated: $\|\sin\Theta\|_2 \leq \|\Delta W\|_2/\gamma_k$"),
    ("thm3.3-wedin", r"Wedin: $\leq \max(\|\Delta W\, V_k^{+}\|_2,\ \|\Delta W^{T} U_k^{+}\|_2)\,/\,\delta$"),
    ("thm3.3-rigorous", r"rigorous: $\leq \|\Delta W\|_2/(\gamma_k - \|\Delta W\|_2)$"),
)

# The statements as mathtext, for axes titles (the registry's plain-text statement goes into the caption).
STATEMENT_TEX: dict[str, str] = {
    "thm3.3": r"$\max(\|\sin\Theta(U_k)\|_2, \|\sin\Theta(V_k)\|_2) \leq \|\Delta W\|_2 / \gamma_k$",
    "thm3.3-wedin": r"$\|\sin\Theta\|_2 \leq \max(\|\Delta W\, V_k^{+}\|_2, \|\Delta W^{T} U_k^{+}\|_2) / \delta$",
    "thm3.3-rigorous": r"$\|\sin\Theta\|_2 \leq \|\Delta W\|_2 / (\gamma_k - \|\Delta W\|_2)$",
    "corF.13": r"$\|U_kU_k^{T}(W_0) - U_kU_k^{T}(W_+)\|_2 = \|\sin\Theta(U_k)\|_2 \leq \|\Delta W\|_2 / \delta$",
    "cor3.4-weyl": r"$|\sigma_i(W_+) - \sigma_i(W_0)| \leq \|\Delta W\|_2$",
    "cor3.4-mirsky": r"$\|\sigma(W_+) - \sigma(W_0)\|_2 \leq \|\Delta W\|_F$",
    "cor3.5": r"$|\|W_+\|_{(k)} - \|W_0\|_{(k)}| \leq \|\Delta W\|_{(k)} \leq k\,\|\Delta W\|_2$",
    "cor3.6": r"$W$ changes $\Leftrightarrow$ $|\Delta W| \geq \frac{1}{2}\mathrm{ULP}(W)$ (as stated)",
    "lemE.1": r"$|x - y| \geq 2^{e-7}$,  $|x-y| / \max(|x|,|y|) > 2^{-8}$",
    "lemE.1-across": r"$|x-y| / \max(|x|,|y|) > 2^{-8}$ across binades (as stated)",
    "lemE.2": r"$\mathrm{ULP}(x) / |x| \in (2^{-8}, 2^{-7}]$",
    "propE.3": r"$|\hat{w} - w| \leq \eta \max(|w|, |\hat{w}|) \Leftrightarrow \hat{w} = w$,  $\eta < 2^{-9}$",
}

_REGIME_LABELS = {
    "dW_over_gap": r"$\|\Delta W\|_2 / \gamma_k$",
    "beta": r"KL coefficient $\beta$",
    "step": "training step",
    "kl": "KL (nats)",
    "eps": r"clip range $\varepsilon$",
    "eta": r"probe tolerance $\eta$",
    "lr": "learning rate",
    "scale": "perturbation scale",
    "w": "stored weight w",
}


def _regime_label(col: str | None) -> str:
    if col is None:
        return "instance index"
    return _REGIME_LABELS.get(col.removeprefix("d_"), col)


def _statement(result_id: str) -> str:
    r = RESULTS.get(result_id)
    return r.statement if r is not None else ""


def _checks(df: pd.DataFrame, result_id: str | None = None) -> pd.DataFrame:
    d = schemas.validate(df, "checks", source="check table")
    if result_id is not None:
        d = d[d["result_id"] == result_id]
        if d.empty:
            raise InputError(f"check table has no rows for result id {result_id!r}; "
                             f"ids present: {sorted(pd.unique(df['result_id']).tolist())}")
    return d


def numeric_result_ids(df: pd.DataFrame) -> list[str]:
    """Result ids with at least one row whose two sides are finite numbers (these get scatter + tightness plots)."""
    d = _checks(df)
    finite = np.isfinite(d["lhs"].to_numpy(float)) & np.isfinite(d["rhs"].to_numpy(float))
    return sorted(pd.unique(d.loc[finite, "result_id"]).tolist())


def _regime_values(d: pd.DataFrame, regime: str | None) -> tuple[str | None, np.ndarray]:
    col = regime if regime is not None else schemas.regime_column(d)
    if col is None:
        return None, np.arange(len(d), dtype=float)
    if col not in d.columns:
        raise InputError(f"regime column {col!r} is not in the check table: {list(d.columns)}")
    return col, pd.to_numeric(d[col], errors="coerce").to_numpy(float)


def _norm_for(values: np.ndarray):
    v = values[np.isfinite(values)]
    if v.size == 0:
        return Normalize(0, 1)
    if v.min() > 0 and v.max() / v.min() > 50:
        return LogNorm(v.min(), v.max())
    lo, hi = float(v.min()), float(v.max())
    return Normalize(lo, hi if hi > lo else lo + 1)


def _positive_floor(*arrays: np.ndarray) -> float:
    pos = np.concatenate([a[np.isfinite(a) & (a > 0)] for a in arrays])
    return float(pos.min()) / 10 if pos.size else 1e-12


def _scatter_sides(ax: Any, d: pd.DataFrame, regime_col: str | None, rv: np.ndarray, fig: Figure,
                   *, colorbar: bool = True) -> dict[str, int]:
    """lhs against rhs on log-log axes, y = x, coloured by regime; violations and assumption failures marked."""
    lhs, rhs = d["lhs"].to_numpy(float), d["rhs"].to_numpy(float)
    ok = np.isfinite(lhs) & np.isfinite(rhs)
    assumed = d["assumptions_hold"].to_numpy(bool)
    stats = {"n": int(len(d)), "finite": int(ok.sum()), "violated": int(((d["verdict"] == "violated").to_numpy(bool)
                                                                          & ok).sum()),
             "assumption_failed": int((~assumed).sum()), "zeros": int(((lhs == 0) | (rhs == 0)).sum())}
    if not ok.any():
        no_data_panel(ax, "no instance with finite lhs and rhs",
                      f"{len(d)} instance(s), {stats['assumption_failed']} with a failed assumption")
        return stats
    floor = _positive_floor(lhs[ok], rhs[ok])
    x, y = np.maximum(rhs, floor), np.maximum(lhs, floor)  # zeros drawn on the bottom edge of the log axes
    violated = (d["verdict"] == "violated").to_numpy(bool)
    good = ok & assumed
    levels = np.unique(rv[good][np.isfinite(rv[good])])
    if len(levels) >= 2:  # colour by regime, with a colorbar
        sc = ax.scatter(x[good], y[good], c=rv[good], cmap="viridis", norm=_norm_for(rv), s=22, alpha=0.85,
                        edgecolors="none", label="instances", gid="instances")
        if colorbar:
            fig.colorbar(sc, ax=ax, label=_regime_label(regime_col), pad=0.02)
    else:  # one regime value: a colour scale would span nothing; the legend says where the instances sit
        where = f" ({_regime_label(regime_col)} = {levels[0]:.4g})" if len(levels) == 1 and regime_col else ""
        ax.scatter(x[good], y[good], color=OKABE_ITO["blue"], s=22, alpha=0.85, edgecolors="none",
                   label=f"instances{where}", gid="instances")
    fa = ok & ~assumed
    if fa.any():
        ax.scatter(x[fa], y[fa], marker="s", s=26, facecolors="none", edgecolors=OKABE_ITO["black"],
                   label=ASSUMPTION_LABEL, gid="assumption-failed")
    nv = stats["violated"]
    if nv:
        ax.scatter(x[violated & ok], y[violated & ok], label=f"{VIOLATION_LABEL}: {nv}", gid="violations",
                   **VIOLATION_STYLE)
        _label_violations(ax, x[violated & ok], y[violated & ok], rv[violated & ok], regime_col)
    if ok.any():
        lo = float(min(x[ok].min(), y[ok].min())) / 1.5
        hi = float(max(x[ok].max(), y[ok].max())) * 1.5
        add_identity_line(ax, lo, hi)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bound (rhs)")
    ax.set_ylabel("measured (lhs)")
    ax.legend(loc="upper left", framealpha=0.85)
    return stats


def _label_violations(ax: Any, x: np.ndarray, y: np.ndarray, rv: np.ndarray, regime_col: str | None,
                      max_labels: int = 2) -> None:
    # Label the worst violations only (more labels overlap); the legend gives the count.
    worst = np.argsort(-(y / x))[:max_labels]
    name = (regime_col or "i").removeprefix("d_")
    for n, i in enumerate(worst):
        ax.annotate(f"worst: {name}={rv[i]:.3g}" if n == 0 else f"{name}={rv[i]:.3g}", (x[i], y[i]),
                    xytext=(8, -14 - 12 * n), textcoords="offset points", fontsize=7,
                    color=VIOLATION_STYLE["color"], gid="violation-label",
                    arrowprops=dict(arrowstyle="-", color=VIOLATION_STYLE["color"], lw=0.6))


def _tightness(ax: Any, d: pd.DataFrame, regime_col: str | None, rv: np.ndarray, *,
               shade_assumption: bool = True) -> None:
    """ratio = lhs/rhs against the regime variable; 1 = bound attained; violations (> 1) marked."""
    lhs, rhs = d["lhs"].to_numpy(float), d["rhs"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):  # rhs = 0: ratio 0 (lhs = 0) or inf, set explicitly
        ratio = np.where(rhs == 0, np.where(lhs == 0, 0.0, np.inf), lhs / np.where(rhs == 0, 1.0, rhs))
    assumed = d["assumptions_hold"].to_numpy(bool)
    violated = (d["verdict"] == "violated").to_numpy(bool)
    indeterminate = (d["verdict"] == "indeterminate").to_numpy(bool)
    # an indeterminate check has a real ratio (|lhs - rhs| within its tolerance): it belongs on the tightness curve
    usable = (assumed | indeterminate) & np.isfinite(ratio) & np.isfinite(rv)
    levels = np.unique(rv[usable])
    if len(levels) < 2:  # a curve against the regime needs two regime values
        what = _one_level(regime_col, levels)
        r = ratio[usable]
        detail = (f"lhs / rhs {r.min():.4g} to {r.max():.4g} over {r.size} instance(s)"
                  + (f" at {_regime_label(regime_col)} = {levels[0]:.4g}" if len(levels) and regime_col else "")
                  if r.size else f"{len(d)} instance(s), none with a finite lhs / rhs and its assumptions")
        no_data_panel(ax, what, detail)
        return
    order = np.argsort(rv, kind="stable")
    good = usable[order]
    # A line only for a single sweep (one matrix / one run); instances from many matrices stay points.
    groups = max([d[c].nunique() for c in ("name", "run", "layer", "matrix_type") if c in d.columns] or [1])
    sweep = groups == 1 and len(np.unique(rv[good[np.argsort(order)]])) == int(good.sum())
    ax.plot(rv[order][good], ratio[order][good], "o-" if sweep else "o", ms=3, lw=0.8,
            color=OKABE_ITO["blue"], alpha=0.8, label="lhs / rhs", gid="tightness")
    # "indeterminate": |lhs - rhs| within the check's tolerance (float64 cannot decide); drawn at its ratio, neither
    # hidden nor shown as a violation or as a failed assumption
    within_tol = indeterminate & np.isfinite(ratio) & np.isfinite(rv)
    if within_tol.any():
        ax.scatter(rv[within_tol], ratio[within_tol], marker="o", s=30, facecolors="none",
                   edgecolors=OKABE_ITO["black"], linewidths=0.8, gid="within-tolerance",
                   label=f"indeterminate (|lhs - rhs| within tolerance): {int(within_tol.sum())}")
    ax.axhline(1.0, ls="--", color=OKABE_ITO["black"], lw=1.0, label="bound attained (ratio = 1)", gid="ratio-one")
    shown_v = violated & np.isfinite(ratio) & np.isfinite(rv)
    if shown_v.any():
        ax.scatter(rv[shown_v], ratio[shown_v], label=f"{VIOLATION_LABEL}: {int(shown_v.sum())}", gid="violations",
                   **VIOLATION_STYLE)
    fa = ~assumed & ~indeterminate & np.isfinite(rv)
    if fa.any():
        # A failed assumption has no meaningful ratio: mark where along the regime axis it happened.
        ax.plot(rv[fa], np.zeros(int(fa.sum())), "|", ms=14, mew=1.5, color=OKABE_ITO["black"],
                transform=ax.get_xaxis_transform(), label=f"{ASSUMPTION_LABEL}: {int(fa.sum())}", gid="assumption-failed")
        if shade_assumption:
            lo, hi = float(rv[fa].min()), float(rv[fa].max())
            if lo == hi:  # one regime value: widen so the band is visible (10% either side, log or linear)
                lo, hi = (lo / 1.1, hi * 1.1) if lo > 0 else (lo - 0.05 * (abs(lo) or 1), hi + 0.05 * (abs(hi) or 1))
            ax.axvspan(lo, hi, color=OKABE_ITO["yellow"], alpha=0.35, lw=0, label="range of assumption failures",
                       gid="assumption-region")
    ax.set_xlabel(_regime_label(regime_col))
    ax.set_ylabel("tightness  lhs / rhs")
    fin = rv[np.isfinite(rv)]
    if fin.size and fin.min() > 0 and fin.max() / fin.min() > 50:
        ax.set_xscale("log")
    pos = ratio[np.isfinite(ratio) & (ratio > 0)]
    if pos.size and pos.max() / pos.min() > 100:
        ax.set_yscale("log")
    ax.legend(loc="best", framealpha=0.85)


_REGIME_UNITS = {"step": "training step", "beta": "beta value", "lr": "learning rate", "eps": "clip range",
                 "eta": "probe tolerance", "scale": "perturbation scale"}


def _one_level(regime_col: str | None, levels: np.ndarray) -> str:
    """The reason a tightness curve cannot be drawn: "1 training step", "no instance", ..."""
    if len(levels) == 0:
        return "no instance with a finite lhs / rhs"
    if regime_col is None:
        return "1 instance"
    name = regime_col.removeprefix("d_")
    return f"1 {_REGIME_UNITS.get(name, 'value of ' + name)}"


def _summary(stats: dict[str, int]) -> str:
    s = f"{stats['n']} instance(s), {stats['violated']} violation(s), {stats['assumption_failed']} with a failed assumption"
    if stats.get("zeros"):
        s += f", {stats['zeros']} with a zero side (drawn on the axis edge)"
    return s


def fig_theory_vs_empirical(df: pd.DataFrame, result_id: str, *, regime: str | None = None) -> Figure:
    """Measured lhs against bound rhs (log-log, y = x) and the tightness curve lhs/rhs against the regime.

    Shapes: one row per instance; ``lhs, rhs: float`` (NaN allowed where an assumption failed), regime numeric.
    """
    d = _checks(df, result_id)
    regime_col, rv = _regime_values(d, regime)
    fig, axes = new_figure(1, 2, width=11.0, height=4.6)
    stats = _scatter_sides(axes[0, 0], d, regime_col, rv, fig)
    axes[0, 0].set_title("measured vs bound\n" + STATEMENT_TEX.get(result_id, result_id), fontsize=9)
    _tightness(axes[0, 1], d, regime_col, rv)
    axes[0, 1].set_title("tightness")
    stmt = _statement(result_id)
    caption = (f"{result_id}: {stmt.rstrip('. ')}. " if stmt else f"{result_id}: ") + f"{_summary(stats)}. " \
              + schemas.describe_run(d)
    return set_caption(fig, f"Theory vs empirical: {result_id}", caption)


def fig_tightness(df: pd.DataFrame, result_id: str, *, regime: str | None = None) -> Figure:
    """The tightness curve alone: lhs/rhs against the regime variable (1 = bound attained)."""
    d = _checks(df, result_id)
    regime_col, rv = _regime_values(d, regime)
    fig, axes = new_figure(1, 1, width=6.0, height=4.4)
    _tightness(axes[0, 0], d, regime_col, rv)
    nv = int((d["verdict"] == "violated").sum())
    return set_caption(fig, f"Tightness: {result_id}",
                       f"{result_id}: lhs/rhs against {_regime_label(regime_col)}; {len(d)} instance(s), "
                       f"{nv} violation(s). " + schemas.describe_run(d))


def fig_thm33_forms(df: pd.DataFrame, *, regime: str | None = None) -> Figure:
    """Thm 3.3 in its three forms side by side: top row lhs vs rhs, bottom row tightness against ||dW||_2/gamma_k.

    The as-stated form is first order and may be violated for large ||dW||_2/gamma_k; Wedin's (perturbed gap) and
    the rigorous W0-only form must hold wherever their assumptions do. The rigorous form assumes ||dW||_2 < gamma_k
    (plus a positive gap): failures are shaded and ticked on the regime axis.
    """
    d_all = _checks(df)
    present = [(rid, lab) for rid, lab in THM33_FORMS if (d_all["result_id"] == rid).any()]
    if not present:
        raise InputError("check table has none of the Thm 3.3 ids " + ", ".join(r for r, _ in THM33_FORMS))
    fig, axes = new_figure(2, len(present), width=4.6 * len(present) + 0.6, height=8.4)
    parts = []

    def finite(rid: str) -> bool:
        d = d_all[d_all["result_id"] == rid]
        return bool((np.isfinite(d["lhs"].to_numpy(float)) & np.isfinite(d["rhs"].to_numpy(float))).any())

    with_data = [j for j, (rid, _) in enumerate(present) if finite(rid)]
    cbar_j = with_data[-1] if with_data else -1  # one colorbar, on the last panel that has points
    for j, (rid, label) in enumerate(present):
        d = d_all[d_all["result_id"] == rid]
        regime_col, rv = _regime_values(d, regime)
        stats = _scatter_sides(axes[0, j], d, regime_col, rv, fig, colorbar=(j == cbar_j))
        axes[0, j].set_title(f"{rid}\n{label}", fontsize=9)
        _tightness(axes[1, j], d, regime_col, rv)
        if (regime_col is not None and regime_col.removeprefix("d_") == "dW_over_gap"
                and not any(t.get_gid() == NO_DATA_GID for t in axes[1, j].texts)):
            axes[1, j].axvline(1.0, color=OKABE_ITO["black"], lw=0.8, ls=":", gid="gap-line")
        parts.append(f"{rid}: {stats['violated']} violated, {stats['assumption_failed']} assumption-failed "
                     f"of {stats['n']}")
    caption = ("Thm 3.3 (Davis-Kahan/Wedin sin-theta bound), three forms. " + "; ".join(parts)
               + ". The as-stated form is first order only; the rigorous form needs ||dW||_2 < gamma_k (dotted "
               "line at 1). " + schemas.describe_run(d_all))
    return set_caption(fig, "Thm 3.3: as stated vs Wedin vs rigorous", caption)


# ---------------------------------------------------------------------------------------------------------------
# Gate III: the exact realization threshold of a bf16 weight
# ---------------------------------------------------------------------------------------------------------------

def _bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) to float64, exactly (bf16 is the top half of an fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _as_bf16(w: np.ndarray) -> np.ndarray:
    """float64 -> ml_dtypes.bfloat16, refusing values that are not exactly representable (they would be rounded)."""
    wb = w.astype(np.float32).astype(ml_dtypes.bfloat16)
    bad = wb.astype(np.float64) != w
    if bad.any():
        raise InputError(f"bf16 update table: column 'w' must hold bf16 values exactly; {int(bad.sum())} row(s) do "
                         f"not, e.g. w = {w[bad][0]!r}")
    return wb


def bf16_threshold_curve(lo: float, hi: float, semantics: str = "exact") -> pd.DataFrame:
    """Every positive normal bf16 value w in the binades covering [lo, hi], with its exact thresholds.

    ``up`` / ``down``: the smallest |delta| that changes stored w when delta > 0 / delta < 0, from
    ``theory.precision.realization_threshold_array`` (half the gap to the neighbour in that direction under
    ``"exact"`` round-to-nearest-even: ½ ULP(w) up, ¼ ULP(w) down at an exact power of two). ``up_incl`` /
    ``down_incl``: the threshold itself changes w (a tie that rounds to an even neighbour).
    Columns: w, up, down, up_incl, down_incl.
    """
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
        raise InputError(f"threshold curve needs 0 < lo <= hi, finite; got lo={lo!r}, hi={hi!r}")
    e_lo = max(math.floor(math.log2(lo)), -126)
    e_hi = min(math.floor(math.log2(hi)), 127)
    e_hi = min(e_hi, e_lo + 63)  # at most 64 binades (128 values each)
    bits = np.arange((e_lo + 127) << 7, ((e_hi + 127) << 7) + 128, dtype=np.uint32).astype(np.uint16)
    bits = bits[bits < 0x7F80]  # the top binade ends at BF16_MAX, not at infinity
    w = _bf16_bits_to_f64(bits)
    wb = _as_bf16(w)
    up, up_incl = realization_threshold_array(wb, np.ones_like(w), semantics)
    down, down_incl = realization_threshold_array(wb, -np.ones_like(w), semantics)
    return pd.DataFrame({"w": w, "up": up, "down": down, "up_incl": up_incl, "down_incl": down_incl})


def fig_bf16_threshold(df: pd.DataFrame, *, semantics: str | None = None) -> Figure:
    """Gate III: the exact threshold for a bf16 weight to change, against |w|, with measured updates overlaid.

    Left: absolute threshold (a staircase over binades) with |delta| of real updates. Right: relative threshold
    threshold/|w| — the saw-tooth between 2^-9 and 2^-8 — with |delta|/|w|. The downward curve drops to ¼ ULP at
    each power of two. Filled markers changed the stored value, hollow ones did not; an "x" marks a measured
    outcome that disagrees with the exact rule (``theory.precision.predict_change_mask``) under ``semantics``:
    ``"exact"`` (one rounding of the exact sum) or ``"fp32"`` (add in float32, then round to bf16); default
    ``df.attrs['semantics']`` or ``"exact"``.
    """
    semantics = semantics or df.attrs.get("semantics", "exact")
    d = schemas.validate(df, "bf16_updates", source="bf16 update table")
    w = d["w"].to_numpy(float)
    delta = d["delta"].to_numpy(float)
    changed = d["changed"].to_numpy(bool)
    nz = w != 0
    if not nz.any():
        raise InputError("bf16 update table: every w is zero; the threshold is defined for normal nonzero w")
    mag = np.abs(w[nz])
    curve = bf16_threshold_curve(float(mag.min()), float(mag.max()))
    cw = curve["w"].to_numpy()
    fig, axes = new_figure(1, 2, width=11.5, height=4.8)
    ax_abs, ax_rel = axes[0, 0], axes[0, 1]
    pow2 = (cw == np.exp2(np.floor(np.log2(cw))))
    for ax, scale in ((ax_abs, np.ones_like(cw)), (ax_rel, cw)):
        ax.plot(cw, curve["down"] / scale, color=OKABE_ITO["orange"], lw=2.2, ls="--",
                label=r"downward (toward 0): $\frac{1}{2}$ gap below", gid="threshold-down")
        ax.plot(cw, curve["up"] / scale, color=OKABE_ITO["blue"], lw=1.1,
                label=r"upward: $\frac{1}{2}\mathrm{ULP}(w)$ (Cor. 3.6 as stated)", gid="threshold-up")
        ax.scatter(cw[pow2], (curve["down"] / scale)[pow2], marker="D", s=22, color=OKABE_ITO["orange"],
                   edgecolors=OKABE_ITO["black"], linewidths=0.5, zorder=4, gid="pow2-down",
                   label=r"$w = 2^e$: downward threshold $\frac{1}{4}\mathrm{ULP}(w)$")
    away = np.sign(delta) == np.sign(w)
    pred = predict_change_mask(_as_bf16(w), delta, semantics)
    disagree = pred != changed
    for ax, yv in ((ax_abs, np.abs(delta)), (ax_rel, np.abs(delta) / np.where(nz, np.abs(w), np.nan))):
        for mask, marker, name in ((away, "^", "away from 0"), (~away, "v", "toward 0")):
            m1, m0 = nz & mask & changed, nz & mask & ~changed
            if m1.any():
                ax.scatter(np.abs(w[m1]), yv[m1], marker=marker, s=22, color=OKABE_ITO["green"],
                           label=f"changed ({name})", gid="changed")
            if m0.any():
                ax.scatter(np.abs(w[m0]), yv[m0], marker=marker, s=22, facecolors="none",
                           edgecolors=OKABE_ITO["purple"], label=f"unchanged ({name})", gid="unchanged")
        if (disagree & nz).any():
            ax.scatter(np.abs(w[disagree & nz]), yv[disagree & nz], gid="violations",
                       label=f"disagrees with exact rule ({semantics}): {int((disagree & nz).sum())}", **VIOLATION_STYLE)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel(r"$|w|$ (stored bf16 weight)")
    ax_abs.set_ylabel(r"$|\Delta w|$ needed to change (absolute)")
    ax_rel.set_ylabel(r"relative threshold $|\Delta w| / |w|$")
    ax_rel.axhline(2.0 ** -9, color=OKABE_ITO["black"], lw=0.7, ls=":", gid="bound-2^-9")
    ax_rel.axhline(2.0 ** -8, color=OKABE_ITO["black"], lw=0.7, ls=":", gid="bound-2^-8")
    ax_abs.set_title("exact threshold (staircase)")
    ax_rel.set_title(r"relative threshold (saw-tooth in $(2^{-9}, 2^{-8}]$)")
    ax_abs.legend(loc="upper left", framealpha=0.85, fontsize=7)
    n_change = int(changed.sum())
    caption = (f"Gate III, Cor. 3.6 / Lemma E.2: a bf16 weight changes iff the step crosses half the gap to its "
               f"neighbour in the step's direction (round-to-nearest-even; ties to even). {len(d)} measured update(s): "
               f"{n_change} changed, {len(d) - n_change} unchanged, {int(disagree.sum())} disagree with the exact "
               f"rule under {semantics!r} semantics. " + schemas.describe_run(d))
    return set_caption(fig, "Gate III: bf16 realization threshold", caption)
