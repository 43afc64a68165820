"""What a reader sees in every figure: rendered with Agg, every text inside the canvas, no two tick labels of one
axis overlapping, and degenerate inputs (one step, one layer, one run, an all-NaN column) drawn as a clear
"not enough data" panel instead of an empty axis or a rounding-noise range.

Every figure function of ``paper_figs.paper_figs``, ``paper_figs.theory_figs`` and ``paper_figs.sweep_figs`` gets a
small synthetic table (schemas in ``paper_figs.schemas``) in a normal and, where one exists, a degenerate form
(``CASES``); ``test_every_figure_function_has_a_case`` fails when a new figure function has none.

The geometry checks use the figure's own Agg renderer (``fig.canvas.get_renderer()``) after a full draw: the
window extent of every visible ``Text`` (titles, suptitle, caption, axis labels, legend entries and titles,
annotations, colorbar labels, offset texts, and the tick labels matplotlib actually draws: the ones inside the
view interval) must lie inside the figure's bounding box, up to ``EDGE_PX`` pixels of anti-aliasing.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from paper_figs import paper_figs as pf
from paper_figs import sweep_figs as sf
from paper_figs import theory_figs as tf
from paper_figs.style import NO_DATA_GID, no_data_texts
from theory.check import assumption_failed, make_check

RUN = dict(model="tinygpt-2L", seed=7, steps=40)
MT = ["q", "k", "v", "o", "up", "gate", "down"]
#: Text may touch the canvas edge by this much (pixels at 100 dpi): anti-aliased glyph edges, not clipping.
EDGE_PX = 1.0


# ------------------------------------------------------------------------------------------------ geometry
def _drawn_tick_labels(axis) -> list[Text]:
    """The tick labels matplotlib draws: visible, non-empty, at a tick inside the view interval."""
    lo, hi = sorted(axis.get_view_interval())
    span = (hi - lo) or 1.0
    out = []
    for ticks, locs in ((axis.get_major_ticks(len(axis.get_majorticklocs())), axis.get_majorticklocs()),
                        (axis.get_minor_ticks(len(axis.get_minorticklocs())), axis.get_minorticklocs())):
        for tick, loc in zip(ticks, locs):
            if not (lo - 1e-10 * span <= loc <= hi + 1e-10 * span):
                continue
            out += [lab for lab in (tick.label1, tick.label2)
                    if lab.get_visible() and lab.get_text() and (tick.get_visible())]
    return out


def _all_tick_label_ids(fig) -> set[int]:
    ids = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in [*axis.majorTicks, *axis.minorTicks]:
                ids |= {id(tick.label1), id(tick.label2)}
    return ids


def _shown(t: Text) -> bool:
    if not (t.get_visible() and t.get_text().strip()):
        return False
    ax = t.axes
    if ax is not None and not ax.get_visible():
        return False
    leg = getattr(ax, "get_legend", lambda: None)() if ax is not None else None
    return not (leg is not None and not leg.get_visible() and t in leg.get_texts())


def reader_texts(fig) -> list[tuple[str, Text]]:
    """(kind, Text) for every text a reader sees: tick labels as drawn, and every other visible text."""
    fig.canvas.draw()
    ticks = _all_tick_label_ids(fig)
    out = [("text", t) for t in fig.findobj(Text) if id(t) not in ticks and _shown(t)]
    for ax in fig.axes:
        if ax.get_visible():
            for axis in (ax.xaxis, ax.yaxis):
                out += [("tick", t) for t in _drawn_tick_labels(axis)]
    return out


def assert_readable(fig) -> None:
    """Every text inside the canvas; no two drawn tick labels of one axis overlap."""
    renderer = fig.canvas.get_renderer()
    texts = reader_texts(fig)
    canvas = fig.bbox.padded(EDGE_PX)
    outside = []
    for kind, t in texts:
        box = t.get_window_extent(renderer)
        if not (canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1):
            outside.append(f"{kind} {t.get_text()[:40]!r} at {np.round(box.extents, 1).tolist()}")
    assert not outside, f"text outside the canvas {np.round(fig.bbox.extents, 1).tolist()}: {outside}"
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = _drawn_tick_labels(axis)
            boxes = [lab.get_window_extent(renderer) for lab in labels]
            clash = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes))
                     for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
            assert not clash, f"{name} tick labels overlap on axes {ax.get_title()!r}: {clash}"


# ------------------------------------------------------------------------------------------- synthetic tables
def sparsity(runs=(("RL-0", "RL", 0.8), ("SFT-0", "SFT", 0.1)), types=MT):
    return pd.DataFrame([dict(run=r, method=m, matrix_type=mt, sparsity=s - 0.01 * i, **RUN)
                         for r, m, s in runs for i, mt in enumerate(types)])


def consensus(layers=(0, 1), types=("q", "o")):
    rng = np.random.default_rng(0)
    return pd.DataFrame([dict(layer=l, matrix_type=m, row=i, col=j, consensus=rng.integers(0, 6) / 5, n_runs=5)
                         for l in layers for m in types for i in range(6) for j in range(5)])


def stripes(steps=(0, 10, 20, 30)):
    rng = np.random.default_rng(1)
    return pd.DataFrame([dict(step=s, matrix_type=m, axis=a, index=i, update_ratio=rng.uniform(), layer=0, **RUN)
                         for s in steps for m, a in (("q", "row"), ("o", "col")) for i in range(8)])


def spectrum_and_angles(layers=(0, 1, 2), runs=("RL-0",), nan_angles=False, other=False):
    rng = np.random.default_rng(2)
    spec, ang = [], []
    for run in runs:
        for layer in [*layers, *([-1] if other else [])]:
            mt = "q" if layer >= 0 else "other"
            sig = np.sort(rng.uniform(0.1, 5, 6))[::-1]
            spec += [dict(run=run, layer=layer, matrix_type=mt, i=i, sigma_base=v,
                          sigma_tuned=v * (1 + 0.01 * rng.standard_normal()), **RUN) for i, v in enumerate(sig)]
            ang += [dict(run=run, layer=layer, matrix_type=mt, side=side, i=i,
                         angle_deg=np.nan if nan_angles else rng.uniform(0.1, 3), k=3, **RUN)
                    for side in "UV" for i in range(3)]
    return pd.DataFrame(spec), pd.DataFrame(ang)


def mask_overlap(layers=(0, 1, 2, 3), types=("q", "o"), nan=False, other=False, runs=("RL-0",)):
    rows = [dict(run=r, layer=l, matrix_type=mt, mask=m, overlap=np.nan if nan else o + 0.01 * l,
                 random_baseline=0.5, **RUN)
            for r in runs for l in layers for mt in types for m, o in (("princ", 0.3), ("low", 0.7))]
    if other:  # compare writes the embeddings / head as matrix type 'other' at layer -1
        rows += [dict(run=r, layer=-1, matrix_type="other", mask=m, overlap=o, random_baseline=0.5, **RUN)
                 for r in runs for m, o in (("princ", 0.31), ("low", 0.69))]
    return pd.DataFrame(rows)


def rotate_overlap(layers=(0, 1, 2, 3)):
    return pd.DataFrame([dict(layer=l, overlap=0.3 if l == 1 else 0.6, random_baseline=0.3,
                              intervention="rotate" if l == 1 else "none", **RUN) for l in layers])


def masked_runs(steps=(0, 10, 20)):
    return pd.DataFrame([dict(mask=m, step=s, kl=0.001 * s * (i + 1), reward=0.1 * s - i, **RUN)
                         for i, m in enumerate(("dense", "safe", "princ")) for s in steps])


def lora_pissa(steps=(0, 10, 20)):
    return pd.DataFrame([dict(method=m, rank=r, lr=lr, step=s, reward=0.01 * s * (r + 1), **RUN)
                         for m in ("LoRA", "PiSSA") for r in (1, 4) for lr in (1e-4, 1e-3) for s in steps])


def jaccard(runs=("a", "b", "c")):
    return pd.DataFrame([dict(run_a=a, run_b=b, jaccard=0.3, matrix_type=mt, baseline=0.1, **RUN)
                         for mt in ("q", "o") for i, a in enumerate(runs) for b in runs[i + 1:]]
                        or [dict(run_a=runs[0], run_b=runs[0], jaccard=1.0, matrix_type="q", **RUN)])


def kl_beta0(steps=(0, 5, 10)):
    return pd.DataFrame([dict(run=r, step=s, kl=0.001 * s * (j + 1), beta=0.0, **RUN)
                         for j, r in enumerate(("dapo-0", "dapo-1")) for s in steps])


def checks(ids=("thm3.3", "thm3.3-wedin", "thm3.3-rigorous"), steps=(1, 2, 3, 4), nan_lhs=False):
    rows = []
    for rid in ids:
        for s in steps:
            for x in (0.02, 0.05, 0.1):
                c = (make_check(rid, x * (0.5 + 0.2 * s), x) if not (rid.endswith("rigorous") and s == 4)
                     else assumption_failed(rid, "||dW||_2 >= gamma_k"))
                row = {**c.as_row(), "step": s, "run": "rlvr", **RUN}
                if nan_lhs:
                    row["lhs"] = np.nan
                rows.append(row)
    return pd.DataFrame(rows)


def narrow_checks():
    rhs = np.geomspace(0.017, 0.11, 28)
    return pd.DataFrame([{**make_check("eq7", r * (1 - 1e-9), r).as_row(), "step": 1} for r in rhs])


def bf16_updates(n=40):
    rng = np.random.default_rng(3)
    import ml_dtypes

    w = rng.uniform(0.1, 4, n).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    delta = w * rng.choice([2.0 ** -10, 2.0 ** -6], n)
    changed = (w + delta).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64) != w
    return pd.DataFrame({"w": w[:n], "delta": delta[:n], "changed": changed[:n]})


def sweep_checks(ratios=(0.05, 0.3, 0.7, 2.0)):
    rows = []
    for cell, r in enumerate(ratios):
        for rid in ("thm3.3", "thm3.3-rigorous"):
            c = make_check(rid, r * 0.8, r) if not (rid.endswith("rigorous") and r > 1) else \
                assumption_failed(rid, "||dW||_2 >= gamma_k")
            rows.append({**c.as_row(), "cell_id": cell, "dW_over_gap": r})
    return {"checks": pd.DataFrame(rows)}


def sweep_claim_tables(lrs=(1e-4, 1e-3, 1e-2)):
    sp = [dict(cell_id=i, lr=lr, run=run, matrix_type="all", sparsity=b - 10 * lr)
          for i, lr in enumerate(lrs) for run, b in (("rlvr", 0.9), ("sft", 0.2))]
    ver = [dict(cell_id=i, lr=lr, claim=c, verdict="reproduced" if lr < 5e-3 else "not reproduced")
           for i, lr in enumerate(lrs) for c in ("sparsity_rl_gt_sft", "mask_predictor")]
    return {"sparsity": pd.DataFrame(sp), "verdicts": pd.DataFrame(ver)}


# ---------------------------------------------------------------------------------------------------- cases
# (id, draw, "not enough data" reason expected in some panel or None)
CASES = [
    ("table1", lambda: pf.table1_sparsity(sparsity()), None),
    ("table1-one-run", lambda: pf.table1_sparsity(sparsity(runs=(("RL-0", "RL", 0.9),), types=["q"])), None),
    ("table1-three-methods", lambda: pf.table1_sparsity(sparsity(runs=(
        ("rl-a", "RL", 0.9), ("rl-b", "RL", 0.85), ("sft-a", "SFT", 0.2), ("dpo-a", "DPO", 0.5)))), None),
    ("fig2", lambda: pf.fig2_consensus(consensus()), None),
    ("fig2-one-layer", lambda: pf.fig2_consensus(consensus(layers=(0,), types=("q",))), None),
    ("fig3", lambda: pf.fig3_stripes(stripes()), None),
    ("fig3-one-step", lambda: pf.fig3_stripes(stripes(steps=(5,))), None),
    ("fig4", lambda: pf.fig4_spectrum(*spectrum_and_angles(runs=("RL-0", "RL-1"))), None),
    ("fig4-one-layer", lambda: pf.fig4_spectrum(*spectrum_and_angles(layers=(0,))), "1 layer"),
    ("fig4-nan-angles", lambda: pf.fig4_spectrum(*spectrum_and_angles(nan_angles=True)), "angles NaN"),
    ("fig4-other", lambda: pf.fig4_spectrum(*spectrum_and_angles(other=True)), None),
    ("fig5", lambda: pf.fig5_mask_overlap(mask_overlap(other=True)), None),
    ("fig5-one-layer", lambda: pf.fig5_mask_overlap(mask_overlap(layers=(0,))), None),
    ("fig5-all-nan", lambda: pf.fig5_mask_overlap(mask_overlap(nan=True)), "overlap NaN"),
    ("fig5-only-layer-minus-one", lambda: pf.fig5_mask_overlap(mask_overlap(other=True).query("layer < 0")),
     "no block layer"),
    ("fig5-seven-types", lambda: pf.fig5_mask_overlap(mask_overlap(types=MT, other=True)), None),
    ("fig6", lambda: pf.fig6_rotate_overlap(rotate_overlap()), None),
    ("fig6-one-layer", lambda: pf.fig6_rotate_overlap(rotate_overlap(layers=(2,))), None),
    ("fig9", lambda: pf.fig9_masked_runs(masked_runs()), None),
    ("fig9-one-step", lambda: pf.fig9_masked_runs(masked_runs(steps=(8,))), "1 step"),
    ("fig10", lambda: pf.fig10_lora_pissa(lora_pissa()), None),
    ("fig10-one-step", lambda: pf.fig10_lora_pissa(lora_pissa(steps=(8,))), "1 step"),
    ("fig12", lambda: pf.fig12_jaccard(jaccard()), None),
    ("fig12-one-run", lambda: pf.fig12_jaccard(jaccard(runs=("a",))), "1 run"),
    ("fig15", lambda: pf.fig15_kl_beta0(kl_beta0()), None),
    ("fig15-one-step", lambda: pf.fig15_kl_beta0(kl_beta0(steps=(1,))), "1 step"),
    ("theory-vs-empirical", lambda: tf.fig_theory_vs_empirical(checks(), "thm3.3"), None),
    ("theory-vs-empirical-one-step", lambda: tf.fig_theory_vs_empirical(checks(ids=("eq7",), steps=(1,)), "eq7"),
     "1 training step"),
    ("theory-vs-empirical-all-nan", lambda: tf.fig_theory_vs_empirical(checks(nan_lhs=True), "thm3.3"),
     "no instance with finite lhs and rhs"),
    ("theory-vs-empirical-narrow-log",  # eq7 on a real one-step run: bounds within one decade, minor labels crowd
     lambda: tf.fig_theory_vs_empirical(narrow_checks(), "eq7"), "1 training step"),
    ("tightness", lambda: tf.fig_tightness(checks(), "thm3.3-rigorous"), None),
    ("tightness-one-step", lambda: tf.fig_tightness(checks(steps=(3,)), "thm3.3"), "1 training step"),
    ("thm33-forms", lambda: tf.fig_thm33_forms(checks()), None),
    ("thm33-forms-one-step", lambda: tf.fig_thm33_forms(checks(steps=(4,))), "1 training step"),
    ("bf16-threshold", lambda: tf.fig_bf16_threshold(bf16_updates()), None),
    ("bf16-threshold-one-update", lambda: tf.fig_bf16_threshold(bf16_updates(1)), None),
    ("sweep-bounds", lambda: sf.sweep_bounds(sweep_checks()), None),
    ("sweep-bounds-one-cell", lambda: sf.sweep_bounds(sweep_checks(ratios=(0.3,))), "1 value of dW_over_gap"),
    ("sweep-claims", lambda: sf.sweep_claims(sweep_claim_tables()), None),
    ("sweep-claims-one-lr", lambda: sf.sweep_claims(sweep_claim_tables(lrs=(1e-3,))), "1 learning rate"),
]

FIGURE_MODULES = (pf, tf, sf)


def figure_functions() -> set[str]:
    """Public functions of the figure modules that return a Figure (by their annotation)."""
    out = set()
    for mod in FIGURE_MODULES:
        for name in mod.__all__:
            fn = getattr(mod, name)
            if inspect.isfunction(fn) and "Figure" in str(inspect.signature(fn).return_annotation):
                out.add(f"{mod.__name__}.{name}")
    return out


def test_every_figure_function_has_a_case():
    called = set()
    for _, draw, _ in CASES:
        names = draw.__code__.co_names
        for mod in FIGURE_MODULES:
            called |= {f"{mod.__name__}.{n}" for n in names if hasattr(mod, n)}
    missing = figure_functions() - called
    assert not missing, f"figure functions without a reader case: {sorted(missing)}"
    assert len(figure_functions()) >= 16


@pytest.mark.parametrize("case, draw, reason", CASES, ids=[c[0] for c in CASES])
def test_a_reader_sees_every_text_and_no_overlapping_ticks(case, draw, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # divide-by-zero, "no artists with labels", tight-layout failures ...
        fig = draw()
        assert_readable(fig)
    texts = no_data_texts(fig)
    if reason is None:
        assert not texts, f"{case}: unexpected 'not enough data' panel: {texts}"
    else:
        assert any(t.startswith("not enough data") and reason in t for t in texts), (case, texts)
        panel = next(t for ax in fig.axes for t in ax.texts if t.get_gid() == NO_DATA_GID)
        ax = panel.axes
        # a clear panel: nothing else drawn in it, no ticks
        assert not ax.lines and not ax.collections and not ax.images
        assert not _drawn_tick_labels(ax.xaxis) and not _drawn_tick_labels(ax.yaxis)


# ------------------------------------------------------------------------- the checks can fail (negative controls)
def test_the_canvas_check_sees_a_legend_outside_the_figure():
    fig = pf.table1_sparsity(sparsity())
    ax = [a for a in fig.axes if a.get_legend() is not None][0]
    ax.legend(loc="upper left", bbox_to_anchor=(1.5, 1.0))  # the old Table 1 placement, pushed further out
    fig.set_layout_engine("none")
    with pytest.raises(AssertionError, match="outside the canvas"):
        assert_readable(fig)


def test_the_tick_check_sees_overlapping_labels():
    from paper_figs.style import new_figure

    fig, axes = new_figure(1, 1, width=3, height=3)
    ax = axes[0, 0]
    ax.set_xticks(np.arange(12), [f"label-{i}" for i in range(12)])
    with pytest.raises(AssertionError, match="tick labels overlap"):
        assert_readable(fig)


def test_crowded_tick_labels_are_thinned_not_dropped_entirely():
    from paper_figs.style import finalize, new_figure

    fig, axes = new_figure(1, 1, width=3, height=3)
    ax = axes[0, 0]
    ax.set_xticks(np.arange(12), [f"label-{i}" for i in range(12)])
    finalize(fig)
    assert_readable(fig)
    kept = [t.get_text() for t in _drawn_tick_labels(ax.xaxis)]
    assert 2 <= len(kept) < 12 and kept[0] == "label-0"


def test_fig5_never_plots_layer_minus_one_and_names_its_method():
    d = mask_overlap(other=True).assign(method="SFT")
    fig = pf.fig5_mask_overlap(d)
    for ax in fig.axes:
        for line in ax.lines:
            assert min(line.get_xdata()) >= 0, (ax.get_title(), line.get_gid())
    assert "other" not in [ax.get_title() for ax in fig.axes if ax.get_visible()]
    ylabels = {ax.get_ylabel() for ax in fig.axes if ax.get_visible() and ax.lines}
    assert ylabels == {"overlap with SFT update mask"}
    assert "RL" not in " ".join(ylabels) and "SFT" in fig.threegate_title
    assert "layer -1, not plotted" in fig.threegate_caption
    with pytest.raises(Exception, match="mixes methods"):
        pf.fig5_mask_overlap(pd.concat([d, mask_overlap().assign(method="RL")]))
    rl = pf.fig5_mask_overlap(pd.concat([d, mask_overlap().assign(method="RL")]), method="RL")
    assert {ax.get_ylabel() for ax in rl.axes if ax.lines} == {"overlap with RL update mask"}


def test_table1_legend_names_methods_inside_the_canvas():
    fig = pf.table1_sparsity(sparsity())
    (leg,) = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [t.get_text() for t in leg.get_texts()] == ["RL", "SFT"]
    fig.canvas.draw()
    box = leg.get_window_extent(fig.canvas.get_renderer())
    assert Bbox.intersection(box, fig.bbox) is not None and fig.bbox.padded(EDGE_PX).contains(box.x1, box.y1)
    several = pf.table1_sparsity(sparsity(runs=(("a", "RL", 0.9), ("b", "RL", 0.8), ("c", "SFT", 0.1))))
    (leg,) = [ax.get_legend() for ax in several.axes if ax.get_legend() is not None]
    assert [t.get_text() for t in leg.get_texts()] == ["RL: a", "RL: b", "SFT"]


def test_theory_figs_do_not_warn_on_zero_bounds():
    rows = [{**make_check("cor3.4-weyl", lhs, rhs).as_row(), "step": s}
            for s, (lhs, rhs) in enumerate([(0.0, 0.0), (0.1, 0.2), (0.0, 0.3), (0.2, 0.4)])]
    d = pd.DataFrame(rows)
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        tf.fig_theory_vs_empirical(d, "cor3.4-weyl")
        tf.fig_tightness(d, "cor3.4-weyl")
