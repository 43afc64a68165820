"""Real Hugging Face causal LMs: completion log-probabilities, and the ``hf_rlvr`` / ``hf_sft`` experiments
(``threegate run`` and the sweep cells), trained on TRL by ``sims.hf.trl_runs``.

* ``completion_log_softmax`` / ``completion_logprobs``: log pi(. | prefix) at the completion positions of
  left-padded sequences (``sims.hf.fisher`` differentiates them along an update).
* ``hf_rlvr`` / ``hf_sft``: the config sections ``[hf_rlvr]`` (``HFRLConfig``) and ``[hf_sft]`` (``HFSFTConfig``),
  with ``preset`` = ``cpu_smoke`` (default) | ``paper`` | ``default``; the model is loaded by
  ``sims.hf.loading`` (offline; default the SmolLM2-135M GGUF). ``run_hf_rlvr`` / ``run_hf_sft`` take
  ``trainer_callbacks``, a function ``(out_dir, config, run_name) -> [TrainerCallback, ...]``: ``threegate run``
  passes one that attaches ``threegate.ThreeGateCallback`` (per-step bf16 counts, snapshots and their analysis in
  the run folder); sims never imports threegate. Adapter runs (LoRA / PiSSA) get no live callback (it would count
  the adapter factors): their tables compare the merged weights with the base, from the run's two snapshots.
* ``run_cell``: one sweep cell with a flat config (``cell_config``), without callbacks: the tables from the base
  and final stored weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sims.experiments.config import Section, check_value, resolve_section, section_config
from sims.hf.loading import LoadedLM, cached_causal_lm
from sims.hf.trl_runs import HFRLConfig, HFRunResult, HFSFTConfig, train_hf_rlvr, train_hf_sft
from sims.tables import summary_tables
from sims.tinygpt.probe import RunResult
from theory.errors import InputError

__all__ = [
    "completion_log_softmax",
    "completion_logprobs",
    "TrainerCallbacks",
    "SECTIONS",
    "cell_config",
    "run_cell",
    "run_hf_rlvr",
    "run_hf_sft",
]

#: ``(out_dir, run config, run name) -> callbacks`` for the trainer of a ``threegate run`` experiment
TrainerCallbacks = Callable[[Path, Any, str], Sequence[Any]]


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities of completions (left-padded prompts, explicit position ids)


def positions_skipping_left_padding(attn: Tensor) -> Tensor:
    """Position ids that skip left padding: the i-th real token of a row is at position i."""
    return (attn.long().cumsum(-1) - 1).clamp_min(0)


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
    out = model(input_ids=sequences, attention_mask=attention_mask.long(), position_ids=positions_skipping_left_padding(attention_mask),
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
# ``threegate run hf_rlvr / hf_sft`` and sweep cells


_PRESETS = ("cpu_smoke", "paper", "default")  # ``preset`` = cpu_smoke (default) | paper | default (dataclass defaults)
#: The config sections of ``threegate run hf_rlvr`` / ``hf_sft`` (top-level ``seed`` / ``device`` override them).
SECTIONS = {
    "hf_rlvr": Section(HFRLConfig, presets=_PRESETS, default="cpu_smoke", forced=("seed", "device")),
    "hf_sft": Section(HFSFTConfig, presets=_PRESETS, default="cpu_smoke", forced=("seed", "device")),
}


def _load_for(cfg) -> LoadedLM:
    """A fresh copy of the base model and tokenizer (the loaded ones are cached per process: SmolLM2 takes ~30 s to
    dequantize; the run sets the tokenizer's padding side)."""
    base = cached_causal_lm(cfg.model, cfg.gguf_file)
    return LoadedLM(copy.deepcopy(base.model), copy.deepcopy(base.tokenizer), base.note)


def _train(cfg: HFRLConfig | HFSFTConfig, *, run_name: str, out_dir: Path | None = None,
           trainer_callbacks: TrainerCallbacks | None = None) -> HFRunResult:
    """Load, attach the caller's callbacks (full fine-tuning only), train on TRL. With callbacks the run keeps no
    snapshots of its own (the callback writes them)."""
    lm = _load_for(cfg)
    live = trainer_callbacks is not None and out_dir is not None and cfg.adapter == "none"
    callbacks = list(trainer_callbacks(Path(out_dir), cfg, run_name)) if live else []
    train = train_hf_rlvr if isinstance(cfg, HFRLConfig) else train_hf_sft
    return train(lm.model, lm.tokenizer, cfg, callbacks=callbacks, run_name=run_name, model_note=lm.note,
                 keep_snapshots=not live)


def cell_config(cfg: Mapping[str, Any]) -> HFRLConfig | HFSFTConfig:
    """The run config of a sweep cell's *flat* config (see ``run_cell``), every key type-checked; loads nothing."""
    cell = dict(cfg)
    algorithm = cell.pop("algorithm", "grpo")
    if algorithm not in ("grpo", "dapo", "sft"):
        raise InputError(f"[cell] algorithm: expected one of ['grpo', 'dapo', 'sft'], got {algorithm!r}")
    if "eps" in cell:
        eps = check_value(cell.pop("eps"), float, "[cell] eps")
        cell.setdefault("epsilon", eps)
        cell.setdefault("epsilon_high", 1.4 * eps if algorithm == "dapo" else eps)
    if algorithm == "sft":
        for key in ("beta", "epsilon", "epsilon_high"):
            cell.pop(key, None)
        return section_config(HFSFTConfig, cell, where="cell", presets=_PRESETS, default="cpu_smoke")
    return section_config(HFRLConfig, {**cell, "loss_type": algorithm}, where="cell", presets=_PRESETS,
                          default="cpu_smoke")


def run_cell(cfg: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """One sweep cell: the ``history``, ``rollouts`` (RL), ``sparsity``, ``spectrum`` and ``angles`` tables of one
    TRL run (base vs final stored weights).

    Keys: ``algorithm`` (``grpo`` | ``dapo``: TRL's loss_type; ``sft``), ``eps`` (epsilon; epsilon_high = 1.4 eps
    for dapo, eps otherwise, unless ``epsilon_high`` is given), ``preset`` (cpu_smoke | paper | default), and any
    field of ``HFRLConfig`` / ``HFSFTConfig`` (``model``, ``lr``, ``beta``, ``steps``, ``seed``, ``device``, ...)."""
    c = cell_config(cfg)
    res = _train(c, run_name="hf_sft" if isinstance(c, HFSFTConfig) else "hf_rlvr")
    return {"history": res.history, **res.tables, **summary_tables([res])}


def run_hf_rlvr(cfg: Mapping[str, Any], *, out_dir: Path | None = None,
                trainer_callbacks: TrainerCallbacks | None = None) -> list[RunResult]:
    """RLVR (GRPO / DAPO on TRL) on a real HF causal LM (default SmolLM2-135M GGUF, offline); [hf_rlvr] section."""
    c = resolve_section(SECTIONS["hf_rlvr"], cfg, "hf_rlvr")[0]
    return [_train(c, run_name="hf_rlvr", out_dir=out_dir, trainer_callbacks=trainer_callbacks)]


def run_hf_sft(cfg: Mapping[str, Any], *, out_dir: Path | None = None,
               trainer_callbacks: TrainerCallbacks | None = None) -> list[RunResult]:
    """SFT (TRL SFTTrainer) on worked solutions on a real HF causal LM (default SmolLM2 GGUF); [hf_sft] section."""
    c = resolve_section(SECTIONS["hf_sft"], cfg, "hf_sft")[0]
    return [_train(c, run_name="hf_sft", out_dir=out_dir, trainer_callbacks=trainer_callbacks)]
