"""Checkpoint loading without unpickling, streaming one matrix at a time.

Formats (``open_checkpoint(path)`` picks one from the path and the file's magic bytes):

* a single ``.safetensors`` file, or a Hugging Face model folder with ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json`` (read lazily through ``safetensors.safe_open``: only the header is parsed up
  front, each tensor is read from the memory-mapped file when asked for);
* a ``.gguf`` file (or a folder holding exactly one), loaded through
  ``transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)`` with
  ``HF_HUB_OFFLINE=1``. GGUF weights are **dequantized whole** into float32 on load, so this path is for small
  models only; quantized weights (e.g. Q4_1) are recorded in ``Checkpoint.note`` because every comparison against
  them compares with a 4-bit grid, not with the original bf16 weights;
* a PyTorch ``.bin`` / ``.pt`` / ``.pth`` zip archive, only through ``torch.load(weights_only=True, mmap=True)``.
  A raw pickle (legacy torch format, ``.pkl``, ``.ckpt`` ...) is refused: it is never unpickled;
* a TRL / Hugging Face Trainer ``checkpoint-N/`` folder (its ``model.safetensors`` or sharded index; the optimizer,
  scheduler and RNG pickles beside it are never read). A run folder holding several ``checkpoint-N/`` folders is
  refused with the names of the first and the last;
* a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), merged onto its base model with
  peft's ``merge_and_unload`` (``threegate.hf_loading``; the base is ``adapter_config.json``'s
  ``base_model_name_or_path`` when that is a local folder, else ``adapter_base=``);
* in memory: a ``{name: tensor}`` mapping or an ``nn.Module`` (its ``state_dict()``; tied weights once), through
  ``as_checkpoint`` (used by the Python API ``threegate.compare``).

Comparing two 8B checkpoints holds one matrix of each in memory at a time: ``select_names`` picks the names
(``only`` regex, 2-D, **model order**: embeddings, then layer 0, 1, 2, ..., 10 numerically and within a layer the
``theory.naming.MATRIX_TYPES`` order, then the rest), checks that the selected names exist with equal shapes on every
side (a tensor outside the selection may be missing; ``shared_only`` keeps the names every side has), and
``iter_matched`` yields ``(name, [tensor_0, tensor_1, ...])`` one name at a time.

Every error is a ``theory.errors`` class with a one-line message naming the file and, where there is one, the
tensor.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from theory.errors import CheckpointError, InputError, NonFiniteError, ShapeMismatchError, ThreegateError
from theory.naming import MATRIX_TYPES, layer_index, matrix_type
from sims.hf.loading import gguf_quant_types, smollm2_gguf_path  # noqa: F401  (smollm2_gguf_path re-exported)
from threegate.hf_loading import load_gguf_state_dict, merge_adapter

__all__ = [
    "Checkpoint",
    "StateDictCheckpoint",
    "open_checkpoint",
    "as_checkpoint",
    "iter_matched",
    "select_names",
    "model_order",
    "save_safetensors",
    "smollm2_gguf_path",
    "FLOAT_DTYPES",
]

#: dtypes a weight comparison accepts (everything else is refused with the dtype named).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PICKLE_MAGIC = b"\x80"  # PROTO opcode: every pickle of protocol >= 2 starts with it
_ZIP_MAGIC = b"PK\x03\x04"
_GGUF_MAGIC = b"GGUF"
_TORCH_SUFFIXES = {".bin", ".pt", ".pth"}
_PICKLE_SUFFIXES = {".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
#: files a Trainer writes beside the weights in checkpoint-N/ (never read: they are not weights)
_TRAINER_STATE = re.compile(r"^(optimizer|scheduler|scaler|training_args|rng_state(_\d+)?)\.(pt|pth|bin)$")


# ----------------------------------------------------------------------------------------------- Checkpoint


class Checkpoint:
    """A read-only set of named tensors; tensors are read one at a time by ``get``.

    Subclasses fill ``_index: name -> (file, shape, dtype)`` from headers and implement ``_read(name)``.
    ``note`` carries what a report must say about the source (e.g. "GGUF Q4_1, dequantized to float32").
    """

    format: str = "?"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.note = ""
        self._index: dict[str, tuple[Path, tuple[int, ...], torch.dtype | str]] = {}

    # -- metadata (headers only)
    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def file_of(self, name: str) -> Path:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype | str:
        """torch dtype, or the raw dtype string for one torch cannot represent."""
        return self._entry(name)[2]

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def _entry(self, name: str) -> tuple[Path, tuple[int, ...], torch.dtype | str]:
        try:
            return self._index[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    # -- data
    def get(self, name: str, *, check_finite: bool = True, float_only: bool = True) -> torch.Tensor:
        """Read one tensor (CPU, its stored dtype). Refuses a non-float dtype and NaN/Inf entries, naming both."""
        file, _, dtype = self._entry(name)
        if float_only and dtype not in FLOAT_DTYPES:
            raise InputError(
                f"{file}: tensor {name!r} has unsupported dtype {_dtype_str(dtype)} "
                f"(weights must be float64/float32/float16/bfloat16; dequantize first)"
            )
        try:
            t = self._read(name)
        except ThreegateError:
            raise
        except Exception as e:  # a header that parsed but data that does not
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({_one_line(e)})") from None
        if check_finite and t.is_floating_point():
            bad = int(t.numel() - torch.isfinite(t).sum().item())
            if bad:
                raise NonFiniteError(f"{file}: tensor {name!r} has {bad} non-finite entries (NaN or Inf)")
        return t

    def _read(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        extra = f", note={self.note!r}" if self.note else ""
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors{extra})"


class SafetensorsCheckpoint(Checkpoint):
    """One or several ``.safetensors`` files, read lazily with ``safe_open`` (memory-mapped)."""

    format = "safetensors"

    def __init__(self, path: Path, files: Sequence[Path], weight_map: Mapping[str, str] | None = None) -> None:
        super().__init__(path)
        self._handles: dict[Path, object] = {}
        for file in files:
            _refuse_pickle_bytes(file)
            try:
                handle = safe_open(str(file), framework="pt")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: file not found") from None
            except Exception as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None
            self._handles[file] = handle
            for name in handle.keys():
                if name in self._index:
                    raise CheckpointError(f"{file}: tensor {name!r} also stored in {self._index[name][0]}")
                sl = handle.get_slice(name)
                raw = sl.get_dtype()
                self._index[name] = (file, tuple(int(d) for d in sl.get_shape()), _SAFETENSORS_DTYPES.get(raw, raw))
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self._index:
                    raise CheckpointError(f"{path}: index lists tensor {name!r} in {shard}, which does not hold it")

    def _read(self, name: str) -> torch.Tensor:
        file = self._index[name][0]
        return self._handles[file].get_tensor(name)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._handles.clear()


class TorchZipCheckpoint(Checkpoint):
    """A PyTorch zip archive, loaded with ``torch.load(weights_only=True, mmap=True)``: tensors stay on disk."""

    format = "torch"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        _refuse_pickle_bytes(path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except Exception as e:
            raise CheckpointError(
                f"{path}: refused by torch.load(weights_only=True), not a plain tensor state dict "
                f"({_weights_only_reason(e)})"
            ) from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a name -> tensor mapping")
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in obj.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            self._tensors[str(name)] = t
            self._index[str(name)] = (self.path, tuple(t.shape), t.dtype)

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class GGUFCheckpoint(Checkpoint):
    """A GGUF file through transformers (dequantized whole to float32 on open; HF tensor names)."""

    format = "gguf"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tensors = dict(load_gguf_state_dict(str(path)))
        for name, t in self._tensors.items():
            self._index[name] = (self.path, tuple(t.shape), t.dtype)
        self.quant_types = dict(gguf_quant_types(str(path)))
        quantized = {k: v for k, v in self.quant_types.items() if k not in ("F32", "F16", "BF16", "F64")}
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(self.quant_types.items(), key=lambda kv: -kv[1]))
        self.note = (
            f"GGUF dequantized to float32 ({kinds})"
            + ("; weights were quantized, so values lie on the quantization grid, not the original bf16 weights"
               if quantized else "")
        )

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class StateDictCheckpoint(Checkpoint):
    """Tensors already in memory: a ``{name: tensor}`` mapping or an ``nn.Module``'s ``state_dict()``.

    Tensors are detached and kept where they are (CPU or a GPU). Tied weights (one storage under two names, e.g.
    ``lm_head.weight`` = ``model.embed_tokens.weight``) are listed once, under the first name, as Hugging Face
    safetensors files store them. ``label`` names the source in messages and run labels.
    """

    format = "memory"

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "state_dict") -> None:
        super().__init__(Path(label))
        self._tensors: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, int]] = set()
        for name, t in tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise InputError(f"{label}: entry {name!r} is not a (str, tensor) pair")
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if t.numel() and key in seen:
                continue
            seen.add(key)
            self._tensors[name] = t.detach()
            self._index[name] = (self.path, tuple(t.shape), t.dtype)

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


# ----------------------------------------------------------------------------------------------- opening


def open_checkpoint(path: str | os.PathLike[str], *, adapter_base: str | os.PathLike[str] | None = None) -> Checkpoint:
    """Open a checkpoint file or folder (see the module docstring). Nothing is unpickled.

    ``adapter_base``: the base model folder a PEFT adapter folder is merged onto, when its ``adapter_config.json``
    does not name a local folder.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: file not found")
    if p.is_dir():
        return _open_folder(p, adapter_base)
    return _open_file(p)


def as_checkpoint(x: Any, *, label: str = "state_dict", adapter_base: str | os.PathLike[str] | None = None) -> Checkpoint:
    """A ``Checkpoint`` from a path, an open ``Checkpoint``, a ``{name: tensor}`` mapping or an ``nn.Module``."""
    if isinstance(x, Checkpoint):
        return x
    if isinstance(x, (str, os.PathLike)):
        return open_checkpoint(x, adapter_base=adapter_base)
    if isinstance(x, torch.nn.Module):
        return StateDictCheckpoint(x.state_dict(), label=label if label != "state_dict" else type(x).__name__)
    if isinstance(x, Mapping):
        return StateDictCheckpoint(x, label=label)
    raise InputError(f"{label}: expected a path, a Checkpoint, a state dict or an nn.Module, got {type(x).__name__}")


def _open_folder(p: Path, adapter_base: str | os.PathLike[str] | None = None) -> Checkpoint:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({_one_line(e)})") from None
        shards = sorted({p / s for s in weight_map.values()})
        for s in shards:
            if not s.is_file():
                raise CheckpointError(f"{s}: shard listed in {index.name} not found")
        ck = SafetensorsCheckpoint(p, shards, weight_map)
        ck.format = "safetensors-sharded"
        return ck
    if (p / "model.safetensors").is_file():  # a model folder or a Trainer checkpoint-N/ folder
        return SafetensorsCheckpoint(p, [p / "model.safetensors"])
    if (p / "adapter_config.json").is_file():
        tensors, note = merge_adapter(p, adapter_base)
        ck = StateDictCheckpoint(dict(tensors), label=str(p))
        ck.format, ck.note = "peft-merged", note
        return ck
    st = sorted(p.glob("*.safetensors"))
    if st:
        return SafetensorsCheckpoint(p, st)
    gg = sorted(p.glob("*.gguf"))
    if len(gg) == 1:
        return GGUFCheckpoint(gg[0])
    if len(gg) > 1:
        raise CheckpointError(f"{p}: holds {len(gg)} .gguf files; name one of them")
    bins = sorted(q for q in p.iterdir() if q.suffix in _TORCH_SUFFIXES and not _TRAINER_STATE.match(q.name))
    if len(bins) == 1:
        return TorchZipCheckpoint(bins[0])
    if len(bins) > 1:
        raise CheckpointError(f"{p}: sharded PyTorch checkpoints are not supported; convert to safetensors")
    runs = sorted((q for q in p.glob("checkpoint-*") if q.is_dir() and q.name[11:].isdigit()),
                  key=lambda q: int(q.name[11:]))
    if runs:
        raise CheckpointError(f"{p}: a training run folder with {len(runs)} checkpoint folders "
                              f"({runs[0].name} ... {runs[-1].name}); name one of them")
    raise CheckpointError(f"{p}: no .safetensors, .gguf or .bin/.pt weights in this folder")


def _open_file(p: Path) -> Checkpoint:
    suffix = p.suffix.lower()
    head = _head(p)
    if suffix == ".safetensors":
        return SafetensorsCheckpoint(p, [p])
    if suffix == ".gguf" or head.startswith(_GGUF_MAGIC):
        if not head.startswith(_GGUF_MAGIC):
            raise CheckpointError(f"{p}: not a GGUF file (magic bytes {head[:4]!r}, expected b'GGUF')")
        return GGUFCheckpoint(p)
    if suffix in _PICKLE_SUFFIXES or (_looks_like_pickle(head) and not _looks_like_safetensors(p)):
        raise CheckpointError(f"{p}: pickle file refused (pickles can run code); convert it to safetensors")
    if suffix in _TORCH_SUFFIXES:
        return TorchZipCheckpoint(p)
    if suffix == ".json" and p.name.endswith(".index.json"):
        return _open_folder(p.parent)
    raise CheckpointError(
        f"{p}: unsupported checkpoint format {suffix or '(no extension)'!r}; "
        f"use .safetensors, .gguf, a zip .bin/.pt, or a model folder"
    )


def _head(p: Path, n: int = 8) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror})") from None


def _looks_like_safetensors(p: Path) -> bool:
    """safetensors layout: u64 little-endian header length n, then a JSON header starting with '{' that fits."""
    head = _head(p, 9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + n <= p.stat().st_size


def _looks_like_pickle(head: bytes) -> bool:
    """Pickle protocol 2-5 starts with PROTO (0x80) and the protocol number."""
    return len(head) >= 2 and head[:1] == _PICKLE_MAGIC and 2 <= head[1] <= 5


def _refuse_pickle_bytes(p: Path) -> None:
    """A raw pickle is refused whatever its name (legacy ``torch.save`` files are raw pickles).

    A safetensors file whose header length happens to start with bytes 0x80 0x02..0x05 is not mistaken for one:
    the safetensors layout is recognised first.
    """
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found")
    head = _head(p)
    if _looks_like_pickle(head) and not _looks_like_safetensors(p):
        raise CheckpointError(f"{p}: pickle file refused (pickles can run code); convert it to safetensors")
    if p.suffix.lower() in _TORCH_SUFFIXES and not head.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"{p}: not a PyTorch zip archive (magic bytes {head[:4]!r}); refused")


def _natural(name: str) -> tuple:
    """Sort key that orders embedded integers numerically (``experts.2`` before ``experts.10``)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _model_order_key(name: str) -> tuple:
    layer = layer_index(name)
    mtype = matrix_type(name)
    type_rank = MATRIX_TYPES.index(mtype) if mtype in MATRIX_TYPES else len(MATRIX_TYPES)
    group = 1 if layer is not None else (0 if "embed" in name else 2)
    return (group, -1 if layer is None else layer, type_rank, _natural(name))


def model_order(names: Iterable[str]) -> list[str]:
    """Names in model order: embeddings, then layers 0, 1, 2, ..., 10 (numerically), each in the
    ``theory.naming.MATRIX_TYPES`` order (q, k, v, o, up, gate, down, then the rest), then everything else.

    Examples
    --------
    >>> model_order(["model.layers.10.mlp.up_proj.weight", "lm_head.weight", "model.layers.2.self_attn.q_proj.weight",
    ...              "model.embed_tokens.weight", "model.layers.2.mlp.down_proj.weight"])  # doctest: +NORMALIZE_WHITESPACE
    ['model.embed_tokens.weight', 'model.layers.2.self_attn.q_proj.weight', 'model.layers.2.mlp.down_proj.weight',
     'model.layers.10.mlp.up_proj.weight', 'lm_head.weight']
    """
    return sorted(names, key=_model_order_key)


def iter_matched(
    checkpoints: Sequence[Checkpoint],
    *,
    names: Iterable[str] | None = None,
    only: str | None = None,
    matrices_only: bool = True,
    max_matrices: int | None = None,
    check_finite: bool = True,
    shared_only: bool = False,
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Yield ``(name, [t_0, t_1, ...])`` for each selected name (``select_names``), one name at a time (one matrix
    per checkpoint in RAM). Names, shapes and dtypes are validated from headers before any data is read."""
    selected = select_names(checkpoints, names=names, only=only, matrices_only=matrices_only,
                            max_matrices=max_matrices, shared_only=shared_only)
    for name in selected:
        yield name, [ck.get(name, check_finite=check_finite) for ck in checkpoints]


def select_names(
    checkpoints: Sequence[Checkpoint],
    *,
    names: Iterable[str] | None = None,
    only: str | None = None,
    matrices_only: bool = True,
    max_matrices: int | None = None,
    shared_only: bool = False,
    notes: list[str] | None = None,
    show: int = 5,
) -> list[str]:
    """The names ``iter_matched`` visits, in model order (``model_order``; explicit ``names`` keep their order).

    The selection is made on the first checkpoint (the base): its names matching ``only`` (``re.search``), 2-D when
    ``matrices_only``. Only the selected names must exist on every other side, with the same shape: a tensor outside
    the selection may be missing anywhere. A selected name missing on a side raises ``ShapeMismatchError`` listing up
    to ``show`` of them (and the names only that side has), unless ``shared_only``, which drops them. ``max_matrices``
    then keeps the first N. Appended to ``notes`` (when given): dropped names, names only a tuned side has, and
    dtypes that differ between the sides.
    """
    if len(checkpoints) < 2:
        raise InputError(f"need at least two checkpoints to match, got {len(checkpoints)}")
    base = checkpoints[0]
    pattern = None
    if only is not None:
        try:
            pattern = re.compile(only)
        except re.error as e:
            raise InputError(f"--only {only!r}: not a valid regular expression ({e})") from None

    def wanted(ck: Checkpoint, n: str) -> bool:
        return (pattern is None or bool(pattern.search(n))) and (not matrices_only or len(ck.shape(n)) == 2)

    if names is not None:
        chosen = list(names)
        missing = [n for n in chosen if n not in base]
        if missing:
            raise CheckpointError(f"{base.path}: no tensor named {missing[0]!r}")
        chosen = [n for n in chosen if wanted(base, n)]
    else:
        chosen = model_order(n for n in base.names() if wanted(base, n))
    notes = notes if notes is not None else []
    if max_matrices is not None and max_matrices < 0:
        raise InputError(f"max_matrices must be >= 0, got {max_matrices}")
    if shared_only:
        for other in checkpoints[1:]:
            absent = [n for n in chosen if n not in other]
            if absent:
                notes.append(f"{other.path.name}: {len(absent)} selected tensor(s) absent, not compared "
                             f"({_few(absent, 3)})")
                chosen = [n for n in chosen if n in other]
    if max_matrices is not None:
        chosen = chosen[:max_matrices]
    for other in checkpoints[1:]:
        absent = [n for n in chosen if n not in other]
        extra = model_order(n for n in other.names() if n not in base and wanted(other, n))
        if absent:
            raise ShapeMismatchError(
                f"tensor names differ: {len(absent)} selected tensor(s) missing in {other.path} "
                f"({_few(absent, show)}); {len(extra)} only in {other.path} ({_few(extra, show)}); "
                f"--shared-only compares the names every side has"
            )
        if extra:
            notes.append(f"{other.path.name}: {len(extra)} tensor(s) not in the base, not compared ({_few(extra, 3)})")
        for name in chosen:
            if base.shape(name) != other.shape(name):
                raise ShapeMismatchError(
                    f"tensor {name!r}: shape {base.shape(name)} in {base.file_of(name)} "
                    f"but {other.shape(name)} in {other.file_of(name)}"
                )
        pairs = collections.Counter((_dtype_str(base.dtype(n)), _dtype_str(other.dtype(n))) for n in chosen)
        for (d0, d1), count in sorted(pairs.items()):
            if d0 != d1:
                notes.append(f"dtypes differ on {count} tensor(s): {d0} in {base.path.name}, {d1} in "
                             f"{other.path.name} (the update mask compares both rounded to bf16)")
    return chosen


# ----------------------------------------------------------------------------------------------- saving


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` to one ``.safetensors`` file atomically (temp file + rename).

    Tensors are moved to CPU and made contiguous; tensors that share storage (tied weights) are cloned so that
    safetensors accepts them. Returns the path.
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        raise InputError(f"{p}: a safetensors checkpoint must end in .safetensors")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InputError(f"{p}: entry {name!r} is not a (str, tensor) pair")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".safetensors.tmp")
    os.close(fd)
    try:
        save_file(out, tmp, metadata=dict(metadata) if metadata else None)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


# ----------------------------------------------------------------------------------------------- helpers


def _few(items: Sequence[str], n: int) -> str:
    if not items:
        return "none"
    s = ", ".join(items[:n])
    return s + (f", ... {len(items) - n} more" if len(items) > n else "")


def _dtype_str(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


def _weights_only_reason(e: BaseException) -> str:
    """The useful clause of torch's long weights_only error (e.g. 'Unsupported global: GLOBAL __main__.Foo')."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
    m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\. Please|$)", text)
    return (m.group(1) if m else text)[:200]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
