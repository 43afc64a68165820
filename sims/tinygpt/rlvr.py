"""RLVR on the small transformer: GRPO, DAPO (clip-only) and REINFORCE with a KL penalty.

One RL step (``steps`` of them):

1. draw ``prompts_per_step`` prompts of the task (seeded numpy rng) and sample ``group_size`` completions for each
   from the current policy (the model as it computes: the bf16 stored weights cast up in ``precision="bf16"``);
2. score each completion with the task's verifier: reward r in {+1, -1};
3. advantages, per group of G completions of one prompt:
   ``grpo``/``dapo``: A = (r - mean_G r) / (std_G r + 1e-6) (GRPO group normalisation; a group with equal rewards
   gives A = 0); ``reinforce_kl``: A = r - mean_G r (group-mean baseline, no normalisation);
4. behaviour log-probs log pi_old(y_t) of the sampled tokens are recomputed at temperature 1 with the policy;
5. the rollout batch is shuffled and split into ``minibatches`` mini-batches; each gives one AdamW step on the
   token-level loss (DAPO's token-level mean over every completion token of the mini-batch)

       L = mean_t [ -min(w_t A, clip(w_t, 1 - eps_low, 1 + eps_high) A) + beta * kl_t ],   w_t = pi_theta / pi_old

   (``reinforce_kl`` uses ``-w_t A`` with no clipping), where kl_t is the KL to the reference policy (the model the
   run started from unless ``ref_model`` is given): ``kl_estimator="k3"`` is Schulman's unbiased
   k3 = exp(l_ref - l) - (l_ref - l) - 1 on the sampled token, ``"exact"`` is the full-vocabulary
   KL(pi_theta(.|prefix) || pi_ref(.|prefix)) at that position.

Algorithms: ``"grpo"`` (symmetric clip eps_low = eps_high allowed, beta >= 0), ``"dapo"`` (clip-only: beta must be 0
and eps_high > eps_low, "clip-higher"), ``"reinforce_kl"`` (no clipping; beta > 0 required).
Optimizer and precision modes: ``sims.tinygpt.storage.MixedPrecisionAdamW``. Probes (``sims.tinygpt.probe``) run after the steps
named in ``probe.steps`` and evaluate the theory checks on the real update of that step.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sims.tinygpt.model import TinyGPT, generate, sequence_logprobs
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import ProbeConfig, Prober, RunResult, start_run
from sims.tinygpt.progress import RunMonitor, equal_reward_groups, stored_unchanged
from sims.tinygpt.storage import check_precision
from theory.errors import InputError

__all__ = ["ALGORITHMS", "RLConfig", "train_rlvr", "group_advantages", "policy_loss", "k3_kl"]

ALGORITHMS = ("grpo", "dapo", "reinforce_kl")


@dataclass
class RLConfig:
    """Settings of one RLVR run (the paper's App. C recipe, scaled down: AdamW betas (0.9, 0.999), reward +/-1,
    several rollouts per prompt, several mini-batch updates per rollout batch, no reference KL for DAPO)."""

    task: str = "addition"
    algorithm: str = "dapo"
    steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int | None = None  # None: the task's longest answer + EOS
    temperature: float = 1.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    minibatches: int = 2
    beta: float = 0.0
    kl_estimator: str = "k3"
    precision: str = "bf16"
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = ProbeConfig(**self.probe)
        self.betas = tuple(self.betas)  # JSON round trips give lists
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"RLConfig.algorithm {self.algorithm!r} is not one of {ALGORITHMS}")
        check_precision(self.precision)
        if self.kl_estimator not in ("k3", "exact"):
            raise InputError(f"RLConfig.kl_estimator must be 'k3' or 'exact', got {self.kl_estimator!r}")
        for name in ("steps", "prompts_per_step", "group_size", "minibatches"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"RLConfig.{name} must be positive, got {getattr(self, name)}")
        if self.group_size < 2:
            raise InputError("RLConfig.group_size must be >= 2 (group-normalised advantages need a group)")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise InputError(f"RLConfig: rollout batch {self.prompts_per_step * self.group_size} is not divisible "
                             f"into {self.minibatches} mini-batches")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise InputError(f"RLConfig: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.beta < 0 or not math.isfinite(self.beta):
            raise InputError(f"RLConfig.beta must be finite and >= 0, got {self.beta}")
        if self.algorithm == "dapo" and (self.beta != 0 or not self.eps_high > self.eps_low):
            raise InputError("RLConfig: 'dapo' is clip-only (beta = 0) with clip-higher (eps_high > eps_low); "
                             f"got beta={self.beta}, eps_low={self.eps_low}, eps_high={self.eps_high}")
        if self.algorithm == "reinforce_kl" and self.beta <= 0:
            raise InputError("RLConfig: 'reinforce_kl' needs a KL penalty beta > 0")
        if self.temperature <= 0:
            raise InputError(f"RLConfig.temperature must be > 0 for sampling, got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


def group_advantages(rewards: torch.Tensor, group_size: int, normalise: bool) -> torch.Tensor:
    """Per-rollout advantages from (P*G,) rewards laid out prompt-major: A = r - mean_G (divided by std_G + 1e-6
    when ``normalise``; population std, so a group of equal rewards gives exactly 0)."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if normalise:
        a = a / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-6)
    return a.reshape(-1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: tuple[float, float] | None,
) -> tuple[torch.Tensor, dict]:
    """Token-level surrogate summed over ``mask`` tokens (caller divides). ``logp, old_logp, mask: (B, T)``,
    ``adv: (B,)``. ``clip=None``: plain importance-weighted policy gradient -w A."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    if clip is None:
        per_tok = -ratio * a
        clipped = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        lo, hi = 1 - clip[0], 1 + clip[1]
        unclipped, clipped_obj = ratio * a, ratio.clamp(lo, hi) * a
        per_tok = -torch.minimum(unclipped, clipped_obj)
        clipped = (clipped_obj < unclipped) & mask  # tokens whose gradient the clip stopped
    m = mask.to(per_tok.dtype)
    return (per_tok * m).sum(), {"clipped_tokens": int(clipped.sum())}


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 = exp(l_ref - l) - (l_ref - l) - 1 per sampled token, zero off ``cmask``: non-negative and
    unbiased for KL(pi || pi_ref) when the tokens are sampled from pi."""
    d = ref_logp - logp
    return (torch.exp(d) - d - 1) * cmask.to(d.dtype)


def _kl_to_ref(model, ref_model, ids, attn, cmask, logp, estimator: str) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) at completion tokens, (B, T), zero elsewhere."""
    with torch.no_grad():
        if estimator == "k3":
            ref_logp = sequence_logprobs(ref_model, ids, cmask, attn)
        else:
            ref_logits = ref_model(ids, attn)[:, :-1].float().log_softmax(-1)
    if estimator == "k3":
        return k3_kl(ref_logp, logp, cmask)
    lq = model(ids, attn)[:, :-1].float().log_softmax(-1)
    kl = F.pad((lq.exp() * (lq - ref_logits)).sum(-1), (1, 0))
    return kl * cmask.to(kl.dtype)


def train_rlvr(model: TinyGPT, cfg: RLConfig, ref_model: TinyGPT | None = None, *, run_name: str = "rlvr") -> RunResult:
    """Train ``model`` in place by RLVR; returns the run's history, probe metrics, theory checks and snapshots.

    Runs under ``sims.tinygpt.determinism.deterministic()`` (deterministic kernels, one thread): the same config and starting
    weights give bit-identical weights and tables on the same machine."""
    with deterministic():
        return _train_rlvr(model, cfg, ref_model, run_name)


def _train_rlvr(model: TinyGPT, cfg: RLConfig, ref_model: TinyGPT | None, run_name: str) -> RunResult:
    t_start = time.perf_counter()
    device, tok, task, max_new, opt = start_run(model, cfg)
    if cfg.beta > 0 and ref_model is None:
        ref_model = copy.deepcopy(model)  # the policy the run starts from, as it computes (stored weights)
    if ref_model is not None:
        ref_model.to(device).eval()  # its log-probs are computed under no_grad (``_kl_to_ref``)
    clip = None if cfg.algorithm == "reinforce_kl" else (cfg.eps_low, cfg.eps_high)
    prober = Prober(model, task, tok, cfg.probe, run=run_name, kind="rlvr", max_new_tokens=max_new, clip_band=clip,
                    device=device)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    monitor = RunMonitor(run_name, cfg.steps, cfg.precision, "KL_ref" if cfg.beta > 0 else "KL_step")
    prober.after_step(0, opt.stored_state_dict())
    for step in range(1, cfg.steps + 1):
        examples = task.sample(rng, cfg.prompts_per_step)
        prompts = [ex.prompt for ex in examples for _ in range(cfg.group_size)]
        model.eval()
        roll = generate(model, [tok.encode(p, bos=True) for p in prompts], max_new, cfg.temperature, gen,
                        eos_id=tok.eos_id, pad_id=tok.pad_id, device=device)
        texts = [tok.decode(c) for c in roll.completions]
        rewards = torch.tensor([task.reward(p, c) for p, c in zip(prompts, texts)], dtype=torch.float32, device=device)
        adv = group_advantages(rewards, cfg.group_size, normalise=cfg.algorithm != "reinforce_kl")
        ids, attn, cmask = roll.sequences, roll.attention_mask, roll.completion_mask
        with torch.no_grad():
            old_logp = sequence_logprobs(model, ids, cmask, attn)
        order = torch.randperm(ids.shape[0], generator=shuffle_gen).to(device)
        stats = {"clipped_tokens": 0, "loss": 0.0, "kl_ref": 0.0, "grad_norm": 0.0}
        n_tok_total = int(cmask.sum())
        model.train()
        for mb in order.chunk(cfg.minibatches):
            n_tok = max(int(cmask[mb].sum()), 1)
            opt.zero_grad()
            logp = sequence_logprobs(model, ids[mb], cmask[mb], attn[mb])
            pg, st = policy_loss(logp, old_logp[mb], adv[mb], cmask[mb], clip=clip)
            loss = pg / n_tok
            if cfg.beta > 0:
                kl = _kl_to_ref(model, ref_model, ids[mb], attn[mb], cmask[mb], logp, cfg.kl_estimator).sum() / n_tok
                loss = loss + cfg.beta * kl
                stats["kl_ref"] += float(kl.detach()) / cfg.minibatches
            loss.backward()
            stats["grad_norm"] = max(stats["grad_norm"], opt.step())
            stats["clipped_tokens"] += st["clipped_tokens"]
            stats["loss"] += float(loss.detach()) / cfg.minibatches
        model.eval()
        with torch.no_grad():
            new_logp = sequence_logprobs(model, ids, cmask, attn)
        # k3 estimate of KL(pi_old || pi_new) per completion token: how far this step moved the policy
        kl_step = float(k3_kl(new_logp, old_logp, cmask).sum()) / max(n_tok_total, 1)
        equal_groups = equal_reward_groups(rewards, cfg.group_size)
        history.append({
            "run": run_name, "step": step, "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards > 0).float().mean()), "loss": stats["loss"], "kl_ref": stats["kl_ref"],
            "kl_step": kl_step, "clip_frac": stats["clipped_tokens"] / max(n_tok_total, 1),
            "grad_norm": stats["grad_norm"], "completion_tokens": n_tok_total, "equal_reward_groups": equal_groups,
        })
        monitor.step(step, reward=history[-1]["reward_mean"], kl=stats["kl_ref"] if cfg.beta > 0 else kl_step,
                     equal_groups=equal_groups)
        prober.after_step(step, opt.stored_state_dict(),
                          token_ratios=_ragged_ratios(new_logp, old_logp, cmask))
    monitor.finish(stored_unchanged(prober.base, opt.stored_state_dict()))
    return RunResult(
        kind="rlvr", name=run_name, config=cfg.to_dict(), history=pd.DataFrame(history),
        metrics=prober.metrics_frame(), checks=prober.checks_frame(), snapshots=prober.snapshots,
        master=opt.master_state_dict(), wall_seconds=time.perf_counter() - t_start,
    )


def _ragged_ratios(new_logp: torch.Tensor, old_logp: torch.Tensor, cmask: torch.Tensor) -> list[np.ndarray]:
    """Token ratios pi_new / pi_old of the sampled completion tokens, one float64 array per sequence."""
    r = torch.exp((new_logp - old_logp).double())
    return [r[i][cmask[i]].cpu().numpy() for i in range(r.shape[0])]
