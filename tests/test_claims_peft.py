"""Tests for sims.claims.peft: verdict logic on constructed tables, the fast presets (columns, schema, properties),
and the default presets in the slow tier (structural facts only: their numbers are measured, not asserted)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from paper_figs.schemas import validate
from sims.claims.base import VERDICT_COLUMNS, VERDICTS
from sims.experiments.registry import run_claims
from sims.claims.peft import (
    COLLAPSE_MARGIN,
    MIN_COLLAPSE_GAP,
    FINAL_FRACTION,
    NO_GAIN_MARGIN,
    TRACK_DELTA,
    final_values,
    lora_pissa_experiment,
    masked_runs_experiment,
    pissa_collapses_at_high_lr,
    pissa_no_better_than_lora,
    princ_mask_worst,
    safe_mask_beats_random,
    safe_mask_kl_tracks_dense,
    safe_mask_tracks_dense,
    summarize_adapter_runs,
)
from sims.experiments.registry import EXPERIMENTS
from theory.errors import InputError

FAST_PRETRAIN = {"preset": "fast", "cache_dir": ".cache/threegate"}
MASKS = ("dense", "princ", "princ_c", "low", "safe", "random")


# ----------------------------------------------------------------------------------------------------------------
# Constructed tables: masked runs


def _masked_final(per_seed: list[dict[str, float]], kl: list[dict[str, float]] | None = None) -> pd.DataFrame:
    rows = []
    for seed, rewards in enumerate(per_seed):
        for mask, r in rewards.items():
            k = kl[seed].get(mask, 0.1) if kl else 0.1
            rows.append({"seed": seed, "mask": mask, "final_reward": r, "final_kl": k})
    return pd.DataFrame(rows)


SUPPORT = [{"dense": 0.40, "safe": 0.38, "princ": 0.20, "princ_c": 0.30, "low": 0.35, "random": 0.30},
           {"dense": 0.42, "safe": 0.41, "princ": 0.22, "princ_c": 0.33, "low": 0.36, "random": 0.31},
           {"dense": 0.39, "safe": 0.40, "princ": 0.18, "princ_c": 0.31, "low": 0.33, "random": 0.29}]
AGAINST = [{"dense": 0.40, "safe": 0.05, "princ": 0.45, "princ_c": 0.10, "low": 0.10, "random": 0.30},
           {"dense": 0.42, "safe": 0.06, "princ": 0.47, "princ_c": 0.12, "low": 0.12, "random": 0.33}]


@pytest.mark.parametrize("verdict_fn", [safe_mask_tracks_dense, princ_mask_worst, safe_mask_beats_random])
def test_masked_verdicts_on_supporting_contradicting_and_single_seed_tables(verdict_fn):
    assert verdict_fn(_masked_final(SUPPORT)).verdict == "reproduced"
    assert verdict_fn(_masked_final(AGAINST)).verdict == "not reproduced"
    one = verdict_fn(_masked_final(SUPPORT[:1]))
    assert one.verdict == "inconclusive" and "MIN_SEEDS" in one.reason


def test_safe_tracks_dense_needs_both_parts():
    """Within TRACK_DELTA of dense is not enough when the principal-only mask does as well (and vice versa)."""
    close_but_princ_equal = [{**s, "princ": s["safe"] + 0.05} for s in SUPPORT]
    assert safe_mask_tracks_dense(_masked_final(close_but_princ_equal)).verdict == "not reproduced"
    beats_princ_but_far = [{**s, "safe": s["dense"] - 3 * TRACK_DELTA, "princ": s["dense"] - 6 * TRACK_DELTA}
                           for s in SUPPORT]
    assert safe_mask_tracks_dense(_masked_final(beats_princ_but_far)).verdict == "not reproduced"


def test_masked_verdict_without_the_needed_mask_is_inconclusive():
    no_safe = [{k: v for k, v in s.items() if k != "safe"} for s in SUPPORT]
    v = safe_mask_tracks_dense(_masked_final(no_safe))
    assert v.verdict == "inconclusive" and "safe" in v.reason


def test_safe_kl_tracks_dense_cases():
    kl_close = [{"dense": 0.20, "safe": 0.21}, {"dense": 0.25, "safe": 0.24}, {"dense": 0.22, "safe": 0.22}]
    kl_far = [{"dense": 0.20, "safe": 0.02}, {"dense": 0.25, "safe": 0.01}]
    assert safe_mask_kl_tracks_dense(_masked_final(SUPPORT, kl_close)).verdict == "reproduced"
    assert safe_mask_kl_tracks_dense(_masked_final(SUPPORT[:2], kl_far)).verdict == "not reproduced"
    zero = [{"dense": 0.0, "safe": 0.0}, {"dense": 0.0, "safe": 0.0}]
    assert safe_mask_kl_tracks_dense(_masked_final(SUPPORT[:2], zero)).verdict == "inconclusive"


def _curve_rows(seed: int, mask: str, rewards: list[float], kls: list[float], steps: list[int]) -> list[dict]:
    return [{"seed": seed, "mask": mask, "step": s, "reward": r, "kl": k} for s, r, k in zip(steps, rewards, kls)]


def test_final_values_average_the_last_quarter_of_probed_steps():
    steps = [0, 5, 10, 15, 20]
    t = pd.DataFrame(_curve_rows(0, "dense", [0.0, 0.1, 0.2, 0.5, 0.7], [0, 1, 2, 3, 4], steps))
    f = final_values(t, ["seed", "mask"]).iloc[0]
    window = [s for s in steps if s >= FINAL_FRACTION * 20]  # 15 and 20
    assert window == [15, 20] and f["final_steps"] == "15,20"
    assert f["final_reward"] == pytest.approx(0.6) and f["final_kl"] == pytest.approx(3.5)
    assert f["initial_reward"] == 0.0


def test_verdicts_read_the_step_table_like_the_final_table():
    steps = [0, 10, 20]
    rows = []
    for seed, fin in enumerate(SUPPORT):
        for mask, r in fin.items():
            rows += _curve_rows(seed, mask, [0.0, r / 2, r], [0.0, 0.05, 0.1], steps)
    step_table = pd.DataFrame(rows)
    for fn in (safe_mask_tracks_dense, princ_mask_worst, safe_mask_beats_random):
        assert fn(step_table).verdict == fn(_masked_final(SUPPORT)).verdict == "reproduced"


# ----------------------------------------------------------------------------------------------------------------
# Constructed tables: LoRA vs PiSSA


def _adapter_final(cells: dict[tuple[str, int, float, int], tuple[float, bool]]) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "rank": r, "lr": lr, "seed": s, "final_reward": fr, "collapsed": c}
                         for (m, r, lr, s), (fr, c) in cells.items()])


def _grid(lora: float, pissa: float, seeds=(0, 1), pissa_collapse_hi=False, lora_collapse_hi=False,
          jitter: float = 0.01):
    cells = {}
    for s in seeds:
        for r in (1, 4):
            for lr in (1e-3, 1e-2):
                hi = lr == 1e-2
                cells[("LoRA", r, lr, s)] = (lora + jitter * s, hi and lora_collapse_hi)
                cells[("PiSSA", r, lr, s)] = (pissa + jitter * s, hi and pissa_collapse_hi)
    return _adapter_final(cells)


def test_pissa_no_better_than_lora_cases():
    assert pissa_no_better_than_lora(_grid(0.3, 0.1)).verdict == "reproduced"  # LoRA better
    assert pissa_no_better_than_lora(_grid(0.3, 0.3)).verdict == "reproduced"  # equal: no gain (within margin)
    v = pissa_no_better_than_lora(_grid(0.1, 0.4))  # PiSSA clearly better
    assert v.verdict == "not reproduced", v.reason
    assert v.numbers["mean_gap_lora_minus_pissa"] == pytest.approx([-0.3, -0.3])
    assert pissa_no_better_than_lora(_grid(0.3, 0.1, seeds=(0,))).verdict == "inconclusive"
    assert pissa_no_better_than_lora(_grid(0.3, 0.1).query("method == 'LoRA'")).verdict == "inconclusive"
    assert NO_GAIN_MARGIN > 0


def test_pissa_no_gain_is_judged_below_the_highest_lr():
    """A PiSSA collapse at the highest lr must not by itself make "no gain" true: PiSSA clearly better at the
    normal lr and collapsed at the high one is "not reproduced"."""
    t = _grid(0.1, 0.4)
    t.loc[(t["method"] == "PiSSA") & (t["lr"] == 1e-2), "final_reward"] = -1.0
    v = pissa_no_better_than_lora(t)
    assert v.verdict == "not reproduced" and v.numbers["lrs_judged"] == [1e-3]
    assert v.numbers["per_cell_gap_seed_mean"]["rank=1,lr=0.01"] == pytest.approx(1.105)


def test_pissa_collapses_at_high_lr_cases():
    assert pissa_collapses_at_high_lr(_grid(0.3, 0.3, pissa_collapse_hi=True)).verdict == "reproduced"
    assert pissa_collapses_at_high_lr(_grid(0.3, 0.3)).verdict == "not reproduced"  # nothing collapses
    both = pissa_collapses_at_high_lr(_grid(0.3, 0.3, pissa_collapse_hi=True, lora_collapse_hi=True))
    assert both.verdict == "not reproduced"  # LoRA collapses as well: not a PiSSA effect
    assert pissa_collapses_at_high_lr(_grid(0.3, 0.3, seeds=(0,), pissa_collapse_hi=True)).verdict == "inconclusive"
    # half of PiSSA's high-lr runs collapsing is not more than MIN_COLLAPSE_GAP = 0.5 ahead of LoRA's none
    half = _grid(0.3, 0.3, pissa_collapse_hi=True)
    half.loc[(half["method"] == "PiSSA") & (half["lr"] == 1e-2) & (half["rank"] == 1), "collapsed"] = False
    assert MIN_COLLAPSE_GAP == 0.5 and pissa_collapses_at_high_lr(half).verdict == "inconclusive"


def test_summarize_adapter_runs_marks_collapse_from_the_curve_and_nonfinite_runs():
    steps = [0, 4, 8, 12, 16]
    rows = []
    for method, curve in (("LoRA", [-0.4, -0.3, -0.2, -0.2, -0.1]),
                          ("PiSSA", [-0.4, -1.0, -1.0, -1.0, -1.0]),
                          ("Edge", [-0.4, -0.4, -0.4, -0.4 - COLLAPSE_MARGIN, -0.4 - COLLAPSE_MARGIN])):
        rows += [{"method": method, "rank": 4, "lr": 1e-2, "seed": 0, "step": s, "reward": r, "kl": 0.1}
                 for s, r in zip(steps, curve)]
    nf = pd.DataFrame([{"method": "PiSSA", "rank": 16, "lr": 1e-2, "seed": 0}])
    f = summarize_adapter_runs(pd.DataFrame(rows), nf).set_index(["method", "rank"])
    assert not f.loc[("LoRA", 4), "collapsed"] and f.loc[("PiSSA", 4), "collapsed"]
    assert not f.loc[("Edge", 4), "collapsed"]  # a drop of exactly the margin is not "more than" it
    assert f.loc[("PiSSA", 16), "collapsed"] and f.loc[("PiSSA", 16), "nonfinite"]
    assert f.loc[("PiSSA", 16), "final_reward"] == -1.0
    assert f.loc[("PiSSA", 4), "final_reward"] == -1.0 and f.loc[("PiSSA", 4), "initial_reward"] == -0.4


# ----------------------------------------------------------------------------------------------------------------
# The fast presets on the cached pretrained model


@pytest.fixture(scope="module")
def masked_written(tmp_path_factory):
    """The fast preset run as ``threegate run masked_runs`` runs it: through ``run_claims``, which writes it."""
    return run_claims("masked_runs", {"pretrain": FAST_PRETRAIN, "masked_runs": {"preset": "fast"}},
                      tmp_path_factory.mktemp("masked_runs"))


@pytest.fixture(scope="module")
def masked_fast(masked_written):
    return masked_written[0]


@pytest.fixture(scope="module")
def lora_fast():
    return lora_pissa_experiment({"pretrain": FAST_PRETRAIN, "lora_pissa": {"preset": "fast"}})


def test_masked_runs_fast_table_is_schema_valid_with_every_mask(masked_fast):
    t = validate(masked_fast.tables["masked_runs"], "masked_runs")
    assert set(t["mask"]) == set(MASKS)
    assert {"run", "density", "reward_greedy", "train_reward", "lr"} <= set(t.columns)
    assert set(t["step"]) == {0, 1, 2, 3}
    f = masked_fast.tables["masked_runs_final"].set_index("mask")
    assert f.loc["dense", "density"] == 1.0
    assert f.loc["random", "density"] == f.loc["safe", "density"] >= f.loc["princ_c", "density"] == 0.5
    assert len(masked_fast.results) == len(MASKS)


def test_masked_runs_fast_start_is_shared_and_kl_grows_from_zero(masked_fast):
    """Every mask starts from the same model and is evaluated on the same prompts and sampling seed: the step-0
    rewards agree exactly; KL to the start is 0 at step 0 and positive once the run has moved."""
    t = masked_fast.tables["masked_runs"]
    start = t[t["step"] == 0]
    assert start["reward"].nunique() == 1 and start["reward_greedy"].nunique() == 1
    assert (start["kl"] == 0).all()
    later = t[t["step"] > 0]
    assert (later["kl"] > 0).all() and np.isfinite(later["kl"]).all()


def test_masked_runs_fast_verdicts_are_computed_from_the_tables(masked_fast):
    f = masked_fast.tables["masked_runs_final"]
    expected = [fn(f).verdict for fn in (safe_mask_tracks_dense, safe_mask_kl_tracks_dense, princ_mask_worst,
                                         safe_mask_beats_random)]
    assert [v.verdict for v in masked_fast.verdicts] == expected
    assert all(v == "inconclusive" for v in expected)  # one seed in the fast preset
    assert list(masked_fast.tables["verdicts"].columns) == VERDICT_COLUMNS


def test_lora_pissa_fast_table_is_schema_valid_over_the_grid(lora_fast):
    t = validate(lora_fast.tables["lora_pissa"], "lora_pissa")
    assert set(t["method"]) == {"LoRA", "PiSSA"} and set(t["rank"]) == {1, 4} and set(t["lr"]) == {1e-3, 1e-2}
    f = lora_fast.tables["lora_pissa_final"]
    assert len(f) == 8 and f["collapsed"].dtype == bool
    assert {"initial_reward", "final_reward", "final_kl", "nonfinite"} <= set(f.columns)
    # trainable parameters grow linearly with the rank: r (in + out) per adapted matrix
    per_rank = t.groupby("rank")["trainable_params"].first()
    assert per_rank[4] == 4 * per_rank[1]
    assert [v.verdict for v in lora_fast.verdicts] == [pissa_no_better_than_lora(f).verdict,
                                                       pissa_collapses_at_high_lr(f).verdict]
    assert all(v.verdict in VERDICTS for v in lora_fast.verdicts)


def test_lora_fast_starts_exactly_at_the_base(lora_fast, masked_fast):
    """B = 0: a LoRA-wrapped model computes exactly what the base computes, so its step-0 eval rewards equal the
    base's (the masked runs' common start) for every rank and lr."""
    t = lora_fast.tables["lora_pissa"]
    lora0 = t[(t["method"] == "LoRA") & (t["step"] == 0)]
    base0 = masked_fast.tables["masked_runs"].query("step == 0").iloc[0]
    assert (lora0["reward"] == base0["reward"]).all() and (lora0["reward_greedy"] == base0["reward_greedy"]).all()


def test_claim_runs_are_threegate_run_names_and_write_verdicts(masked_written):
    assert {"masked_runs", "lora_pissa"} <= set(EXPERIMENTS)
    masked_fast, path = masked_written
    verdicts = json.loads((path / "verdicts.json").read_text())
    assert [v["verdict"] for v in verdicts] == [v.verdict for v in masked_fast.verdicts]
    assert (path / "masked_runs_final.csv").is_file() and (path / "history.csv").is_file()
    back = pd.read_csv(path / "masked_runs.csv")
    validate(back, "masked_runs")
    pd.testing.assert_frame_equal(back[["mask", "step", "reward", "kl"]],
                                  masked_fast.tables["masked_runs"][["mask", "step", "reward", "kl"]],
                                  check_dtype=False)


def test_config_errors_name_the_problem():
    with pytest.raises(InputError, match="masks"):
        masked_runs_experiment({"pretrain": FAST_PRETRAIN, "masked_runs": {"preset": "fast", "masks": ["nope"]}})
    with pytest.raises(InputError, match="unknown key '"):
        lora_pissa_experiment({"pretrain": FAST_PRETRAIN, "lora_pissa": {"preset": "fast", "rankz": [2]}})
    with pytest.raises(InputError, match="methods"):
        lora_pissa_experiment({"pretrain": FAST_PRETRAIN, "lora_pissa": {"preset": "fast", "methods": ["DoRA"]}})


# ----------------------------------------------------------------------------------------------------------------
# Default presets (slow tier): structure only, never a number measured on this machine


def _check_default(run, name: str, n_runs: int) -> None:
    validate(run.tables[name], name)
    assert len(run.results) + int(run.tables[f"{name}_final"].get("nonfinite", pd.Series(dtype=bool)).sum()) \
        == n_runs
    assert all(v.verdict in VERDICTS for v in run.verdicts)
    for v in run.verdicts:
        assert all(math.isfinite(e) for e in v.numbers.get("effects", []))
    assert len(run.verdicts) and all("MIN_SEEDS" not in v.reason for v in run.verdicts)  # >= 2 seeds


@pytest.mark.slow
def test_masked_runs_default_preset():
    run = masked_runs_experiment({})
    _check_default(run, "masked_runs", 3 * len(MASKS))
    t = run.tables["masked_runs"]
    assert (t.query("step == 0")["kl"] == 0).all() and np.isfinite(t["reward"]).all()


@pytest.mark.slow
def test_lora_pissa_default_preset():
    run = lora_pissa_experiment({})
    _check_default(run, "lora_pissa", 3 * 2 * 3 * 2)
