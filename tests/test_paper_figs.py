"""Tests for paper_figs.style, paper_figs.schemas, paper_figs.theory_figs and paper_figs.paper_figs.

Each figure is built from a tiny synthetic table and its *content* is checked against values computed here
independently: bar heights, heatmap pixels, line data, the y = x line, the violation markers (present iff the table
has violations, at exactly the violating points), and the caption (paper figure number + run description).
Gate III thresholds are checked against an exact oracle written here from the bit-pattern definition of bf16
(``fractions.Fraction``, round-to-nearest-even), independent of ``theory.precision``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from matplotlib.collections import PathCollection
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from paper_figs import paper_figs as pf
from paper_figs import schemas, style, theory_figs as tf
from theory.check import assumption_failed, make_check
from theory.errors import CheckpointError, InputError, NonFiniteError

RUN_COLS = dict(model="tinygpt-2L", seed=7, steps=120)


# ---------------------------------------------------------------------------------------------------- helpers
def by_gid(ax, gid, kind=None):
    """Artists of an axes with a given gid (lines, collections, patches, texts)."""
    arts = [*ax.lines, *ax.collections, *ax.patches, *ax.texts, *ax.images]
    return [a for a in arts if a.get_gid() == gid and (kind is None or isinstance(a, kind))]


def main_axes(fig):
    """Visible axes that are not colorbars."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def full_text(fig):
    return (getattr(fig, "threegate_title", "") + " " + getattr(fig, "threegate_caption", "")
            + " " + " ".join(t.get_text() for t in fig.texts) + " " + (fig._suptitle.get_text() if fig._suptitle else ""))


def offsets(coll):
    return np.asarray(coll.get_offsets(), dtype=float)


# ------------------------------------------------------------------------------------------ bf16 exact oracle
def bf16_from_bits(bits: int) -> Fraction:
    """Exact value of a positive/negative normal bf16 bit pattern: (-1)^s 2^(E-127) (1 + M/128)."""
    s, E, M = bits >> 15, (bits >> 7) & 0xFF, bits & 0x7F
    assert 0 < E < 255, "oracle covers normal numbers only"
    v = Fraction(128 + M, 128) * Fraction(2) ** (E - 127)
    return -v if s else v


def rne_bf16(x: Fraction) -> Fraction:
    """Round an exact rational to the nearest bf16 (normal range), ties to even mantissa."""
    if x == 0:
        return Fraction(0)
    sign = -1 if x < 0 else 1
    a = abs(x)
    e = math.floor(math.log2(a))
    while Fraction(2) ** e > a:  # log2 of a Fraction can be off by one near powers of two
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    q = Fraction(2) ** (e - 7)
    m = a / q
    n = math.floor(m)
    rem = m - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    return sign * n * q


def oracle_changed(w: float, delta: float) -> bool:
    wf = Fraction(w)
    return rne_bf16(wf + Fraction(delta)) != wf


def test_oracle_pins_the_power_of_two_asymmetry_and_ties():
    one = Fraction(1)
    # Below 1.0 the spacing is 2^-8, above it 2^-7: the downward threshold is a quarter of the upper ULP.
    assert not oracle_changed(1.0, -2.0 ** -9)  # tie, rounds back to the even mantissa of 1.0
    assert oracle_changed(1.0, -(2.0 ** -9 + 2.0 ** -20))
    assert not oracle_changed(1.0, 2.0 ** -8)  # tie upward, 1.0 is even
    assert oracle_changed(1.0 + 2.0 ** -7, 2.0 ** -8)  # odd mantissa: the tie goes to the even neighbour
    assert rne_bf16(one + Fraction(3, 2 ** 9)) == one + Fraction(1, 2 ** 7)


# ------------------------------------------------------------------------------------------------- style
def test_palette_is_okabe_ito_and_distinct():
    assert style.OKABE_ITO["vermillion"] == "#D55E00" and style.OKABE_ITO["blue"] == "#0072B2"
    cols = [style.color_for(i) for i in range(8)]
    assert len(set(cols)) == 8
    assert style.colors_for(["b", "a", "b"]) == {"b": cols[0], "a": cols[1]}


def test_caption_is_written_on_the_figure_and_kept():
    fig, axes = style.new_figure(1, 2)
    assert axes.shape == (1, 2)
    style.set_caption(fig, "Paper Fig. 99", "what was run")
    assert fig.threegate_caption == "what was run"
    assert any(t.get_gid() == "threegate-caption" and t.get_text() == "what was run" for t in fig.texts)
    assert style.caption_of(fig) == "Paper Fig. 99. what was run"


# ------------------------------------------------------------------------------------------------ schemas
def test_validate_names_the_missing_column():
    with pytest.raises(InputError, match=r"sparsity.*lacks column\(s\) \['sparsity'\]"):
        schemas.validate(pd.DataFrame({"run": ["a"], "method": ["RL"], "matrix_type": ["q"]}), "sparsity")


def test_validate_rejects_nan_where_not_allowed_but_allows_nan_sides_of_checks():
    df = pd.DataFrame({"run": ["a"], "method": ["RL"], "matrix_type": ["q"], "sparsity": [np.nan]})
    with pytest.raises(NonFiniteError, match="'sparsity'"):
        schemas.validate(df, "sparsity")
    row = assumption_failed("thm3.3-rigorous", "||dW||_2 < gamma_k").as_row()
    out = schemas.validate(pd.DataFrame([row]), "checks")
    assert math.isnan(out["lhs"].iloc[0]) and not out["holds"].iloc[0]


def test_validate_rejects_non_numeric_and_empty():
    df = pd.DataFrame({"run": ["a"], "method": ["RL"], "matrix_type": ["q"], "sparsity": ["lots"]})
    with pytest.raises(InputError, match="must be numeric, found 'lots'"):
        schemas.validate(df, "sparsity")
    with pytest.raises(InputError, match="no rows"):
        schemas.validate(pd.DataFrame(columns=["run", "method", "matrix_type", "sparsity"]), "sparsity")


def test_validate_reads_booleans_written_as_text():
    df = pd.DataFrame({"w": [1.0, 2.0], "delta": [0.1, 0.2], "changed": ["True", "false"]})
    assert schemas.validate(df, "bf16_updates")["changed"].tolist() == [True, False]
    with pytest.raises(InputError, match="boolean"):
        schemas.validate(df.assign(changed=["yes", "no"]), "bf16_updates")


@pytest.mark.parametrize("fname, expected", [
    ("sparsity.csv", "sparsity"), ("sparsity_qwen.parquet", "sparsity"), ("kl_beta0.csv", "kl_beta0"),
    ("checks.csv", "checks"), ("jaccard_block13.csv", "jaccard"),
])
def test_identify_by_file_name(fname, expected):
    assert schemas.identify(pd.DataFrame({"x": [1]}), fname) == expected


def test_identify_by_columns_picks_the_most_specific_schema():
    checks = pd.DataFrame([make_check("cor3.4", 1, 2).as_row()])
    assert schemas.identify(checks, "whatever.csv") == "checks"
    kl = pd.DataFrame({"run": ["a"], "step": [1], "kl": [0.1]})
    assert schemas.identify(kl) == "kl_beta0"
    assert schemas.identify(pd.DataFrame({"nothing": [1]})) is None


def test_read_table_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        schemas.read_table(tmp_path / "missing.csv")
    bad = tmp_path / "sparsity.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match="sparsity.parquet.*could not be read"):
        schemas.read_table(bad)
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(InputError, match="unsupported extension"):
        schemas.read_table(tmp_path / "x.txt")


def test_sidecar_metadata_goes_into_the_caption(tmp_path):
    p = tmp_path / "kl_beta0.csv"
    pd.DataFrame({"run": ["a", "a"], "step": [0, 10], "kl": [0.0, 0.01]}).to_csv(p, index=False)
    (tmp_path / "kl_beta0.csv.meta.json").write_text('{"model": "tinygpt-4L", "seeds": [1, 2]}')
    df = schemas.read_table(p)
    assert df.attrs["model"] == "tinygpt-4L"
    desc = schemas.describe_run(df)
    assert "model tinygpt-4L" in desc and "seeds 1, 2" in desc and "10 steps" in desc
    (tmp_path / "kl_beta0.csv.meta.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        schemas.read_table(p)


def test_describe_run_from_columns():
    df = pd.DataFrame({"run": ["r0", "r1"], "model": ["m", "m"], "seed": [0, 1], "steps": [50, 50]})
    assert schemas.describe_run(df) == "Run: model m; 50 steps; seeds 0, 1; 2 run(s): r0, r1"
    df.attrs["description"] = "five DAPO runs"
    assert schemas.describe_run(df) == "five DAPO runs"


def test_every_schema_documents_every_column():
    for s in schemas.SCHEMAS.values():
        assert s.paper_ref and s.doc
        for c in s.columns:
            assert c.doc and c.dtype in {"str", "int", "float", "float?", "bool"}, (s.name, c.name)


# ------------------------------------------------------------------------------------- theory vs empirical
def check_table(violations: bool = True, failures: bool = False) -> pd.DataFrame:
    """Thm 3.3-like family: lhs = r (1 + a r), rhs = r; violated (lhs > rhs) iff a > 0."""
    rows = []
    for r in np.geomspace(0.01, 3.0, 12):
        rows.append({**make_check("thm3.3", r * (1 + (0.3 if violations else -0.3) * r), r).as_row(),
                     "d_dW_over_gap": r, **RUN_COLS})
        if r < 1 or not failures:
            rows.append({**make_check("thm3.3-rigorous", min(r, 1.0), r / abs(1 - r) + 1e-9).as_row(),
                         "d_dW_over_gap": r, **RUN_COLS})
        else:
            rows.append({**assumption_failed("thm3.3-rigorous", "||dW||_2 < gamma_k").as_row(),
                         "d_dW_over_gap": r, **RUN_COLS})
        rows.append({**make_check("thm3.3-wedin", 0.5 * r, r).as_row(), "d_dW_over_gap": r, **RUN_COLS})
    return pd.DataFrame(rows)


def test_scatter_has_identity_line_and_marks_exactly_the_violations():
    df = check_table(violations=True)
    fig = tf.fig_theory_vs_empirical(df, "thm3.3")
    ax_sc, ax_t = main_axes(fig)
    (ident,) = by_gid(ax_sc, "identity")
    x, y = ident.get_data()
    np.testing.assert_array_equal(x, y)  # the y = x line
    assert ax_sc.get_xscale() == ax_sc.get_yscale() == "log"
    sub = df[df["result_id"] == "thm3.3"]
    bad = sub[sub["verdict"] == "violated"]
    assert len(bad) > 0
    (viol,) = by_gid(ax_sc, "violations")
    np.testing.assert_allclose(np.sort(offsets(viol)[:, 0]), np.sort(bad["rhs"]))
    np.testing.assert_allclose(np.sort(offsets(viol)[:, 1]), np.sort(bad["lhs"]))
    assert tuple(viol.get_facecolor()[0][:3]) == pytest.approx(tuple(int(style.OKABE_ITO["vermillion"][i:i + 2], 16) / 255
                                                                     for i in (1, 3, 5)))
    assert by_gid(ax_sc, "violation-label"), "violations must be labelled"
    assert any(style.VIOLATION_LABEL in t.get_text() for t in ax_sc.get_legend().get_texts())
    # colour by regime: each point's colour value is its regime value, and the colorbar names the regime
    (pts,) = by_gid(ax_sc, "instances")
    np.testing.assert_allclose(np.sort(pts.get_array()), np.sort(sub["d_dW_over_gap"]))
    cbars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(cbars) == 1 and r"\Delta W" in cbars[0].get_ylabel()
    # the tightness curve is lhs/rhs against the regime, sorted
    (tight,) = by_gid(ax_t, "tightness")
    order = np.argsort(sub["d_dW_over_gap"].to_numpy())
    np.testing.assert_allclose(tight.get_xdata(), sub["d_dW_over_gap"].to_numpy()[order])
    np.testing.assert_allclose(tight.get_ydata(), (sub["lhs"] / sub["rhs"]).to_numpy()[order])
    assert by_gid(ax_t, "ratio-one")[0].get_ydata()[0] == 1.0
    text = full_text(fig)
    assert "thm3.3" in text and "model tinygpt-2L" in text and "seed 7" in text
    assert f"{len(bad)} violation(s)" in text


def test_no_violation_marker_when_the_bound_holds():
    fig = tf.fig_theory_vs_empirical(check_table(violations=False), "thm3.3")
    for ax in main_axes(fig):
        assert not by_gid(ax, "violations")
        assert not by_gid(ax, "violation-label")
    assert "0 violation(s)" in full_text(fig)


def test_unknown_result_id_and_bad_regime_are_named():
    with pytest.raises(InputError, match="no rows for result id 'nope'"):
        tf.fig_theory_vs_empirical(check_table(), "nope")
    with pytest.raises(InputError, match="regime column 'zzz'"):
        tf.fig_theory_vs_empirical(check_table(), "thm3.3", regime="zzz")


def test_numeric_result_ids_skips_ids_without_finite_sides():
    rows = [assumption_failed("lemF9", "ratios in band").as_row(), make_check("cor3.4", 1.0, 2.0).as_row()]
    assert tf.numeric_result_ids(pd.DataFrame(rows)) == ["cor3.4"]


def test_thm33_three_forms_side_by_side():
    df = check_table(violations=True, failures=True)
    fig = tf.fig_thm33_forms(df)
    axs = main_axes(fig)
    assert len(axs) == 6  # 2 rows x 3 forms
    titles = [a.get_title() for a in axs[:3]]
    assert [t.split("\n")[0] for t in titles] == ["thm3.3", "thm3.3-wedin", "thm3.3-rigorous"]
    sc_stated, sc_wedin, sc_rig, t_stated, t_wedin, t_rig = axs
    assert by_gid(sc_stated, "violations") and by_gid(t_stated, "violations")
    for ax in (sc_wedin, sc_rig, t_wedin, t_rig):
        assert not by_gid(ax, "violations")
    # rigorous: assumption failures (||dW||/gamma >= 1) shaded over exactly their regime range and ticked
    failed = df[(df["result_id"] == "thm3.3-rigorous") & ~df["assumptions_hold"]]["d_dW_over_gap"]
    (region,) = by_gid(t_rig, "assumption-region")
    lo, hi = region.get_x(), region.get_x() + region.get_width()  # axvspan: a Rectangle in data x
    assert (lo, hi) == pytest.approx((failed.min(), failed.max()))
    (ticks,) = by_gid(t_rig, "assumption-failed")
    np.testing.assert_allclose(np.sort(ticks.get_xdata()), np.sort(failed))
    assert not by_gid(t_stated, "assumption-region")
    assert "gap-line" in {l.get_gid() for l in t_rig.lines}
    text = full_text(fig)
    assert "thm3.3-rigorous: 0 violated" in text and f"{len(failed)} assumption-failed" in text


def test_thm33_needs_one_of_its_ids():
    df = pd.DataFrame([make_check("cor3.4", 1, 2).as_row()])
    with pytest.raises(InputError, match="none of the Thm 3.3 ids"):
        tf.fig_thm33_forms(df)


# ------------------------------------------------------------------------------------------------ Gate III
def test_threshold_curve_matches_the_bit_pattern_oracle():
    curve = tf.bf16_threshold_curve(0.3, 1.9)  # binades [0.25, 0.5), [0.5, 1), [1, 2)
    assert len(curve) == 3 * 128
    for _, r in curve.iterrows():
        bits = int(np.array(r["w"], dtype=np.float32).view(np.uint32) >> 16)
        w = bf16_from_bits(bits)
        assert Fraction(r["w"]) == w
        assert Fraction(r["up"]) == (bf16_from_bits(bits + 1) - w) / 2
        assert Fraction(r["down"]) == (w - bf16_from_bits(bits - 1)) / 2
        ulp = Fraction(2) ** (math.floor(math.log2(r["w"])) - 7)
        assert Fraction(r["up"]) == ulp / 2
        is_pow2 = bits & 0x7F == 0
        assert Fraction(r["down"]) == (ulp / 4 if is_pow2 else ulp / 2)
        # a tie is realised iff the neighbour is even, i.e. w's own mantissa is odd (inside a binade)
        if not is_pow2:
            assert bool(r["down_incl"]) == bool(bits & 1)
        assert bool(r["up_incl"]) == bool(bits & 1)


@settings(max_examples=60)
@given(st.integers(min_value=2, max_value=253), st.integers(min_value=0, max_value=127))
@example(127, 0)  # w = 1.0: down threshold 2^-9, a quarter of the upper ULP
@example(127, 1)  # w = 1 + 2^-7: odd mantissa, ties are realised
@example(2, 0)  # near the bottom of the normal range
@example(253, 127)  # near the top
def test_threshold_curve_row_matches_oracle_anywhere(E, M):
    bits = (E << 7) | M
    w = bf16_from_bits(bits)
    curve = tf.bf16_threshold_curve(float(w), float(w))
    row = curve[curve["w"] == float(w)]
    assert len(row) == 1 and len(curve) == 128
    up = (bf16_from_bits(bits + 1) - w) / 2
    down = (w - bf16_from_bits(bits - 1)) / 2
    assert Fraction(row["up"].iloc[0]) == up and Fraction(row["down"].iloc[0]) == down
    # the threshold is exactly where the oracle's rounding starts to move w
    for t, sgn, incl in ((up, 1, row["up_incl"].iloc[0]), (down, -1, row["down_incl"].iloc[0])):
        assert rne_bf16(w + sgn * t * Fraction(1 + 2 ** -20)) != w
        assert (rne_bf16(w + sgn * t) != w) == bool(incl)
        assert rne_bf16(w + sgn * t * Fraction(1 - 2 ** -20)) == w


def bf16_update_table(rng, n=120, wrong: int | None = None):
    w = np.concatenate([rng.standard_normal(n).astype(ml_dtypes.bfloat16).astype(np.float64),
                        [1.0, 1.0, 1.0 + 2 ** -7, 0.5, -2.0]])
    rel = rng.uniform(2 ** -10, 2 ** -7, len(w)) * rng.choice([-1.0, 1.0], len(w))
    delta = w * rel
    delta[-5:] = [-(2 ** -9), 2 ** -8, 2 ** -8, -(2 ** -10 + 2 ** -30), 2 ** -8 * 1.01]  # pinned ties / pow2 cases
    changed = np.array([oracle_changed(a, b) for a, b in zip(w, delta)])
    if wrong is not None:
        changed[wrong] = not changed[wrong]
    return pd.DataFrame({"w": w, "delta": delta, "changed": changed, **RUN_COLS})


def test_bf16_threshold_figure_content(rng):
    df = bf16_update_table(rng)
    assert df["changed"].tail(5).tolist() == [False, False, True, True, True]
    fig = tf.fig_bf16_threshold(df)
    ax_abs, ax_rel = main_axes(fig)
    # both threshold curves on both panels; relative thresholds lie in [2^-9, 2^-8] (Lemma E.2 halved)
    for ax in (ax_abs, ax_rel):
        assert by_gid(ax, "threshold-up") and by_gid(ax, "threshold-down") and by_gid(ax, "pow2-down")
    rel_up = by_gid(ax_rel, "threshold-up")[0].get_ydata()
    rel_down = by_gid(ax_rel, "threshold-down")[0].get_ydata()
    assert rel_up.min() > 2 ** -9 - 1e-18 and rel_up.max() == 2 ** -8
    assert rel_down.min() == 2 ** -9  # at powers of two: a quarter ULP
    pow2 = offsets(by_gid(ax_rel, "pow2-down")[0])
    np.testing.assert_array_equal(pow2[:, 1], 2.0 ** -9)
    np.testing.assert_array_equal(np.log2(pow2[:, 0]), np.round(np.log2(pow2[:, 0])))
    # every measured update drawn once per panel, split changed / unchanged
    n_changed = sum(len(offsets(c)) for c in by_gid(ax_abs, "changed"))
    n_unchanged = sum(len(offsets(c)) for c in by_gid(ax_abs, "unchanged"))
    assert (n_changed, n_unchanged) == (int(df["changed"].sum()), int((~df["changed"]).sum()))
    assert not by_gid(ax_abs, "violations"), "oracle outcomes agree with the exact rule"
    text = full_text(fig)
    assert "0 disagree" in text and "model tinygpt-2L" in text


def test_bf16_threshold_marks_an_outcome_that_disagrees(rng):
    df = bf16_update_table(rng, wrong=3)
    fig = tf.fig_bf16_threshold(df)
    for ax in main_axes(fig):
        (v,) = by_gid(ax, "violations")
        assert offsets(v)[0, 0] == abs(df["w"].iloc[3])
    assert "1 disagree" in full_text(fig)


def test_bf16_threshold_rejects_non_bf16_weights():
    df = pd.DataFrame({"w": [0.1], "delta": [1e-3], "changed": [True]})
    with pytest.raises(InputError, match="bf16 values exactly"):
        tf.fig_bf16_threshold(df)
    with pytest.raises(NonFiniteError, match="'delta'"):
        tf.fig_bf16_threshold(pd.DataFrame({"w": [1.0], "delta": [np.inf], "changed": [True]}))


# ------------------------------------------------------------------------------------------ paper figures
MT = ["q", "k", "v", "o", "up", "gate", "down"]


def caption_has(fig, label):
    text = full_text(fig)
    assert label in fig.threegate_title, fig.threegate_title
    assert "model tinygpt-2L" in text and "seed 7" in text, text


def test_table1_bars_are_matrix_types_times_runs():
    rows = [dict(run=run, method=m, matrix_type=mt, sparsity=s, **RUN_COLS)
            for run, m, s in (("RL-a", "DAPO-RL", 0.8), ("RL-b", "RL", 0.7), ("SFT-a", "SFT", 0.1))
            for mt in MT[:4]]
    rows = [r for r in rows if not (r["run"] == "RL-b" and r["matrix_type"] == "v")]  # one combination missing
    df = pd.DataFrame(rows)
    fig = pf.table1_sparsity(df)
    (ax,) = main_axes(fig)
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and (p.get_gid() or "").startswith("bars-")]
    assert len(bars) == len(df) == 4 * 3 - 1
    heights = sorted(round(b.get_height(), 9) for b in bars)
    assert heights == sorted(round(100 * s, 9) for s in df["sparsity"])
    sft = [b for b in bars if b.get_gid() == "bars-SFT-a"]
    assert sft and all(b.get_hatch() == "//" for b in sft)
    assert all(not b.get_hatch() for b in bars if b.get_gid() != "bars-SFT-a")
    assert [t.get_text() for t in ax.get_xticklabels()] == MT[:4]
    caption_has(fig, "Table 1")
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        pf.table1_sparsity(df.assign(sparsity=80.0))


def test_fig2_consensus_pixels_are_the_table():
    rng = np.random.default_rng(0)
    rows = [dict(layer=l, matrix_type=m, row=i, col=j, consensus=rng.integers(0, 6) / 5, n_runs=5, **RUN_COLS)
            for l in (0, 3) for m in ("q", "o") for i in range(4) for j in range(3)]
    df = pd.DataFrame(rows)
    fig = pf.fig2_consensus(df)
    axs = main_axes(fig)
    assert [a.get_title() for a in axs] == ["layer 0, q", "layer 0, o", "layer 3, q", "layer 3, o"]
    for ax in axs:
        l, m = int(ax.get_title().split(",")[0].split()[1]), ax.get_title().split(", ")[1]
        sub = df[(df.layer == l) & (df.matrix_type == m)]
        C = ax.images[0].get_array()
        assert C.shape == (4, 3)
        for r in sub.itertuples():
            assert C[r.row, r.col] == r.consensus
    assert any(a.get_label() == "<colorbar>" for a in fig.axes)
    caption_has(fig, "Fig. 2")
    assert "R = 5" in full_text(fig)


def test_fig3_stripes_heatmap_is_index_by_step():
    rows = [dict(step=s, matrix_type=m, axis=a, index=i, update_ratio=(i + 1) * s / 400, layer=2, **RUN_COLS)
            for s in (10, 20, 40) for m, a in (("q", "row"), ("o", "col")) for i in range(5)]
    fig = pf.fig3_stripes(pd.DataFrame(rows))
    axs = main_axes(fig)
    assert [a.get_title() for a in axs] == ["q: row ratio", "o: column ratio"]
    A = axs[0].images[0].get_array()
    assert A.shape == (5, 3)
    np.testing.assert_allclose(A, [[(i + 1) * s / 400 for s in (10, 20, 40)] for i in range(5)])
    assert [t.get_text() for t in axs[0].get_xticklabels()] == ["10", "20", "40"]
    caption_has(fig, "Fig. 3")
    with pytest.raises(InputError, match="'row' or 'col'"):
        pf.fig3_stripes(pd.DataFrame(rows).assign(axis="diag"))


def spectrum_tables():
    rng = np.random.default_rng(1)
    spec, ang = [], []
    for run, s, a in (("RL", 0.01, 2.0), ("SFT", 0.3, 40.0)):
        for layer in range(3):
            sig = np.sort(rng.uniform(0.1, 5, 6))[::-1]
            for i, v in enumerate(sig):
                spec.append(dict(run=run, layer=layer, matrix_type="q", i=i, sigma_base=v,
                                 sigma_tuned=v * (1 + s * rng.standard_normal()), **RUN_COLS))
            for side in "UV":
                for i in range(3):
                    ang.append(dict(run=run, layer=layer, matrix_type="q", side=side, i=i,
                                    angle_deg=a * rng.uniform(0.1, 1), k=3, **RUN_COLS))
    return pd.DataFrame(spec), pd.DataFrame(ang)


def test_fig4_spectrum_angles_max_angle_and_nss():
    spec, ang = spectrum_tables()
    fig = pf.fig4_spectrum(spec, ang, layer=1)
    ax_sig, ax_ang, ax_max, ax_nss = main_axes(fig)
    base = by_gid(ax_sig, "sigma-base")[0]
    one = spec[(spec.run == "RL") & (spec.layer == 1)].sort_values("i")
    np.testing.assert_allclose(base.get_ydata(), one["sigma_base"])
    assert {l.get_gid() for l in ax_ang.lines} == {"angles-RL-U", "angles-RL-V", "angles-SFT-U", "angles-SFT-V"}
    for run in ("RL", "SFT"):
        mx = by_gid(ax_max, f"maxangle-{run}")[0].get_ydata()
        expect = [ang[(ang.run == run) & (ang.layer == l)]["angle_deg"].max() for l in range(3)]
        np.testing.assert_allclose(mx, expect)
        nss = by_gid(ax_nss, f"nss-{run}")[0].get_ydata()
        exp_nss = []
        for l in range(3):
            g = spec[(spec.run == run) & (spec.layer == l)]
            exp_nss.append(np.sqrt(((g.sigma_tuned - g.sigma_base) ** 2).sum() / (g.sigma_base ** 2).sum()))
        np.testing.assert_allclose(nss, exp_nss, rtol=1e-12)
    caption_has(fig, "Fig. 4")
    assert "k = 3" in full_text(fig) and "layer 1" in full_text(fig)
    assert len(main_axes(pf.fig4_spectrum(spec))) == 2  # without angles: spectrum and NSS only
    with pytest.raises(InputError, match="no rows for layer 9"):
        pf.fig4_spectrum(spec, layer=9)


def test_fig5_overlap_lines_and_baselines():
    rows = [dict(layer=l, mask=m, overlap=o, random_baseline=b, **RUN_COLS)
            for l in range(4) for m, o, b in (("princ", 0.3, 0.5), ("low", 0.7, 0.5))]
    fig = pf.fig5_mask_overlap(pd.DataFrame(rows))
    (ax,) = main_axes(fig)
    assert {l.get_gid() for l in ax.lines} == {"overlap-princ", "baseline-princ", "overlap-low", "baseline-low"}
    np.testing.assert_allclose(by_gid(ax, "overlap-princ")[0].get_ydata(), 0.3)
    np.testing.assert_allclose(by_gid(ax, "baseline-low")[0].get_ydata(), 0.5)
    caption_has(fig, "Fig. 5")
    assert "princ: below random in 100% of layers" in full_text(fig)
    assert "low: below random in 0% of layers" in full_text(fig)


def test_fig5_draws_the_magnitude_only_baseline_when_the_table_has_it():
    rows = [dict(layer=l, mask=m, overlap=o, random_baseline=0.5, binade_baseline=bb + 0.01 * l, **RUN_COLS)
            for l in range(3) for m, o, bb in (("princ", 0.30, 0.32), ("low", 0.70, 0.66))]
    fig = pf.fig5_mask_overlap(pd.DataFrame(rows))
    (ax,) = main_axes(fig)
    assert {"binade-princ", "binade-low"} <= {l.get_gid() for l in ax.lines}
    np.testing.assert_allclose(by_gid(ax, "binade-princ")[0].get_ydata(), [0.32, 0.33, 0.34])
    assert by_gid(ax, "binade-low")[0].get_linestyle() == ":"
    # mean(overlap - binade) per mask: princ 0.30 - 0.33 = -0.030, low 0.70 - 0.67 = +0.030
    assert "princ -0.030" in full_text(fig) and "low +0.030" in full_text(fig)
    # an all-NaN binade column (an older table) draws no magnitude line and says nothing about it
    plain = pd.DataFrame(rows).assign(binade_baseline=np.nan)
    (ax2,) = main_axes(pf.fig5_mask_overlap(plain))
    assert not [l for l in ax2.lines if str(l.get_gid()).startswith("binade-")]
    assert "magnitude-only" not in full_text(pf.fig5_mask_overlap(plain))


def test_fig6_bars_per_layer_coloured_by_intervention():
    iv = {1: "rotate", 3: "rotate+permute"}
    rows = [dict(layer=l, overlap=0.3 if l in iv else 0.6, random_baseline=0.3, intervention=iv.get(l, "none"),
                 **RUN_COLS) for l in range(5)]
    fig = pf.fig6_rotate_overlap(pd.DataFrame(rows))
    (ax,) = main_axes(fig)
    bars = {b.get_gid(): [] for b in ax.patches}
    for b in ax.patches:
        bars[b.get_gid()].append(round(b.get_x() + b.get_width() / 2))
    assert bars == {"bars-none": [0, 2, 4], "bars-rotate": [1], "bars-rotate+permute": [3]}
    assert len({tuple(b.get_facecolor()) for b in ax.patches}) == 3
    np.testing.assert_allclose(by_gid(ax, "baseline")[0].get_ydata(), 0.3)
    caption_has(fig, "Fig. 6")
    assert "layer(s) [1, 3]" in full_text(fig)


def test_fig9_one_line_per_mask_in_both_panels():
    rows = [dict(mask=m, step=s, kl=0.01 * s * (k + 1), reward=s / 10 - k, **RUN_COLS)
            for k, m in enumerate(("dense", "princ", "safe")) for s in (0, 5, 10)]
    fig = pf.fig9_masked_runs(pd.DataFrame(rows))
    ax_kl, ax_r = main_axes(fig)
    assert [l.get_gid() for l in ax_kl.lines] == ["kl-dense", "kl-princ", "kl-safe"]
    assert [l.get_gid() for l in ax_r.lines] == ["reward-dense", "reward-princ", "reward-safe"]
    np.testing.assert_allclose(by_gid(ax_kl, "kl-safe")[0].get_ydata(), [0.0, 0.15, 0.3])
    caption_has(fig, "Fig. 9")
    assert "safe -1" in full_text(fig)


def test_fig10_grid_is_rank_by_lr_with_both_methods():
    rows = [dict(method=m, rank=r, lr=lr, step=s, reward=0.1 * s, **RUN_COLS)
            for m in ("LoRA", "PiSSA") for r in (8, 32, 64) for lr in (1e-4, 1e-5) for s in (0, 10)]
    fig = pf.fig10_lora_pissa(pd.DataFrame(rows))
    axs = main_axes(fig)
    assert len(axs) == 3 * 2
    assert axs[0].get_title() == "rank 8, lr 0.0001" and axs[-1].get_title() == "rank 64, lr 1e-05"
    for ax in axs:
        assert [l.get_gid() for l in ax.lines] == ["reward-LoRA", "reward-PiSSA"]
    caption_has(fig, "Fig. 10")


@pytest.mark.parametrize("swap", [False, True])
def test_fig12_jaccard_matrix_is_symmetric_in_either_argument_order(swap):
    pairs = [("r0", "r1", 0.6), ("r0", "r2", 0.5), ("r1", "r2", 0.4)]
    rows = [dict(run_a=b if swap else a, run_b=a if swap else b, jaccard=j, baseline=0.3, **RUN_COLS)
            for a, b, j in pairs]
    fig = pf.fig12_jaccard(pd.DataFrame(rows))
    (ax,) = main_axes(fig)
    J = ax.images[0].get_array()
    np.testing.assert_array_equal(J, [[1, 0.6, 0.5], [0.6, 1, 0.4], [0.5, 0.4, 1]])
    assert ax.get_title() == "all: mean J 0.50, baseline 0.30"
    assert len(by_gid(ax, "jaccard-value")) == 9
    caption_has(fig, "Fig. 12")


def test_fig12_grows_with_the_number_of_runs_and_drops_cell_values_when_crowded():
    def table(n):
        runs = [f"seed-{i}" for i in range(n)]
        return pd.DataFrame([dict(run_a=a, run_b=b, jaccard=0.5, **RUN_COLS)
                             for i, a in enumerate(runs) for b in runs[i + 1:]])

    small, ten, many = (pf.fig12_jaccard(table(n)) for n in (3, 10, pf.JACCARD_VALUES_UP_TO + 2))
    assert len(by_gid(main_axes(ten)[0], "jaccard-value")) == 100
    assert {t.get_fontsize() for t in by_gid(main_axes(ten)[0], "jaccard-value")} == {5.5}
    assert by_gid(main_axes(many)[0], "jaccard-value") == []  # colours only
    widths = [f.get_size_inches()[0] for f in (small, ten, many)]
    assert widths[0] < widths[1] < widths[2]
    # at 10 runs no two x tick labels overlap once drawn
    ten.canvas.draw()
    boxes = [t.get_window_extent() for t in main_axes(ten)[0].get_xticklabels()]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def test_fig15_kl_lines_and_beta_must_be_zero():
    rows = [dict(run=r, step=s, kl=0.001 * s * (i + 1), beta=0.0, **RUN_COLS)
            for i, r in enumerate(("dapo-0", "dapo-1")) for s in (0, 10, 20)]
    df = pd.DataFrame(rows)
    fig = pf.fig15_kl_beta0(df)
    (ax,) = main_axes(fig)
    np.testing.assert_allclose(by_gid(ax, "kl-dapo-1")[0].get_ydata(), [0, 0.02, 0.04])
    caption_has(fig, "Fig. 15")
    assert "final KL 0.02 to 0.04" in full_text(fig)
    with pytest.raises(InputError, match="beta != 0"):
        pf.fig15_kl_beta0(df.assign(beta=0.1))


def test_every_paper_figure_names_its_number():
    labels = {label for _, label in pf.PAPER_FIGURES.values()}
    assert labels == {"Table 1", "Fig. 2", "Fig. 3", "Fig. 4", "Fig. 5", "Fig. 6", "Fig. 9", "Fig. 10", "Fig. 12",
                      "Fig. 15"}
    assert set(pf.PAPER_FIGURES) <= set(schemas.SCHEMAS)


def test_ratio_above_one_within_tolerance_is_shown_not_hidden():
    # lhs > rhs by less than tol: the verdict is "indeterminate" (float64 cannot decide); it is drawn at its ratio,
    # neither as a violation nor as a failed assumption
    rows = [{**make_check("cor3.4-weyl", 2e-16, 1e-16, tol=1e-15).as_row(), "d_scale": 1e-3},
            {**make_check("cor3.4-weyl", 0.5, 1.0).as_row(), "d_scale": 1.0},
            {**make_check("cor3.4-weyl", 0.25, 1.0).as_row(), "d_scale": 2.0}]
    assert rows[0]["verdict"] == "indeterminate"
    fig = tf.fig_theory_vs_empirical(pd.DataFrame(rows), "cor3.4-weyl")
    _, ax_t = main_axes(fig)
    (tol_pts,) = by_gid(ax_t, "within-tolerance")
    np.testing.assert_allclose(offsets(tol_pts), [[1e-3, 2.0]])
    assert "indeterminate" in tol_pts.get_label()
    assert not by_gid(ax_t, "violations")
    assert not by_gid(ax_t, "assumption-failed")
    (line,) = by_gid(ax_t, "tightness")
    assert line.get_linestyle() == "-"  # one sweep with distinct regime values: joined


def test_tightness_points_are_not_joined_across_repeated_regimes():
    rows = [{**make_check("cor3.5", x, 1.0).as_row(), "d_dW_over_gap": r} for r, x in ((0.1, 0.2), (0.1, 0.5), (1, .3))]
    fig = tf.fig_theory_vs_empirical(pd.DataFrame(rows), "cor3.5")
    (line,) = by_gid(main_axes(fig)[1], "tightness")
    assert line.get_linestyle() == "None"


def test_statement_mathtext_parses_and_covers_the_registry():
    import theory
    from matplotlib.mathtext import MathTextParser

    parser = MathTextParser("path")
    for rid, tex in tf.STATEMENT_TEX.items():
        for piece in tex.split("$")[1::2]:
            parser.parse(f"${piece}$")  # raises ValueError on bad mathtext
    # each mathtext statement belongs to a registered result (a renamed id would silently lose its title)
    assert set(tf.STATEMENT_TEX) <= set(theory.RESULTS), sorted(set(tf.STATEMENT_TEX) - set(theory.RESULTS))
    # an id without one falls back to its name
    fig = tf.fig_theory_vs_empirical(pd.DataFrame([make_check("new-id", 1.0, 2.0).as_row()]), "new-id")
    assert main_axes(fig)[0].get_title().endswith("new-id")


def test_schemas_markdown_lists_every_column_once():
    md = schemas.schemas_markdown()
    for s in schemas.SCHEMAS.values():
        assert md.count(f"### `{s.name}` ") == 1
        section = md.split(f"### `{s.name}` ")[1].split("### ")[0]
        rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
        assert [r.split("`")[1] for r in rows] == [c.name for c in s.columns]
