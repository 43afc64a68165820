"""bf16 arrays, vectorised and exact: one step ``w + delta`` and rounding to bf16 by integer bit manipulation on
float64 bit patterns (numpy, or torch on any device), the exact realization threshold per entry, and the change
masks (the exact rule, the paper's rule of thumb, half an ULP) and the Def 2.1 probe.

Every function agrees bit for bit with the scalar oracle ``theory.bf16`` (tests/test_precision.py); the module
docstring there states the two step semantics (``"exact"`` and ``"fp32"``) and the exact rule.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np
from jaxtyping import Bool, Float

from theory.bf16 import (
    _BF16, _F32, Semantics, _as_fraction, _check_semantics, _Fmt, _torch_if_tensor,
)
from theory.errors import InputError, NonFiniteError, ShapeMismatchError
from theory.linalg import reject_complex

__all__ = [
    "bf16_step_array", "bf16_round_array", "realization_threshold_array",
    "predict_change_mask", "rule_of_thumb_mask", "half_ulp_mask", "probe_unchanged",
]


# ---------------------------------------------------------------------------------------------------------------
# Vectorised: integer bit manipulation on float64 bit patterns, in numpy or torch (any device)
# ---------------------------------------------------------------------------------------------------------------
# The core functions take ``xp`` = the numpy or the torch module; the operations used (where, maximum, sign,
# isfinite, isinf, shifts and masks on int64) have the same names and meaning in both.


def _i64_bits(xp: Any, s: Any) -> Any:
    """int64 view of float64 values (the IEEE bit pattern; the sign bit makes it negative)."""
    return s.view(np.int64) if xp is np else s.view(xp.int64)


def _bits32_to_f64(xp: Any, bits: Any) -> Any:
    """float64 values of float32 bit patterns held in int64 (exact)."""
    if xp is np:
        return (bits & 0xFFFFFFFF).astype(np.uint32).view(np.float32).astype(np.float64)
    signed = ((bits & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000  # wrap into the int32 range
    return signed.to(xp.int32).view(xp.float32).to(xp.float64)


def _bits16_to_f64(xp: Any, bits: Any) -> Any:
    """float64 values of bf16 bit patterns held in int64 (bf16 bits << 16 is the float32 of equal value)."""
    return _bits32_to_f64(xp, (bits & 0xFFFF) << 16)


def _round_bits(xp: Any, s: Any, err: Any, fmt: _Fmt) -> Any:
    """Bits (int64) of the ``fmt`` value nearest the exact value ``s + err``, by integer arithmetic.

    ``s`` finite float64, ``err`` float64 with ``s == fl64(s + err)`` (as TwoSum returns; err = 0 when s is
    exact). s is written M * 2^(e-52) with the 53-bit integer M; the target quantum is 2^qe, qe = max(e, emin) - p,
    so the result magnitude is R = round(M / 2^shift), shift = qe - (e - 52), a tie decided by the sign of err (a
    nonzero err means s is not the exact value, so the tie is not a tie) and otherwise by R's parity.
    """
    b = _i64_bits(xp, s)
    sign = (b >> 63) & 1
    E = (b >> 52) & 0x7FF
    F = b & ((1 << 52) - 1)
    e = E - 1023
    tiny = (E == 0) | (e <= fmt.emin - fmt.p - 2)  # |s+err| < half the smallest subnormal: rounds to 0
    huge = e > fmt.emax
    e_c = xp.where(e < fmt.emin - fmt.p - 1, fmt.emin - fmt.p - 1, xp.where(huge, fmt.emax, e))
    M = xp.where(tiny, 0, F | (1 << 52))
    shift = 52 - fmt.p + xp.where(e_c < fmt.emin, fmt.emin - e_c, 0)  # in [52 - p, 53]
    one = xp.ones_like(shift)
    q = M >> shift
    rem = M & ((one << shift) - 1)
    half = one << (shift - 1)
    err_away = xp.sign(err) * xp.where(sign == 1, -1.0, 1.0)  # > 0: the exact magnitude is above |s|
    up = (rem > half) | ((rem == half) & ((err_away > 0) | ((err_away == 0) & ((q & 1) == 1))))
    R = q + xp.where(up, 1, 0)
    body = xp.where(e_c >= fmt.emin, ((e_c + fmt.bias) << fmt.p) + (R - (1 << fmt.p)), R)
    body = xp.where(tiny, 0, body)
    body = xp.where(huge | (body >= fmt.inf_bits), fmt.inf_bits, body)
    return (sign << (fmt.p + fmt.exp_bits)) | body


def _round_value(xp: Any, s: Any, err: Any, fmt: _Fmt) -> Any:
    """Bits of the nearest ``fmt`` value of s + err, where s may also be +-inf (an overflowed float64 sum)."""
    inf = xp.isinf(s)
    bits = _round_bits(xp, xp.where(inf, 0.0, s), xp.where(inf, 0.0, err), fmt)
    return xp.where(inf, xp.where(s > 0, fmt.inf_bits, fmt.sign_bit | fmt.inf_bits), bits)


def _two_sum(xp: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """s = fl(a + b) and err with s + err = a + b exactly (Knuth's TwoSum; err = 0 where s overflowed)."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)
    return s, xp.where(xp.isfinite(s), err, 0.0)


def _step_core(xp: Any, wb: Any, d: Any, semantics: str) -> Any:
    """bf16 bits (int64) of the step w + d; wb: bf16 bits as int64, d: float64 (same backend and device)."""
    w = _bits16_to_f64(xp, wb)
    if semantics == "exact":
        s, err = _two_sum(xp, w, d)
        return _round_value(xp, s, err, _BF16)
    zero = xp.zeros_like(d)
    d32 = _bits32_to_f64(xp, _round_value(xp, d, zero, _F32))
    s, err = _two_sum(xp, w, d32)
    s32 = _bits32_to_f64(xp, _round_value(xp, s, err, _F32))
    return _round_value(xp, s32, zero, _BF16)


# numpy shorthands used by the threshold code and the exhaustive proofs


def _f32_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    return _bits32_to_f64(np, np.asarray(bits).astype(np.int64))


def _bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    return _bits16_to_f64(np, np.asarray(bits).astype(np.int64))


def _round_f64_bits(s: np.ndarray, err: np.ndarray, fmt: _Fmt) -> np.ndarray:
    return _round_value(np, s, err, fmt)


def _to_bits_bf16(w: Any, name: str) -> tuple[np.ndarray, str, Any]:
    """(uint16 bits, kind, torch device or None) of a bf16 array: ml_dtypes.bfloat16 numpy or torch.bfloat16
    (float32/float64 arrays are accepted when every entry is exactly a bf16 value)."""
    reject_complex(w, name)
    torch = _torch_if_tensor(w)
    if torch is not None:
        if w.dtype != torch.bfloat16:
            raise InputError(f"{name} must be a torch.bfloat16 tensor, got {w.dtype}")
        return w.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16), "torch", w.device
    a = np.asarray(w)
    if a.dtype == ml_dtypes.bfloat16:
        return np.ascontiguousarray(a).view(np.uint16), "numpy", None
    if a.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore"):
            b = np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16)
        same = (b.astype(np.float64) == a) | (np.isnan(a) & np.isnan(b.astype(np.float64)))
        if not np.all(same):
            i = int(np.flatnonzero(~same.ravel())[0])
            raise InputError(f"{name} has entries that are not bf16 values (first at flat index {i}: "
                             f"{a.ravel()[i]!r}); pass a bf16 array")
        return np.ascontiguousarray(b).view(np.uint16), "numpy", None
    raise InputError(f"{name} must be a bf16 array (ml_dtypes.bfloat16 or torch.bfloat16), got dtype {a.dtype}")


def _to_f64(x: Any, name: str) -> np.ndarray:
    """float64 numpy copy of a float32/float64 (or bf16) numpy array or torch tensor; exact (an upcast).
    Complex input raises ``ComplexInputError`` (never cast to its real part)."""
    reject_complex(x, name)
    torch = _torch_if_tensor(x)
    if torch is not None:
        x = x.detach().cpu()
        x = x.double().numpy() if x.is_floating_point() else x.numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" and str(a.dtype) != "bfloat16":
        raise InputError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.dtype == np.float64:
        return a
    if a.dtype.itemsize > 8:
        raise InputError(f"{name}: dtype {a.dtype} is wider than float64; pass float32 or float64")
    return a.astype(np.float64)


def _check_finite_bits(bits: Any, name: str) -> None:
    bad = (bits & 0x7F80) == 0x7F80
    if bad.any():
        i = int(np.flatnonzero(np.asarray(bad.cpu() if hasattr(bad, "cpu") else bad).ravel())[0])
        raise NonFiniteError(f"{name} has {int(bad.sum())} non-finite entries (first at flat index {i})")


def _check_finite(a: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(a)
    if np.any(bad):
        i = int(np.flatnonzero(bad.ravel())[0])
        raise NonFiniteError(f"{name} has {int(bad.sum())} NaN/Inf entries (first at flat index {i})")


def _prepare(w: Any, delta: Any) -> tuple[np.ndarray, np.ndarray, str, Any]:
    wb, kind, dev = _to_bits_bf16(w, "w")
    d = _to_f64(delta, "delta")
    if wb.shape != d.shape:
        raise ShapeMismatchError(f"w has shape {wb.shape} but delta has shape {d.shape}")
    _check_finite_bits(wb, "w")
    _check_finite(d, "delta")
    return wb, d, kind, dev


def _step_torch(w: Any, delta: Any, semantics: str, device: Any) -> Any:
    """The step on torch tensors, computed on ``device`` (CUDA works: only int64/float64 elementwise ops)."""
    import torch  # torch only for torch inputs: numpy callers never load it

    if not isinstance(w, torch.Tensor):
        wb_np, _, _ = _to_bits_bf16(w, "w")
        w = torch.from_numpy(wb_np.view(np.int16).copy()).view(torch.bfloat16)
    if w.dtype != torch.bfloat16:
        raise InputError(f"w must be a torch.bfloat16 tensor, got {w.dtype}")
    if not isinstance(delta, torch.Tensor):
        delta = torch.from_numpy(_to_f64(delta, "delta"))
    if not delta.is_floating_point():
        raise InputError(f"delta must be a float tensor, got {delta.dtype}")
    if tuple(w.shape) != tuple(delta.shape):
        raise ShapeMismatchError(f"w has shape {tuple(w.shape)} but delta has shape {tuple(delta.shape)}")
    wb = w.detach().to(device).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    d = delta.detach().to(device).to(torch.float64)
    _check_finite_bits(wb, "w")
    if not torch.isfinite(d).all():
        bad = ~torch.isfinite(d)
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise NonFiniteError(f"delta has {int(bad.sum())} NaN/Inf entries (first at flat index {i})")
    out = _step_core(torch, wb, d, semantics)
    return (((out & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def bf16_step_array(
    w: Any, delta: Any, semantics: Semantics = "exact", *, device: Any = None
) -> Any:
    """Vectorised ``bf16_step``: stored bf16 values after ``w + delta``, by integer bit manipulation.

    ``w``: bf16 array (``ml_dtypes.bfloat16`` numpy or ``torch.bfloat16``, any shape); ``delta``: float32 or
    float64 of the same shape. The exact sum is carried as a float64 pair (TwoSum) and rounded by integer
    operations on its bit pattern, so no float cast ever does the rounding. numpy in, numpy out (a bfloat16
    array); a torch tensor in (or ``device`` given) runs the same integer code in torch on ``device`` (default:
    w's device, e.g. CUDA) and returns a torch.bfloat16 tensor there.
    """
    _check_semantics(semantics)
    torch = _torch_if_tensor(w)
    if torch is not None or device is not None:
        return _step_torch(w, delta, semantics, device if device is not None else w.device)
    wb, d, _, _ = _prepare(w, delta)
    out = _step_core(np, wb.astype(np.int64), d, semantics)
    return np.ascontiguousarray(out.astype(np.uint16)).view(_bf16_dtype())


def bf16_round_array(x: Any, *, via_f32: bool = False) -> np.ndarray:
    """bf16 bits (uint16) nearest each float32/float64 entry of x, by integer arithmetic (nan -> 0x7FC0).

    ``via_f32=True`` rounds to float32 first (what torch 2.13 and ml_dtypes < 0.7 do for float64 input).
    """
    a = _to_f64(x, "x")
    nan = np.isnan(a)
    a0 = np.where(nan, 0.0, a)
    zero = np.zeros_like(a0)
    if via_f32:
        a0 = _f32_bits_to_f64(_round_value(np, a0, zero, _F32))
    bits = _round_value(np, a0, zero, _BF16)
    return np.where(nan, 0x7FC0, bits).astype(np.uint16)


def _neighbour_bits_array(wb: np.ndarray, up: np.ndarray) -> np.ndarray:
    """int64 bf16 pattern of the neighbour of each finite pattern in direction up (True) / down (False)."""
    b = wb.astype(np.int64)
    b = np.where(b == 0x8000, 0, b)
    neg = b >= 0x8000
    toward_pos = np.where(neg, b - 1, b + 1)
    toward_neg = np.where(neg, b + 1, np.where(b == 0, 0x8001, b - 1))
    nb = np.where(up, toward_pos, toward_neg)
    return np.where(nb == 0x8000, 0, nb)


def _f32_next_array(x: np.ndarray, up: bool) -> np.ndarray:
    """Next float32 value above (up) or below each float32 value x (given as float64), by bits."""
    b = x.astype(np.float32).view(np.uint32).astype(np.int64)
    b = np.where(b == 0x80000000, 0, b)
    neg = b >= 0x80000000
    if up:
        nb = np.where(neg, b - 1, b + 1)
    else:
        nb = np.where(neg, b + 1, np.where(b == 0, 0x80000001, b - 1))
    nb = np.where(nb == 0x80000000, 0, nb)
    return _f32_bits_to_f64(nb)


def _f32_even_array(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) & 1) == 0


def realization_threshold_array(
    w: Any, direction: Any, semantics: Semantics = "exact"
) -> tuple[Float[np.ndarray, "*shape"], Bool[np.ndarray, "*shape"]]:
    """Vectorised ``realization_threshold``: (t as float64, inclusive) per entry; direction is +-1 per entry.

    Closed form (an independent implementation of the search in the scalar version). Write the step upward
    (a downward step from w is the upward step from -w). n = next bf16 above w, m = (w + n)/2. Under ``"exact"``:
    t = m - w, inclusive iff n even. Under ``"fp32"``: the smallest float32 sum that rounds away from w is
    S = m (n even) or nextf32(m) (n odd); the sum f32(w + d) reaches S iff w + d >= B = midpoint(prevf32(S), S)
    (> B when S is odd); d* = the smallest float32 >= (or >) B - w; finally t = midpoint(prevf32(d*), d*),
    inclusive iff d* is even. Every intermediate is exact in float64.
    """
    _check_semantics(semantics)
    wb, _, _ = _to_bits_bf16(w, "w")
    _check_finite_bits(wb, "w")
    sgn = np.broadcast_to(np.sign(np.asarray(direction, dtype=np.float64)), wb.shape)
    if np.any(sgn == 0):
        raise InputError("direction must be +1 or -1 in every entry")
    # reflect the downward entries: flip the sign bit so every step is upward
    wb = np.where(sgn < 0, wb ^ 0x8000, wb).astype(np.uint16)
    wv = _bf16_bits_to_f64(wb)
    nb = _neighbour_bits_array(wb, np.ones(wb.shape, dtype=bool))
    n_even = (nb & 1) == 0
    n = np.where(nb == 0x7F80, 2.0**128, _bf16_bits_to_f64(nb))
    m = (wv + n) / 2
    if semantics == "exact":
        return m - wv, n_even
    S = np.where(n_even, m, _f32_next_array(m, up=True))
    B = (_f32_next_array(S, up=False) + S) / 2
    incl_B = _f32_even_array(S)
    v = B - wv  # > 0, exact
    c = _f32_bits_to_f64(_round_f64_bits(v, np.zeros_like(v), _F32))
    too_small = np.where(incl_B, c < v, c <= v)
    d_star = np.where(too_small, _f32_next_array(c, up=True), c)
    t = (_f32_next_array(d_star, up=False) + d_star) / 2
    return t, _f32_even_array(d_star)


def predict_change_mask(w_bf16: Any, delta: Any, semantics: Semantics = "exact") -> np.ndarray:
    """Boolean mask: does the stored bf16 value change under ``w + delta`` -- by the exact threshold rule.

    Entry-wise: |delta| > t or (|delta| == t and inclusive), with (t, inclusive) the exact realization threshold
    of w in the direction of delta (``realization_threshold_array``); delta == 0 never changes w.
    """
    _check_semantics(semantics)
    wb, d, kind, _ = _prepare(w_bf16, delta)
    sgn = np.where(d < 0, -1.0, 1.0)
    t, incl = realization_threshold_array(wb.view(_bf16_dtype()), sgn, semantics)
    a = np.abs(d)
    return (d != 0) & ((a > t) | (incl & (a == t)))


def _bf16_dtype() -> Any:
    return ml_dtypes.bfloat16


def rule_of_thumb_mask(w: Any, delta: Any) -> np.ndarray:
    """The paper's rule of thumb: |delta| > |w|/256 (i.e. a relative update above 2^-8)."""
    wb, d, _, _ = _prepare(w, delta)
    return np.abs(d) > np.abs(_bf16_bits_to_f64(wb)) / 256


def _ulp_array(wb: np.ndarray) -> np.ndarray:
    E = (wb.astype(np.int64) >> 7) & 0xFF
    return np.ldexp(1.0, np.maximum(E, 1) - 127 - 7)


def half_ulp_mask(w: Any, delta: Any) -> np.ndarray:
    """Cor 3.6 as stated: |delta| >= ULP(w)/2."""
    wb, d, _, _ = _prepare(w, delta)
    return np.abs(d) >= _ulp_array(wb) / 2


def probe_unchanged(w: Any, w_hat: Any, eta: float = 1e-3) -> Any:
    """Def 2.1: |w_hat - w| <= eta * max(|w|, |w_hat|), evaluated exactly.

    Scalars (floats / Fractions) give a bool via Fractions. Arrays (any float dtype, bf16 included) give a mask:
    float64 evaluation, with entries whose two sides are within a relative 2^-40 of each other re-decided with
    Fractions, so the mask equals the exact predicate.
    """
    eta_q = _as_fraction(eta, "eta")
    if eta_q < 0:
        raise InputError(f"eta must be >= 0, got {eta}")
    if np.ndim(w) == 0 and np.ndim(w_hat) == 0 and not hasattr(w, "shape"):
        a, b = _as_fraction(w, "w"), _as_fraction(w_hat, "w_hat")
        return abs(b - a) <= eta_q * max(abs(a), abs(b))
    a, b = _to_f64(w, "w"), _to_f64(w_hat, "w_hat")
    if a.shape != b.shape:
        raise ShapeMismatchError(f"w has shape {a.shape} but w_hat has shape {b.shape}")
    _check_finite(a, "w")
    _check_finite(b, "w_hat")
    lhs = np.abs(b - a)
    rhs = float(eta) * np.maximum(np.abs(a), np.abs(b))
    out = lhs <= rhs
    near = np.abs(lhs - rhs) <= 2.0**-40 * np.maximum(lhs, rhs)
    for i in np.flatnonzero(near.ravel()):
        x, y = Fraction(float(a.ravel()[i])), Fraction(float(b.ravel()[i]))
        out.ravel()[i] = abs(y - x) <= eta_q * max(abs(x), abs(y))
    return out
