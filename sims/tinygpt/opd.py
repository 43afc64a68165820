"""On-policy distillation (OPD) on the small transformer: the student samples, a teacher's log-probabilities are the
target, the loss is the per-token reverse KL.

One OPD step (``steps`` of them), laid out like an RLVR step (``sims.tinygpt.rlvr``) so that the two make the same
number of optimizer updates from the same prompts:

1. draw ``prompts_per_step`` prompts of the task (seeded numpy rng) and sample ``group_size`` completions for each
   from the current student (temperature ``temperature``; the stored bf16 weights in ``precision="bf16"``);
2. split the batch into ``minibatches`` mini-batches; each gives one optimizer step on

       L = (1 / n_tok) sum_{sampled prefixes t} KL(pi_student(. | y_<t) || pi_teacher(. | y_<t)),

   the exact reverse KL over the whole vocabulary at every position that predicts a completion token (the
   prefixes are the student's own samples, held fixed; the teacher is not trained and runs without gradients,
   on the mini-batch's rows in the student's order, so a teacher equal to the student gives bit-identical logits).

The reward of the samples (the task's verifier) is recorded but never used for the update. Optimizer, precision
modes and probes as in RLVR (``sims.tinygpt.storage.MixedPrecisionAdamW``, ``sims.tinygpt.probe``); deterministic
under ``sims.tinygpt.probe.deterministic``. The teacher must share the tokenizer (the same vocabulary size).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from sims.tinygpt.model import TinyGPT, generate
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import ProbeConfig, Prober, RunResult, _action_positions, start_run
from sims.tinygpt.storage import OPTIMIZERS, check_precision
from theory.errors import InputError

__all__ = ["OPDConfig", "train_opd", "reverse_kl_per_position"]


@dataclass
class OPDConfig:
    """Settings of one OPD run (the RLVR run's batch layout and optimizer; no reward in the loss)."""

    task: str = "counting"
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int | None = None  # None: the task's longest answer + EOS
    temperature: float = 1.0
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    minibatches: int = 2
    precision: str = "bf16"
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    optimizer: str = "adamw"
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = ProbeConfig(**self.probe)
        self.betas = tuple(self.betas)
        check_precision(self.precision)
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"OPDConfig.optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        for name in ("steps", "prompts_per_step", "group_size", "minibatches"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"OPDConfig.{name} must be positive, got {getattr(self, name)}")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise InputError(f"OPDConfig: batch {self.prompts_per_step * self.group_size} is not divisible into "
                             f"{self.minibatches} mini-batches")
        if not self.temperature > 0:
            raise InputError(f"OPDConfig.temperature must be > 0 for sampling, got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


def reverse_kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(student) || softmax(teacher)) over the last axis (the vocabulary), computed in float32 at least.

    Examples
    --------
    >>> import torch
    >>> z = torch.tensor([[0.0, 1.0, 2.0]])
    >>> float(reverse_kl_per_position(z, z))
    0.0
    """
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    ls, lt = student_logits.to(dt).log_softmax(-1), teacher_logits.to(dt).log_softmax(-1)
    return (ls.exp() * (ls - lt)).sum(-1)


def train_opd(model: TinyGPT, teacher: TinyGPT, cfg: OPDConfig, *, run_name: str = "opd") -> RunResult:
    """Train ``model`` (the student) in place by on-policy distillation from ``teacher``; deterministic."""
    if teacher.cfg.vocab_size != model.cfg.vocab_size:
        raise InputError(f"teacher vocabulary {teacher.cfg.vocab_size} != student vocabulary {model.cfg.vocab_size}")
    with deterministic():
        return _train_opd(model, teacher, cfg, run_name)


def _train_opd(model: TinyGPT, teacher: TinyGPT, cfg: OPDConfig, run_name: str) -> RunResult:
    t_start = time.perf_counter()
    device, tok, task, max_new, opt = start_run(model, cfg)
    teacher.to(device).eval()
    prober = Prober(model, task, tok, cfg.probe, run=run_name, kind="opd", max_new_tokens=max_new, clip_band=None,
                    device=device)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    prober.after_step(0, opt.stored_state_dict())
    for step in range(1, cfg.steps + 1):
        examples = task.sample(rng, cfg.prompts_per_step)
        prompts = [ex.prompt for ex in examples for _ in range(cfg.group_size)]
        model.eval()
        roll = generate(model, [tok.encode(p, bos=True) for p in prompts], max_new, cfg.temperature, gen,
                        eos_id=tok.eos_id, pad_id=tok.pad_id, device=device)
        rewards = [task.reward(p, tok.decode(c)) for p, c in zip(prompts, roll.completions)]
        ids, attn = roll.sequences, roll.attention_mask
        pos = _action_positions(roll.completion_mask)
        order = torch.randperm(ids.shape[0], generator=shuffle_gen).to(device)
        model.train()
        stats = {"loss": 0.0, "grad_norm": 0.0}
        for mb in order.chunk(cfg.minibatches):
            with torch.no_grad():  # the same rows in the same order as the student's forward
                teacher_logits = teacher(ids[mb], attn[mb])
            opt.zero_grad()
            kl = reverse_kl_per_position(model(ids[mb], attn[mb]), teacher_logits)
            loss = kl[pos[mb]].sum() / max(int(pos[mb].sum()), 1)
            loss.backward()
            stats["grad_norm"] = max(stats["grad_norm"], opt.step())
            stats["loss"] += float(loss.detach()) / cfg.minibatches
        model.eval()
        history.append({"run": run_name, "step": step, "reverse_kl": stats["loss"],
                        "reward_mean": float(np.mean(rewards)), "accuracy": float(np.mean(np.array(rewards) > 0)),
                        "grad_norm": stats["grad_norm"], "completion_tokens": int(pos.sum())})
        prober.after_step(step, opt.stored_state_dict())
    return RunResult(
        kind="opd", name=run_name, config=cfg.to_dict(), history=pd.DataFrame(history),
        metrics=prober.metrics_frame(), checks=prober.checks_frame(), snapshots=prober.snapshots,
        master=opt.master_state_dict(), wall_seconds=time.perf_counter() - t_start,
    )
