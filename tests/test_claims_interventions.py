"""Tests for sims.claims.interventions: App. D coordinates and conventions (exact), the verdict logic on constructed
tables, and the fast configurations of ``interventions`` and ``kl_beta0`` on the cached pretrained model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from paper_figs.schemas import validate
from sims.claims.base import VERDICTS
from sims.claims.interventions import (
    KL_BUDGET_MULTIPLE,
    MIN_KL_POINTS,
    MIN_RATIO_DROP,
    MIN_UNTOUCHED_RATIO,
    RANDOM_LEVEL_SLACK,
    SCRAMBLED,
    apply_edits,
    bounded_kl_at_beta0,
    default_permutation,
    function_preservation,
    intervention_collapses_overlap,
    interventions_experiment,
    kl_beta0_experiment,
    lemma_f9_band_hypothesis,
    logit_tolerance,
    per_step_kl_bound,
    permutation_index,
    to_original_coordinates,
)
from sims.tinygpt.model import GPTConfig, TinyGPT, permute_kv_heads, random_orthogonal
from theory.errors import InputError, ShapeMismatchError

FAST_PRETRAIN = {"preset": "fast", "cache_dir": ".cache/threegate"}


def small_model(n_kv_head: int = 4, seed: int = 0) -> TinyGPT:
    return TinyGPT(GPTConfig(vocab_size=32, n_layer=2, n_head=8, n_kv_head=n_kv_head, d_model=64, max_seq_len=16,
                             seed=seed))


def batch(n: int = 3, T: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32, (n, T), generator=g), torch.ones(n, T, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------------
# Coordinates: undoing a permutation is exact


@pytest.mark.parametrize("n_kv_head", [2, 4])
@pytest.mark.parametrize("mt", ["q", "k", "v", "o"])
def test_to_original_coordinates_undoes_permute_kv_heads_exactly(n_kv_head, mt):
    m = small_model(n_kv_head)
    lin = {"q": "q", "k": "k", "v": "v", "o": "o"}[mt]
    before = getattr(m.blocks[1].attn, lin).weight.detach().numpy().copy()
    perm = default_permutation(n_kv_head)
    permute_kv_heads(m, 1, perm)
    after = getattr(m.blocks[1].attn, lin).weight.detach().numpy()
    assert not np.array_equal(after, before)  # the permutation moved entries
    np.testing.assert_array_equal(to_original_coordinates(after, m.cfg, perm, mt), before)


def test_undoing_with_the_inverse_permutation_is_wrong_for_a_non_involution():
    """Control: the mapping direction matters (perm and perm^-1 differ for a 4-cycle), so the test above can fail."""
    m = small_model(4)
    before = m.blocks[0].attn.k.weight.detach().numpy().copy()
    perm = default_permutation(4)
    inverse = list(np.argsort(perm))
    assert inverse != perm
    permute_kv_heads(m, 0, perm)
    after = m.blocks[0].attn.k.weight.detach().numpy()
    assert not np.array_equal(to_original_coordinates(after, m.cfg, inverse, "k"), before)


def test_masks_map_back_like_the_weights():
    """A mask travels with its entries: the mask of "entry is negative" commutes with the permutation."""
    m = small_model(4)
    perm = default_permutation(4)
    W0 = m.blocks[0].attn.o.weight.detach().numpy().copy()
    permute_kv_heads(m, 0, perm)
    W1 = m.blocks[0].attn.o.weight.detach().numpy()
    np.testing.assert_array_equal(to_original_coordinates(W1 < 0, m.cfg, perm, "o"), W0 < 0)


def test_permutation_index_rejects_what_it_cannot_map():
    cfg = small_model(4).cfg
    with pytest.raises(InputError, match="not permuted"):
        permutation_index(cfg, [1, 2, 3, 0], "up")
    with pytest.raises(InputError, match="not a permutation"):
        permutation_index(cfg, [0, 0, 1, 2], "q")
    with pytest.raises(ShapeMismatchError):
        to_original_coordinates(np.zeros((5, 64)), cfg, [1, 2, 3, 0], "k")
    with pytest.raises(InputError, match="at least 2 kv heads"):
        default_permutation(1)


# ----------------------------------------------------------------------------------------------------------------
# App. D conventions (the paper mixes row-vector and (out, in) conventions): literal readings break the function


@torch.no_grad()
def _max_logit_diff(m0, m1, ids, attn) -> float:
    return float((m0(ids, attn) - m1(ids, attn)).abs().max())


@torch.no_grad()
def _tol(m, ids, attn) -> float:
    return logit_tolerance(m.cfg, float(m(ids, attn).abs().max()))


def test_paper_rotate_formulas_read_in_one_convention_break_the_function():
    """App. D writes W_v' = W_v R_kv and W_o' = W_o R_q. In the row-vector convention (y = x W, W_o of shape
    (H D, d)), W_o R_q rotates the model dimension, not the head space: the logits change far beyond the
    tolerance. The function-preserving pair is W_o' = R_q^T W_o there (``rotate_vo``: o.weight R_q in (out, in))."""
    m0 = small_model(4)
    ids, attn = batch()
    tol = _tol(m0, ids, attn)
    R = random_orthogonal(m0.cfg.head_dim, torch.Generator().manual_seed(3))
    R_kv = torch.block_diag(*[R] * m0.cfg.n_kv_head).float()
    R_q = torch.block_diag(*[R] * m0.cfg.n_head).float()
    literal, right = small_model(4), small_model(4)
    with torch.no_grad():
        for m, o_new in ((literal, lambda Wo: (Wo @ R_q).T), (right, lambda Wo: (R_q.T @ Wo).T)):
            a = m.blocks[0].attn
            Wv, Wo = a.v.weight.T, a.o.weight.T  # row-vector convention: x @ W
            a.v.weight.copy_((Wv @ R_kv).T)
            a.o.weight.copy_(o_new(Wo))
    assert _max_logit_diff(m0, right, ids, attn) <= tol
    assert _max_logit_diff(m0, literal, ids, attn) > 100 * tol


def test_paper_permute_with_the_inverse_on_o_breaks_the_function():
    """App. D: "the matching inverse on W_o". With o.weight's columns (the head axis of y) the same permutation as
    q's rows preserves the function; the inverse does not once the permutation is not an involution (4 kv heads)."""
    m0 = small_model(4)
    ids, attn = batch()
    tol = _tol(m0, ids, attn)
    perm = default_permutation(4)
    same, inverse = small_model(4), small_model(4)
    permute_kv_heads(same, 0, perm)
    permute_kv_heads(inverse, 0, perm)
    _, q_idx = permutation_index(m0.cfg, perm, "o")
    _, q_inv = permutation_index(m0.cfg, list(np.argsort(perm)), "o")
    with torch.no_grad():
        o = inverse.blocks[0].attn.o.weight
        o.copy_(m0.blocks[0].attn.o.weight[:, q_inv])  # o gets the inverse permutation instead of perm
    assert not np.array_equal(q_idx, q_inv)
    assert _max_logit_diff(m0, same, ids, attn) <= tol
    assert _max_logit_diff(m0, inverse, ids, attn) > 100 * tol


# ----------------------------------------------------------------------------------------------------------------
# Function preservation: float32 within tol; bf16 storage breaks Rotate, not Permute


def _bf16_model(n_kv_head: int = 4) -> TinyGPT:
    m = small_model(n_kv_head)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


@pytest.mark.parametrize("kind", ["rotate", "permute", "rotate+permute"])
def test_function_preservation_float32_and_bf16_storage(kind):
    import copy

    base = _bf16_model()
    edited = copy.deepcopy(base)
    rec = apply_edits(edited, [(1, kind)], rotation_seed=5)
    assert rec[1]["kind"] == kind and (rec[1]["perm"] is not None) == ("permute" in kind)
    ids, attn = batch(4, 12)
    rows = {r["storage"]: r for r in function_preservation(base, edited, ids, attn, intervention=kind, layer=1)}
    assert rows["float32"]["preserved"] and rows["float32"]["max_abs_logit_diff"] <= rows["float32"]["tol"]
    if kind == "permute":  # bf16 values are moved, not rounded: still preserved in bf16 storage
        assert rows["bf16"]["preserved"]
    else:  # rotated weights leave the bf16 grid; rounding them breaks exact preservation
        assert not rows["bf16"]["preserved"] and rows["bf16"]["ratio_to_tol"] > 1


def test_logit_tolerance_scales_with_the_dtype_epsilon():
    cfg = small_model().cfg
    assert math.isclose(logit_tolerance(cfg, 2.0, torch.bfloat16) / logit_tolerance(cfg, 2.0, torch.float32),
                        torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float32).eps)
    assert logit_tolerance(cfg, 2.0) == 2 * logit_tolerance(cfg, 1.0)


def test_apply_edits_rejects_bad_edits():
    m = small_model()
    with pytest.raises(InputError, match="unknown intervention"):
        apply_edits(m, [(0, "shear")], rotation_seed=0)
    with pytest.raises(InputError, match="edited twice"):
        apply_edits(m, [(0, "rotate"), (0, "permute")], rotation_seed=0)
    with pytest.raises(InputError, match="out of range"):
        apply_edits(m, [(7, "rotate")], rotation_seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Verdict logic on constructed tables: overlap collapse


def overlap_table(untouched: dict[int, float], scrambled: dict[int, float], *, baseline: float = 0.3,
                  kind: str = "rotate+permute") -> pd.DataFrame:
    """Rows for layer 0 untouched (ratio per seed) and layer 1 edited: v/o at the scrambled ratio, q/k/up at the
    untouched ratio (mapped back or unedited: they must not count as scrambled)."""
    rows = []
    for s in untouched:
        for mt in ("q", "k", "v", "o", "up", "gate", "down"):
            rows.append({"seed": s, "layer": 0, "matrix_type": mt, "intervention": "none",
                         "overlap": baseline * untouched[s], "random_baseline": baseline})
            r = scrambled[s] if mt in SCRAMBLED[kind] else untouched[s]
            rows.append({"seed": s, "layer": 1, "matrix_type": mt, "intervention": kind, "overlap": baseline * r,
                         "random_baseline": baseline})
    return pd.DataFrame(rows)


def test_overlap_collapse_clear_is_reproduced():
    v = intervention_collapses_overlap(overlap_table({0: 1.7, 1: 1.75, 2: 1.68}, {0: 1.02, 1: 0.98, 2: 1.0}))
    assert v.verdict == "reproduced", v.reason
    assert v.numbers["effects"] == pytest.approx([0.68, 0.77, 0.68])


def test_overlap_that_does_not_drop_is_not_reproduced():
    v = intervention_collapses_overlap(overlap_table({0: 1.7, 1: 1.75, 2: 1.68}, {0: 1.69, 1: 1.74, 2: 1.7}))
    assert v.verdict == "not reproduced", v.reason


def test_overlap_collapse_with_one_seed_is_inconclusive():
    v = intervention_collapses_overlap(overlap_table({0: 1.7}, {0: 1.0}))
    assert v.verdict == "inconclusive" and "MIN_SEEDS" in v.reason


def test_overlap_collapse_needs_reproducible_untouched_masks():
    t = overlap_table({0: 1.05, 1: 1.04}, {0: 1.0, 1: 1.0})
    v = intervention_collapses_overlap(t)
    assert v.verdict == "inconclusive" and "not reproducible" in v.reason
    assert 1.05 < MIN_UNTOUCHED_RATIO


def test_overlap_drop_short_of_the_random_level_is_inconclusive():
    v = intervention_collapses_overlap(overlap_table({0: 2.5, 1: 2.5, 2: 2.52}, {0: 1.5, 1: 1.52, 2: 1.5}))
    assert v.verdict == "inconclusive" and "random level" in v.reason
    assert 1.5 > 1 + RANDOM_LEVEL_SLACK


def test_permute_alone_has_nothing_scrambled_after_mapping_back():
    t = overlap_table({0: 1.7, 1: 1.7}, {0: 1.0, 1: 1.0}, kind="permute")
    v = intervention_collapses_overlap(t)
    assert v.verdict == "inconclusive" and "no scrambled" in v.reason


def test_overlap_verdict_ignores_zero_baselines_and_names_missing_columns():
    t = overlap_table({0: 1.7, 1: 1.75, 2: 1.68}, {0: 1.02, 1: 0.98, 2: 1.0})
    extra = t.iloc[:1].assign(layer=5, overlap=0.0, random_baseline=0.0)  # rerun changed nothing: ratio undefined
    assert intervention_collapses_overlap(pd.concat([t, extra])).verdict == "reproduced"
    with pytest.raises(InputError, match="random_baseline"):
        intervention_collapses_overlap(t.drop(columns=["random_baseline"]))
    with pytest.raises(InputError, match="unknown intervention"):
        intervention_collapses_overlap(t.assign(intervention="shear"))


@given(st.floats(1.3, 3.0), st.floats(0.0, 2.0))
@example(1.3, MIN_RATIO_DROP)  # the drop exactly at the threshold: strict, so not reproduced as a collapse
def test_overlap_verdict_is_reproduced_only_above_the_min_drop(r_un, drop):
    r_sc = max(r_un - drop, 0.0)
    seeds = {0: r_un, 1: r_un}
    v = intervention_collapses_overlap(overlap_table(seeds, {0: r_sc, 1: r_sc}))
    assert v.verdict in VERDICTS
    if v.verdict == "reproduced":
        assert r_un - r_sc > MIN_RATIO_DROP and r_sc <= 1 + RANDOM_LEVEL_SLACK


# ----------------------------------------------------------------------------------------------------------------
# Verdict logic on constructed tables: KL at beta = 0 and the Lemma F.9 band


def kl_table(curves: dict[int, np.ndarray], eps_low: float = 0.2, eps_high: float = 0.28) -> pd.DataFrame:
    return pd.DataFrame([{"run": f"dapo-s{s}", "seed": s, "step": t, "kl": float(k), "eps_low": eps_low,
                          "eps_high": eps_high} for s, kl in curves.items() for t, k in enumerate(kl)])


def test_per_step_kl_bound_is_the_largest_log_ratio_on_the_band():
    assert per_step_kl_bound(0.2, 0.28) == pytest.approx(max(-math.log(0.8), math.log(1.28)))
    assert per_step_kl_bound(0.5, 0.1) == pytest.approx(math.log(2))
    with pytest.raises(InputError):
        per_step_kl_bound(1.0, 0.2)


def test_saturating_kl_is_reproduced():
    t = np.arange(31)
    v = bounded_kl_at_beta0(kl_table({s: 0.05 * (1 - np.exp(-t / (8 + s))) for s in range(3)}))
    assert v.verdict == "reproduced", v.reason


def test_accelerating_kl_is_not_reproduced():
    t = np.arange(31)
    v = bounded_kl_at_beta0(kl_table({s: 1e-4 * (1 + 0.1 * s) * t ** 2 for s in range(3)}))
    assert v.verdict == "not reproduced", v.reason


def test_kl_over_the_lemma_budget_is_not_reproduced_even_if_it_flattens():
    t = np.arange(31)
    budget = KL_BUDGET_MULTIPLE * 30 * per_step_kl_bound(0.2, 0.28)
    v = bounded_kl_at_beta0(kl_table({s: 2 * budget * (1 - np.exp(-t / 8)) for s in range(3)}))
    assert v.verdict == "not reproduced" and "budget" in v.reason


def test_kl_with_one_seed_or_few_steps_is_inconclusive():
    t = np.arange(31)
    assert bounded_kl_at_beta0(kl_table({0: 0.05 * (1 - np.exp(-t / 8))})).verdict == "inconclusive"
    few = bounded_kl_at_beta0(kl_table({s: np.linspace(0, 0.01, MIN_KL_POINTS - 1) for s in range(3)}))
    assert few.verdict == "inconclusive" and "MIN_KL_POINTS" in few.reason


def test_band_hypothesis_verdict_is_exact():
    ok = pd.DataFrame({"run": ["a", "a"], "step": [1, 2], "out_of_band_frac": [0.0, 0.0]})
    assert lemma_f9_band_hypothesis(ok).verdict == "reproduced"
    bad = ok.assign(out_of_band_frac=[0.0, 1e-3])
    v = lemma_f9_band_hypothesis(bad)
    assert v.verdict == "not reproduced" and v.numbers["steps_with_violations"] == 1
    assert lemma_f9_band_hypothesis(ok.assign(out_of_band_frac=np.nan)).verdict == "inconclusive"


# ----------------------------------------------------------------------------------------------------------------
# The fast configurations on the cached pretrained model


@pytest.fixture(scope="module")
def interventions_run():
    return interventions_experiment({"pretrain": FAST_PRETRAIN, "interventions": {"preset": "fast"}})


@pytest.fixture(scope="module")
def kl_run():
    return kl_beta0_experiment({"pretrain": FAST_PRETRAIN, "kl_beta0": {"preset": "fast"}})


def test_interventions_fast_tables(interventions_run):
    t = interventions_run.tables
    main = validate(t["rotate_overlap"], "rotate_overlap")
    assert {"seed", "layer", "matrix_type", "intervention", "overlap", "random_baseline", "scrambled"} <= set(main)
    assert ((main["overlap"] >= 0) & (main["overlap"] <= 1)).all()
    assert set(main["intervention"]) == {"none", "rotate+permute"}  # the fast model has 2 layers: layer 1 edited
    fp = t["function_preservation"]
    assert {"intervention", "layer", "max_abs_logit_diff", "tol", "preserved"} <= set(fp)
    assert fp.loc[fp["storage"] == "float32", "preserved"].all()
    assert [v.verdict in VERDICTS for v in interventions_run.verdicts] == [True]
    assert len(interventions_run.results) == 3 * len(interventions_run.config["seeds"])


def test_interventions_fast_pairs_are_consistent(interventions_run):
    p = interventions_run.tables["overlap_pairs"]
    key = ["seed", "layer", "matrix_type"]
    orig = p[(p["pair"] == "intervened vs rerun") & (p["coordinates"] == "original")].set_index(key)
    raw = p[(p["pair"] == "intervened vs rerun") & (p["coordinates"] == "as stored")].set_index(key)
    # untouched layers and unpermuted matrices need no mapping: both coordinate systems give the same overlap
    same = [i for i in orig.index if orig.loc[i, "intervention"] == "none" or i[2] in ("up", "gate", "down")]
    assert same and np.array_equal(orig.loc[same, "overlap"], raw.loc[same, "overlap"])
    # overlap is |A & B| / |A|: at most min(1, |B| / |A|) = min(1, density(B) / density(A)); baseline = density(B)
    assert (p["random_baseline"] == p["density_b"]).all()
    assert (p["overlap"] <= np.minimum(1, p["density_b"] / p["density_a"]) + 1e-12).all()


def test_intervened_and_reference_runs_start_from_the_same_function(interventions_run):
    """Same seed, same data: on the untouched layer the intervened run's mask nearly equals the reference's
    (the bf16-rounded rotation perturbs the function by ~1e-2 in the logits, not more)."""
    p = interventions_run.tables["overlap_pairs"]
    same_seed = p[(p["pair"] == "intervened vs reference") & (p["intervention"] == "none")]
    assert (same_seed["overlap"] > 0.9).all()


def test_kl_beta0_fast_tables(kl_run):
    t = kl_run.tables
    kl = validate(t["kl_beta0"], "kl_beta0")
    assert (kl["beta"] == 0).all() and (kl["kl"] >= 0).all()
    assert (kl.loc[kl["step"] == 0, "kl"] == 0).all()
    steps = kl_run.config["rl_steps"]
    assert sorted(kl["step"].unique()) == list(range(steps + 1))
    band = t["band_violations"]
    assert {"run", "step", "out_of_band_frac", "violation_fraction_lemma", "k1", "k3", "bound",
            "per_step_bound"} <= set(band)
    assert ((band["out_of_band_frac"] >= 0) & (band["out_of_band_frac"] <= 1)).all()
    # the lemma's symmetric band [1 - max eps, 1 + max eps] contains the run's band: never more violations
    assert (band["violation_fraction_lemma"] <= band["out_of_band_frac"] + 1e-12).all()
    # kl_beta0 and the probe's kl_tok_base are the same measurement
    merged = kl.merge(band, on=["run", "step"])
    assert np.array_equal(merged["kl"].to_numpy(), merged["kl_tok_base"].to_numpy())
    assert all(v.verdict in VERDICTS for v in kl_run.verdicts) and len(kl_run.verdicts) == 2


def test_paper_figures_draw_the_fast_tables(interventions_run, kl_run):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from paper_figs.paper_figs import fig6_rotate_overlap, fig15_kl_beta0

    assert isinstance(fig6_rotate_overlap(interventions_run.tables["rotate_overlap"]), Figure)
    assert isinstance(fig15_kl_beta0(kl_run.tables["kl_beta0"]), Figure)


def test_config_errors_name_the_problem():
    with pytest.raises(InputError, match="unknown key '"):
        interventions_experiment({"pretrain": FAST_PRETRAIN, "interventions": {"preset": "fast", "layerz": [1]}})
    with pytest.raises(InputError, match="out of range"):
        interventions_experiment({"pretrain": FAST_PRETRAIN,
                                  "interventions": {"preset": "fast", "edits": [[9, "rotate"]]}})
    with pytest.raises(InputError, match="clip-higher"):
        kl_beta0_experiment({"pretrain": FAST_PRETRAIN, "kl_beta0": {"preset": "fast", "eps_high": 0.1}})


# ----------------------------------------------------------------------------------------------------------------
# The default presets (slow tier): structural facts only, no number measured on this machine


@pytest.mark.slow
@pytest.mark.parametrize("name", ["interventions", "kl_beta0"])
def test_default_preset_runs_and_gives_valid_tables(name, tmp_path):
    from sims.experiments.registry import run_claims

    run, path = run_claims(name, {}, tmp_path / name)
    schema = {"interventions": "rotate_overlap", "kl_beta0": "kl_beta0"}[name]
    table = validate(run.tables[schema], schema)
    numeric = [c for c in ("overlap", "random_baseline", "kl", "step", "layer") if c in table.columns]
    assert np.isfinite(table[numeric].to_numpy(dtype=float)).all()
    assert len(set(run.config["seeds"])) >= 3
    assert all(v.verdict in VERDICTS for v in run.verdicts)
    assert (path / f"{schema}.csv").is_file() and (path / "verdicts.json").is_file()
