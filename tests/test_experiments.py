"""Tests for sims.experiments.registry (``threegate run``) and sims.experiments.sim_verify, on fast configs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import sims.claims.base
from sims.claims import consistency, geometry, interventions, peft, sparsity
from sims.experiments.registry import CLAIM_EXPERIMENTS, EXPERIMENTS, run_claims, run_experiment
from sims.experiments.sim_verify import SIM_COLUMNS, default_simulation_checks
from sims.tinygpt.storage import load_snapshot
from theory.errors import InputError
from threegate.cli import main

from tests.conftest import RIGOROUS_IDS


@pytest.fixture(scope="module")
def cache():
    """The project's pretraining cache (keyed by config hash): the fast base model is trained once per machine."""
    return ".cache/threegate"


def _fast_config(cache) -> dict:
    return {
        "seed": 0,
        "pretrain": {"preset": "fast", "cache_dir": str(cache)},
        "rlvr": {"task": "counting", "steps": 2, "lr": 3e-4, "probe": {"n_eval_prompts": 8, "n_fisher_rollouts": 8}},
        "sft": {"steps": 2, "lr": 1e-3, "probe": {"n_eval_prompts": 8, "n_fisher_rollouts": 8}},
    }


FAST_PRETRAIN = {"preset": "fast", "cache_dir": ".cache/threegate"}


def test_registry_lists_every_experiment_in_one_place():
    assert list(EXPERIMENTS) == ["rlvr", "sft", "rl_vs_sft", "clip_eps", "sparsity", "mask_predictor", "consistency",
                                 "geometry", "interventions", "kl_beta0", "masked_runs", "lora_pissa", "hf_rlvr",
                                 "hf_sft"]
    assert all(EXPERIMENTS[name].fn is fn for name, fn in CLAIM_EXPERIMENTS.items())
    assert EXPERIMENTS["sparsity"].doc.startswith("Table 1 + Sec. 2.3 at our scale")
    # the claim modules only define functions: nothing registers itself on import
    for mod in (sims.claims.base, consistency, geometry, interventions, peft, sparsity):
        assert not hasattr(mod, "CLAIM_EXPERIMENTS") and not hasattr(mod, "claim_experiments"), mod.__name__


def test_clip_eps_sweep_reports_lemma_f9_per_step(tmp_path, cache):
    cfg = _fast_config(cache)
    cfg.pop("sft")  # clip_eps reads [pretrain], [rlvr] and [clip_eps] only
    cfg["rlvr"].update(steps=2, minibatches=4, lr=2e-3)
    cfg["clip_eps"] = {"eps": [0.05, 0.4]}
    out = run_experiment("clip_eps", cfg, tmp_path / "clip")
    t = pd.read_parquet(out / "clip_eps.parquet")
    assert sorted(t["eps"].unique()) == [0.05 * 1.4, 0.4 * 1.4]  # Lemma F.9's symmetric band uses max(eps_low, eps_high)
    assert set(t["step"]) == {1, 2}
    # a violation fraction > 0 is exactly an assumption failure, and the bound is E[T] max(-log(1-eps), log(1+eps))
    assert ((t["violation_fraction"] > 0) == ~t["assumptions_hold"]).all()
    expected = t["mean_len"] * np.maximum(-np.log1p(-t["eps"]), np.log1p(t["eps"]))
    np.testing.assert_allclose(t["bound"], expected, rtol=1e-12)
    assert (t["k3"] >= 0).all() and (t["small_step"] >= 0).all()
    with pytest.raises(InputError, match="clip_eps"):
        run_experiment("clip_eps", {**cfg, "clip_eps": {"eps": [1.5]}}, tmp_path / "bad")


def test_rl_vs_sft_writes_tidy_tables_from_one_checkpoint(tmp_path, cache):
    out = run_experiment("rl_vs_sft", _fast_config(cache), tmp_path / "out")
    for name in ("checks", "metrics", "history", "sparsity", "spectrum", "angles", "kl_beta0"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.parquet").is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["runs"]["rlvr"]["seed"] == 0 and cfg["runs"]["sft"]["task"] == "counting"
    assert json.loads((out / "run.json").read_text())["seed"] == 0
    # both runs start from the same stored weights
    a = load_snapshot(out / "snapshots" / "rlvr_step00000.safetensors")
    b = load_snapshot(out / "snapshots" / "sft_step00000.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sp = pd.read_parquet(out / "sparsity.parquet")
    assert set(sp["method"]) == {"RL", "SFT"}
    assert set(sp["matrix_type"]) == {"q", "k", "v", "o", "up", "gate", "down", "all"}
    # the pooled row is the count-weighted mean of the per-type rows
    for run, g in sp.groupby("run"):
        per = g[g["matrix_type"] != "all"]
        assert g.loc[g["matrix_type"] == "all", "changed"].item() == per["changed"].sum()
    chk = pd.read_parquet(out / "checks.parquet")
    assert {"run", "step", "matrix", "result_id", "lhs", "rhs", "ratio", "holds", "assumptions_hold",
            "failed_assumption", "fisher_estimator"} <= set(chk.columns)
    met = chk[chk["result_id"].isin(RIGOROUS_IDS) & chk["assumptions_hold"]]
    assert len(met) and met["holds"].all()
    assert not chk.duplicated(["run", "step", "matrix", "reference", "result_id"]).any()  # tidy: one row per key


def test_cli_run_and_errors(tmp_path, capsys, cache):
    cfg = _fast_config(cache)
    cfg.pop("sft")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main(["run", "rlvr", "--config", str(path), "--out", str(tmp_path / "o"), "--seed", "1"]) == 0
    assert "bf16 update sparsity" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["runs"]["rlvr"]["seed"] == 1
    assert main(["run", "nope", "--config", str(path)]) == 1
    assert "unknown experiment" in capsys.readouterr().err
    assert main(["run", "rlvr", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rlvr": {"stepz": 3}}))
    assert main(["run", "rlvr", "--config", str(bad), "--out", str(tmp_path / "o2")]) == 1
    assert "[rlvr]: unknown key 'stepz' (did you mean 'steps'?)" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert main(["run", "--list"]) == 0


def test_default_simulation_checks_fast_budget(cache):
    df = default_simulation_checks(seed=0, budget="fast", cache_dir=str(cache))
    assert list(df.columns[: len(SIM_COLUMNS)]) == SIM_COLUMNS
    assert set(df["source"]) == {"rlvr", "sft"}
    met = df[df["result_id"].isin(RIGOROUS_IDS) & df["assumptions_hold"].astype(bool)]
    assert len(met) and met["holds"].astype(bool).all()
    failed = df[~df["assumptions_hold"].astype(bool)]
    assert failed["failed_assumption"].notna().all()  # every failure names its assumption
    with pytest.raises(InputError, match="budget"):
        default_simulation_checks(budget="huge")


def test_gate3_rows_on_real_snapshots(cache):
    """Prop E.3 on the stored bf16 weights of real runs: the probe equals bit equality, and the rows count the
    entries that really changed (so a run that changed nothing would not pass silently)."""
    df = default_simulation_checks(seed=0, budget="fast", cache_dir=str(cache))
    g3 = df[df["result_id"] == "propE.3"]
    assert set(g3["source"]) == {"rlvr", "sft"}
    assert (g3["lhs"] == 0).all() and g3["holds"].astype(bool).all()
    assert g3["n_changed"].sum() > 0 and (g3["n_changed"] <= g3["n_entries"]).all()


def test_gate3_rows_catch_a_probe_that_disagrees_with_bits():
    import torch

    from sims.experiments.sim_verify import gate3_probe_rows

    w = torch.tensor([[1.0, 2.0], [3.0, 0.5]], dtype=torch.bfloat16)
    nudged = w.clone()
    nudged[0, 0] = torch.tensor(1.0078125, dtype=torch.bfloat16)  # the next bf16 value above 1: a real change
    rows = gate3_probe_rows({"m": w}, {1: {"m": nudged}}, "x", eta=2**-7)  # eta >= 2^-8: the probe misses it,
    assert rows.loc[0, "lhs"] == 1 and not rows.loc[0, "holds"]  # which is outside Prop E.3 (eta < 2^-9), not a
    assert not rows.loc[0, "assumptions_hold"] and rows.loc[0, "failed_assumption"] == "0 <= eta < 2^-9"  # violation
    rows = gate3_probe_rows({"m": w}, {1: {"m": nudged}}, "x")  # eta = 1e-3 < 2^-8: exact
    assert rows.loc[0, "lhs"] == 0 and rows.loc[0, "n_changed"] == 1 and rows.loc[0, "n_entries"] == 4


@pytest.mark.slow
def test_default_simulation_checks_default_budget_no_exact_violation():
    """The budget ``threegate verify`` uses: pretrain (cached) + 12 DAPO and 12 SFT steps, probed at 4, 8, 12."""
    import theory

    df = default_simulation_checks(seed=0, budget="default")
    exact_ids = {rid for rid, r in theory.RESULTS.items() if r.exact}
    met = df[df["result_id"].isin(exact_ids) & df["assumptions_hold"].astype(bool)]
    assert len(met) > 100
    assert met["holds"].astype(bool).all(), met.loc[~met["holds"].astype(bool), ["result_id", "source", "matrix"]]
    assert {"eq7", "prop3.2", "lemF.9", "thm3.3-rigorous", "propE.3"} <= set(df["result_id"])


def test_section_config_turns_every_list_of_a_config_file_into_a_tuple():
    """TOML / YAML give lists; config dataclasses are frozen and hashed into cache keys, so every list becomes a
    tuple in the one parser (no module converts its own keys)."""
    from sims.claims.base import config_from_section
    from sims.claims.peft import LoraPissaConfig, MaskedRunsConfig

    c = config_from_section(MaskedRunsConfig, {"masked_runs": {"masks": ["dense", "princ"], "seeds": [3, 4]}},
                            "masked_runs")
    assert c.masks == ("dense", "princ") and c.seeds == (3, 4)
    hash(c)
    lp = config_from_section(LoraPissaConfig, {"lora_pissa": {"ranks": [2, 4], "lrs": [1e-3]}}, "lora_pissa")
    assert lp.ranks == (2, 4) and lp.lrs == (1e-3,)
    hash(lp)


def test_run_claims_writes_tables_and_verdicts(tmp_path, capsys):
    cfg = {"pretrain": FAST_PRETRAIN, "mask_predictor": {"preset": "fast", "rl_steps": 1}}
    run, out = run_claims("mask_predictor", cfg, tmp_path / "mp")
    assert (out / "mask_predictor.parquet").is_file() and (out / "history.csv").is_file()
    saved = json.loads((out / "verdicts.json").read_text())
    assert [s["verdict"] for s in saved] == [v.verdict for v in run.verdicts]
    assert pd.read_csv(out / "verdicts.csv")["verdict"].tolist() == [v.verdict for v in run.verdicts]
    assert run.verdicts[0].verdict.upper() in capsys.readouterr().out
    assert {"sparsity", "mask_predictor"} <= set(EXPERIMENTS)
    with pytest.raises(InputError, match="unknown claim experiment"):
        run_claims("nope", cfg, tmp_path / "x")


def test_threegate_run_writes_claim_tables_and_verdicts(tmp_path, capsys):
    """`threegate run mask_predictor` writes the claim tables and verdicts.json, not only the standard tables."""
    cfg = {"pretrain": FAST_PRETRAIN, "mask_predictor": {"preset": "fast", "rl_steps": 1}}
    out = run_experiment("mask_predictor", cfg, tmp_path / "mp")
    assert (out / "mask_predictor.csv").is_file()
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts and all(v["verdict"] in {"reproduced", "not reproduced", "inconclusive"} for v in verdicts)
