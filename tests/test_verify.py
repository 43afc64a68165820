"""threegate verify: verdict aggregation on constructed checks, and an end-to-end run on real campaigns."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import theory
from sims.claims.base import ClaimRun, Verdict
from sims.experiments import registry
from theory.check import Result, assumption_failed, make_check
from threegate import verify


def _result(exact: bool) -> Result:
    return Result(id="fake", statement="x <= y", gate="II", check=lambda: None, exact=exact)


def test_all_hold_gives_holds_and_worst_ratio():
    checks = [make_check("fake", 1.0, 4.0), make_check("fake", 3.0, 4.0), make_check("fake", 0.0, 1.0)]
    row, rows = verify.summarize(_result(True), checks, source="theory")
    assert row.verdict == "holds"
    assert row.instances == 3 and row.assumptions_met == 3 and row.violations == 0
    assert row.worst_ratio == pytest.approx(0.75)
    assert row.counterexample is None
    assert [r["instance"] for r in rows] == [0, 1, 2]


def test_violation_of_exact_result_is_flagged_with_first_counterexample():
    checks = [make_check("fake", 1.0, 2.0), make_check("fake", 5.0, 2.0), make_check("fake", 9.0, 2.0)]
    row, _ = verify.summarize(_result(True), checks, source="theory")
    assert row.verdict == "violated" and row.violations == 2
    assert "EXACT RESULT VIOLATED" in row.notes
    assert row.counterexample["instance"] == 1 and row.counterexample["lhs"] == 5.0
    assert row.worst_ratio == pytest.approx(4.5)


def test_violation_of_as_stated_result_is_a_finding_not_a_bug():
    row, _ = verify.summarize(_result(False), [make_check("fake", 3.0, 2.0)], source="theory")
    assert row.verdict == "violated"
    assert "not a theorem" in row.notes and "EXACT" not in row.notes


def test_assumption_failures_are_counted_not_judged():
    checks = [assumption_failed("fake", "gap > 0"), assumption_failed("fake", "gap > 0"), make_check("fake", 1, 2)]
    row, _ = verify.summarize(_result(True), checks, source="theory")
    assert row.instances == 3 and row.assumptions_met == 1 and row.verdict == "holds"
    assert "gap > 0 x2" in row.notes


def test_only_failed_assumptions_gives_no_verdict():
    row, _ = verify.summarize(_result(True), [assumption_failed("fake", "finite inputs")], source="theory")
    assert row.verdict == "no instance met the assumptions"
    assert math.isnan(row.worst_ratio)


def test_nan_lhs_never_holds():
    c = make_check("fake", float("nan"), 1.0)
    assert not c.holds and c.verdict == "indeterminate"  # a NaN side decides nothing: neither holds nor violated


def test_run_writes_json_with_one_row_per_selected_id(tmp_path):
    ids = sorted(rid for rid, r in theory.RESULTS.items() if r.campaign is not None and r.gate == "II")[:2]
    if not ids:
        pytest.fail("no Gate II result with a campaign is registered")
    out, js = tmp_path / "v", tmp_path / "v.json"
    args = verify.argparse.Namespace(seed=0, json_path=str(js), out=str(out), only=ids, no_sims=True,
                                     sim_budget="fast", no_report=True, claims="none")
    rc = verify.run(args)
    rows = json.loads(js.read_text())
    assert [r["result_id"] for r in rows] == ids
    assert all(r["instances"] > 0 for r in rows)
    assert (out / "verify.csv").exists() and (out / "checks.csv").exists()
    exact_violated = [r for r in rows if r["exact"] and r["verdict"] == "violated"]
    assert rc == (1 if exact_violated else 0)


def test_noise_floor_instances_do_not_set_the_worst_ratio():
    tiny = make_check("fake", 1e-15, 1e-16, tol=1e-13)  # two roundoffs: ratio 10, but inside the tolerance
    floor = make_check("fake", 1e-15, 1.0, tol=1e-13)  # lhs at the noise floor, decided: holds
    real = make_check("fake", 0.5, 1.0, tol=1e-13)
    assert tiny.verdict == "indeterminate" and floor.verdict == "holds"
    row, _ = verify.summarize(_result(True), [tiny, floor, real], source="theory")
    assert row.verdict == "holds" and row.worst_ratio == pytest.approx(0.5)
    assert "1 indeterminate" in row.notes and "1 at the float64 noise floor" in row.notes
    assert row.assumptions_met == 2 and row.violations == 0


def test_failed_assumptions_group_without_their_measured_numbers():
    a = assumption_failed("fake", "gap > 0 (delta = -1e-16)")
    b = assumption_failed("fake", "gap > 0 (delta = -3e-2)")
    row, _ = verify.summarize(_result(True), [a, b], source="theory")
    assert "gap > 0 x2" in row.notes


def test_measured_bf16_updates_agree_with_the_exact_fp32_rule():
    """The measured torch updates (fp32 add, bf16 cast) are what the exact Gate III rule predicts, entry by entry."""
    import numpy as np

    from theory.precision import predict_change_mask

    t = verify.measured_bf16_updates(seed=3, n=3000)
    assert list(t.columns) == ["w", "delta", "changed"]
    pred = np.asarray(predict_change_mask(t["w"].to_numpy(), t["delta"].to_numpy(np.float32), "fp32"))
    assert np.array_equal(pred, t["changed"].to_numpy())
    # the sample straddles the threshold: both outcomes occur, and some power-of-two downward steps below 1/2 ULP
    assert 0.2 < t["changed"].mean() < 0.9
    w, d = t["w"].to_numpy(), t["delta"].to_numpy()
    pow2 = np.abs(w) == np.exp2(np.floor(np.log2(np.abs(w))))
    half_ulp = np.exp2(np.floor(np.log2(np.abs(w))) - 8)
    quirk = pow2 & (np.sign(d) != np.sign(w)) & (np.abs(d) < half_ulp) & t["changed"].to_numpy()
    assert quirk.any(), "no update shows the power-of-two quarter-ULP threshold"


def test_assumption_names_drop_counts_in_parentheses():
    assert verify.assumption_name("every ratio in band (581 of 706 outside)") == "every ratio in band"
    assert verify.assumption_name("gap > 0 (delta = -1e-16)") == "gap > 0"
    assert verify.assumption_name("finite inputs (W0)") == "finite inputs (W0)"


def _claim_run(verdict: str) -> ClaimRun:
    v = Verdict("toy_claim", "Fig. 0: a toy effect is positive", verdict, "measured on a toy table",
                {"seeds": ["0", "1"], "effects": [0.3, 0.4]})
    table = pd.DataFrame({"seed": [0, 1], "effect": [0.3, 0.4]})
    return ClaimRun([], {"toy": table}, [v], {"preset": "fast"})


def test_claim_verdicts_are_rows_and_a_broken_experiment_is_an_error_row(tmp_path, monkeypatch):
    seen = {}

    def ok(cfg):
        seen["cfg"] = cfg
        return _claim_run("reproduced")

    def broken(cfg):
        raise RuntimeError("diverged at step 3")

    monkeypatch.setattr(registry, "CLAIM_EXPERIMENTS", {"toy": ok, "zz_broken": broken})
    rows = verify.run_claim_experiments(7, "fast", tmp_path)
    assert seen["cfg"] == {"toy": {"preset": "fast"}, "seed": 7}  # the preset reaches the experiment's section
    by_id = {r.result_id: r for r in rows}
    assert by_id["toy_claim"].verdict == "reproduced" and by_id["toy_claim"].source == "claim:toy"
    assert by_id["toy_claim"].instances == 2
    assert by_id["toy_claim"].notes == "[fast preset] Fig. 0: a toy effect is positive: measured on a toy table"
    assert by_id["zz_broken"].verdict == "error" and "RuntimeError: diverged at step 3" in by_id["zz_broken"].notes
    written = pd.read_csv(tmp_path / "claims" / "toy" / "toy.csv")  # the finished experiment's tables are kept
    assert written["effect"].tolist() == [0.3, 0.4]
    saved = json.loads((tmp_path / "claims" / "toy" / "verdicts.json").read_text())
    assert saved == [{"claim": "toy_claim", "statement": "Fig. 0: a toy effect is positive", "verdict": "reproduced",
                      "reason": "measured on a toy table", "numbers": {"seeds": ["0", "1"], "effects": [0.3, 0.4]}}]
    assert not (tmp_path / "claims" / "zz_broken").exists()


def test_verify_exits_nonzero_when_a_claim_experiment_fails(tmp_path, monkeypatch):
    def broken(cfg):
        raise ValueError("bad config")

    monkeypatch.setattr(registry, "CLAIM_EXPERIMENTS", {"broken": broken, "toy": lambda c: _claim_run("inconclusive")})
    ids = sorted(rid for rid, r in theory.RESULTS.items() if r.campaign is not None and r.gate == "III")[:1]
    args = verify.argparse.Namespace(seed=0, json_path=None, out=str(tmp_path / "v"), only=ids, no_sims=True,
                                     sim_budget="fast", no_report=True, claims="fast")
    assert verify.run(args) == 1
    table = pd.read_csv(tmp_path / "v" / "verify.csv")
    assert set(table["verdict"]) >= {"error", "inconclusive"}  # both claim rows are in the saved table
