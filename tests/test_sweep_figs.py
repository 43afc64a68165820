"""Tests for paper_figs.sweep_figs: the figures of real (small) sweep stores, checked on the plotted data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from paper_figs.sweep_figs import bounds_by_cell, claims_by_lr, grid_keys, sweep_bounds, sweep_claims
from sims.sweep.runner import run_sweep
from sims.sweep.spec import parse_spec
from sims.sweep.store import load_store
from theory.errors import InputError

RATIOS = [0.05, 0.3, 0.7, 2.0]
LRS = [1e-4, 1e-3, 1e-2]


def claim_cell(cfg: dict) -> dict[str, pd.DataFrame]:
    """A cell with the tables of a claim experiment, its numbers a known function of (lr, seed)."""
    lr, seed = cfg["rlvr"]["lr"], cfg["seed"]
    sp = []
    for run, base in (("rlvr", 0.9), ("sft", 0.2)):
        for mt, off in (("all", 0.0), ("q", 0.05)):
            sp.append({"run": run, "matrix_type": mt, "sparsity": base * (1 - 100 * lr) + off + 0.01 * seed})
    verdicts = [{"claim": "sparsity_rl_gt_sft", "verdict": "reproduced" if lr < 5e-3 else "not reproduced"},
                {"claim": "mask_predictor", "verdict": "inconclusive"}]
    return {"sparsity": pd.DataFrame(sp), "verdicts": pd.DataFrame(verdicts)}


def by_gid(ax, gid):
    return [a for a in [*ax.lines, *ax.collections] if a.get_gid() == gid]


@pytest.fixture(scope="module")
def theory_tables(tmp_path_factory):
    store = tmp_path_factory.mktemp("sweep") / "theory.sqlite"
    spec = parse_spec({
        "sweep": {"experiment": "theory", "store": str(store), "workers": 0},
        "base": {"m": 9, "n": 7, "k": 2, "instances": 2, "ids": ["thm3.3", "thm3.3-rigorous"]},
        "grid": {"perturbation": ["gaussian", "swap"], "target_ratio": RATIOS, "seed": [0, 1]},
    })
    assert run_sweep(spec, progress=False).done == 16
    return load_store(store)


@pytest.fixture(scope="module")
def claim_tables(tmp_path_factory):
    store = tmp_path_factory.mktemp("sweep") / "claims.sqlite"
    spec = parse_spec({"sweep": {"experiment": "tests.test_sweep_figs:claim_cell", "store": str(store), "workers": 0},
                       "grid": {"rlvr.lr": LRS, "seed": [0, 1]}})
    assert run_sweep(spec, progress=False).done == 6
    return load_store(store)


def test_bounds_by_cell_is_the_worst_ratio_over_rows_whose_assumptions_hold(theory_tables):
    agg = bounds_by_cell(theory_tables)
    assert agg.attrs["regime"] == "dW_over_gap" and len(agg) == 16 * 2
    c = theory_tables["checks"]
    for _, row in agg.iterrows():
        rows = c[(c["cell_id"] == row["cell_id"]) & (c["result_id"] == row["result_id"])]
        held = rows[rows["assumptions_hold"]]
        expected = (held["lhs"] / held["rhs"]).max() if len(held) else np.nan
        assert row["worst_ratio"] == pytest.approx(expected, nan_ok=True, rel=1e-15)
        assert row["n_violated"] == (rows["verdict"] == "violated").sum()
    # the rigorous form's assumption ||dW||_2 < gamma_k fails in exactly the ratio-2 cells
    rig = agg[agg["result_id"] == "thm3.3-rigorous"]
    assert (rig["n_assumption_failed"] > 0).sum() == 4 and rig.loc[rig["n_assumption_failed"] > 0, "x"].min() > 1.9
    assert rig["worst_ratio"].isna().sum() == 4


def test_sweep_bounds_plots_one_line_per_id_with_a_point_per_cell(theory_tables):
    fig = sweep_bounds(theory_tables)
    (ax,) = fig.axes
    agg = bounds_by_cell(theory_tables)
    for rid in ("thm3.3", "thm3.3-rigorous"):
        (line,) = by_gid(ax, f"bound-{rid}")
        want = agg[(agg["result_id"] == rid) & agg["worst_ratio"].notna()].sort_values(["x", "cell_id"])
        np.testing.assert_array_equal(line.get_xdata(), want["x"].to_numpy())
        np.testing.assert_array_equal(line.get_ydata(), want["worst_ratio"].to_numpy())
    assert len(by_gid(ax, "bound-thm3.3")[0].get_xdata()) == 16  # every cell
    assert len(by_gid(ax, "bound-thm3.3-rigorous")[0].get_xdata()) == 12  # not the 4 cells beyond the gap
    # the swap perturbation at ratio 0.7 (> 1/2) swaps sigma_k and sigma_{k+1}: the as-stated Thm 3.3 is violated
    # there (sin Theta = 1 > 0.7) in both seeds and nowhere else with ratio < 1; the rigorous form never is
    (viol,) = by_gid(ax, "violations")
    pts = viol.get_offsets()
    assert len(pts) == 2 + int(((agg["n_violated"] > 0) & (agg["x"] > 1)).sum())
    assert np.all(pts[pts[:, 0] < 1, 1] == pytest.approx(1 / 0.7, rel=1e-6))
    assert agg.loc[agg["result_id"] == "thm3.3-rigorous", "n_violated"].sum() == 0
    assert by_gid(ax, "ratio-one")[0].get_ydata()[0] == 1.0
    assert ax.get_xscale() == "log"
    assert "16 done cell(s) of experiment theory" in fig.threegate_caption


def test_sweep_bounds_panels_by_a_grid_key(theory_tables):
    fig = sweep_bounds(theory_tables, by="perturbation", ids=["thm3.3"])
    assert [ax.get_title() for ax in fig.axes] == ["perturbation = gaussian", "perturbation = swap"]
    gauss, swap = fig.axes
    assert len(by_gid(gauss, "bound-thm3.3")[0].get_xdata()) == 8
    assert not by_gid(gauss, "violations") and len(by_gid(swap, "violations")[0].get_offsets()) >= 2


def test_sweep_bounds_errors(theory_tables):
    with pytest.raises(InputError, match="no 'checks' table"):
        sweep_bounds({"_cells": theory_tables["_cells"]})
    with pytest.raises(InputError, match="regime column 'nope'"):
        sweep_bounds(theory_tables, regime="nope")
    with pytest.raises(InputError, match="'by' column 'nope'"):
        sweep_bounds(theory_tables, by="nope")
    with pytest.raises(InputError, match="no rows for result ids"):
        sweep_bounds(theory_tables, ids=["cor3.5"])


def test_sweep_claims_metric_and_verdicts_across_learning_rates(claim_tables):
    assert grid_keys(claim_tables) == ["rlvr.lr", "seed"]
    m = claims_by_lr(claim_tables)
    assert m.attrs["lr"] == "rlvr.lr" and len(m) == 6 * 2  # cells x runs, matrix_type 'all' only
    fig = sweep_claims(claim_tables)
    left, right = fig.axes
    for run, base in (("rlvr", 0.9), ("sft", 0.2)):
        assert len(by_gid(left, f"cells-{run}")[0].get_offsets()) == 6
        (mean,) = by_gid(left, f"mean-{run}")
        np.testing.assert_allclose(mean.get_xdata(), LRS)
        # mean over seeds 0 and 1 of base (1 - 100 lr) + 0.01 seed
        np.testing.assert_allclose(mean.get_ydata(), [base * (1 - 100 * lr) + 0.005 for lr in LRS], rtol=1e-12)
    rep = by_gid(right, "verdict-reproduced")[0].get_offsets()
    notrep = by_gid(right, "verdict-not reproduced")[0].get_offsets()
    inc = by_gid(right, "verdict-inconclusive")[0].get_offsets()
    assert len(rep) + len(notrep) + len(inc) == 6 * 2  # cells x claims
    assert sorted(set(rep[:, 0])) == [1e-4, 1e-3] and set(notrep[:, 0]) == {1e-2}
    assert [t.get_text() for t in right.get_yticklabels()] == ["mask_predictor", "sparsity_rl_gt_sft"]


def test_sweep_claims_chosen_metric_and_errors(claim_tables, theory_tables):
    m = claims_by_lr(claim_tables, metric="sparsity:sparsity")  # every matrix type averaged
    assert len(m) == 12 and m["value"].max() > claims_by_lr(claim_tables)["value"].max()
    with pytest.raises(InputError, match="no column 'x'"):
        claims_by_lr(claim_tables, metric="sparsity:x")
    with pytest.raises(InputError, match="neither a 'sparsity' table nor 'verdicts'"):
        sweep_claims(theory_tables)
    with pytest.raises(InputError, match="no learning-rate grid key"):
        sweep_claims({**theory_tables, "sparsity": pd.DataFrame({"sparsity": [0.5], "cell_id": ["x"]})})


@pytest.mark.slow
def test_sweep_claims_on_real_rlvr_cells(tmp_path):
    """Two real RLVR runs of the fast base model at two learning rates, through the sweep and into the figure."""
    store = tmp_path / "rlvr.sqlite"
    spec = parse_spec({
        "sweep": {"experiment": "rlvr", "store": str(store), "workers": 0},
        "base": {"seed": 0, "pretrain": {"preset": "fast"},
                 "rlvr": {"task": "counting", "steps": 2, "probe": {"n_eval_prompts": 8, "n_fisher_rollouts": 8}}},
        "grid": {"rlvr.lr": [1e-4, 3e-3]},
    })
    s = run_sweep(spec, progress=False)
    assert (s.done, s.failed) == (2, 0)
    tables = load_store(store)
    assert {"checks", "metrics", "history", "sparsity"} <= set(tables)
    fig = sweep_claims(tables)
    (ax,) = fig.axes
    (mean,) = by_gid(ax, "mean-rlvr")
    np.testing.assert_allclose(mean.get_xdata(), [1e-4, 3e-3])
    assert np.all((mean.get_ydata() >= 0) & (mean.get_ydata() <= 1))
