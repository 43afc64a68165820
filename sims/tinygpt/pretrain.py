"""Next-token pretraining of TinyGPT on the synthetic task corpus, cached by config hash.

``pretrain(cfg)`` trains with AdamW on fresh batches from ``sims.tinygpt.tasks.pretraining_corpus`` (one document per
sequence, ``BOS doc EOS``, right-padded) and returns ``(model, info)``. The weights are cached as safetensors and the
info as JSON under ``cache_dir`` keyed by a SHA-256 of the config (plus the cache format version and the device
type): a later call with the same config loads them instead of retraining. Never pickle.

``info`` holds the loss curve, the per-task accuracy of greedy decoding (and of temperature-1 sampling) before and
after, and the spectral summary of every block matrix at init and after pretraining:

* ``power_law_exponent``: a in sigma_i ~ C i^(-a), least squares of log sigma_i on log i over the top
  ``top_fraction`` of the spectrum (i = 1..ceil(top_fraction * r)). A Gaussian init (Marchenko-Pastur bulk) is
  flat at the top, a small a; learned structure shows as a steeper decay.
* ``stable_rank`` = sum sigma_i^2 / sigma_1^2 (r for a flat spectrum, 1 for rank one);
  ``top_over_median`` = sigma_1 / median sigma (a heavy-tail measure, about (1+sqrt(c))/median for MP).

Reproducibility: every random draw comes from generators seeded by ``cfg.seed`` (model init from the model config's
seed, data from ``cfg.seed``, evaluation prompts from ``cfg.eval_seed``); training runs with a fixed intra-op thread
count (``cfg.num_threads``, default 1: on a shared 2-core box 2 threads were ~30x slower per step, measured) and, on
an accelerator, ``torch.use_deterministic_algorithms``; a rerun of the same config on the same machine gives
bit-identical weights (tested on CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sims.tinygpt.determinism import deterministic
from sims.tinygpt.model import GPTConfig, TinyGPT, generate, matrix_params, sequence_logprobs
from sims.tinygpt.tasks import Task, Tokenizer, pad_right, pretraining_corpus, task_by_name
from theory.errors import CheckpointError, InputError, NonFiniteError
from theory.linalg import singular_values

__all__ = [
    "PretrainConfig",
    "pretrain",
    "config_hash",
    "evaluate_accuracy",
    "power_law_exponent",
    "stable_rank",
    "spectral_summary",
    "load_pretrained",
    "CACHE_VERSION",
]

CACHE_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights (and so the cache key)."""

    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=Tokenizer().vocab_size, max_seq_len=32))
    tasks: tuple[str, ...] = ("addition", "modular", "sorting", "counting")
    p_correct: float = 0.6  # fraction of task documents whose answer is right
    p_distractor: float = 0.2  # fraction of documents that are distractor text
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio after a linear warmup
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on 2-D matrices only
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    eval_n: int = 200  # evaluation prompts per task
    eval_seed: int = 12345
    log_every: int = 50
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise InputError(f"PretrainConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.steps < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise InputError(f"PretrainConfig: need steps >= 0, batch_size > 0, lr > 0 "
                             f"(got {self.steps}, {self.batch_size}, {self.lr})")
        if self.model.vocab_size != Tokenizer().vocab_size:
            raise InputError(f"PretrainConfig.model.vocab_size={self.model.vocab_size} != tokenizer vocab "
                             f"{Tokenizer().vocab_size}")
        for name in self.tasks:
            task_by_name(name)  # raises InputError on an unknown name

    @classmethod
    def fast(cls, **overrides) -> "PretrainConfig":
        """Seconds: for tests. Same model shape as default, far fewer steps."""
        return replace(cls(steps=60, batch_size=32, warmup_steps=10, eval_n=20, log_every=10), **overrides)

    @classmethod
    def default(cls, **overrides) -> "PretrainConfig":
        """The base model the simulations start from (about a minute on 2 CPU cores)."""
        return replace(cls(), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def task_objects(self) -> list[Task]:
        return [task_by_name(n) for n in self.tasks]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


#: The modules whose code decides the pretrained weights: a change to any of them is a different model, so their
#: bytes are part of the cache key (a cache written by older code once silently served a different model).
_CODE_FILES = ("pretrain.py", "model.py", "tasks.py")


def code_digest() -> str:
    """SHA-256 (first 16 hex digits) of the source of the modules that produce the pretrained weights."""
    h = hashlib.sha256()
    for name in _CODE_FILES:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def config_hash(cfg: PretrainConfig, device: str | torch.device = "cpu") -> str:
    """SHA-256 of the canonical JSON of the config, the cache format version, the device type and the digest of
    the code that trains the model (``code_digest``)."""
    payload = {"config": cfg.to_dict(), "cache_version": CACHE_VERSION, "device": torch.device(device).type,
               "code": code_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Spectral summaries


def power_law_exponent(sigmas: Float[np.ndarray, " r"], top_fraction: float = 0.5) -> float:
    """Fitted a of sigma_i ~ C i^(-a) (least squares in log-log over i = 1..max(2, ceil(top_fraction * r))).

    Exact on a pure power law. Zero singular values in the fitted range raise ``InputError`` (log of zero)."""
    s = np.sort(np.asarray(sigmas, dtype=np.float64))[::-1]
    if s.ndim != 1 or s.size < 2:
        raise InputError(f"power_law_exponent: need at least 2 singular values, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise NonFiniteError("power_law_exponent: non-finite singular values")
    if not 0 < top_fraction <= 1:
        raise InputError(f"power_law_exponent: top_fraction must be in (0, 1], got {top_fraction}")
    k = max(2, math.ceil(top_fraction * s.size))
    top = s[:k]
    if top[-1] <= 0:
        raise InputError("power_law_exponent: zero singular value inside the fitted range")
    x, y = np.log(np.arange(1, k + 1, dtype=np.float64)), np.log(top)
    slope = np.polyfit(x, y, 1)[0]
    return float(-slope)


def stable_rank(sigmas: Float[np.ndarray, " r"]) -> float:
    """sum sigma_i^2 / sigma_1^2."""
    s = np.asarray(sigmas, dtype=np.float64)
    if s.size == 0 or s.max() <= 0:
        raise InputError("stable_rank: needs a nonzero singular value")
    return float(np.sum(s**2) / s.max() ** 2)


def spectral_summary(W: Any, top_fraction: float = 0.5) -> dict[str, float]:
    """Power-law exponent, stable rank, sigma_1/median and sigma_1 of one matrix (float64 SVD)."""
    s = singular_values(W)
    return {
        "power_law_exponent": power_law_exponent(s, top_fraction),
        "stable_rank": stable_rank(s),
        "top_over_median": float(s[0] / np.median(s)),
        "sigma_1": float(s[0]),
    }


def _spectra(model: TinyGPT) -> dict[str, dict[str, float]]:
    return {name: spectral_summary(p.detach()) for name, p in matrix_params(model).items()}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_accuracy(
    model: TinyGPT,
    tasks: Sequence[Task],
    n: int,
    seed: int,
    *,
    temperature: float = 0.0,
    sample_seed: int = 0,
    tokenizer: Tokenizer | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Fraction of ``n`` seeded prompts per task answered exactly (greedy when ``temperature == 0``)."""
    tok = tokenizer or Tokenizer()
    device = torch.device(device) if device is not None else model.device
    gen = torch.Generator(device=device).manual_seed(sample_seed)
    out = {}
    for ti, task in enumerate(tasks):
        examples = task.sample(np.random.default_rng([seed, ti]), n)
        prompts = [tok.encode(e.prompt, bos=True) for e in examples]
        g = generate(model, prompts, task.max_answer_len + 1, temperature, gen,
                     eos_id=tok.eos_id, pad_id=tok.pad_id, device=device)
        correct = [task.is_correct(e.prompt, tok.decode(c)) for e, c in zip(examples, g.completions)]
        out[task.name] = float(np.mean(correct))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training


def _lr_at(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _batch(cfg: PretrainConfig, rng: np.random.Generator, tok: Tokenizer, tasks: list[Task], device):
    docs = pretraining_corpus(rng, cfg.batch_size, tasks, p_correct=cfg.p_correct, p_distractor=cfg.p_distractor)
    ids, mask = pad_right([tok.encode(d, bos=True, eos=True) for d in docs], tok.pad_id, device)
    if ids.shape[1] > cfg.model.max_seq_len:
        raise InputError(f"a pretraining document of {ids.shape[1]} tokens exceeds max_seq_len "
                         f"{cfg.model.max_seq_len}")
    return ids, mask


def _train(cfg: PretrainConfig, device: torch.device) -> tuple[TinyGPT, dict[str, Any]]:
    tok, tasks = Tokenizer(), cfg.task_objects()
    model = TinyGPT(cfg.model, dtype=cfg.torch_dtype, device=device)
    info: dict[str, Any] = {"config": cfg.to_dict(), "config_hash": config_hash(cfg, device), "device": device.type}
    info["spectra_init"] = _spectra(model)
    info["accuracy_greedy_before"] = evaluate_accuracy(model, tasks, cfg.eval_n, cfg.eval_seed, device=device)
    info["accuracy_sampled_before"] = evaluate_accuracy(model, tasks, cfg.eval_n, cfg.eval_seed, temperature=1.0,
                                                        sample_seed=cfg.eval_seed, device=device)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                            foreach=False)
    rng = np.random.default_rng(cfg.seed)
    eval_rng = np.random.default_rng([cfg.seed, 1])
    eval_ids, eval_mask = _batch(replace(cfg, batch_size=256), eval_rng, tok, tasks, device)  # fixed held-out batch
    loss_curve, eval_curve = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for step in range(cfg.steps + 1):
        if step % cfg.log_every == 0 or step == cfg.steps:
            with torch.no_grad():
                eval_curve.append([step, _nll(model, eval_ids, eval_mask)])
        if step == cfg.steps:
            break
        ids, mask = _batch(cfg, rng, tok, tasks, device)
        loss = _loss(model, ids, mask)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"pretraining loss is not finite at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        opt.step()
        if step % cfg.log_every == 0:
            loss_curve.append([step, float(loss.detach())])
    info["train_seconds"] = time.perf_counter() - t0  # wall clock (inflated when other processes share the cores)
    info["train_cpu_seconds"] = time.process_time() - c0
    model.eval()
    info["loss_curve"] = loss_curve  # [step, training-batch loss]
    info["eval_loss_curve"] = eval_curve  # [step, mean NLL per token on a fixed held-out batch]
    info["loss_before"], info["loss_after"] = eval_curve[0][1], eval_curve[-1][1]
    info["accuracy_greedy_after"] = evaluate_accuracy(model, tasks, cfg.eval_n, cfg.eval_seed, device=device)
    info["accuracy_sampled_after"] = evaluate_accuracy(model, tasks, cfg.eval_n, cfg.eval_seed, temperature=1.0,
                                                       sample_seed=cfg.eval_seed, device=device)
    info["spectra_pretrained"] = _spectra(model)
    return model, info


def _loss(model: TinyGPT, ids, mask) -> torch.Tensor:
    target = mask.clone()
    target[:, 0] = False  # BOS is never predicted
    lp = sequence_logprobs(model, ids, target, mask)
    return -lp.sum() / target.sum()


def _nll(model: TinyGPT, ids, mask) -> float:
    return float(_loss(model, ids, mask))


# ----------------------------------------------------------------------------------------------------------------
# Cache


def _paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    d = Path(cache_dir)
    return d / f"pretrain-{key[:20]}.safetensors", d / f"pretrain-{key[:20]}.json"


def _save(model: TinyGPT, info: dict, wpath: Path, ipath: Path) -> None:
    wpath.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp_w, tmp_i = wpath.with_suffix(".safetensors.tmp"), ipath.with_suffix(".json.tmp")
    save_file(state, str(tmp_w), metadata={"config_hash": info["config_hash"]})
    tmp_i.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp_w, wpath)  # weights first: info present implies weights complete
    os.replace(tmp_i, ipath)


def load_pretrained(path: str | os.PathLike, cfg: PretrainConfig, device: str | torch.device = "cpu") -> TinyGPT:
    """Load cached safetensors weights into a fresh TinyGPT of ``cfg.model``; a missing/corrupt file, a pickle, or
    mismatched names/shapes raise ``CheckpointError`` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    model = TinyGPT(cfg.model, dtype=cfg.torch_dtype, device="cpu")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise CheckpointError(f"{path}: tensors do not match the model config (missing {missing}, "
                              f"unexpected {extra}, wrong shape {wrong})")
    bad_dtype = sorted(k for k, v in state.items() if v.dtype != cfg.torch_dtype)
    if bad_dtype:
        raise CheckpointError(f"{path}: tensors {bad_dtype} are not {cfg.dtype}")
    model.load_state_dict(state)
    return model.to(device)


def pretrain(
    cfg: PretrainConfig | None = None,
    cache_dir: str | os.PathLike | None = ".cache/threegate",
    *,
    device: str | torch.device = "cpu",
    force: bool = False,
) -> tuple[TinyGPT, dict[str, Any]]:
    """Pretrained model and its info dict; reuses ``cache_dir`` when the config hash matches (``info['from_cache']``
    says which). ``cache_dir=None`` disables the cache; ``force=True`` retrains and overwrites."""
    cfg = cfg or PretrainConfig.default()
    device = torch.device(device)
    key = config_hash(cfg, device)
    if cache_dir is not None:
        wpath, ipath = _paths(cache_dir, key)
        if not force and wpath.is_file() and ipath.is_file():
            try:
                info = json.loads(ipath.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{ipath}: unreadable pretraining info ({e})") from None
            if info.get("config_hash") != key:
                raise CheckpointError(f"{ipath}: config hash {info.get('config_hash')!r} != expected {key!r}")
            model = load_pretrained(wpath, cfg, device)
            model.eval()
            return model, {**info, "from_cache": True}
    with deterministic(cfg.num_threads, algorithms=device.type != "cpu"):
        model, info = _train(cfg, device)
    info = json.loads(json.dumps(info))  # the same plain-JSON form a cache hit returns (tuples -> lists)
    if cache_dir is not None:
        _save(model, info, wpath, ipath)
    return model, {**info, "from_cache": False}
