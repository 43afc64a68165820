"""SFT on the small transformer: teacher-forced cross-entropy on correct demonstrations of the same task.

Each step draws ``batch_size`` fresh examples of the task (seeded numpy rng), encodes ``BOS prompt answer EOS`` and
minimises the mean negative log-likelihood of the completion tokens (answer + EOS; prompt tokens carry no loss),
with the same optimizer and precision modes as RLVR (``sims.tinygpt.storage.MixedPrecisionAdamW``). The demonstration loss
on a fixed held-out set is recorded at step 0 and after every step (``history['eval_loss']``). Probes as in RLVR
(``sims.tinygpt.probe``); there is no clip band, so Lemma F.9 is not evaluated on SFT steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from sims.tinygpt.model import TinyGPT, sequence_logprobs
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import ProbeConfig, Prober, RunResult, start_run
from sims.tinygpt.progress import RunMonitor, stored_unchanged
from sims.tinygpt.storage import check_precision
from sims.tinygpt.tasks import encode_demonstrations
from theory.errors import InputError

__all__ = ["SFTConfig", "train_sft", "demonstration_loss"]


@dataclass
class SFTConfig:
    task: str = "addition"
    steps: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    precision: str = "bf16"
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    n_eval: int = 64  # held-out demonstrations for the eval loss
    max_new_tokens: int | None = None  # for the probe's generations; None: the task's longest answer + EOS
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = ProbeConfig(**self.probe)
        self.betas = tuple(self.betas)
        check_precision(self.precision)
        for name in ("steps", "batch_size", "n_eval"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"SFTConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"SFTConfig.lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


def demonstration_loss(model: TinyGPT, ids: torch.Tensor, attn: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per completion token (teacher forcing)."""
    logp = sequence_logprobs(model, ids, cmask, attn)
    return -logp.sum() / cmask.sum().clamp_min(1)


def train_sft(model: TinyGPT, cfg: SFTConfig, *, run_name: str = "sft") -> RunResult:
    """Train ``model`` in place by SFT; deterministic (see ``sims.tinygpt.determinism.deterministic``)."""
    with deterministic():
        return _train_sft(model, cfg, run_name)


def _train_sft(model: TinyGPT, cfg: SFTConfig, run_name: str) -> RunResult:
    t_start = time.perf_counter()
    device, tok, task, max_new, opt = start_run(model, cfg)
    prober = Prober(model, task, tok, cfg.probe, run=run_name, kind="sft", max_new_tokens=max_new, clip_band=None,
                    device=device)
    rng = np.random.default_rng(cfg.seed)
    eval_batch = encode_demonstrations(tok, task.sample(np.random.default_rng([cfg.seed, 99]), cfg.n_eval), device)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(demonstration_loss(model, *eval_batch))

    history = [{"run": run_name, "step": 0, "loss": float("nan"), "eval_loss": eval_loss(), "grad_norm": 0.0}]
    prober.after_step(0, opt.stored_state_dict())
    for step in range(1, cfg.steps + 1):
        batch = encode_demonstrations(tok, task.sample(rng, cfg.batch_size), device)
        model.train()
        opt.zero_grad()
        loss = demonstration_loss(model, *batch)
        loss.backward()
        gnorm = opt.step()
        history.append({"run": run_name, "step": step, "loss": float(loss.detach()), "eval_loss": eval_loss(),
                        "grad_norm": gnorm})
        prober.after_step(step, opt.stored_state_dict())
    RunMonitor(run_name, cfg.steps, cfg.precision).finish(stored_unchanged(prober.base, opt.stored_state_dict()))
    return RunResult(
        kind="sft", name=run_name, config=cfg.to_dict(), history=pd.DataFrame(history),
        metrics=prober.metrics_frame(), checks=prober.checks_frame(), snapshots=prober.snapshots,
        master=opt.master_state_dict(), wall_seconds=time.perf_counter() - t_start,
    )
