"""One fused pass for the bf16 probe (Def. 2.1 at ``eta < 2**-8``): change counts and update masks.

At every ``eta < 2**-8`` (the paper's 1e-3 included) an entry is *changed* iff the two bf16 bit patterns differ
and are not the two zeros ``+0`` / ``-0`` (``theory.metrics``, Prop. E.3 sharpened). This module is the one home
of that pass; ``theory.metrics`` (``bf16_changed_count``, ``update_mask``, ``bf16_unchanged``), ``threegate
compare``, ``threegate bench`` and the live-run callback call it.

Inputs ``a, b`` are torch tensors of one shape holding bf16 values, as

* ``torch.bfloat16`` tensors,
* ``torch.int16`` tensors: bf16 **bit patterns** (a snapshot kept as ``w.view(torch.int16)``),
* ``torch.float32`` tensors: fp32 master weights, rounded to bf16 inside the pass exactly as
  ``Tensor.to(torch.bfloat16)`` rounds them (round to nearest, ties to even; overflow to Inf),
* any other float dtype: rounded eagerly by ``Tensor.to(torch.bfloat16)`` first (float64 goes through float32
  there, as ``theory.metrics.to_bf16`` documents).

Exactness: the count equals the integer-bit oracle ``#{i: bits differ and (a_i | b_i) & 0x7FFF != 0}`` for every
pair of finite patterns, subnormals included. NaN and Inf (exponent bits all ones, before or after the rounding)
are detected in the same pass and raise ``NonFiniteError`` naming the side and the count; no count or mask is
returned then, so a NaN payload can never be counted as a change.

Backends (``backend=``):

* ``"blocked"``: numpy's vectorised int16 kernels over cache-sized blocks (``BLOCK`` entries): compare, count,
  Inf/NaN test and the ``-0`` fix-up while the block is in cache. CPU only.
* ``"compiled"``: ``torch.compile`` of the int16-view compare (``_count_pass`` / ``_mask_pass``): Triton on CUDA,
  inductor's C++ on CPU. The first call compiles (seconds, cached on disk by inductor); a compile that fails
  falls back to ``"eager"`` and the reason is kept in ``kernel_info()``.
* ``"eager"``: the same two functions run by torch op by op (several passes; the reference for the compiled one).
* ``"auto"``: ``"blocked"`` on CPU, ``"compiled"`` elsewhere. Measured with ``threegate bench`` (one thread, this
  repository's 2-core machine, torch 2.13 CPU): inductor does not vectorise int16 loads (a scalar loop, ~1.4-2.5
  GB/s) while the blocked numpy pass runs at ~0.9 of ``memcpy`` bandwidth; on an H200 the issue measured the
  compiled int16 compare at 3826 GB/s against a 4218 GB/s copy (eager ``ne().sum()``: 662).

Host synchronisation: one per call (the count and the Inf/NaN flag come back together).

Examples
--------
>>> import torch
>>> a = torch.tensor([1.0, 0.0, -0.0, 2.0], dtype=torch.bfloat16)
>>> b = torch.tensor([1.0, -0.0, 0.0, 2.015625], dtype=torch.bfloat16)  # 2 + 2**-6: the next bf16 after 2
>>> changed_count(a, b)
1
>>> changed_mask(a, b).tolist()
[False, False, False, True]
>>> masters = torch.tensor([1.0, 2.0]) + 2.0**-12  # fp32: rounds back to 1 and 2 in bf16
>>> changed_count(masters, torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
0
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from theory.errors import InputError, NonFiniteError, ShapeMismatchError

__all__ = ["changed_count", "changed_mask", "kernel_info", "BLOCK", "BACKENDS"]

BACKENDS = ("auto", "blocked", "compiled", "eager")
#: int16 entries per block of the CPU pass: two blocks (1 MiB) stay in cache through its reductions.
BLOCK = 1 << 18

_EXP = 0x7F80  # bf16 exponent bits: all ones = Inf/NaN
_MAG = 0x7FFF  # everything but the sign bit
_NEG_ZERO = -32768  # 0x8000 as int16
_KERNEL_DTYPES = (torch.bfloat16, torch.int16, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# the pass, as torch functions (compiled on request, or run eagerly)
# ----------------------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """int16 bf16 bit patterns of a bf16 / int16 / float32 tensor (float32 rounded as ``Tensor.to`` rounds)."""
    if t.dtype == torch.float32:
        t = t.to(torch.bfloat16)
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _differ_and_bad(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _bits(a), _bits(b)
    differ = (x != y) & (((x | y) & _MAG) != 0)
    bad = ((x & _EXP) == _EXP) | ((y & _EXP) == _EXP)
    return differ, bad


def _count_pass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[#changed, #entries with an Inf/NaN on either side]`` (int64, on the inputs' device)."""
    differ, bad = _differ_and_bad(a, b)
    return torch.stack([differ.sum(), bad.sum()])


def _mask_pass(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The update mask and the Inf/NaN count."""
    differ, bad = _differ_and_bad(a, b)
    return differ, bad.sum()


_COMPILED: dict[str, Callable[..., Any]] = {}
_COMPILE_ERROR: list[str] = []


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """``torch.compile(fn)`` (dynamic shapes: one compilation serves every matrix size), or None after a failure."""
    if _COMPILE_ERROR:
        return None
    if fn.__name__ not in _COMPILED:
        try:
            _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
        except Exception as e:  # e.g. a platform without a compiler back end
            _COMPILE_ERROR.append(f"{type(e).__name__}: {e}"[:300])
            return None
    return _COMPILED[fn.__name__]


def _run(fn: Callable[..., Any], backend: str, a: torch.Tensor, b: torch.Tensor):
    if backend == "compiled":
        cf = _compiled(fn)
        if cf is not None:
            try:
                return cf(a, b)
            except Exception as e:  # compilation happens on the first call; any failure there -> eager
                _COMPILE_ERROR.append(f"{type(e).__name__}: {' '.join(str(e).split())}"[:300])
    return fn(a, b)


def kernel_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Which backend ``"auto"`` uses on ``device``, and why a compiled pass is not in use (if so)."""
    auto = _auto_backend(torch.device(device))
    return {"device": str(device), "auto": auto, "compile_error": _COMPILE_ERROR[0] if _COMPILE_ERROR else None,
            "block": BLOCK}


def _auto_backend(device: torch.device) -> str:
    return "blocked" if device.type == "cpu" else "compiled"


# ----------------------------------------------------------------------------------------------------------------
# the CPU pass: numpy int16 kernels, block by block
# ----------------------------------------------------------------------------------------------------------------


def _np_bits(t: torch.Tensor) -> np.ndarray:
    return _bits(t).numpy()


def _block_has_nonfinite(x: np.ndarray) -> bool:
    """Inf/NaN by two reductions: as int16, positive Inf/NaN lie in [0x7F80, 0x7FFF] (top of the signed range),
    negative ones in [0xFF80, 0xFFFF] (top of the unsigned range)."""
    return bool(x.max() >= _EXP or x.view(np.uint16).max() >= 0xFF80)


def _blocked(a: torch.Tensor, b: torch.Tensor, want_mask: bool) -> tuple[int, bool, np.ndarray | None]:
    """(#changed, any Inf/NaN, mask or None), block by block; stops at the first block with an Inf/NaN."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.shape[0]
    mask = np.empty(n, dtype=bool) if want_mask else None
    buf = None if want_mask else np.empty(min(BLOCK, n), dtype=bool)
    changed = 0
    for s in range(0, n, BLOCK):
        x, y = _np_bits(fa[s:s + BLOCK]), _np_bits(fb[s:s + BLOCK])
        if _block_has_nonfinite(x) or _block_has_nonfinite(y):
            return changed, True, None
        out = mask[s:s + x.shape[0]] if want_mask else buf[: x.shape[0]]
        np.not_equal(x, y, out=out)
        if x.min() == _NEG_ZERO or y.min() == _NEG_ZERO:  # only a -0 makes a differing pair of zeros
            out &= ((x | y) & np.int16(_MAG)) != 0
        if not want_mask:
            changed += int(np.count_nonzero(out))
    if want_mask:
        changed = -1  # not needed by the caller
    return changed, False, mask


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def _prepare(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch tensor, got {type(x).__name__} (theory.metrics takes arrays)")
    t = x.detach()
    if t.dtype in _KERNEL_DTYPES:
        return t.contiguous()
    if t.dtype.is_floating_point:
        return t.to(torch.bfloat16).contiguous()
    raise InputError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not a bf16 value type "
                     f"(bfloat16, int16 bit patterns, or a float dtype to round)")


def _pair(a: Any, b: Any, names: tuple[str, str], backend: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    x, y = _prepare(a, names[0]), _prepare(b, names[1])
    if x.shape != y.shape:
        raise ShapeMismatchError(f"{names[0]} has shape {tuple(x.shape)} but {names[1]} has shape {tuple(y.shape)}")
    if y.device != x.device:
        y = y.to(x.device)
    if backend == "auto":
        backend = _auto_backend(x.device)
    if backend == "blocked" and x.device.type != "cpu":
        raise InputError(f"backend 'blocked' runs on the CPU; the tensors are on {x.device}")
    return x, y, backend


def _raise_nonfinite(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str]) -> None:
    for t, nm in ((x, names[0]), (y, names[1])):
        bits = _bits(t).reshape(-1)
        count = int(((bits & _EXP) == _EXP).sum())
        if count:
            suffix = " as bf16" if t.dtype != torch.bfloat16 else ""
            raise NonFiniteError(f"{nm}: {count} non-finite entries (NaN or Inf){suffix}")
    raise NonFiniteError(f"{names[0]}, {names[1]}: non-finite entries (NaN or Inf)")  # pragma: no cover


def changed_count(a: Any, b: Any, *, names: tuple[str, str] = ("w0", "w1"), backend: str = "auto") -> int:
    """Number of entries whose stored bf16 value differs between ``a`` and ``b`` (``+0 == -0``).

    Parameters
    ----------
    a, b : torch.Tensor
        Same shape; bf16, int16 bit patterns, float32 masters (rounded to bf16 in the pass) or another float dtype.
    names : (str, str)
        How errors name the two sides.
    backend : {"auto", "blocked", "compiled", "eager"}
        See the module docstring.

    Raises
    ------
    NonFiniteError
        An Inf or NaN on either side (after rounding), naming the side and the count.
    ShapeMismatchError, InputError
        Shapes differ; a non-float dtype; an unknown backend.

    Examples
    --------
    >>> import torch
    >>> w = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    >>> w2 = w.clone(); w2.view(torch.int16)[:7] += 1
    >>> changed_count(w, w2), changed_count(w, w2, backend="eager")
    (7, 7)
    """
    x, y, backend = _pair(a, b, names, backend)
    if x.numel() == 0:
        return 0
    if backend == "blocked":
        count, bad, _ = _blocked(x, y, want_mask=False)
    else:
        count, bad = (int(v) for v in _run(_count_pass, backend, x.reshape(-1), y.reshape(-1)).tolist())
    if bad:
        _raise_nonfinite(x, y, names)
    return count


def changed_mask(a: Any, b: Any, *, names: tuple[str, str] = ("w0", "w1"), backend: str = "auto") -> torch.Tensor:
    """Update mask ``M`` (bool, ``a``'s shape and device): True where the stored bf16 value changed.

    Same inputs, errors and backends as ``changed_count``.

    Examples
    --------
    >>> import torch
    >>> changed_mask(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0 + 2.0**-7])).tolist()
    [False, True]
    """
    x, y, backend = _pair(a, b, names, backend)
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if backend == "blocked":
        _, bad, mask = _blocked(x, y, want_mask=True)
        if bad:
            _raise_nonfinite(x, y, names)
        return torch.from_numpy(mask).reshape(x.shape)
    differ, bad = _run(_mask_pass, backend, x.reshape(-1), y.reshape(-1))
    if int(bad):
        _raise_nonfinite(x, y, names)
    return differ.reshape(x.shape)

