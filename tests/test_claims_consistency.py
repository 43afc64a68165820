"""Tests for sims.claims.consistency: verdict logic on constructed tables and masks, the stratified baseline and
stripe statistics against exact oracles, and the fast preset's tables against the paper's figure schemas."""

from __future__ import annotations

import copy
import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from paper_figs.schemas import validate
from sims.claims.base import VERDICT_COLUMNS, VERDICTS
from sims.claims.consistency import (
    ABS_MARGIN,
    MIN_RUNS,
    REL_MARGIN,
    STRIPE_TOP_FRACTION,
    ConsistencyConfig,
    RunSpec,
    _train,
    consistency_above_baseline,
    consistency_experiment,
    exponent_strata,
    final_masks,
    jaccard_rows,
    pair_group,
    run_specs,
    stratified_baseline,
    stripe_stats,
    stripes_above_binomial,
)
from theory.errors import InputError
from theory.metrics import bernoulli_jaccard_baseline, jaccard_matrix

FAST_PRETRAIN = {"preset": "fast", "cache_dir": ".cache/threegate"}


# ----------------------------------------------------------------------------------------------------------------
# Constructed Jaccard tables


def _pairs(runs: int, jac: float | list[float], base: float | list[float], density: float = 0.4,
           group: str = "seed") -> pd.DataFrame:
    names = [f"r{i}" for i in range(runs)]
    pairs = list(combinations(names, 2))
    js = jac if isinstance(jac, list) else [jac] * len(pairs)
    bs = base if isinstance(base, list) else [base] * len(pairs)
    return pd.DataFrame([{"run_a": a, "run_b": b, "group": group, "matrix_type": "all", "jaccard": j,
                          "baseline": bb, "baseline_exponent": bb, "density_a": density, "density_b": density}
                         for (a, b), j, bb in zip(pairs, js, bs)])


def test_clearly_above_baseline_is_reproduced():
    v = consistency_above_baseline(_pairs(5, 0.58, 0.43))  # the paper's Table 2 Q row
    assert v.verdict == "reproduced", v.reason
    assert v.numbers["pairs"] == 10 and len(v.numbers["runs"]) == 5


def test_jaccard_at_baseline_is_not_reproduced():
    v = consistency_above_baseline(_pairs(5, [0.25 + 0.001 * i for i in range(10)], 0.25))
    assert v.verdict == "not reproduced", v.reason


def test_too_few_runs_is_inconclusive():
    v = consistency_above_baseline(_pairs(MIN_RUNS["seed"] - 1, 0.58, 0.43))
    assert v.verdict == "inconclusive" and "needed" in v.reason


@pytest.mark.parametrize("density", [0.97, 0.0005])
def test_nearly_full_or_empty_masks_are_inconclusive(density):
    v = consistency_above_baseline(_pairs(5, 0.99, 0.5, density=density))
    assert v.verdict == "inconclusive" and "uninformative" in v.reason


def test_some_pairs_above_some_at_baseline_is_inconclusive():
    v = consistency_above_baseline(_pairs(5, [0.6] * 5 + [0.3] * 5, 0.3))
    assert v.verdict == "inconclusive", v.reason


def test_relative_margin_alone_is_not_enough():
    """J - b = 0.05 >= ABS_MARGIN on every pair but J / b = 1.1 < REL_MARGIN: not reproduced."""
    v = consistency_above_baseline(_pairs(5, 0.55, 0.50))
    assert 0.55 - 0.50 >= ABS_MARGIN and 0.55 / 0.50 < REL_MARGIN
    assert v.verdict == "not reproduced", v.reason


def test_absolute_margin_alone_is_not_enough():
    """J / b = 2 on every pair but J - b = 0.01 < ABS_MARGIN (tiny densities): not reproduced."""
    v = consistency_above_baseline(_pairs(5, 0.02, 0.01, density=0.02))
    assert v.verdict == "not reproduced", v.reason


def test_verdict_reads_only_its_group_and_matrix_type():
    t = _pairs(5, 0.58, 0.43)
    noise = pd.concat([_pairs(5, 0.2, 0.43, group="task"), _pairs(5, 0.2, 0.43).assign(matrix_type="q")])
    assert consistency_above_baseline(pd.concat([t, noise])).verdict == "reproduced"
    assert consistency_above_baseline(pd.concat([t, noise]), group="task").verdict == "not reproduced"
    assert consistency_above_baseline(t, group="algorithm").verdict == "inconclusive"


def test_verdict_missing_column_names_it():
    with pytest.raises(InputError, match="baseline_exponent"):
        consistency_above_baseline(_pairs(5, 0.5, 0.4).drop(columns="baseline_exponent"),
                                   baseline="baseline_exponent")


# ----------------------------------------------------------------------------------------------------------------
# From masks to the table: Bernoulli masks sit on the baseline, masks sharing a core do not

_SHAPES = {"blocks.0.attn.q.weight": (32, 16), "blocks.0.attn.o.weight": (16, 32), "blocks.1.mlp.up.weight": (48, 16)}


def _base(rng) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(rng.normal(0, 0.05, s).astype(np.float32)) for n, s in _SHAPES.items()}


def _specs(r: int) -> list[RunSpec]:
    return [RunSpec(s, "counting", "dapo") for s in range(r)]


def test_independent_bernoulli_masks_give_not_reproduced(rng):
    masks = [{n: rng.random(s) < 0.3 for n, s in _SHAPES.items()} for _ in range(5)]
    t = pd.DataFrame(jaccard_rows(_specs(5), masks, _base(rng), steps=1))
    v = consistency_above_baseline(t)
    assert v.verdict == "not reproduced", v.reason
    assert abs(v.numbers["mean_excess"]) < 0.02  # about 4 sd of J at n = 2048, p = 0.3


def test_masks_sharing_a_core_give_reproduced(rng):
    core = {n: rng.random(s) < 0.3 for n, s in _SHAPES.items()}
    masks = [{n: core[n] | (rng.random(s) < 0.1) for n, s in _SHAPES.items()} for _ in range(5)]
    t = pd.DataFrame(jaccard_rows(_specs(5), masks, _base(rng), steps=1))
    assert consistency_above_baseline(t).verdict == "reproduced"
    all_rows = t[t["matrix_type"] == "all"]
    per_type = t[t["matrix_type"] != "all"].groupby(["run_a", "run_b"])[["intersection", "union", "n"]].sum()
    pd.testing.assert_frame_equal(all_rows.set_index(["run_a", "run_b"])[["intersection", "union", "n"]]
                                  .sort_index(), per_type.sort_index(), check_dtype=False)
    J = jaccard_matrix([np.concatenate([m[n].ravel() for n in _SHAPES]) for m in masks])
    got = all_rows.set_index(["run_a", "run_b"])["jaccard"]
    for i, j in combinations(range(5), 2):
        assert got[(f"dapo-counting-s{i}", f"dapo-counting-s{j}")] == J[i, j]


def test_magnitude_driven_masks_sit_on_the_stratified_baseline(rng):
    """Masks that change the small weights with high probability, independently across runs: J is far above the
    plain Bernoulli baseline, yet on the exponent-stratified one (no agreement beyond magnitude). The cut sits on a
    binade boundary, as a ULP-driven rule does."""
    base = _base(rng)
    prob = {n: np.where(np.abs(w.numpy()) < 2.0**-6, 0.9, 0.05) for n, w in base.items()}
    masks = [{n: rng.random(p.shape) < p for n, p in prob.items()} for _ in range(5)]
    t = pd.DataFrame(jaccard_rows(_specs(5), masks, base, steps=1))
    assert consistency_above_baseline(t).verdict == "reproduced"
    assert consistency_above_baseline(t, baseline="baseline_exponent").verdict == "not reproduced"


# ----------------------------------------------------------------------------------------------------------------
# Stratified baseline and strata: exact oracles


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.data())
@example([True], None)
def test_one_stratum_is_the_bernoulli_baseline(a, data):
    b = data.draw(st.lists(st.booleans(), min_size=len(a), max_size=len(a))) if data is not None else a
    A, B = np.array(a), np.array(b)
    got = stratified_baseline(A, B, np.zeros(A.size, dtype=np.int64))
    want = bernoulli_jaccard_baseline(A.mean(), B.mean())
    assert got == pytest.approx(want, rel=8 * np.finfo(np.float64).eps, abs=0)


def test_stratified_baseline_of_stratum_determined_masks_is_one():
    strata = np.repeat(np.arange(4), 25)
    A = np.isin(strata, [1, 3])
    assert stratified_baseline(A, A.copy(), strata) == 1.0
    assert stratified_baseline(np.zeros(100, bool), np.zeros(100, bool), strata) == 1.0


def test_stratified_baseline_exact_value():
    """Two strata of 4: A has 2 and 0, B has 1 and 4: E|A and B| = 2*1/4 + 0 = 0.5, E|A or B| = 2 + 5 - 0.5."""
    strata = np.array([0] * 4 + [1] * 4)
    A = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
    B = np.array([0, 0, 1, 0, 1, 1, 1, 1], bool)
    assert stratified_baseline(A, B, strata) == 0.5 / 6.5


def test_stratified_baseline_rejects_mismatched_shapes():
    with pytest.raises(InputError, match="shapes differ"):
        stratified_baseline(np.zeros(3, bool), np.zeros(4, bool), np.zeros(3, np.int64))


def test_exponent_strata_group_by_matrix_and_binade():
    w = torch.tensor([[1.0, 1.5, 1.9921875, 2.0], [0.0, -1.0, 1e-40, 0.25]])
    ids = exponent_strata({"a": w, "b": w}, ["a", "b"])
    a, b = ids[:8], ids[8:]
    assert a[0] == a[1] == a[2] == a[5]  # [1, 2) and its sign-flipped -1 share the exponent
    assert len({a[0], a[3], a[7]}) == 3  # 2.0 and 0.25 are other binades
    assert a[4] == a[6]  # zero and a bf16 subnormal: exponent field 0
    assert not set(a) & set(b)  # another matrix, other strata


# ----------------------------------------------------------------------------------------------------------------
# Runs, groups and stripes


def test_pair_group_names_the_single_factor():
    a = RunSpec(0, "counting", "dapo")
    assert pair_group(a, RunSpec(1, "counting", "dapo")) == "seed"
    assert pair_group(a, RunSpec(0, "addition", "dapo")) == "task"
    assert pair_group(a, RunSpec(0, "counting", "grpo")) == "algorithm"
    assert pair_group(a, RunSpec(1, "addition", "dapo")) == "mixed"
    with pytest.raises(InputError, match="same configuration"):
        pair_group(a, RunSpec(0, "counting", "dapo"))


def test_run_specs_share_the_anchor_run_once():
    c = ConsistencyConfig.default()
    specs = run_specs(c)
    assert len(specs) == len(set(specs)) == 5 + 3 + 2
    assert specs[:5] == [RunSpec(s, "counting", "dapo") for s in range(5)]
    groups = [pair_group(a, b) for a, b in combinations(specs, 2)]
    assert groups.count("seed") == 10 and groups.count("task") == 6 and groups.count("algorithm") == 3


def test_stripe_stats_of_a_perfect_row_stripe_are_exact():
    M = np.zeros((40, 10), bool)
    M[[3, 17]] = True  # two full rows: k = ceil(0.05 * 40) = 2 rows hold every change
    top, disp = stripe_stats(M, "row")
    assert math.ceil(STRIPE_TOP_FRACTION * 40) == 2
    assert top == pytest.approx(20.0, rel=1e-15) and disp == pytest.approx(10.0, rel=1e-12)  # m/k and n
    top_c, disp_c = stripe_stats(M.T, "col")
    assert (top_c, disp_c) == (top, disp)
    assert all(math.isnan(x) for x in stripe_stats(np.zeros((4, 4), bool), "row"))


def test_stripe_stats_of_bernoulli_masks_are_near_one(rng):
    M = rng.random((400, 300)) < 0.3
    _, disp = stripe_stats(M, "row")
    assert abs(disp - 1) < 0.35  # chi-square with 399 dof: sd of var ratio ~ sqrt(2/399) = 0.07


def _stripe_table(dispersions: dict[str, float]) -> pd.DataFrame:
    rows = []
    for seed, (run, d) in enumerate(dispersions.items()):
        for mt in ("q", "k", "v", "o", "up"):
            rows.append({"run": run, "seed": seed, "matrix_type": mt, "row_dispersion": d if mt != "o" else 1.0,
                         "col_dispersion": d if mt == "o" else 1.0})
    return pd.DataFrame(rows)


def test_stripes_verdict_on_constructed_tables():
    v = stripes_above_binomial(_stripe_table({"a": 4.0, "b": 4.2, "c": 3.9}))
    assert v.verdict == "reproduced" and v.numbers["mean_dispersion"]["o"] == pytest.approx({"row": 1.0,
                                                                                             "col": 12.1 / 3})
    assert stripes_above_binomial(_stripe_table({"a": 1.01, "b": 0.99})).verdict == "not reproduced"
    assert stripes_above_binomial(_stripe_table({"a": 4.0})).verdict == "inconclusive"


def test_config_errors_name_the_problem():
    with pytest.raises(InputError, match="unknown key '"):
        consistency_experiment({"consistency": {"preset": "fast", "runz": 3}})
    with pytest.raises(InputError, match="unknown task"):
        ConsistencyConfig.fast(tasks=("counting", "chess"))
    with pytest.raises(InputError, match="unknown algorithm"):
        ConsistencyConfig.fast(algorithms=["ppo"])
    with pytest.raises(InputError, match="kl_beta"):
        ConsistencyConfig.fast(kl_beta=0.0)
    assert ConsistencyConfig.fast(tasks=["counting"]).tasks == ("counting",)
    assert ConsistencyConfig.default(rl_steps=30, probes=5).probe_steps == (0, 6, 12, 18, 24, 30)


# ----------------------------------------------------------------------------------------------------------------
# The fast preset on the cached fast-pretrained model


@pytest.fixture(scope="module")
def fast_run():
    return consistency_experiment({"pretrain": FAST_PRETRAIN, "consistency": {"preset": "fast"}})


def test_fast_tables_validate_against_the_figure_schemas(fast_run):
    t = fast_run.tables
    for name in ("jaccard", "consensus", "stripes"):
        validate(t[name], name)
    assert {"group", "baseline", "baseline_exponent", "density_a", "density_b"} <= set(t["jaccard"].columns)
    assert {"group", "matrix_type", "n_runs", "mean_jaccard", "mean_baseline", "ratio", "mean_baseline_exponent",
            "row_top_share", "row_dispersion", "col_top_share", "col_dispersion"} <= set(t["consistency"].columns)
    assert set(t["jaccard"]["matrix_type"]) == {"q", "k", "v", "o", "up", "gate", "down", "all"}
    counts = t["jaccard"][t["jaccard"]["matrix_type"] == "all"]["group"].value_counts()
    assert counts["seed"] == 10 and counts["task"] == 3 and counts["algorithm"] == 3
    assert t["stripes"]["step"].min() > 0 and t["stripes"]["step"].nunique() == 2
    assert list(t["verdicts"].columns) == VERDICT_COLUMNS


def test_fast_verdicts_are_computed_from_the_tables(fast_run):
    jac = fast_run.tables["jaccard"]
    assert all(v.verdict in VERDICTS for v in fast_run.verdicts)
    first = [consistency_above_baseline(jac, g, baseline=b).verdict for g in ("seed", "task", "algorithm")
             for b in ("baseline", "baseline_exponent")]
    assert [v.verdict for v in fast_run.verdicts[:6]] == first


def test_fast_consensus_is_the_mean_of_the_seed_group_masks(fast_run):
    seed_runs = [r for r in fast_run.results if r.name.startswith("dapo-counting-")]
    assert len(seed_runs) == 5
    masks = [final_masks(r) for r in seed_runs]
    C = fast_run.tables["consensus"]
    assert C["consensus"].between(0, 1).all() and (C["n_runs"] == 5).all()
    sub = C[(C["layer"] == 1) & (C["matrix_type"] == "o")]
    name = "blocks.1.attn.o.weight"
    grid = np.full(masks[0][name].shape, np.nan)
    grid[sub["row"], sub["col"]] = sub["consensus"]
    np.testing.assert_array_equal(grid, np.mean([m[name] for m in masks], axis=0))


def test_fast_stripes_at_the_last_step_are_the_final_masks_row_means(fast_run):
    r = next(r for r in fast_run.results if r.name == "dapo-counting-s1")
    M = final_masks(r)["blocks.0.attn.q.weight"]
    s = fast_run.tables["stripes"]
    rows = s[(s["run"] == r.name) & (s["step"] == s["step"].max()) & (s["layer"] == 0) & (s["matrix_type"] == "q")
             & (s["axis"] == "row")].sort_values("index")
    np.testing.assert_array_equal(rows["update_ratio"].to_numpy(), M.mean(axis=1))


def test_fast_summary_means_match_the_pairs(fast_run):
    jac, summ = fast_run.tables["jaccard"], fast_run.tables["consistency"]
    for _, row in summ.iterrows():
        t = jac[(jac["group"] == row["group"]) & (jac["matrix_type"] == row["matrix_type"])]
        assert row["n_pairs"] == len(t) and row["mean_jaccard"] == t["jaccard"].mean()
        assert row["mean_baseline"] == t["baseline"].mean()


def test_a_rerun_reproduces_the_mask_bit_for_bit(fast_run):
    """Same seed, task and algorithm from the same base: the update mask is identical (J = 1), so every J < 1
    between seeds is a real difference, not run-to-run nondeterminism."""
    from sims.claims.base import start_model

    c = ConsistencyConfig.fast()
    spec = RunSpec(2, "counting", "dapo")
    again = final_masks(_train(copy.deepcopy(start_model({"pretrain": FAST_PRETRAIN}, True)), c, spec, "cpu"))
    first = final_masks(next(r for r in fast_run.results if r.name == spec.name))
    for n in first:
        assert jaccard_matrix([first[n], again[n]])[0, 1] == 1.0 and np.array_equal(first[n], again[n])


# ----------------------------------------------------------------------------------------------------------------
# The default preset (slow tier): structure only, no number measured on this machine


@pytest.mark.slow
def test_default_preset_runs_and_its_verdicts_are_well_formed():
    run = consistency_experiment({"consistency": {"preset": "default"}})
    for name in ("jaccard", "consensus", "stripes"):
        validate(run.tables[name], name)
    assert all(v.verdict in VERDICTS for v in run.verdicts) and len(run.verdicts) == 7
    jac = run.tables["jaccard"]
    assert np.isfinite(jac[["jaccard", "baseline", "baseline_exponent"]].to_numpy()).all()
    assert jac["jaccard"].between(0, 1).all()
    assert len(set(jac.loc[jac["group"] == "seed", "run_a"]) | set(jac.loc[jac["group"] == "seed", "run_b"])) >= 5
