"""Slow tier: ThreeGateCallback on SmolLM2-135M (offline GGUF, dequantized float32 masters) under TRL's GRPOTrainer,
checked through ``threegate compare`` on the snapshots it wrote (trl 1.16, transformers 5.25).

Two GRPO steps (loss "dapo", beta = 0: TRL logs no KL, so no Gate I table), then the CLI compare of the base and the
step-2 snapshot on layer 0 must count exactly the entries the callback counted against the base at step 2. Eight
new tokens never answer a word problem (every reward -1, zero advantages, no update), so the reward here counts
digits in the completion: the counting, not the task, is under test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_smollm2_grpo_counts_match_threegate_compare_on_the_snapshots(tmp_path):
    pytest.importorskip("trl")
    from threegate.checkpoints import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except Exception as e:  # the optional real-model package is missing
        pytest.skip(str(e))
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sims.hf.loading import load_causal_lm
    from sims.hf.word_problems import format_prompt, generate_problems
    from threegate import ThreeGateCallback
    from threegate.bench_callback import trainable_copy

    def digits(prompts, completions, **kwargs):
        return [float(sum(ch.isdigit() for ch in c)) for c in completions]

    os.environ["HF_HUB_OFFLINE"] = "1"
    lm = load_causal_lm(None)
    problems = generate_problems(8, seed=0)
    ds = Dataset.from_dict({"prompt": [format_prompt(p) for p in problems], "answer": [p.answer for p in problems]})
    cfg = GRPOConfig(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=4,
                     num_generations=4, max_completion_length=8, temperature=1.5, learning_rate=1e-5, beta=0.0, loss_type="dapo",
                     logging_steps=1, report_to="none", use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True)
    only = r"layers\.0\."
    cb = ThreeGateCallback(out_dir=tmp_path / "tg", only=only)
    GRPOTrainer(model=trainable_copy(lm.model), reward_funcs=digits, args=cfg, train_dataset=ds,
                processing_class=lm.tokenizer, callbacks=[cb]).train()
    tg = tmp_path / "tg"
    snaps = tg / "snapshots"
    subprocess.run([sys.executable, "-m", "threegate", "compare", str(snaps / "step_000000.safetensors"),
                    str(snaps / "step_000002.safetensors"), "--only", only, "--out", str(tmp_path / "cmp"),
                    "--no-figures", "--no-progress"], check=True, capture_output=True, timeout=1200)
    cmp = pd.read_csv(tmp_path / "cmp" / "matrices.csv").set_index("name")
    steps = pd.read_parquet(tg / "steps.parquet")
    at2 = steps[(steps["step"] == 2) & steps["matrix"].str.contains(only)].set_index("matrix")
    assert len(at2) == 7 and set(at2.index) == set(cmp.index)
    assert (cmp.loc[at2.index, "changed"] == at2["changed_base"]).all()
    assert at2["changed_base"].sum() > 0
    mine = pd.read_parquet(tg / "snapshot_matrices.parquet").set_index("name")
    assert (mine.loc[at2.index, "changed"] == at2["changed_base"]).all()
    assert not (tg / "gate1_kl.parquet").exists()  # beta = 0: no KL in TRL's logs
