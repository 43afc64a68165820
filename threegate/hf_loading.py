"""Checkpoints that only transformers (and peft) can read: GGUF files and PEFT adapter folders.

transformers and peft are imported inside the functions (heavy: seconds), so ``threegate.checkpoints`` stays light.
Every failure is a ``CheckpointError`` naming the file or folder; nothing is unpickled (``use_safetensors=True``).

* ``load_gguf_state_dict(path)``: a GGUF file dequantized to float32 by
  ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)``.
* ``merge_adapter(folder, adapter_base)``: a PEFT adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) merged onto its base model with peft's ``merge_and_unload``. The base is
  ``adapter_base`` when given, else ``adapter_config.json``'s ``base_model_name_or_path`` if that is a local folder
  (a hub id is refused: everything here runs offline). The base folder must hold safetensors weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from sims.hf.loading import hub_offline, transformers_quiet
from theory.errors import CheckpointError

__all__ = ["quiet_transformers", "load_gguf_state_dict", "merge_adapter"]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level, its progress bars off (the GGUF dequantize bar included) and the hub
    offline inside the block, restored on exit (``sims.hf.loading``'s context managers)."""
    with transformers_quiet(), hub_offline():
        yield


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[tuple[str, torch.Tensor], ...]:
    """Tied weights (lm_head = embed_tokens) once, under the first name, as HF safetensors files store them."""
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out.append((name, t.detach()))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def load_gguf_state_dict(path: str) -> tuple[tuple[str, torch.Tensor], ...]:
    """Dequantized state dict of a GGUF file (cached: a small model loads once per process; never the hub)."""
    from transformers import AutoModelForCausalLM  # heavy: only when a GGUF file is compared

    folder, fname = os.path.split(os.path.abspath(path))
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: transformers cannot load this GGUF file ({_one_line(e)[:200]})") from None
    return _dedupe_tied(model.state_dict())


def _adapter_base(folder: Path, cfg: dict, adapter_base: str | os.PathLike[str] | None) -> Path:
    named = cfg.get("base_model_name_or_path")
    if adapter_base is not None:
        base = Path(adapter_base)
    elif isinstance(named, str) and named and Path(named).is_dir():
        base = Path(named)
    else:
        raise CheckpointError(f"{folder / 'adapter_config.json'}: base_model_name_or_path {named!r} is not a local "
                              f"folder; name the base model folder with --adapter-base")
    if not base.is_dir() or not (base / "config.json").is_file():
        raise CheckpointError(f"{base}: not a model folder (no config.json) to merge the adapter {folder} onto")
    if not ((base / "model.safetensors").is_file() or (base / "model.safetensors.index.json").is_file()):
        raise CheckpointError(f"{base}: the base model's weights must be safetensors (model.safetensors or a "
                              f"sharded index); pickled weights are never loaded")
    return base


def merge_adapter(folder: str | os.PathLike[str], adapter_base: str | os.PathLike[str] | None = None
                  ) -> tuple[tuple[tuple[str, torch.Tensor], ...], str]:
    """``(merged state dict items, note)`` of a PEFT adapter folder merged onto its base (see the module docstring).

    The merged weights are peft's: ``merge_and_unload()`` adds ``scaling * B @ A`` to each adapted base weight in
    the base model's dtype. The note names the adapter type, rank, base folder and peft version.
    """
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable adapter config ({_one_line(e)})") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise CheckpointError(f"{folder / 'adapter_model.bin'}: pickled adapter weights are refused; save the "
                                  f"adapter as adapter_model.safetensors")
        raise CheckpointError(f"{weights}: file not found (a PEFT adapter folder holds adapter_config.json and "
                              f"adapter_model.safetensors)")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            list(fh.keys())
    except Exception as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({_one_line(e)})") from None
    base = _adapter_base(folder, cfg, adapter_base)
    import peft  # heavy (peft, transformers): only when an adapter folder is compared
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", local_files_only=True,
                                                         use_safetensors=True)
            merged = PeftModel.from_pretrained(model, str(folder), is_trainable=False).merge_and_unload()
    except Exception as e:
        raise CheckpointError(f"{folder}: peft cannot merge this adapter onto {base} ({_one_line(e)[:200]})") from None
    note = (f"PEFT {cfg.get('peft_type', '?')} adapter (r={cfg.get('r', '?')}) merged onto {base} with peft "
            f"{peft.__version__} merge_and_unload")
    return _dedupe_tied(merged.state_dict()), note
