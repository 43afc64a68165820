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
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter  # noqa: E402

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
    "no_data_panel",
    "no_data_texts",
    "NO_DATA_GID",
    "finalize",
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

    Uses the object-oriented API (``Figure`` with an Agg canvas, no pyplot state), so figures never leak between
    calls. The layout is matplotlib's constrained layout: tick labels, axis labels, legends and colorbars are fitted
    inside the canvas; :func:`set_caption` reserves the strip under the axes for the caption.
    """
    width = width if width is not None else 4.2 * ncols + 0.6
    height = height if height is not None else 3.4 * nrows + 0.9
    with plt.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
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


#: Caption font size (points) and line height (inches: 8 pt x 1.2 line spacing / 72, plus a little slack).
CAPTION_FONTSIZE = 8
_CAPTION_LINE_IN = CAPTION_FONTSIZE * 1.25 / 72
#: Characters of the 8 pt caption per inch of figure width (DejaVu Sans averages ~0.55 em per character).
_CAPTION_CHARS_PER_IN = 15


def set_caption(fig: Figure, title: str, caption: str, *, width: int = 120) -> Figure:
    """Title above, caption (wrapped) below the axes; kept on ``fig.threegate_caption`` for the report.

    Also places the colorbar asked for with :func:`request_colorbar` and finishes the figure with
    :func:`finalize` (layout fixed, crowded tick labels thinned), so the returned figure is what a reader sees.
    """
    w_in, h_in = fig.get_figwidth(), fig.get_figheight()
    title_wrapped = "\n".join(textwrap.wrap(title, width=max(30, int(w_in * 8))))
    fig.suptitle(title_wrapped, fontsize=12, fontweight="bold")
    chars = min(width, max(40, int(w_in * _CAPTION_CHARS_PER_IN)))
    cap = fig.text(0.01, 0.005, "", ha="left", va="bottom", fontsize=CAPTION_FONTSIZE, wrap=False,
                   gid="threegate-caption")
    cap.set_in_layout(False)  # the layout gets the strip under the axes instead (rect below)
    pending = getattr(fig, "_threegate_colorbar", None)
    if pending is not None:  # one colorbar shared by every visible panel, placed by the layout engine
        mappable, label = pending
        panels = [ax for ax in fig.axes if ax.get_visible()]
        fig.colorbar(mappable, ax=panels, label=label)
    fig.threegate_title = title  # type: ignore[attr-defined]
    fig.threegate_caption = caption  # type: ignore[attr-defined]
    renderer = fig.canvas.get_renderer()
    for _ in range(4):  # wrap until the caption fits the canvas's width (measured, not guessed)
        wrapped = "\n".join(textwrap.wrap(caption, width=chars))
        cap.set_text(wrapped)
        if cap.get_window_extent(renderer).x1 <= fig.bbox.x1 - 2 or chars <= 30:
            break
        chars = int(chars * 0.85)
    n_lines = wrapped.count("\n") + 1
    strip = min(0.45, (n_lines * _CAPTION_LINE_IN + 0.08) / h_in)
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.set(rect=(0.0, strip, 1.0, 1.0 - strip), w_pad=0.06, h_pad=0.06)
    return finalize(fig)


def request_colorbar(fig: Figure, mappable: Any, label: str) -> None:
    """Ask :func:`set_caption` for one colorbar shared by all panels, to the right of the grid."""
    fig._threegate_colorbar = (mappable, label)  # type: ignore[attr-defined]


def title_lines(fig: Figure) -> int:
    """Most lines in any axes title (two-line titles need more room under the suptitle)."""
    return max([ax.get_title().count("\n") + 1 for ax in fig.axes if ax.get_title()] or [1])


NO_DATA_GID = "not-enough-data"


def no_data_panel(ax: Any, reason: str, detail: str = "") -> None:
    """Turn ``ax`` into a clear "not enough data (reason)" panel: no ticks, no grid, the reason in the middle.

    For degenerate inputs (one step, one layer, one run, a column that is all NaN) a figure draws this instead of
    an empty axis or one whose range is a rounding artefact; ``detail`` (e.g. the one value there is) goes under it.

    Examples
    --------
    >>> fig, axes = new_figure(1, 1)
    >>> no_data_panel(axes[0, 0], "1 step", "KL at step 3: 0.002 nats")
    >>> no_data_texts(fig)
    ['not enough data (1 step)\\nKL at step 3: 0.002 nats']
    """
    # Remove what was drawn artist by artist (``cla`` would reset tickers that shared axes hold in common) and
    # hide this panel's ticks through its own tick parameters (set_xticks would empty every shared panel).
    for artist in [*ax.lines, *ax.collections, *ax.patches, *ax.texts, *ax.images]:
        artist.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="both", which="both", bottom=False, left=False, top=False, right=False,
                   labelbottom=False, labelleft=False, labeltop=False, labelright=False)
    ax.grid(False)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(True)
        ax.spines[side].set_color("#bbbbbb")
    ax.set_facecolor("#f7f7f7")
    # wrap to the panel: its share of the figure's width, ~11 characters of 10 pt text per inch
    spec = ax.get_subplotspec()
    cols = spec.get_gridspec().ncols if spec is not None else 1
    chars = max(18, int(ax.figure.get_figwidth() / cols * 11))
    lines = textwrap.wrap(f"not enough data ({reason})", chars) + (textwrap.wrap(detail, chars) if detail else [])
    ax.text(0.5, 0.5, "\n".join(lines), transform=ax.transAxes, ha="center", va="center", fontsize=10,
            color="#444444", gid=NO_DATA_GID)


def no_data_texts(fig: Figure) -> list[str]:
    """The texts of every "not enough data" panel of a figure (for captions and tests)."""
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == NO_DATA_GID]


def finalize(fig: Figure) -> Figure:
    """Lay out once (no rasterising), thin tick labels that would overlap on any axis, and freeze the layout (the
    constrained layout is not recomputed on every later draw or save: it costs more than the drawing); returns
    ``fig``."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    changed = False
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            changed |= _thin_tick_labels(axis, renderer)
    if changed:
        fig.draw_without_rendering()
    fig.set_layout_engine("none")
    return fig


def _visible_tick_labels(axis: Any, minor: bool) -> list[tuple[float, Any]]:
    ticks = axis.get_minor_ticks() if minor else axis.get_major_ticks()
    locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for loc, tick in zip(locs, ticks):
        for lab in (tick.label1, tick.label2):
            if lab.get_visible() and lab.get_text() and lo <= loc <= hi:
                out.append((float(loc), lab))
    return out


def _thin_tick_labels(axis: Any, renderer: Any) -> bool:
    """Keep tick labels left to right (bottom to top) while they do not overlap the last one kept.

    A log axis first drops its minor labels when at least two major ones show. Dropped ticks are removed through a
    ``FixedLocator`` (the formatter is kept, so offsets and units stay right). Returns whether anything changed.
    """
    pad = 2.0  # pixels between neighbouring labels

    def overlapping(labels) -> bool:
        boxes = [lab.get_window_extent(renderer).padded(pad / 2) for _, lab in labels]
        return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])

    major = _visible_tick_labels(axis, minor=False)
    minor = _visible_tick_labels(axis, minor=True)
    if not overlapping(major + minor):
        return False
    if minor and axis.get_scale() == "log" and len(major) >= 2:
        axis.set_minor_formatter(NullFormatter())
        minor = []
        if not overlapping(major):
            return True
    kept: list[tuple[float, Any]] = []
    last = None
    for loc, lab in sorted(major + minor, key=lambda p: p[0]):
        box = lab.get_window_extent(renderer).padded(pad / 2)
        if last is None or not box.overlaps(last):
            kept.append((loc, lab))
            last = box
    keep = {loc for loc, _ in kept}
    major_locs = [loc for loc in axis.get_majorticklocs() if loc in keep or not _has_label(axis, loc, False)]
    axis.set_major_locator(FixedLocator(major_locs))
    if minor:
        minor_locs = [loc for loc in axis.get_minorticklocs() if loc in keep or not _has_label(axis, loc, True)]
        axis.set_minor_locator(FixedLocator(minor_locs))
    return True


def _has_label(axis: Any, loc: float, minor: bool) -> bool:
    return any(l == loc for l, _ in _visible_tick_labels(axis, minor))


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
