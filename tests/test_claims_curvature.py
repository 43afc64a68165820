"""sims.claims.curvature: the two quadratic-form routes agree (forward-mode Fisher vs Hessian-vector products), the
pre-registered verdict on constructed tables (for, against, too few seeds, a seed-rule pass that the sign test does
not confirm), the SmolLM2 verdict, the fast preset, and SmolLM2 itself in the slow tier."""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from sims.claims.base import VERDICTS, start_model
from sims.claims.curvature import (
    ALPHA,
    MIN_LOG10_RATIO,
    CurvatureConfig,
    _sample_prefixes,
    curvature_experiment,
    curvature_principal_above_complement,
    fisher_quadratic_forms,
    smollm2_curvature_verdict,
)
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import hvp_quadratic_forms, restricted_fisher
from theory.errors import InputError
from theory.update_geometry import rank_one_directions

FAST_PRETRAIN = {"preset": "fast", "cache_dir": ".cache/threegate"}
MATRIX_TYPES = ("q", "k", "v", "o", "up", "gate", "down")


@pytest.fixture(scope="module")
def tiny():
    """The fast base model in float64 and prefixes sampled from it (4 prompts of the counting task)."""
    with deterministic():
        model = start_model({"pretrain": FAST_PRETRAIN}, True)
        ids, attn, pos = _sample_prefixes(model, "counting", 4, 0, "cpu")
        model64 = copy.deepcopy(model).double()
        for p in model64.parameters():
            p.requires_grad_(False)
        yield model64, {n: p.detach() for n, p in model64.named_parameters()}, ids, attn, pos


def test_forward_mode_fisher_and_hessian_vector_products_agree(tiny):
    """q = Dᵀ F D two ways: the diagonal of the exact Fisher from vmapped JVPs, and Dᵀ H D with H the Hessian of the
    summed token KL at the same weights (double backward). Error model: both are float64 sums of n_pos * V terms
    of size ~q, so they agree to ~1e-12 relative (measured: 1e-14)."""
    model64, params, ids, attn, pos = tiny
    for name in ("blocks.0.attn.k.weight", "blocks.1.mlp.down.weight"):
        dirs = [d for *_, d in rank_one_directions(params[name], 3, 3)]
        q_jvp = fisher_quadratic_forms(model64, params, name, dirs, ids, attn, pos)
        param = dict(model64.named_parameters())[name]
        param.requires_grad_(True)
        try:
            q_hvp = hvp_quadratic_forms(lambda: model64(ids, attn), param, [torch.from_numpy(d) for d in dirs], pos,
                                        int(ids.shape[0]))
        finally:
            param.requires_grad_(False)
        np.testing.assert_allclose(q_hvp, q_jvp, rtol=1e-10, atol=0)
        assert (q_jvp > 0).all()  # a Fisher is PSD, and these directions move the logits


def test_quadratic_forms_are_the_diagonal_of_the_joint_fisher_and_scale_quadratically(tiny):
    model64, params, ids, attn, pos = tiny
    name = "blocks.0.attn.q.weight"
    dirs = [d for *_, d in rank_one_directions(params[name], 2, 2)]
    q = fisher_quadratic_forms(model64, params, name, dirs, ids, attn, pos)
    FB = restricted_fisher(model64, params, ids, attn, pos, [{name: torch.from_numpy(d)} for d in dirs]).numpy()
    np.testing.assert_array_equal(q, np.diag(FB))
    q2 = fisher_quadratic_forms(model64, params, name, [2.0 * d for d in dirs], ids, attn, pos)
    np.testing.assert_allclose(q2, 4.0 * q, rtol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# The pre-registered verdict on constructed tables


def _directions_table(log10_ratio_by_seed: dict[int, list[float]]) -> pd.DataFrame:
    """Per seed and matrix: complement q = 1 (two directions), principal q = 10^r (two directions)."""
    rows = []
    for seed, ratios in log10_ratio_by_seed.items():
        for m, r in enumerate(ratios):
            layer, mt = divmod(m, len(MATRIX_TYPES))
            for kind, q in (("principal", 10.0**r), ("complement", 1.0)):
                rows += [{"seed": seed, "layer": layer, "matrix_type": MATRIX_TYPES[mt], "kind": kind, "q": q}] * 2
    return pd.DataFrame(rows)


def test_verdict_for_a_clear_gap_on_fourteen_matrices():
    v = curvature_principal_above_complement(_directions_table({0: [1.0] * 14, 1: [1.05] * 14}))
    assert v.verdict == "reproduced", v.reason
    assert v.numbers["matrices_principal_above"] == 14 and v.numbers["sign_test_p"] == 2.0**-14
    assert v.numbers["critical_count"] == 11
    assert v.numbers["design_power"] == pytest.approx(0.69818988, abs=1e-8)
    assert v.numbers["matrices_for_power_0.8"] == 18
    assert v.numbers["min_effect"] == MIN_LOG10_RATIO


def test_verdict_against_an_inverted_gap():
    v = curvature_principal_above_complement(_directions_table({0: [-0.5] * 14, 1: [-0.45] * 14}))
    assert v.verdict == "not reproduced", v.reason
    assert v.numbers["sign_test_p_inverted"] == 2.0**-14


def test_verdict_with_one_seed_is_inconclusive():
    v = curvature_principal_above_complement(_directions_table({0: [1.0] * 14}))
    assert v.verdict == "inconclusive" and v.seeds_needed is None


def test_a_seed_rule_pass_without_a_significant_sign_test_is_inconclusive():
    """Four matrices: a large, stable mean effect, but a sign test on 4 matrices can never reject at 0.05
    (1/16 > 0.05): the pre-registered test does not confirm, so the verdict stays inconclusive."""
    v = curvature_principal_above_complement(_directions_table({0: [1.0] * 4, 1: [1.1] * 4}))
    assert v.verdict == "inconclusive" and "does not reject" in v.reason
    assert v.numbers["critical_count"] is None and v.numbers["design_power"] == 0.0
    # and a majority that is not enough: 9 of 14 above (p = 0.21)
    mixed = [1.0] * 9 + [-0.2] * 5
    v = curvature_principal_above_complement(_directions_table({0: mixed, 1: mixed}))
    assert v.numbers["matrices_principal_above"] == 9 and v.numbers["sign_test_p"] > ALPHA


def test_verdict_needs_both_kinds_and_names_missing_columns():
    t = _directions_table({0: [1.0] * 3, 1: [1.0] * 3})
    assert curvature_principal_above_complement(t[t["kind"] == "principal"]).verdict == "inconclusive"
    with pytest.raises(InputError, match="curvature_principal_above_complement: table lacks"):
        curvature_principal_above_complement(t.drop(columns=["q"]))


def test_smollm2_verdict_on_constructed_tables():
    def table(principal, complement):
        return pd.DataFrame([{"matrix": m, "kind": kind, "q": q} for m in ("a", "b")
                             for kind, qs in (("principal", principal), ("complement", complement)) for q in qs])

    v = smollm2_curvature_verdict(table([5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]))
    assert v.verdict == "reproduced" and v.numbers["per_matrix"]["a"]["p"] == float(Fraction(1, 70))
    v = smollm2_curvature_verdict(table([5.0, 1.5, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]))
    assert v.verdict == "inconclusive" and v.numbers["rejected"] == 0
    assert "not read as a refutation" in v.reason


# ----------------------------------------------------------------------------------------------------------------
# The fast preset


@pytest.fixture(scope="module")
def fast_run():
    return curvature_experiment({"pretrain": FAST_PRETRAIN, "curvature": {"preset": "fast"}})


def test_fast_tables_have_every_matrix_and_direction(fast_run):
    c = CurvatureConfig.fast()
    t = fast_run.tables["curvature"]
    assert len(t) == len(c.seeds) * 14 * (c.k + c.n_complement)
    assert set(t["kind"]) == {"principal", "complement"}
    assert (t["q"] >= 0).all() and np.isfinite(t["q"]).all()
    # principal indices are 0..k-1, complement ones k..r-1
    assert (t.loc[t["kind"] == "principal", "index"] < c.k).all()
    assert (t.loc[t["kind"] == "complement", "index"] >= c.k).all()
    r = fast_run.tables["curvature_ratios"]
    assert len(r) == len(c.seeds) * 14 and set(r.columns) >= {"seed", "layer", "matrix_type", "r"}


def test_fast_verdict_is_computed_from_the_table(fast_run):
    (v,) = fast_run.verdicts
    assert v.as_row() == curvature_principal_above_complement(fast_run.tables["curvature"]).as_row()
    assert v.verdict in VERDICTS and v.numbers["matrices"] == 14
    json.loads(fast_run.tables["verdicts"]["numbers"][0])


def test_config_rejects_bad_values():
    with pytest.raises(InputError, match="must be positive"):
        curvature_experiment({"pretrain": FAST_PRETRAIN, "curvature": {"preset": "fast", "k": 0}})


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 (slow tier)


@pytest.mark.slow
def test_smollm2_curvature_runs_and_its_forms_are_those_of_a_fisher(tmp_path):
    """A few matrices of SmolLM2-135M by Hessian-vector products (minutes): every q >= 0 up to float32 rounding
    (the Fisher is PSD; a wrong HVP would show negative forms), the verdict from the table."""
    from sims.experiments.registry import EXPERIMENTS

    run = EXPERIMENTS["curvature_smollm2"].fn({})
    t = run.tables["curvature_smollm2"]
    assert len(t) == 3 * 8 and set(t["kind"]) == {"principal", "complement"}
    assert (t["q"] >= -1e-6 * t["q"].abs().max()).all()
    (v,) = run.verdicts
    assert v.as_row() == smollm2_curvature_verdict(t).as_row()
    assert "quantized" in t["note"].iloc[0]


@pytest.mark.slow
def test_default_preset_runs_every_complement_direction(tmp_path):
    from sims.experiments.registry import run_claims

    run, _ = run_claims("curvature", {"pretrain": {"cache_dir": ".cache/threegate"}}, tmp_path / "curv")
    t = run.tables["curvature"]
    c = CurvatureConfig.default()
    per_matrix = t[t["seed"] == c.seeds[0]].groupby("matrix").size()
    # k principal + every pair j >= k: r directions per matrix (r = 32 for k, v and 64 otherwise)
    assert set(per_matrix) == {32, 64} and t["seed"].nunique() == len(c.seeds)
    assert (t["q"] >= 0).all()
    assert run.verdicts[0].numbers["matrices"] == 14
