"""Tests for threegate.callback.ThreeGateCallback on real TRL trainers (CPU, the tiny Llama of sims.hf.tiny).

* a 3-step GRPOTrainer run (trl 1.16, loss "grpo", beta > 0 so TRL logs a KL): the per-step counts equal an
  independent recount from bf16 states saved each step by a separate callback (integer bit compare); the Gate III
  exact rule fed the float32 master has precision = recall = 1; snapshots load in ``threegate compare``;
* a 3-step SFTTrainer run whose tables ``threegate figs`` draws (per-step sparsity, consecutive Jaccard, Table 1).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from sims.hf.tiny import save_tiny_llama  # noqa: E402
from theory.errors import InputError  # noqa: E402


def recount(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Independent oracle: int16 bit patterns differ, except +0 vs -0."""
    x = a.contiguous().view(torch.int16).numpy().astype(np.int32)
    y = b.contiguous().view(torch.int16).numpy().astype(np.int32)
    return (x != y) & (((x | y) & 0x7FFF) != 0)


class SaveStates(TrainerCallback):
    """Keeps bf16(param) of every 2-D trainable parameter at the start and after every step."""

    def __init__(self):
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def _save(self, step, model):
        self.states[step] = {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()
                             if p.ndim == 2 and p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._save(0, model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self._save(state.global_step, model)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def _load(tiny_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return (AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True),
            AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True))


def count_digits(prompts, completions, **kwargs):
    """Reward (TRL signature: prompts, completions, **kwargs -> list of floats): digits in the completion."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


@pytest.fixture(scope="module")
def grpo_run(tiny_dir, tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from threegate import ThreeGateCallback

    out = tmp_path_factory.mktemp("grpo")
    model, tok = _load(tiny_dir)
    ds = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "7-4=", "5*1="] * 4})
    cfg = GRPOConfig(output_dir=str(out / "trainer"), max_steps=3, per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=8, learning_rate=3e-5, beta=0.1, loss_type="grpo", logging_steps=1,
                     report_to="none", use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
                     temperature=1.5)
    saver = SaveStates()
    cb = ThreeGateCallback(out_dir=out / "tg", snapshot_steps=[2], gate3=True, k=4)
    trainer = GRPOTrainer(model=model, reward_funcs=count_digits, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[saver, cb])
    trainer.train()
    return out / "tg", saver.states, trainer


def test_grpo_counts_equal_an_independent_recount_from_bf16_states(grpo_run):
    tg, states, _ = grpo_run
    steps = pd.read_parquet(tg / "steps.parquet")
    assert sorted(steps["step"].unique()) == [1, 2, 3]
    assert set(steps["matrix"]) == set(states[0])  # HF parameter names, tied lm_head once
    for row in steps.itertuples():
        cur, prev, base = states[row.step][row.matrix], states[row.step - 1][row.matrix], states[0][row.matrix]
        m_t = recount(prev, cur)
        assert row.numel == cur.numel()
        assert row.changed_prev == int(m_t.sum()), (row.step, row.matrix)
        assert row.changed_base == int(recount(base, cur).sum())
        if row.step > 1:
            m_prev = recount(states[row.step - 2][row.matrix], prev)
            assert (row.inter_prev, row.size_prev) == (int((m_t & m_prev).sum()), int(m_prev.sum()))
    last = steps[steps["step"] == 3]
    assert 0 < last["changed_base"].sum() < last["numel"].sum()  # lr 3e-5: some, not all, stored values moved


def test_grpo_pooled_tables_are_sums_of_the_per_matrix_counts(grpo_run):
    tg, _, _ = grpo_run
    steps = pd.read_parquet(tg / "steps.parquet")
    pooled = pd.read_parquet(tg / "step_sparsity.parquet")
    for t in (2, 3):
        s, a = steps[steps["step"] == t], pooled[(pooled["step"] == t) & (pooled["matrix_type"] == "all")].iloc[0]
        assert (a.numel, a.changed_prev, a.changed_base) == (s.numel.sum(), s.changed_prev.sum(), s.changed_base.sum())
        union = a.changed_prev + a.size_prev - a.inter_prev
        assert a.jaccard_prev == (a.inter_prev / union if union else 1.0)
    assert pooled.loc[pooled["step"] == 1, "jaccard_prev"].isna().all()
    t1 = pd.read_parquet(tg / "sparsity.parquet")
    row = t1[t1["matrix_type"] == "all"].iloc[0]
    s3 = steps[steps["step"] == 3]
    assert (row.run, row.method) == ("RL-seed0", "RL")
    assert row.sparsity == 1.0 - s3.changed_base.sum() / s3.numel.sum()


def test_grpo_gate3_exact_rule_has_precision_and_recall_one(grpo_run):
    tg, _, _ = grpo_run
    g3 = pd.read_parquet(tg / "steps_gate3.parquet")
    by_matrix = pd.read_parquet(tg / "steps_gate3_by_matrix.parquet")
    moved = g3[g3["changed"] > 0]
    assert len(moved) >= 1
    assert (moved["precision_master"] == 1.0).all() and (moved["recall_master"] == 1.0).all()
    assert (by_matrix["pred_master"] == by_matrix["changed"]).all() and (by_matrix["tp_master"] == by_matrix["changed"]).all()
    assert ((moved["recall_update"] >= 0) & (moved["recall_update"] <= 1)).all()


def test_grpo_snapshots_kl_and_gate2_tables(grpo_run):
    from threegate.checkpoints import open_checkpoint

    tg, states, trainer = grpo_run
    snaps = sorted(p.name for p in (tg / "snapshots").glob("*.safetensors"))
    assert snaps == ["step_000000.safetensors", "step_000002.safetensors", "step_000003.safetensors"]
    ck = open_checkpoint(tg / "snapshots" / "step_000002.safetensors")
    assert set(ck.names()) == set(states[2])
    for name in states[2]:
        assert torch.equal(ck.get(name).view(torch.int16), states[2][name].view(torch.int16))
    logged = {h["step"]: h["kl"] for h in trainer.state.log_history if "kl" in h}
    kl = pd.read_parquet(tg / "gate1_kl.parquet")
    assert dict(zip(kl["step"], kl["kl"])) == logged and len(logged) == 3
    checks = pd.read_parquet(tg / "checks.parquet")
    assert set(checks["step"]) == {2, 3}
    assert (checks.groupby("step")["kl"].first() == pd.Series({2: logged[2], 3: logged[3]})).all()
    rigorous = checks[checks["result_id"].isin(["cor3.4-weyl", "cor3.4-mirsky", "cor3.5"])]
    assert (rigorous["verdict"] != "violated").all()
    assert {"angles", "mask_overlap", "snapshot_matrices"} <= {p.stem for p in tg.glob("*.parquet")}
    # the follow-up metrics (issue 17) reach live runs through the snapshot analysis: a share in [0, 1] per matrix
    # that moved, beside the random baseline 1 - k^2/(mn)
    snap = pd.read_parquet(tg / "snapshot_matrices.parquet")
    moved = snap[snap["changed"] > 0] if "changed" in snap.columns else snap
    energy = moved["energy_off_principal_subspace"].dropna()
    assert len(energy) > 0 and ((energy >= 0) & (energy <= 1)).all()
    assert ((moved["random_energy_off_principal_subspace"] > 0) & (moved["random_energy_off_principal_subspace"] < 1)).all()
    assert "iso_residual_share" in snap.columns


@pytest.fixture(scope="module")
def sft_run(tiny_dir, tmp_path_factory):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from threegate import ThreeGateCallback

    out = tmp_path_factory.mktemp("sft")
    model, tok = _load(tiny_dir)
    ds = Dataset.from_dict({"text": [f"{a}+{b}={a + b}" for a in range(4) for b in range(4)]})
    cfg = SFTConfig(output_dir=str(out / "trainer"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-4,
                    max_length=16, logging_steps=1, report_to="none", use_cpu=True, seed=0, save_strategy="no",
                    disable_tqdm=True, gradient_checkpointing=False)
    cb = ThreeGateCallback(out_dir=out / "tg", save_snapshots=False)
    SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[cb]).train()
    return out / "tg"


def test_sft_run_tables_are_drawn_by_threegate_figs(sft_run, tmp_path):
    from paper_figs.report import render_all

    steps = pd.read_parquet(sft_run / "steps.parquet")
    assert {"step", "matrix", "numel", "changed_prev", "changed_base"} <= set(steps.columns)
    assert not (sft_run / "checks.parquet").exists() and not (sft_run / "snapshots").exists()
    t1 = pd.read_parquet(sft_run / "sparsity.parquet")
    assert set(t1["method"]) == {"SFT"} and set(t1["run"]) == {"SFT-seed0"}
    rep = render_all(sft_run, tmp_path / "report")
    assert not rep.errors, rep.errors
    slugs = {f.slug for f in rep.figures}
    assert {"live-steps-step-sparsity", "table-1-sparsity"} <= slugs
    fig = next(f for f in rep.figures if f.slug == "live-steps-step-sparsity")
    assert fig.png.is_file() and "consecutive Jaccard" in fig.caption


def test_timing_rows_and_method_labels(sft_run):
    timing = pd.read_parquet(sft_run / "steps_timing.parquet")
    assert list(timing["step"]) == [1, 2, 3]
    assert (timing["step_s"] > 0).all() and (timing["callback_s"] > 0).all() and (timing["snapshot_s"] == 0).all()


def test_bad_options_raise_input_errors(tmp_path):
    from threegate import ThreeGateCallback

    for kw, msg in (({"snapshot_steps": -1}, "snapshot_steps"), ({"snapshot_steps": [0, 2]}, "start at 1"),
                    ({"snapshot_steps": "often"}, "snapshot_steps"), ({"k": 0}, "--k"), ({"alpha": 1.5}, "alpha"),
                    ({"gate3": 1}, "gate3"), ({"flush_every": 0}, "flush_every"), ({"eta": math.nan}, "eta")):
        with pytest.raises(InputError, match=msg):
            ThreeGateCallback(out_dir=tmp_path, **kw)


def test_import_threegate_stays_light():
    import subprocess
    import sys

    code = "import sys, threegate; print('transformers' in sys.modules, 'ThreeGateCallback' in threegate.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]  # importing threegate does not import transformers; the callback is lazy
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        import threegate

        threegate.nothing_here


def test_callback_bench_reports_per_step_ratios_on_the_tiny_model(tiny_dir):
    """Structure only (timings are reported, never asserted): one SFT run of 2 steps with Gate III on."""
    from threegate.bench_callback import bench_callback, format_callback_report

    res = bench_callback(["sft"], steps=2, batch=2, model=str(tiny_dir), gate3=True)
    (run,) = res["runs"]
    assert [s["step"] for s in run["steps"]] == [1, 2] and run["ratio"] > 0
    n = run["tracked_params"]
    assert 4 * n + n // 8 <= run["memory_bytes"] <= 4 * n + n // 8 + 15  # 4.125 B/param (15 matrices round up)
    assert [g["step"] for g in run["gate3"]] == [1, 2]
    assert all(g["recall_master"] == 1.0 for g in run["gate3"] if g["changed"])
    text = format_callback_report(res)
    assert "SFT (21,760 tracked 2-D parameters" in text and "Gate III per step" in text
    with pytest.raises(InputError, match="callback-steps"):
        bench_callback(["sft"], steps=1, model=str(tiny_dir))
    with pytest.raises(InputError, match="callback-trainer"):
        bench_callback(["ppo"], model=str(tiny_dir))


def test_a_failing_snapshot_analysis_is_recorded_and_training_goes_on(tiny_dir, tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import threegate.callback
    from threegate import ThreeGateCallback

    def broken(*args, **kwargs):
        raise InputError("tensor 'x': linear algebra failed (simulated)")

    monkeypatch.setattr(threegate.callback, "compare_tables", broken)  # the name the callback calls
    model, tok = _load(tiny_dir)
    cfg = SFTConfig(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2,
                    learning_rate=1e-4, max_length=16, report_to="none", use_cpu=True, seed=0, save_strategy="no",
                    disable_tqdm=True, gradient_checkpointing=False)
    cb = ThreeGateCallback(out_dir=tmp_path / "tg", snapshot_steps=1)
    with pytest.warns(UserWarning, match="snapshot analysis at step 1 failed"):
        SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"text": ["1+1=2"] * 8}),
                   processing_class=tok, callbacks=[cb]).train()
    assert sorted(pd.read_parquet(tmp_path / "tg" / "steps.parquet")["step"].unique()) == [1, 2]
    assert (tmp_path / "tg" / "snapshots" / "step_000002.safetensors").is_file()
    meta = json.loads((tmp_path / "tg" / "steps.parquet.meta.json").read_text())
    assert "step 1: tensor 'x': linear algebra failed (simulated)" in meta["error"]
