"""Shared figure style: Okabe–Ito colours, readable fonts, a light grid, captions written onto the figure.

Every figure function in ``paper_figs`` draws on a figure made by :func:`new_figure` and finishes with
:func:`set_caption`, which writes the caption under the axes (so a PNG on its own says what was run) and keeps it on
``fig.threegate_caption`` for the HTML report. Violations of a bound are always drawn with :data:`VIOLATION_STYLE`
and labelled ``VIOLATION_LABEL`` so a reader (and a test) can find them.
"""

from __future__ import annotations

import textwrap
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = [
    "OKABE_ITO",
    "VIOLATION_STYLE",
    "VIOLATION_LABEL",
    "REFERENCE_LABEL",
    "ASSUMPTION_LABEL",
    "RC",
    "color_for",
    "colors_for",
    "new_figure",
    "set_caption",
    "caption_of",
    "add_identity_line",
    "request_colorbar",
    "integer_ticks",
]

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO: dict[str, str] = {
    "blue": "#0072B2",
    "orange": "#E69F00",
    "green": "#009E73",
    "vermillion": "#D55E00",
    "sky": "#56B4E9",
    "purple": "#CC79A7",
    "yellow": "#F0E442",
    "black": "#000000",
}
_CYCLE = ["blue", "orange", "green", "purple", "sky", "vermillion", "yellow", "black"]

# Violations: a red-orange "x" over the point, never used for anything else.
VIOLATION_LABEL = "violation (lhs > rhs)"
VIOLATION_STYLE: dict[str, Any] = dict(marker="x", s=70, linewidths=2.0, color=OKABE_ITO["vermillion"], zorder=5)
REFERENCE_LABEL = "y = x (bound attained)"
ASSUMPTION_LABEL = "assumption failed"

RC: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=[OKABE_ITO[c] for c in _CYCLE]),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "mathtext.fontset": "dejavusans",
    "image.cmap": "viridis",  # perceptually uniform and colour-blind safe
}


def color_for(i: int) -> str:
    """The i-th colour of the Okabe–Ito cycle (wraps around)."""
    return OKABE_ITO[_CYCLE[i % len(_CYCLE)]]


def colors_for(keys: Iterable[Any]) -> dict[Any, str]:
    """A stable key -> colour map in order of first appearance."""
    out: dict[Any, str] = {}
    for k in keys:
        if k not in out:
            out[k] = color_for(len(out))
    return out


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float | None = None, height: float | None = None,
               squeeze: bool = False, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure in the project style; ``axes`` is a 2-D array unless ``squeeze``.

    Uses the object-oriented API (``Figure`` directly, no pyplot state), so figures never leak between calls.
    """
    width = width if width is not None else 4.2 * ncols + 0.6
    height = height if height is not None else 3.4 * nrows + 0.9
    with plt.rc_context(RC):
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(nrows, ncols, squeeze=squeeze, **kwargs)
    for ax in fig.axes:
        _style_axes(ax)
    return fig, axes


def _style_axes(ax: Any) -> None:
    # rc_context only applies while the axes are created; set what matters explicitly so it survives saving.
    ax.grid(True, alpha=RC["grid.alpha"], linewidth=RC["grid.linewidth"])
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_prop_cycle(RC["axes.prop_cycle"])


def set_caption(fig: Figure, title: str, caption: str, *, width: int = 120) -> Figure:
    """Title above, caption (wrapped) below the axes; kept on ``fig.threegate_caption`` for the report."""
    # Wrap to the figure's width: ~15 characters per inch at 8 pt, ~8 per inch for the 12 pt bold title.
    w_in = fig.get_figwidth()
    title_wrapped = "\n".join(textwrap.wrap(title, width=max(30, int(w_in * 8))))
    fig.suptitle(title_wrapped, fontsize=12, fontweight="bold")
    wrapped = "\n".join(textwrap.wrap(caption, width=min(width, max(40, int(w_in * 15)))))
    n_lines = wrapped.count("\n") + 1
    fig.text(0.01, 0.005, wrapped, ha="left", va="bottom", fontsize=8, wrap=False, gid="threegate-caption")
    h = fig.get_figheight()
    bottom = min(0.45, (0.62 + 0.14 * n_lines) / h)  # inches: tick labels + axis label + caption lines
    extra_title = 0.22 * title_wrapped.count("\n")
    top = 1 - ((0.95 if title_lines(fig) > 1 else 0.6) + extra_title) / h  # suptitle above two-line axes titles
    pending = getattr(fig, "_threegate_colorbar", None)
    fig.subplots_adjust(bottom=bottom, top=top, hspace=0.55, wspace=0.38, right=0.87 if pending else 0.97)
    if pending is not None:  # a shared colorbar in its own axes, placed after the layout is fixed
        mappable, label = pending
        cax = fig.add_axes((0.9, bottom, 0.018, top - bottom), label="<colorbar>")
        fig.colorbar(mappable, cax=cax, label=label)
    fig.threegate_title = title  # type: ignore[attr-defined]
    fig.threegate_caption = caption  # type: ignore[attr-defined]
    return fig


def request_colorbar(fig: Figure, mappable: Any, label: str) -> None:
    """Ask :func:`set_caption` for one colorbar shared by all panels, to the right of the grid."""
    fig._threegate_colorbar = (mappable, label)  # type: ignore[attr-defined]


def title_lines(fig: Figure) -> int:
    """Most lines in any axes title (two-line titles need more room under the suptitle)."""
    return max([ax.get_title().count("\n") + 1 for ax in fig.axes if ax.get_title()] or [1])


def caption_of(fig: Figure) -> str:
    """Title and caption of a figure made here (empty string for foreign figures)."""
    return f"{getattr(fig, 'threegate_title', '')}. {getattr(fig, 'threegate_caption', '')}".strip(". ")


def add_identity_line(ax: Any, lo: float, hi: float) -> Any:
    """The y = x reference (a bound attained with equality), dashed black, spanning [lo, hi]."""
    (line,) = ax.plot([lo, hi], [lo, hi], ls="--", color=OKABE_ITO["black"], lw=1.0, label=REFERENCE_LABEL,
                      gid="identity")
    return line


def integer_ticks(ax: Any, axis: str = "x") -> None:
    """Integer-only tick labels (layers, indices, steps)."""
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
