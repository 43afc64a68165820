"""Tests for sims.claims.geometry: exact structured oracles for the drift and overlap measurements, the verdict
logic on constructed tables, and the fast (default tier) and default (slow tier) presets of ``geometry``."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from paper_figs.schemas import validate
from sims.claims.base import VERDICTS
from sims.claims.geometry import (
    ACC_MATCH_TOL,
    MIN_DRIFT_REDUCTION,
    MIN_OVERLAP_GAP,
    PAPER_ALPHA,
    PAPER_K,
    VERDICT_K,
    GeometryConfig,
    StructuralMasks,
    drift_rows,
    geometry_experiment,
    overlap_rows,
    pick_accuracy_match,
    rl_drift_below_sft,
    rl_overlap_vs_random,
)
from theory.errors import InputError
from theory.metrics import selection_count

FAST_PRETRAIN = {"preset": "fast", "cache_dir": ".cache/threegate"}
EPS = np.finfo(np.float64).eps
NAME = "blocks.0.attn.q.weight"


# ----------------------------------------------------------------------------------------------------------------
# Drift on structured matrices with known spectra and subspaces


def _givens(n: int, i: int, j: int, theta: float) -> np.ndarray:
    G = np.eye(n)
    c, s = math.cos(theta), math.sin(theta)
    G[i, i], G[j, j], G[i, j], G[j, i] = c, c, -s, s
    return G


@given(st.floats(0.0, 80.0), st.sampled_from([1, 2, 4, 8]))
@example(0.0, 1)
@example(45.0, 4)
def test_drift_of_a_givens_rotation_is_exactly_that_angle(theta_deg, k):
    """W0 = diag(s) (distinct s), W1 = G W0 with G rotating e_0 towards e_k: the spectrum is unchanged (NSS = 0),
    the left top-k subspace turns by exactly theta in one direction (one angle theta, k-1 zero), the right one not."""
    n = 20
    s = np.linspace(10.0, 1.0, n)
    W0 = np.diag(s)
    W1 = _givens(n, 0, k, math.radians(theta_deg)) @ W0
    drift, spectrum, angles = drift_rows({NAME: torch.from_numpy(W0)}, {NAME: torch.from_numpy(W1)}, (k,),
                                         angle_k=k, run="r")
    (row,) = drift
    assert row["nss"] <= 8 * n * EPS
    assert row["max_angle_deg"] == pytest.approx(theta_deg, abs=1e-9)
    assert row["mean_angle_deg"] == pytest.approx(theta_deg / (2 * k), abs=1e-9)
    assert row["gap_rel"] == pytest.approx((s[k - 1] - s[k]) / s[0], rel=1e-12)
    u = sorted(a["angle_deg"] for a in angles if a["side"] == "U")
    v = [a["angle_deg"] for a in angles if a["side"] == "V"]
    assert u[-1] == pytest.approx(theta_deg, abs=1e-9) and max(u[:-1], default=0.0) <= 1e-9
    assert max(v) <= 1e-9
    assert [r["sigma_base"] for r in spectrum] == pytest.approx([r["sigma_tuned"] for r in spectrum], rel=1e-13)


def test_drift_of_a_scaled_matrix_is_the_scale():
    """W1 = (1 + c) W0: NSS = |c| exactly (every singular value scales), no rotation at any k."""
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((32, 48))
    for c in (1e-3, -0.25):
        drift, _, _ = drift_rows({NAME: torch.from_numpy(W0)}, {NAME: torch.from_numpy((1 + c) * W0)}, (1, 4, 16))
        assert [r["k"] for r in drift] == [1, 4, 16]  # 16 <= min(32, 48) / 2; larger k are skipped
        for r in drift:
            assert r["nss"] == pytest.approx(abs(c), rel=1e-10)
            assert r["max_angle_deg"] <= 1e-8


def test_drift_angles_are_nan_with_the_reason_when_the_top_k_subspace_is_not_unique():
    W0 = np.diag([3.0, 2.0, 2.0, 1.0, 0.5, 0.25])  # sigma_2 = sigma_3: the top-2 subspace is not determined
    drift, _, angles = drift_rows({NAME: torch.from_numpy(W0)}, {NAME: torch.from_numpy(W0 * 1.01)}, (1, 2, 3),
                                  angle_k=2)
    by_k = {r["k"]: r for r in drift}
    assert math.isnan(by_k[2]["max_angle_deg"]) and "zero spectral gap at k=2" in by_k[2]["failed_assumption"]
    assert by_k[1]["failed_assumption"] == "" and by_k[3]["failed_assumption"] == ""
    assert all(math.isnan(a["angle_deg"]) for a in angles)


# ----------------------------------------------------------------------------------------------------------------
# Overlaps on constructed updates


def _bf16_base(rng, shape=(16, 24)) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(torch.bfloat16)


@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.5])
def test_an_update_of_exactly_the_low_magnitude_entries_overlaps_m_low_fully(rng, alpha):
    from theory.metrics import low_magnitude_mask

    W0 = _bf16_base(rng)
    low = torch.from_numpy(low_magnitude_mask(W0.double().numpy(), alpha))
    W1 = torch.where(low, W0 * 2 + 1, W0)  # every selected entry changes its stored bf16 value, no other does
    assert bool(((W1 != W0) == low).all())
    masks = StructuralMasks({NAME: W0}, (1, 4), (alpha,))
    rows = {(r["structural_mask"], r["k"]): r for r in overlap_rows({NAME: W0}, {NAME: W1}, masks)}
    n = W0.numel()
    assert rows[("low", 0)]["overlap"] == 1.0
    assert rows[("low", 0)]["random_baseline"] == selection_count(alpha, n) / n
    for k in (1, 4):
        # M_princ and not M_low misses M_low entirely; M_princ has exactly round(alpha n) entries
        assert rows[("princ_not_low", k)]["overlap"] == 0.0
        assert rows[("princ", k)]["mask_size"] == selection_count(alpha, n)


def test_binade_baseline_equals_the_overlap_when_the_update_is_a_function_of_the_binade(rng):
    """Every entry with |w0| >= 0.5 changes and no other: P(change | binade) is 0 or 1, so the magnitude-only
    prediction is exact and binade_baseline == overlap on every structural mask."""
    W0 = _bf16_base(rng, (24, 32))
    big = W0.abs() >= 0.5  # 0.5 = 2**-1 is a binade boundary
    W1 = torch.where(big, W0 * 2, W0)
    masks = StructuralMasks({NAME: W0}, (1, 4), (0.2, 0.5))
    rows = overlap_rows({NAME: W0}, {NAME: W1}, masks)
    assert rows and all(r["changed"] == int(big.sum()) for r in rows)
    for r in rows:
        assert r["binade_baseline"] == pytest.approx(r["overlap"], abs=1e-12)
        assert r["binade_expected"] == pytest.approx(r["intersection"], abs=1e-9)


def test_overlap_is_nan_when_nothing_changed(rng):
    W0 = _bf16_base(rng)
    masks = StructuralMasks({NAME: W0}, (2,), (0.5,))
    rows = overlap_rows({NAME: W0}, {NAME: W0.clone()}, masks)
    assert all(math.isnan(r["overlap"]) and r["changed"] == 0 for r in rows)


# ----------------------------------------------------------------------------------------------------------------
# Accuracy matching


def test_accuracy_match_takes_the_closest_trained_step_and_the_earliest_on_ties():
    acc = {0: 0.60, 10: 0.50, 20: 0.70, 30: 0.64, 40: 0.56}
    assert pick_accuracy_match(0.60, acc) == (30, pytest.approx(0.04))  # step 0 (the base) is never a match
    assert pick_accuracy_match(0.60, {0: 0.6, 10: 0.5, 20: 0.7})[0] == 10  # |gap| 0.1 on both: the earlier step
    with pytest.raises(InputError, match="no probed step >= 1"):
        pick_accuracy_match(0.5, {0: 0.5})


# ----------------------------------------------------------------------------------------------------------------
# Verdict logic on constructed tables


def _drift_table(rl: list[tuple[float, float]], sft: list[tuple[float, float]], *, match: str = "steps",
                 gap: float = 0.0, k: int = VERDICT_K) -> pd.DataFrame:
    """Two matrices per seed; (nss, mean angle) per seed for RL and SFT; an unrelated k that must be ignored."""
    rows = []
    for seed, ((rn, ra), (sn, sa)) in enumerate(zip(rl, sft)):
        for mt in ("q", "up"):
            for kk, scale in ((k, 1.0), (k // 2, 100.0)):
                rows.append({"method": "RL", "match": "reference", "seed": seed, "k": kk, "matrix_type": mt,
                             "nss": rn * scale, "mean_angle_deg": ra * scale, "accuracy_gap": 0.0})
                rows.append({"method": "SFT", "match": match, "seed": seed, "k": kk, "matrix_type": mt,
                             "nss": sn, "mean_angle_deg": sa, "accuracy_gap": gap})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("match", ["steps", "accuracy"])
@pytest.mark.parametrize("rl, sft, expected", [
    ([(1e-4, 0.1)] * 3, [(4e-4, 0.4), (4.2e-4, 0.41), (3.9e-4, 0.38)], "reproduced"),   # RL a quarter of SFT
    ([(4e-4, 0.4)] * 3, [(4e-4, 0.4), (4.1e-4, 0.41), (3.9e-4, 0.39)], "not reproduced"),  # no difference
    ([(8e-4, 0.8)] * 2, [(4e-4, 0.4), (4e-4, 0.4)], "not reproduced"),                  # RL drifts more
    ([(1e-4, 0.4)] * 3, [(4e-4, 0.4), (4e-4, 0.4), (4e-4, 0.4)], "not reproduced"),     # NSS yes, angle no
    ([(1e-4, 0.1)], [(4e-4, 0.4)], "inconclusive"),                                      # one seed
    ([(1e-4, 0.1), (1e-4, 0.1)], [(4e-4, 0.4), (1.1e-4, 0.11)], "inconclusive"),         # spread swamps it
])
def test_drift_verdict_on_constructed_tables(match, rl, sft, expected):
    v = rl_drift_below_sft(_drift_table(rl, sft, match=match), match)
    assert v.verdict == expected, v.reason
    assert v.numbers["k"] == VERDICT_K
    assert v.numbers["sft_minus_rl_nss"] == pytest.approx([b[0] - a[0] for a, b in zip(rl, sft)])


def test_drift_verdict_effect_is_the_relative_reduction():
    v = rl_drift_below_sft(_drift_table([(1e-4, 0.1)] * 2, [(4e-4, 0.5)] * 2), "steps")
    assert v.numbers["effects_nss"] == pytest.approx([0.75, 0.75])
    assert v.numbers["effects_mean_angle_deg"] == pytest.approx([0.8, 0.8])
    assert MIN_DRIFT_REDUCTION < 0.75


def test_drift_verdict_at_accuracy_is_inconclusive_when_no_checkpoint_matches():
    t = _drift_table([(1e-4, 0.1)] * 3, [(4e-4, 0.4)] * 3, match="accuracy", gap=ACC_MATCH_TOL + 0.01)
    v = rl_drift_below_sft(t, "accuracy")
    assert v.verdict == "inconclusive" and "no SFT checkpoint matches" in v.reason
    assert rl_drift_below_sft(t, "steps").verdict == "inconclusive"  # no steps-matched rows at all


def test_drift_verdict_at_accuracy_needs_rl_to_have_moved_the_accuracy():
    t = _drift_table([(1e-4, 0.1)] * 3, [(4e-4, 0.4)] * 3, match="accuracy", gap=0.0)
    moved = t.assign(accuracy=0.80, base_accuracy=0.60)
    assert rl_drift_below_sft(moved, "accuracy").verdict == "reproduced"
    still = t.assign(accuracy=0.62, base_accuracy=0.60)  # |0.02| <= ACC_MATCH_TOL: RL did not move the accuracy
    v = rl_drift_below_sft(still, "accuracy")
    assert v.verdict == "inconclusive" and "did not move the accuracy" in v.reason
    assert rl_drift_below_sft(still.assign(match=still["match"].replace("accuracy", "steps")), "steps").verdict \
        == "reproduced"  # the steps-matched comparison does not depend on accuracy


def test_drift_verdict_zero_sft_drift_is_inconclusive_and_bad_input_is_named():
    v = rl_drift_below_sft(_drift_table([(1e-4, 0.1)] * 2, [(0.0, 0.0)] * 2), "steps")
    assert v.verdict == "inconclusive"
    with pytest.raises(InputError, match="match must be one of"):
        rl_drift_below_sft(_drift_table([(1, 1)], [(1, 1)]), "loss")
    with pytest.raises(InputError, match="lacks column"):
        rl_drift_below_sft(pd.DataFrame({"method": ["RL"]}), "steps")


def _overlap_table(rl_overlap: list[float], *, mask: str = "princ", baseline: float = PAPER_ALPHA,
                   sft_overlap: float = 0.5) -> pd.DataFrame:
    """Per seed two matrices whose update masks have 100 and 300 entries, both with overlap o."""
    rows = []
    for seed, o in enumerate(rl_overlap):
        for method, match, ov in (("RL", "reference", o), ("SFT", "steps", sft_overlap)):
            for changed in (100, 300):
                rows.append({"method": method, "match": match, "seed": seed, "structural_mask": mask,
                             "k": 0 if mask == "low" else PAPER_K, "alpha": PAPER_ALPHA,
                             "intersection": round(ov * changed), "changed": changed,
                             "random_baseline": baseline})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("mask, overlaps, expected", [
    ("princ", [0.30, 0.32, 0.31], "reproduced"),
    ("princ", [0.50, 0.505, 0.50], "not reproduced"),  # at random
    ("princ", [0.70, 0.72], "not reproduced"),   # above random: the opposite
    ("princ", [0.30], "inconclusive"),
    ("low", [0.70, 0.72, 0.71], "reproduced"),
    ("low", [0.30, 0.31], "not reproduced"),
    ("low", [0.90, 0.50], "inconclusive"),       # spread swamps the mean effect
])
def test_overlap_verdict_on_constructed_tables(mask, overlaps, expected):
    v = rl_overlap_vs_random(_overlap_table(overlaps, mask=mask), mask)
    assert v.verdict == expected, v.reason
    assert v.numbers["sft_steps_overlap"] == pytest.approx([0.5] * len(overlaps))


def test_overlap_verdict_pools_by_update_mask_size():
    """Two matrices: |M| = 100 at density 0.2 with overlap 0.1, |M| = 300 at density 0.6 with overlap 0.5. Pooled:
    overlap (10 + 150) / 400 = 0.4, baseline (0.2 * 100 + 0.6 * 300) / 400 = 0.5."""
    rows = [{"method": "RL", "seed": s, "structural_mask": "princ", "k": PAPER_K, "alpha": PAPER_ALPHA,
             "intersection": i, "changed": c, "random_baseline": b}
            for s in (0, 1) for i, c, b in ((10, 100, 0.2), (150, 300, 0.6))]
    v = rl_overlap_vs_random(pd.DataFrame(rows), "princ")
    assert v.numbers["rl_overlap"] == pytest.approx([0.4, 0.4])
    assert v.numbers["rl_baseline"] == pytest.approx([0.5, 0.5])
    assert v.numbers["effects"] == pytest.approx([0.1, 0.1]) and 0.1 > MIN_OVERLAP_GAP


@pytest.mark.parametrize("binade, expected", [
    (0.30, "not reproduced"),   # magnitude alone predicts the low overlap: nothing left for the principal reading
    (0.45, "reproduced"),       # overlap 0.30 well below what magnitude predicts
])
def test_overlap_verdict_against_the_binade_baseline(binade, expected):
    t = _overlap_table([0.30, 0.305, 0.30])
    t = t.assign(binade_expected=binade * t["changed"])
    v = rl_overlap_vs_random(t, "princ", baseline="binade")
    assert v.verdict == expected, v.reason
    assert v.numbers["rl_binade_baseline"] == pytest.approx([binade] * 3)
    assert rl_overlap_vs_random(t, "princ").verdict == "reproduced"  # against the random 0.5 it is below
    with pytest.raises(InputError, match="lacks column"):
        rl_overlap_vs_random(t.drop(columns="binade_expected"), "princ", baseline="binade")
    with pytest.raises(InputError, match="'random' or 'binade'"):
        rl_overlap_vs_random(t, "princ", baseline="magnitude")


def test_overlap_verdict_ignores_other_k_and_alpha():
    t = _overlap_table([0.3, 0.31])
    other = t.assign(k=PAPER_K * 2, intersection=t["changed"])  # overlap 1 at another k: must not count
    v = rl_overlap_vs_random(pd.concat([t, other]), "princ")
    assert v.numbers["rl_overlap"] == pytest.approx([0.3, 0.31])
    assert rl_overlap_vs_random(t, "princ", alpha=0.2).verdict == "inconclusive"
    with pytest.raises(InputError, match="'princ' or 'low'"):
        rl_overlap_vs_random(t, "princ_not_low")


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def test_config_rejects_unknown_keys_and_bad_sweeps():
    with pytest.raises(InputError, match="unknown key '"):
        geometry_experiment({"pretrain": FAST_PRETRAIN, "geometry": {"preset": "fast", "kz": [1]}})
    with pytest.raises(InputError, match="ks must be positive"):
        geometry_experiment({"pretrain": FAST_PRETRAIN, "geometry": {"preset": "fast", "ks": [0, 4]}})
    with pytest.raises(InputError, match="alphas must be fractions"):
        geometry_experiment({"pretrain": FAST_PRETRAIN, "geometry": {"preset": "fast", "alphas": [1.5]}})


def test_sft_probe_grid_contains_the_matched_step_and_the_end():
    c = GeometryConfig.default()
    steps = c.sft_probe_steps()
    assert c.updates in steps and max(steps) == c.sft_max_factor * c.updates and steps[0] == 0
    assert c.ks and VERDICT_K in c.ks and PAPER_K in c.ks and PAPER_ALPHA in c.alphas
    assert len(c.seeds) >= 3


# ----------------------------------------------------------------------------------------------------------------
# The fast preset on real runs


@pytest.fixture(scope="module")
def fast_run():
    return geometry_experiment({"pretrain": FAST_PRETRAIN, "geometry": {"preset": "fast"}})


def test_fast_tables_validate_against_the_figure_schemas(fast_run):
    t = fast_run.tables
    for name in ("spectrum", "angles", "mask_overlap"):
        validate(t[name], name)
    assert set(t["angles"]["k"]) == {VERDICT_K}
    assert set(t["mask_overlap"]["method"]) == {"RL"} and set(t["mask_overlap"]["alpha"]) == {PAPER_ALPHA}
    assert set(t["mask_overlap"]["mask"]) == {"princ", "low", "princ_not_low"}
    for col in ("run", "match", "layer", "matrix_type", "k", "nss", "max_angle_deg", "mean_angle_deg"):
        assert col in t["drift"].columns
    assert set(t["drift"]["match"]) == {"reference", "steps", "accuracy"}
    for col in ("structural_mask", "k", "alpha", "method", "overlap", "random_baseline"):
        assert col in t["overlap_sweep"].columns


def test_fast_verdicts_are_computed_from_the_tables(fast_run):
    t = fast_run.tables
    assert [v.verdict for v in fast_run.verdicts] == list(t["verdicts"]["verdict"])
    assert all(v.verdict in VERDICTS for v in fast_run.verdicts)
    expected = [rl_drift_below_sft(t["drift"], "steps"), rl_drift_below_sft(t["drift"], "accuracy"),
                rl_overlap_vs_random(t["overlap_sweep"], "princ"), rl_overlap_vs_random(t["overlap_sweep"], "low"),
                rl_overlap_vs_random(t["overlap_sweep"], "princ", baseline="binade")]
    assert [v.as_row() for v in expected] == [v.as_row() for v in fast_run.verdicts]
    for n in t["verdicts"]["numbers"]:
        json.loads(n)
    assert len(fast_run.results) == 2 * len(GeometryConfig.fast().seeds)


def test_fast_nss_agrees_with_the_spectrum_table(fast_run):
    """NSS from theory.metrics.nss (drift) equals the norm of the spectrum table's differences (two code paths)."""
    t = fast_run.tables
    s = t["spectrum"]
    key = ["run", "layer", "matrix_type"]
    from_spec = s.groupby(key).apply(
        lambda g: np.linalg.norm(g["sigma_tuned"] - g["sigma_base"]) / np.linalg.norm(g["sigma_base"]),
        include_groups=False).rename("nss_spec")
    d = t["drift"].drop_duplicates(key).set_index(key)["nss"]
    both = pd.concat([d, from_spec], axis=1, join="inner")
    assert len(both) == len(from_spec) == s.groupby(key).ngroups
    np.testing.assert_allclose(both["nss"], both["nss_spec"], rtol=1e-9, atol=1e-15)
    # every checkpoint is compared with the same base
    assert s.groupby(["layer", "matrix_type", "i"])["sigma_base"].nunique().max() == 1


def test_fast_overlap_sweep_obeys_set_inclusions(fast_run):
    sw = fast_run.tables["overlap_sweep"]
    assert (sw["intersection"] <= np.minimum(sw["changed"], sw["mask_size"])).all()
    np.testing.assert_array_equal(sw["random_baseline"], sw["mask_size"] / sw["total"])
    exact = sw[sw["structural_mask"] != "princ_not_low"]
    assert (exact["mask_size"] == [selection_count(a, n) for a, n in zip(exact["alpha"], exact["total"])]).all()
    key = ["run", "layer", "matrix_type", "k", "alpha"]
    p = sw[sw["structural_mask"] == "princ"].set_index(key)
    pnl = sw[sw["structural_mask"] == "princ_not_low"].set_index(key)
    assert (pnl["intersection"] <= p.loc[pnl.index, "intersection"]).all()  # a subset never overlaps more
    nz = sw[sw["changed"] > 0]
    assert ((nz["binade_expected"] >= -1e-9) & (nz["binade_expected"] <= nz["mask_size"] + 1e-9)).all()
    d = fast_run.tables["drift"]
    angles = d["max_angle_deg"].dropna()
    assert ((angles >= 0) & (angles <= 90)).all()


def test_fast_accuracy_match_is_consistent(fast_run):
    m = fast_run.tables["accuracy_match"]
    c = GeometryConfig.fast()
    assert set(m["sft_step"]) <= set(c.sft_probe_steps()) - {0}
    np.testing.assert_allclose(m["accuracy_gap"], (m["sft_accuracy"] - m["rl_accuracy"]).abs())
    assert (m["matched"] == (m["accuracy_gap"] <= ACC_MATCH_TOL)).all()


# ----------------------------------------------------------------------------------------------------------------
# The default preset (slow tier): structure only, no number measured on this machine


@pytest.mark.slow
def test_default_preset_runs_and_its_tables_are_valid(tmp_path):
    from sims.experiments.registry import run_claims

    run, out = run_claims("geometry", {"pretrain": {"cache_dir": ".cache/threegate"}}, tmp_path / "geometry")
    assert len(run.verdicts) == 5 and all(v.verdict in VERDICTS for v in run.verdicts)
    for name in ("spectrum", "angles", "mask_overlap"):
        validate(run.tables[name], name)
    d = run.tables["drift"]
    assert np.isfinite(d["nss"]).all() and (d["nss"] >= 0).all()
    assert d["seed"].nunique() >= 3
    assert len(json.loads((out / "verdicts.json").read_text())) == 5
