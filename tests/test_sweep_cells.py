"""Tests for sims.sweep.cells: the theory cell kind, function cells and the flat config of the HF cells."""

from __future__ import annotations

import pandas as pd
import pytest

import sims.sweep.cells as cells
from sims.sweep.cells import run_cell_tables, theory_cell
from theory.errors import InputError


def test_theory_cell_rows_and_the_swap_counterexample_to_as_stated_thm33():
    """swap: dW = c (u_{k+1} v_{k+1}^T - u_k v_k^T), ||dW||_2 = c = ratio * gamma_k. For ratio > 1/2 the k-th and
    (k+1)-th singular values cross, so sin Theta = 1 > ratio: the as-stated Thm 3.3 fails below ratio 1 while the
    rigorous form's assumption ||dW||_2 < gamma_k holds and the rigorous bound holds."""
    ids = ["thm3.3", "thm3.3-wedin", "thm3.3-rigorous", "cor3.4-weyl"]
    t = theory_cell({"perturbation": "swap", "target_ratio": 0.6, "instances": 3, "ids": ids})["checks"]
    assert len(t) == 3 * len(ids) and list(t["result_id"][:4]) == ids
    by = t.set_index(["instance", "result_id"])
    for i in range(3):
        assert by.loc[(i, "thm3.3"), "verdict"] == "violated"
        assert by.loc[(i, "thm3.3"), "lhs"] == pytest.approx(1.0, abs=1e-12)  # the subspaces swapped a direction
        assert by.loc[(i, "thm3.3-rigorous"), "verdict"] == "holds"
        # the swap attains Wedin (lhs = rhs): indeterminate within the tolerance, never violated
        assert by.loc[(i, "thm3.3-wedin"), "verdict"] == "indeterminate"
        assert by.loc[(i, "cor3.4-weyl"), "verdict"] == "holds"
    assert (t["dW_over_gap"] - 0.6).abs().max() < 1e-9
    assert t["instance_seed"].nunique() == 3
    # below 1/2 the swap does not cross and every form holds
    small = theory_cell({"perturbation": "swap", "target_ratio": 0.4, "ids": ids})["checks"]
    assert (small["verdict"] == "holds").sum() == 3 and (small["verdict"] != "violated").all()  # Weyl: attained
    # reproducible bit for bit
    pd.testing.assert_frame_equal(t, theory_cell({"perturbation": "swap", "target_ratio": 0.6, "instances": 3,
                                                  "ids": ids})["checks"], check_exact=True)


def test_theory_cell_rigorous_assumption_fails_beyond_the_gap():
    t = theory_cell({"target_ratio": 2.0, "ids": ["thm3.3-rigorous"]})["checks"]
    assert list(t["verdict"]) == ["assumption-failed"]
    assert "gamma_k" in t["failed_assumption"].iloc[0]


def test_function_cell_must_return_tables():
    with pytest.raises(TypeError, match="dict\\[str, pandas.DataFrame\\]"):
        run_cell_tables("tests.test_sweep:not_a_table_cell", {})


def test_hf_kinds_call_run_cell_with_a_flat_config(monkeypatch):
    seen = []
    monkeypatch.setattr(cells.hf_backend, "run_cell",
                        lambda cfg: seen.append(cfg) or {"history": pd.DataFrame({"step": [0]})})
    assert run_cell_tables("hf_sft", {"lr": 1e-5, "seed": 2})["history"]["step"].tolist() == [0]
    run_cell_tables("hf_rlvr", {"algorithm": "dapo", "eps": 0.2})
    assert seen == [{"lr": 1e-5, "seed": 2, "algorithm": "sft"}, {"algorithm": "dapo", "eps": 0.2}]
    with pytest.raises(InputError, match="hf_sft"):
        run_cell_tables("hf_rlvr", {"algorithm": "sft"})
    with pytest.raises(InputError, match="hf_rlvr"):
        run_cell_tables("hf_sft", {"algorithm": "grpo"})


def test_cell_warnings_are_deduplicated_cut_and_capped():
    """Distinct (category, message) pairs in first-seen order; a long message cut to MAX_WARNING_CHARS; past
    MAX_CELL_WARNINGS one "truncated" entry that store.count_warnings counts back to the true number."""
    import warnings

    from sims.sweep.cells import MAX_WARNING_CHARS, cell_warnings
    from sims.sweep.store import MAX_CELL_WARNINGS, count_warnings

    n = MAX_CELL_WARNINGS + 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("y" * (2 * MAX_WARNING_CHARS), UserWarning)
        for i in list(range(n - 1)) * 2:
            warnings.warn(f"w{i}", RuntimeWarning)
    kept = cell_warnings(caught)
    assert len(kept) == MAX_CELL_WARNINGS + 1 and count_warnings(kept) == n
    assert kept[0] == {"category": "UserWarning", "message": "y" * (MAX_WARNING_CHARS - 3) + "..."}
    assert kept[1] == {"category": "RuntimeWarning", "message": "w0"}
    assert kept[-1] == {"category": "truncated", "message": f"{n - MAX_CELL_WARNINGS} more distinct warnings"}
