"""Checking a local Hugging Face model folder before transformers touches it: structure and finiteness, no pickle.

``check_model_folder(folder)`` runs before ``sims.hf.loading.load_causal_lm`` hands a folder to transformers, so a
bad folder is one line naming the folder, file or tensor and the problem, never a transformers / ``torch.load``
traceback (whose advice to unpickle must not reach a user):

* ``config.json`` must be a JSON object with a ``model_type``;
* the weights must be safetensors (``model.safetensors``, or the shards of ``model.safetensors.index.json``, every
  listed shard present and holding the tensors the index names). Weights that are a pickle (``pytorch_model.bin``
  and other ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.pkl``: a torch zip archive or a raw pickle) are refused
  without being opened beyond their first bytes;
* each safetensors file: the 8-byte header length, the JSON header (every entry a known dtype, a shape, and data
  offsets that match dtype x shape), the data section exactly as long as the header says (a truncated file names
  the first tensor that lies past its end);
* every floating-point tensor finite, decided on the bits: an entry is NaN or Inf iff all its exponent bits are set
  (exact for F64 / F32 / F16 / BF16; read through a memory map, a chunk at a time).

A ``.gguf`` file gets its magic bytes checked (``check_gguf_file``); its tensors are quantized, so their finiteness
is checked after loading (``check_finite_parameters``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from theory.errors import CheckpointError, NonFiniteError

__all__ = ["SAFETENSORS_FLOAT_BITS", "SAFETENSORS_ITEMSIZE", "PICKLE_SUFFIXES", "check_model_folder",
           "check_safetensors_file", "check_gguf_file", "check_finite_parameters", "weight_files"]

#: Float dtypes of safetensors -> (unsigned view, exponent mask, mantissa mask): an entry is non-finite iff
#: (bits & exponent mask) == exponent mask; NaN iff moreover (bits & mantissa mask) != 0.
SAFETENSORS_FLOAT_BITS: dict[str, tuple[str, int, int]] = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000, 0x000F_FFFF_FFFF_FFFF),
    "F32": ("<u4", 0x7F80_0000, 0x007F_FFFF),
    "F16": ("<u2", 0x7C00, 0x03FF),
    "BF16": ("<u2", 0x7F80, 0x007F),
}
#: Bytes per entry of every safetensors dtype.
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                        "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
#: Weight files that are pickles (a torch zip archive holds one): never opened beyond their magic bytes.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CHUNK = 1 << 22  # entries per finite-check chunk (bounded memory on large tensors)
_MAX_HEADER = 100 << 20  # safetensors refuses headers over 100 MB too


def _pickle_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip archive holding a pickle"
    if head[:1] == b"\x80":
        return "a raw pickle"
    return "a pickle-based format"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers would load from ``folder`` (the index's shards, else ``*.safetensors``);
    a folder whose weights are only pickles, or that has none, is a ``CheckpointError``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a shard index (a JSON object with a 'weight_map' table)") from None
        shards = sorted({folder / str(s) for s in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{folder / missing[0]}: shard listed in {index.name} is missing")
        return shards
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise CheckpointError(f"{pickles[0]}: the model's weights are {_pickle_kind(pickles[0])}; threegate loads weights only "
                              "from safetensors (or GGUF) and never unpickles")
    raise CheckpointError(f"{folder}: no model weights (no .safetensors file)")


def check_safetensors_file(path: Path, *, finite: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check one safetensors file's structure (and, with ``finite``, every float tensor's entries); returns
    ``{tensor name: (dtype, shape)}``. Raises ``CheckpointError`` (truncated or malformed) or ``NonFiniteError``
    naming the file and the tensor."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, shorter than its 8-byte header "
                                  "length)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of "
                                  f"{size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)") from None
    data_size = size - 8 - n
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or not 0 <= begin <= end or \
                end - begin != math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r}: data offsets [{begin}, {end}] do not match dtype "
                                  f"{dtype} and shape {list(shape)}")
        entries[name] = (dtype, shape, begin, end)
    past = sorted((end, name) for name, (_, _, _, end) in entries.items() if end > data_size)
    if past:
        raise CheckpointError(f"{path}: truncated: tensor {past[0][1]!r} ends at byte {past[0][0]} of the data "
                              f"section, which holds {data_size} bytes")
    used = max((end for *_, end in entries.values()), default=0)
    if used != data_size:
        raise CheckpointError(f"{path}: corrupt: the data section holds {data_size} bytes, its tensors {used}")
    if finite and entries:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,)) if data_size else None
        for name, (dtype, shape, begin, end) in entries.items():
            if dtype in SAFETENSORS_FLOAT_BITS and end > begin:
                _check_finite_bits(data[begin:end], dtype, f"{path}: tensor {name!r}")
        del data
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in entries.items()}


def _check_finite_bits(buf: np.ndarray, dtype: str, what: str) -> None:
    view, exp_mask, man_mask = SAFETENSORS_FLOAT_BITS[dtype]
    bits = buf.view(view)
    nan = inf = 0
    first = -1
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start:start + _CHUNK]
        bad = (chunk & exp_mask) == exp_mask
        if bad.any():
            is_nan = bad & ((chunk & man_mask) != 0)
            nan += int(is_nan.sum())
            inf += int(bad.sum()) - int(is_nan.sum())
            if first < 0:
                first = start + int(np.argmax(bad))
    if nan or inf:
        raise NonFiniteError(f"{what} has {nan} NaN and {inf} Inf entries (first at flat index {first})")


def check_gguf_file(path: Path) -> None:
    """A ``.gguf`` file must start with the magic bytes ``GGUF``."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic bytes {head!r}, expected b'GGUF')")


def check_model_folder(folder: Path) -> list[Path]:
    """Check a HF model folder (``config.json`` + safetensors weights) as the module docstring says; returns the
    weight files. Loads nothing; never unpickles."""
    folder = Path(folder)
    config = folder / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a HF model folder (no config.json)") from None
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{config}: not valid JSON") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CheckpointError(f"{config}: not a transformers model config (no 'model_type')")
    files = weight_files(folder)
    names: dict[str, Path] = {}
    for file in files:
        for name in check_safetensors_file(file):
            if name in names:
                raise CheckpointError(f"{file}: tensor {name!r} is also stored in {names[name].name}")
            names[name] = file
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            if names.get(name) != folder / str(shard):
                raise CheckpointError(f"{folder / str(shard)}: {index.name} lists tensor {name!r} there, which does "
                                      "not hold it")
    return files


def check_finite_parameters(named: Iterable[tuple[str, torch.Tensor]], source: Path | str) -> None:
    """Every floating-point tensor of ``named`` (``model.named_parameters()``) finite; else ``NonFiniteError``
    naming ``source`` and the tensor (for weights whose file format is checked only after decoding, e.g. GGUF)."""
    for name, t in named:
        if t.is_floating_point():
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                nan = int(torch.isnan(t.detach()).sum())
                raise NonFiniteError(f"{source}: tensor {name!r} (as loaded) has {nan} NaN and {int(bad.sum()) - nan} "
                                     f"Inf entries (first at flat index {int(bad.flatten().nonzero()[0])})")
