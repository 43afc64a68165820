"""Tests for paper_figs.live_figs (the per-step figure of a live run) and the step_sparsity schema."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from paper_figs import live_figs, schemas
from theory.errors import InputError
from threegate.callback import pool_steps
from threegate.live import MatrixCounts
from threegate.callback import steps_frame


def _steps(n_steps: int) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for t in range(1, n_steps + 1):
        for layer in (0, 1):
            for mt, numel in (("q", 64), ("down", 128)):
                changed = int(rng.integers(0, numel // 2))
                rows.append(MatrixCounts(t, f"model.layers.{layer}.{'self_attn' if mt == 'q' else 'mlp'}.{mt}_proj.weight",
                                         numel, changed, changed + 3 * t, changed // 3, -1 if t == 1 else 10))
    return pool_steps(steps_frame(rows), "matrix_type").assign(run="RL-seed0", model="tiny")


def _inside(fig) -> None:
    """Every axes (with its drawn tick labels, axis labels, title and legend) and every figure text lies inside
    the canvas once drawn by Agg (a bare ``Figure`` has a base canvas that lays nothing out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    box = fig.bbox
    parts = [(ax.get_title() or f"axes {i}", ax.get_tightbbox(r)) for i, ax in enumerate(fig.axes) if ax.get_visible()]
    parts += [(t.get_text()[:30], t.get_window_extent(r)) for t in fig.texts + [fig._suptitle] if t is not None]
    for what, ext in parts:
        assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1 and ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1, what


def test_step_sparsity_table_is_identified_and_drawn_with_every_label_inside():
    df = _steps(4)
    assert schemas.identify(df) == "step_sparsity"
    assert schemas.identify(df, "step_sparsity.parquet") == "step_sparsity"
    assert schemas.identify(df, "steps_by_layer.parquet") is None  # listed in OTHER_TABLES
    fig = live_figs.fig_step_sparsity(df)
    _inside(fig)
    ax_jac = fig.axes[2]
    (line,) = [ln for ln in ax_jac.get_lines() if ln.get_gid() == "jaccard_prev-all"]
    expected = df[df["matrix_type"] == "all"].sort_values("step")["jaccard_prev"].to_numpy()
    np.testing.assert_array_equal(line.get_ydata(), expected)
    assert "consecutive Jaccard" in fig.threegate_caption


def test_one_step_says_not_enough_data_and_bad_values_raise():
    fig = live_figs.fig_step_sparsity(_steps(1))
    assert any(t.get_gid() == "not-enough-data" for t in fig.axes[2].texts)
    bad = _steps(2)
    bad.loc[0, "sparsity_step"] = 1.5
    with pytest.raises(InputError, match="sparsity_step"):
        live_figs.fig_step_sparsity(bad)
    with pytest.raises(InputError, match="lacks column"):
        live_figs.fig_step_sparsity(_steps(2).drop(columns="jaccard_prev"))


def test_pooled_jaccard_from_counts():
    rows = [MatrixCounts(1, "a", 10, 4, 4, 0, -1), MatrixCounts(2, "a", 10, 2, 5, 1, 4),
            MatrixCounts(1, "b", 6, 0, 0, 0, -1), MatrixCounts(2, "b", 6, 0, 0, 0, 0)]
    g = pool_steps(steps_frame(rows), "matrix_type").set_index(["step", "matrix_type"])
    assert np.isnan(g.loc[(1, "all"), "jaccard_prev"])
    assert g.loc[(2, "all"), "jaccard_prev"] == 1 / (2 + 4 - 1)
    assert g.loc[(2, "all"), "sparsity_step"] == 1 - 2 / 16
    assert g.loc[(2, "all"), "baseline_prev"] == pytest.approx((2 / 16) * (4 / 16) / (2 / 16 + 4 / 16 - 2 * 4 / 256),
                                                               rel=1e-15)
