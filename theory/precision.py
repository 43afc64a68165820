"""Gate III, precision: an exact bf16 oracle and the exact rule for when a stored bf16 weight changes.

bf16 = 1 sign bit, 8 exponent bits (bias 127), 7 stored mantissa bits. For bits ``s eeeeeeee mmmmmmm``:

- normal (1 <= E <= 254):  x = (-1)^s * 2^(E-127) * (1 + m/128),   ULP(x) = 2^(e-7) for |x| in [2^e, 2^(e+1))
- subnormal / zero (E = 0): x = (-1)^s * m * 2^-133,                  ULP(x) = 2^-133
- E = 255: inf (m = 0) or nan.

**The oracle** (``decode_bf16``, ``round_to_bf16_bits``, ``round_to_f32_bits``, ``bf16_step``) works on Python
integers and ``fractions.Fraction``: no float cast is ever the reference. Rounding is IEEE 754 round-to-nearest, ties
to the even mantissa, with gradual underflow and overflow to +-inf (a value at or above ``2^128 - 2^119`` -- the midpoint between
the largest bf16 ``2^128 - 2^120`` and ``2^128`` -- rounds to inf).

**Two semantics for one step** ``w -> w + delta`` (w a stored bf16 value):

- ``"exact"``: round the exact real sum once: ``bf16(w + delta)``.
- ``"fp32"``: what mixed-precision training does for one step from an fp32 master equal to w:
  ``bf16(f32(w + f32(delta)))`` -- delta is rounded to float32 (a no-op when it already is one), the sum is rounded
  to float32, then the float32 master is rounded to bf16. Double rounding makes this differ from ``"exact"``.
  (A persistent fp32 master that accumulates many sub-threshold steps is *not* modelled by one step.)

**Where the roundings differ (measured, see tests).** Take ``x = 1 + 2^-8 + 2^-30`` (a float64):
rounding x directly to bf16 gives ``1 + 2^-7`` (x is above the midpoint ``1 + 2^-8``), but float32 first gives
``f32(x) = 1 + 2^-8`` exactly (2^-30 is below half a float32 ULP), a tie, which then rounds to the even ``1.0``.
``torch.tensor(x, dtype=float64).to(torch.bfloat16)`` returns 1.0 (torch 2.13 casts float64 through float32: it
implements ``bf16(f32(x))``, not ``bf16(x)``), and so does ``numpy.float64 -> ml_dtypes.bfloat16`` before ml_dtypes
0.7; ml_dtypes 0.7.0 rounds once (tests/test_library_facts.py holds these facts by version). From float32 inputs the
three (this module, torch, ml_dtypes) agree bit for bit. So under ``"fp32"`` semantics a step slightly *below*
half an ULP can change w (``w = 1 + 2^-7``, odd mantissa: ``delta = 2^-8 - 2^-24 - 2^-33`` changes it, see
``realization_threshold``), and under ``"exact"`` it cannot.

**The exact realization rule** (corrected Cor 3.6). Stepping w towards its neighbour n (in the direction of delta),
with gap g = |n - w|, under ``"exact"`` semantics the stored value changes iff

    |delta| > g/2,  or  |delta| = g/2 and n has an even mantissa (then w's is odd).

g is ULP(w) except at a power of two stepping towards zero, where the spacing below is half: g = ULP(w)/2 (not at the
smallest normal 2^-126, whose lower neighbour is subnormal with the same spacing). So the paper's "changes iff
|delta| >~ 1/2 ULP(w)" is wrong by a factor 2 at powers of two and wrong on the tie for every even mantissa.
``realization_threshold`` gives the exact threshold under both semantics.

"Changes" means the stored *value* changes: +0 and -0 count as the same value.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Iterator, Literal, NamedTuple

import numpy as np
from jaxtyping import Bool, Float

from theory.check import Check, assumption_failed, make_check, register
from theory.errors import ComplexInputError, InputError, NonFiniteError, ShapeMismatchError
from theory.linalg import reject_complex

__all__ = [
    "BF16_MAX", "BF16_MIN_NORMAL", "BF16_MIN_SUBNORMAL",
    "Decoded", "decode_bf16", "decode_f32", "bf16_bits", "bf16_value", "is_bf16_representable",
    "ulp_bf16", "next_up", "next_down",
    "round_to_bf16_bits", "round_to_f32_bits", "bf16_step",
    "SEMANTICS", "bf16_step_array", "bf16_round_array",
    "Threshold", "realization_threshold", "realization_threshold_array",
    "predict_change_mask", "rule_of_thumb_mask", "half_ulp_mask", "probe_unchanged",
    "exact_scalar", "check_cor36", "check_lemE1", "check_lemE1_across", "check_lemE2", "check_propE3",
]

Semantics = Literal["exact", "fp32"]
SEMANTICS = ("exact", "fp32")

BF16_MAX = Fraction(2**128 - 2**120)
BF16_MIN_NORMAL = Fraction(1, 2**126)
BF16_MIN_SUBNORMAL = Fraction(1, 2**133)


# ---------------------------------------------------------------------------------------------------------------
# Formats: (mantissa bits p, exponent bits, bias). emin = 1 - bias; subnormal quantum 2^(emin - p).
# ---------------------------------------------------------------------------------------------------------------


class _Fmt(NamedTuple):
    name: str
    p: int
    exp_bits: int
    bias: int

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return (1 << self.exp_bits) - 2 - self.bias

    @property
    def inf_bits(self) -> int:
        return ((1 << self.exp_bits) - 1) << self.p

    @property
    def sign_bit(self) -> int:
        return 1 << (self.p + self.exp_bits)


_BF16 = _Fmt("bf16", 7, 8, 127)
_F32 = _Fmt("f32", 23, 8, 127)


class Decoded(NamedTuple):
    """A decoded bit pattern: ``kind`` in zero/subnormal/normal/inf/nan, ``sign`` 0 or 1, exact ``value``
    (a Fraction for finite patterns, None for inf and nan; -0 decodes to Fraction(0) with sign 1)."""

    kind: str
    sign: int
    value: Fraction | None


def _decode(bits: int, fmt: _Fmt) -> Decoded:
    nbits = 1 + fmt.exp_bits + fmt.p
    if not isinstance(bits, (int, np.integer)) or not 0 <= int(bits) < (1 << nbits):
        raise InputError(f"{fmt.name} bit pattern must be an integer in [0, 2^{nbits}), got {bits!r}")
    bits = int(bits)
    sign = bits >> (nbits - 1)
    E = (bits >> fmt.p) & ((1 << fmt.exp_bits) - 1)
    m = bits & ((1 << fmt.p) - 1)
    s = -1 if sign else 1
    if E == (1 << fmt.exp_bits) - 1:
        return Decoded("nan" if m else "inf", sign, None)
    if E == 0:
        return Decoded("subnormal" if m else "zero", sign, s * Fraction(m) * Fraction(2) ** (fmt.emin - fmt.p))
    return Decoded("normal", sign, s * Fraction((1 << fmt.p) + m) * Fraction(2) ** (E - fmt.bias - fmt.p))


def decode_bf16(bits: int) -> Decoded:
    """Exact value and class of a bf16 bit pattern (uint16 as an int)."""
    return _decode(bits, _BF16)


def decode_f32(bits: int) -> Decoded:
    """Exact value and class of a float32 bit pattern (uint32 as an int)."""
    return _decode(bits, _F32)


def _floor_log2(q: Fraction) -> int:
    """floor(log2(q)) for q > 0, exactly."""
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    return e


def _round(q: Fraction, fmt: _Fmt, negative_zero: bool = False) -> int:
    """Round the exact rational q to the nearest ``fmt`` value, ties to even; returns the bit pattern."""
    if q == 0:
        return fmt.sign_bit if negative_zero else 0
    sign = fmt.sign_bit if q < 0 else 0
    a = abs(q)
    qe = max(_floor_log2(a), fmt.emin) - fmt.p  # exponent of the quantum (ULP) at a
    scaled = a / Fraction(2) ** qe  # a in units of that quantum
    R = scaled.numerator // scaled.denominator
    rem = scaled - R
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and R % 2 == 1):
        R += 1
    # R in [2^p, 2^(p+1)] for normal a; R <= 2^p for subnormal a (R = 2^p is the smallest normal)
    if qe + fmt.p < fmt.emin or R < (1 << fmt.p):
        body = R  # subnormal (or zero, or the carry into the smallest normal: bits 1 << p)
    else:
        body = ((qe + fmt.p + fmt.bias) << fmt.p) + (R - (1 << fmt.p))
    if body >= fmt.inf_bits:
        body = fmt.inf_bits
    return sign | body


def round_to_bf16_bits(q: Fraction | int | float) -> int:
    """Bits of the bf16 nearest the exact value q (IEEE round-to-nearest-even, subnormals, overflow to +-inf).

    A negative q that rounds to zero gives -0 (0x8000). Floats are taken at their exact value (``Fraction(x)``);
    numpy / ml_dtypes / torch scalars and 0-d arrays are accepted and converted losslessly (``exact_scalar``).
    """
    v, neg_zero = exact_scalar(q, "q")
    return _round(v, _BF16, negative_zero=v < 0 or neg_zero)


def round_to_f32_bits(q: Fraction | int | float) -> int:
    """Bits of the float32 nearest the exact value q (IEEE round-to-nearest-even)."""
    v, neg_zero = exact_scalar(q, "q")
    return _round(v, _F32, negative_zero=v < 0 or neg_zero)


def exact_scalar(x: Any, name: str) -> tuple[Fraction, bool]:
    """``(Fraction(x), x is -0.0)`` for a finite real scalar of any kind, converted losslessly.

    Accepted: Fraction, int, float, numpy integer and float scalars (float16/32/64), ml_dtypes scalars (bf16),
    0-d numpy arrays, 0-d torch tensors (any real dtype, any device): each of these float formats is a subset of
    float64, so the value is exact. Refused with an ``InputError`` subclass naming ``name``: bool, complex
    (``ComplexInputError``), a non-0-d array or tensor, a float wider than float64, NaN/Inf (``NonFiniteError``).

    Examples
    --------
    >>> exact_scalar(np.float32(0.1), "w")
    (Fraction(13421773, 134217728), False)
    >>> exact_scalar(np.array(-0.0), "w")
    (Fraction(0, 1), True)
    """
    if isinstance(x, Fraction):
        return x, False
    reject_complex(x, name)
    torch = _torch_if_tensor(x)
    if torch is not None:
        if x.ndim != 0:
            raise InputError(f"{name} must be a scalar (a 0-d tensor), got shape {tuple(x.shape)}")
        x = x.detach().cpu()
        x = x.item() if (x.dtype == torch.bool or not x.is_floating_point()) else x.double().item()
    elif isinstance(x, np.ndarray):
        if x.ndim != 0:
            raise InputError(f"{name} must be a scalar (a 0-d array), got shape {x.shape}")
        x = x[()]
    if isinstance(x, (bool, np.bool_)):
        raise InputError(f"{name} must be a number, got a bool")
    if isinstance(x, (int, np.integer)):
        return Fraction(int(x)), False
    if isinstance(x, complex):
        raise ComplexInputError(f"{name} is complex ({x!r}); a real number is needed")
    itemsize = getattr(getattr(x, "dtype", None), "itemsize", 8)
    if itemsize > 8:
        raise InputError(f"{name}: dtype {x.dtype} is wider than float64 and cannot be converted exactly")
    try:
        xf = float(x)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be a real number (float, int or Fraction), got {type(x).__name__}") from e
    if not math.isfinite(xf):
        raise NonFiniteError(f"{name} is {xf}: a finite value is needed")
    return Fraction(xf), xf == 0 and math.copysign(1.0, xf) < 0


def _as_fraction(x: Any, name: str) -> Fraction:
    return exact_scalar(x, name)[0]


def bf16_bits(x: Fraction | int | float) -> int:
    """Bits of x, which must be exactly a bf16 value (inf and -0.0 allowed as floats; nan gives 0x7FC0).

    Any real scalar type is accepted (see ``exact_scalar``): numpy float32, ml_dtypes / torch bf16 scalars, 0-d
    arrays and tensors."""
    if isinstance(x, float) and math.isnan(x):
        return 0x7FC0
    if isinstance(x, float) and math.isinf(x):
        return 0xFF80 if x < 0 else 0x7F80
    q, neg_zero = exact_scalar(x, "x")
    b = _round(q, _BF16, negative_zero=q < 0 or neg_zero)
    d = decode_bf16(b)
    if d.value != q:
        raise InputError(f"x = {x!r} is not exactly a bf16 value (nearest bf16 is {bf16_value(b)!r})")
    return b


def bf16_value(bits: int) -> float:
    """The bf16 value of ``bits`` as a Python float (every bf16 value, inf and nan included, is a float64)."""
    d = decode_bf16(bits)
    if d.kind == "nan":
        return math.nan
    if d.kind == "inf":
        return -math.inf if d.sign else math.inf
    v = float(d.value)
    return -0.0 if (d.kind == "zero" and d.sign) else v


def is_bf16_representable(x: Fraction | int | float) -> bool:
    try:
        bf16_bits(x)
        return True
    except InputError:
        return False


def _finite_bf16(x: Any, name: str) -> tuple[int, Fraction]:
    """Bits and exact value of a finite bf16 value x (error naming ``name`` otherwise)."""
    if isinstance(x, float) and not math.isfinite(x):
        raise NonFiniteError(f"{name} = {x}: a finite bf16 value is needed")
    try:
        b = bf16_bits(x)
    except InputError as e:
        raise type(e)(f"{name}: {e}") from None
    return b, decode_bf16(b).value  # type: ignore[return-value]


def ulp_bf16(x: Fraction | int | float) -> Fraction:
    """ULP of a finite bf16 value: 2^(e-7) for normal |x| in [2^e, 2^(e+1)); 2^-133 for subnormals and zero."""
    _, v = _finite_bf16(x, "x")
    if v == 0 or abs(v) < BF16_MIN_NORMAL:
        return BF16_MIN_SUBNORMAL
    return Fraction(2) ** (_floor_log2(abs(v)) - 7)


def _step_bits(b: int, up: bool) -> int:
    """Neighbouring bf16 bit pattern of pattern b in value order (-0 is treated as +0; +-inf stay put)."""
    if b == 0x8000:
        b = 0
    neg = b >= 0x8000
    if up:
        if b == 0x7F80:
            return b
        nb = b - 1 if neg else b + 1
    else:
        if b == 0xFF80:
            return b
        if b == 0:
            return 0x8001
        nb = b + 1 if neg else b - 1
    return 0 if nb == 0x8000 else nb


def next_up(x: Fraction | int | float) -> float:
    """The next bf16 value above x (x a bf16 value, not nan); next_up(max) = inf, next_up(-0) = next_up(0)."""
    b = bf16_bits(x)
    if b & 0x7FFF > 0x7F80:
        raise InputError("next_up of nan")
    return bf16_value(_step_bits(b, up=True))


def next_down(x: Fraction | int | float) -> float:
    """The next bf16 value below x; next_down(-max) = -inf."""
    b = bf16_bits(x)
    if b & 0x7FFF > 0x7F80:
        raise InputError("next_down of nan")
    return bf16_value(_step_bits(b, up=False))


# ---------------------------------------------------------------------------------------------------------------
# One step, exactly (scalar oracle)
# ---------------------------------------------------------------------------------------------------------------


def _check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise InputError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")


def bf16_step(w: Fraction | int | float, delta: Fraction | int | float, semantics: Semantics = "exact") -> float:
    """Stored bf16 value after adding ``delta`` to the bf16 weight ``w`` (exact oracle, returns a float).

    ``"exact"``: bf16(w + delta), one rounding of the exact real sum.
    ``"fp32"``:  bf16(f32(w + f32(delta))): fp32 master (= w exactly) plus delta rounded to float32, sum rounded
    to float32, then to bf16.
    """
    _check_semantics(semantics)
    _, wv = _finite_bf16(w, "w")
    d = _as_fraction(delta, "delta")
    if semantics == "exact":
        return bf16_value(_round(wv + d, _BF16))
    d32 = decode_f32(_round(d, _F32)).value
    if d32 is None:  # delta overflowed float32: the sum is +-inf
        return math.inf if d > 0 else -math.inf
    s32 = decode_f32(_round(wv + d32, _F32))
    if s32.value is None:
        return -math.inf if s32.sign else math.inf
    return bf16_value(_round(s32.value, _BF16))


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


def _torch_if_tensor(x: Any) -> Any:
    """The torch module if x is a torch tensor (without importing torch for numpy inputs), else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def _to_bits_bf16(w: Any, name: str) -> tuple[np.ndarray, str, Any]:
    """(uint16 bits, kind, torch device or None) of a bf16 array: ml_dtypes.bfloat16 numpy or torch.bfloat16
    (float32/float64 arrays are accepted when every entry is exactly a bf16 value)."""
    import ml_dtypes

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
    import torch

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


# ---------------------------------------------------------------------------------------------------------------
# The exact realization rule
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """Stored w changes under a step of size |delta| in ``direction`` iff |delta| > value, or |delta| == value and
    ``inclusive`` (the midpoint tie rounds away from w)."""

    value: Fraction
    inclusive: bool
    direction: int
    semantics: str

    def changes(self, abs_delta: Fraction | float) -> bool:
        a = Fraction(abs_delta)
        return a > self.value or (self.inclusive and a == self.value)


def _direction(direction: Any) -> int:
    """+1 or -1 from +1/'up'/'+' or -1/'down'/'-' (numbers of any real scalar type); else an InputError naming
    ``direction`` (0 included: a step has a sign)."""
    if isinstance(direction, str):
        if direction in ("up", "+"):
            return 1
        if direction in ("down", "-"):
            return -1
    else:
        try:
            v, _ = exact_scalar(direction, "direction")
        except InputError:
            v = None
        if v == 1:
            return 1
        if v == -1:
            return -1
    raise InputError(f"direction must be +1/'up' or -1/'down' (the sign of the step), got {direction!r}")


def _virtual_neighbour(b: int, up: bool) -> tuple[Fraction, bool]:
    """Value and even-ness of the bf16 neighbour of pattern b; past +-max the neighbour is +-2^128 (even, and
    reaching its rounding region means overflow to inf)."""
    nb = _step_bits(b, up)
    if nb & 0x7FFF == 0x7F80:
        return (Fraction(2**128) if up else -Fraction(2**128)), True
    return decode_bf16(nb).value, nb % 2 == 0  # type: ignore[return-value]


def realization_threshold(w: Fraction | int | float, direction: Any = 1,
                          semantics: Semantics = "exact") -> Threshold:
    """Exact smallest |delta| that changes stored bf16 ``w`` when delta has sign ``direction``.

    ``"exact"``: with n the neighbour in that direction, t = |n - w|/2, inclusive iff n's mantissa is even (a tie
    rounds to even). So t = ULP(w)/2 except t = ULP(w)/4 below a power of two (not at 2^-126), and the threshold
    is not attained (exclusive) when w's own mantissa is even.

    ``"fp32"``: the map delta -> bf16(f32(w + f32(delta))) is monotone, so the set of changing |delta| is an
    up-set. It is found exactly: a binary search over positive float32 values d (as bit patterns) for the smallest
    d that changes w, with the Fraction oracle; then t is the rounding boundary of d in float32 (the midpoint to
    its float32 predecessor, inclusive iff d is even). Double rounding makes t differ from the exact t, e.g. for
    w = 1 + 2^-7 up: t = 2^-8 - 2^-24 - 2^-33 < ULP/2.
    """
    _check_semantics(semantics)
    sgn = _direction(direction)
    b, wv = _finite_bf16(w, "w")
    if semantics == "exact":
        n, n_even = _virtual_neighbour(b, up=sgn > 0)
        return Threshold(abs(n - wv) / 2, n_even, sgn, semantics)

    def changes(d_bits: int) -> bool:
        d = decode_f32(d_bits).value
        return bf16_step(wv, sgn * d, "fp32") != float(wv)  # type: ignore[operator]

    lo, hi = 0, 0x7F7FFFFF  # changes(hi) is True (the largest float32 overflows every w); changes(0) is False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if changes(mid):
            hi = mid
        else:
            lo = mid
    d_star = decode_f32(hi).value
    pred = decode_f32(hi - 1).value
    return Threshold((d_star + pred) / 2, hi % 2 == 0, sgn, semantics)  # type: ignore[operator]


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
    import ml_dtypes

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


# ---------------------------------------------------------------------------------------------------------------
# Registered checks
# ---------------------------------------------------------------------------------------------------------------

_GATE = "III"


def _normal_value(x: Any, name: str, rid: str) -> tuple[Fraction | None, Check | None]:
    """Exact value of a finite nonzero *normal* bf16 x, or an assumption_failed check naming the problem."""
    try:
        b, v = _finite_bf16(x, name)
    except NonFiniteError:
        return None, assumption_failed(rid, f"{name} is finite")
    except InputError:
        return None, assumption_failed(rid, f"{name} is a bf16 value")
    if decode_bf16(b).kind != "normal":
        return None, assumption_failed(rid, f"{name} is a normal bf16 value (nonzero, not subnormal)")
    return v, None


def _distinct_normal_pair(x: Any, y: Any, rid: str) -> tuple[Fraction | None, Fraction | None, Check | None]:
    """Both inputs finite normal bf16 and distinct (the hypotheses of Lemma E.1), else the failed-assumption check."""
    xv, bad = _normal_value(x, "x", rid)
    if bad is None:
        yv, bad = _normal_value(y, "y", rid)
    if bad is not None:
        return None, None, bad
    if xv == yv:
        return None, None, assumption_failed(rid, "x != y")
    return xv, yv, None


def _binade(v: Fraction) -> int:
    return _floor_log2(abs(v))


@register(
    "cor3.6",
    statement="A stored bf16 weight W changes at a step iff |dW| >= ULP(W)/2 (as stated: 'iff |dW| >~ 1/2 ULP')",
    gate=_GATE,
    assumptions=("w is a finite bf16 value", "semantics is 'exact' or 'fp32'"),
    exact=False,
    paper_ref="Cor. 3.6",
)
def check_cor36(w: Any, direction: Any = 1, semantics: Semantics = "exact") -> Check:
    """Does the as-stated rule give the right verdict for every step of w in ``direction``?

    lhs = ULP(w)/2 (the as-stated threshold), rhs = t, the exact threshold (``realization_threshold``).
    holds iff lhs == rhs and t is attained (inclusive), i.e. "changes iff |delta| >= ULP/2" is exactly right.
    ratio 2 at a power of two stepping towards zero; ratio 1 with ``tie_mismatch`` for even mantissas; ratio
    slightly off 1 under fp32 double rounding. ``details['disagreeing_delta']`` is a step where rule and truth
    differ (None when they agree).

    Examples
    --------
    >>> check_cor36(1.0078125, 1).verdict  # an odd mantissa: "changes iff |delta| >= ULP/2" is exact
    'holds'
    >>> c = check_cor36(1.0, -1)  # a power of two stepping down: the exact threshold is ULP/4
    >>> c.verdict, c.ratio
    ('violated', 2.0)
    """
    rid = "cor3.6"
    sgn = _direction(direction)  # a bad direction is a bad argument (InputError naming it), not a hypothesis
    if semantics not in SEMANTICS:
        return assumption_failed(rid, "semantics is 'exact' or 'fp32'")
    try:
        _, w_exact = _finite_bf16(w, "w")
    except ComplexInputError:
        raise
    except NonFiniteError:
        return assumption_failed(rid, "w is finite")
    except InputError:
        return assumption_failed(rid, "w is a finite bf16 value")
    half = ulp_bf16(w) / 2
    t = realization_threshold(w, sgn, semantics)
    agrees = half == t.value and t.inclusive
    if agrees:
        bad = None
    elif half < t.value or (half == t.value and not t.inclusive):
        bad = half  # the rule says "changes", it does not
    else:
        bad = (half + t.value) / 2  # t < delta < ULP/2: it changes, the rule says not
    details = {
        "w": float(w_exact), "direction": sgn, "semantics": semantics,
        "half_ulp": str(half), "threshold": str(t.value), "inclusive": t.inclusive,
        "tie_mismatch": bool(half == t.value and not t.inclusive),
        "power_of_two_down": bool(half == 2 * t.value),
        "disagreeing_delta": None if bad is None else str(sgn * bad),
    }
    return replace(make_check(rid, float(half), float(t.value), details=details), holds=bool(agrees))


def _sample_bf16_bits(rng: np.random.Generator, n: int, normal_only: bool = False) -> list[int]:
    out = []
    while len(out) < n:
        b = int(rng.integers(0, 1 << 16))
        E = (b >> 7) & 0xFF
        if E == 0xFF or (normal_only and E == 0):
            continue
        out.append(b)
    return out


@check_cor36.campaign
def _cor36_campaign(seed: int) -> Iterator[Check]:
    rng = np.random.default_rng(seed)
    bits = _sample_bf16_bits(rng, 24)
    bits += [0x3F80, 0xBF80, 0x3F81, 0x0080, 0x0000, 0x7F7F, 0x4000 | int(rng.integers(0, 128))]
    for b in bits:
        for sgn in (1, -1):
            for sem in SEMANTICS:
                yield check_cor36(bf16_value(b), sgn, sem)


@register(
    "lemE.1",
    statement="distinct normal bf16 x != y in one binade [2^e, 2^(e+1)): |x-y| >= 2^(e-7) and "
              "|x-y|/max(|x|,|y|) > 2^-8",
    gate=_GATE,
    assumptions=("x, y finite normal bf16", "x != y", "|x| and |y| in the same binade [2^e, 2^(e+1))"),
    paper_ref="Lemma E.1",
)
def check_lemE1(x: Any, y: Any) -> Check:
    """lhs = 2^(e-7), rhs = |x - y|; holds iff lhs <= rhs and the relative gap exceeds 2^-8 (both parts).

    ratio = 1 for neighbours (tight). Pairs of opposite sign lie in different binades in the sense of the lemma
    (the binade is of the signed value), so they fail the assumption.

    Examples
    --------
    >>> c = check_lemE1(1.0, 1.0078125)  # neighbours in [1, 2): the gap is exactly 2^-7
    >>> c.verdict, c.lhs == c.rhs == 2.0**-7
    ('holds', True)
    """
    rid = "lemE.1"
    xv, yv, bad = _distinct_normal_pair(x, y, rid)
    if bad:
        return bad
    if (xv > 0) != (yv > 0) or _binade(xv) != _binade(yv):
        return assumption_failed(rid, "x and y in the same binade [2^e, 2^(e+1)) (same sign)")
    e = _binade(xv)
    gap, bound = abs(xv - yv), Fraction(2) ** (e - 7)
    rel = gap / max(abs(xv), abs(yv))
    details = {"e": e, "rel_gap": float(rel), "rel_gap_gt_2^-8": bool(rel > Fraction(1, 256))}
    return replace(make_check(rid, float(bound), float(gap), details=details),
                   holds=bool(bound <= gap and rel > Fraction(1, 256)))


@register(
    "lemE.1-across",
    statement="as stated 'also across the binade boundary': distinct normal bf16 x != y satisfy "
              "|x-y|/max(|x|,|y|) > 2^-8 (strict). Corrected form: >= 2^-8, equality iff {x,y} = {2^e, 2^e - 2^(e-8)}",
    gate=_GATE,
    assumptions=("x, y finite normal bf16", "x != y"),
    exact=False,
    paper_ref="Lemma E.1 (cross-binade remark)",
)
def check_lemE1_across(x: Any, y: Any) -> Check:
    """lhs = 2^-8, rhs = |x - y| / max(|x|, |y|); holds iff lhs < rhs (strict, as stated).

    Violated (ratio exactly 1) at x = 2^e, y = its lower neighbour 2^e - 2^(e-8), e.g. (1, 0.99609375).
    ``details['corrected_holds']`` is the corrected statement (lhs <= rhs, equality only at such a pair).

    Examples
    --------
    >>> c = check_lemE1_across(1.0, 0.99609375)  # 1 and its lower neighbour: relative gap exactly 2^-8
    >>> c.verdict, c.details["corrected_holds"]
    ('violated', True)
    """
    rid = "lemE.1-across"
    xv, yv, bad = _distinct_normal_pair(x, y, rid)
    if bad:
        return bad
    big, small = (xv, yv) if abs(xv) >= abs(yv) else (yv, xv)
    rel = abs(xv - yv) / abs(big)
    pow2_pair = (abs(big) == Fraction(2) ** _binade(big) and (big > 0) == (small > 0)
                 and abs(big) - abs(small) == abs(big) / 256)
    lhs = Fraction(1, 256)
    details = {"rel_gap": str(rel), "power_of_two_pair": bool(pow2_pair),
               "corrected_holds": bool(rel > lhs or (rel == lhs and pow2_pair))}
    return replace(make_check(rid, float(lhs), float(rel), details=details), holds=bool(lhs < rel))


def _pair_campaign(rng: np.random.Generator, n: int, across: bool) -> list[tuple[float, float]]:
    pairs = []
    for b in _sample_bf16_bits(rng, n, normal_only=True):
        E = (b >> 7) & 0xFF
        if across:
            p2 = (b & 0x8000) | (E << 7)  # the power of two at the bottom of b's binade
            lower = p2 - 1 if (p2 & 0x7FFF) > 0x0080 else p2 + 1  # its lower neighbour (normal when E > 1)
            pairs.append((bf16_value(p2), bf16_value(lower)))
            pairs.append((bf16_value(b), bf16_value(lower)))
        else:
            other = (b & ~0x7F) | int(rng.integers(0, 128))
            if other == b:
                other = b ^ 1
            pairs.append((bf16_value(b), bf16_value(other)))
            pairs.append((bf16_value(b), bf16_value(b ^ 1)))
    return pairs


@check_lemE1.campaign
def _lemE1_campaign(seed: int) -> Iterator[Check]:
    for x, y in _pair_campaign(np.random.default_rng(seed), 20, across=False):
        yield check_lemE1(x, y)


@check_lemE1_across.campaign
def _lemE1_across_campaign(seed: int) -> Iterator[Check]:
    for x, y in _pair_campaign(np.random.default_rng(seed), 20, across=True):
        yield check_lemE1_across(x, y)


@register(
    "lemE.2",
    statement="for normal bf16 x: ULP(x)/|x| in (2^-8, 2^-7]",
    gate=_GATE,
    assumptions=("x finite normal bf16",),
    paper_ref="Lemma E.2",
)
def check_lemE2(x: Any) -> Check:
    """lhs = ULP(x)/|x|, rhs = 2^-7; holds iff 2^-8 < lhs <= rhs. Tight (ratio 1) at powers of two.

    Examples
    --------
    >>> c = check_lemE2(1.5)  # ULP(1.5) / 1.5 = 2^-7 / 1.5
    >>> c.verdict, c.lhs == 2.0**-7 / 1.5
    ('holds', True)
    """
    rid = "lemE.2"
    xv, bad = _normal_value(x, "x", rid)
    if bad:
        return bad
    r = ulp_bf16(x) / abs(xv)
    details = {"lower_bound_strict": bool(r > Fraction(1, 256)), "rel_ulp": str(r)}
    return replace(make_check(rid, float(r), 2.0**-7, details=details),
                   holds=bool(Fraction(1, 256) < r <= Fraction(1, 128)))


@check_lemE2.campaign
def _lemE2_campaign(seed: int) -> Iterator[Check]:
    rng = np.random.default_rng(seed)
    for b in _sample_bf16_bits(rng, 30, normal_only=True) + [0x3F80, 0x3FFF, 0x0080, 0x7F7F, 0xFF7F]:
        yield check_lemE2(bf16_value(b))


@register(
    "propE.3",
    statement="for eta < 2^-9 and finite nonzero normal bf16 w, w_hat: "
              "|w_hat - w| <= eta*max(|w|,|w_hat|) iff w and w_hat are the same bf16 value",
    gate=_GATE,
    assumptions=("w, w_hat finite normal bf16", "0 <= eta < 2^-9"),
    paper_ref="Prop. E.3 / Cor. E.4",
)
def check_propE3(w: Any, w_hat: Any, eta: float = 1e-3) -> Check:
    """holds iff probe_unchanged(w, w_hat, eta) == (w == w_hat), evaluated exactly.

    For distinct values lhs = eta and rhs = |w_hat - w|/max(|w|,|w_hat|) (the probe must see rhs > lhs);
    for equal values lhs = 0 (the relative change) and rhs = eta.

    Examples
    --------
    >>> check_propE3(0.99609375, 1.0, 1e-3).verdict  # neighbours: the probe sees the change
    'holds'
    >>> check_propE3(0.99609375, 1.0, 1e-2).verdict  # eta >= 2^-9 is outside the proposition
    'assumption-failed'
    """
    rid = "propE.3"
    wv, bad = _normal_value(w, "w", rid)
    if bad:
        return bad
    hv, bad = _normal_value(w_hat, "w_hat", rid)
    if bad:
        return bad
    try:
        eq = _as_fraction(eta, "eta")
    except InputError:
        return assumption_failed(rid, "eta is a finite number")
    if not 0 <= eq < Fraction(1, 512):
        return assumption_failed(rid, "0 <= eta < 2^-9")
    same = wv == hv
    probe = probe_unchanged(wv, hv, eq)
    rel = abs(hv - wv) / max(abs(wv), abs(hv))
    lhs, rhs = (0.0, float(eq)) if same else (float(eq), float(rel))
    details = {"same_value": bool(same), "probe_unchanged": bool(probe), "rel_change": str(rel)}
    return replace(make_check(rid, lhs, rhs, details=details), holds=bool(probe == same))


@check_propE3.campaign
def _propE3_campaign(seed: int) -> Iterator[Check]:
    rng = np.random.default_rng(seed)
    for b in _sample_bf16_bits(rng, 20, normal_only=True):
        w = bf16_value(b)
        for other in (b, b + 1 if (b & 0x7F) != 0x7F else b - 1, b - 1 if (b & 0x7F) else b + 1,
                      (b & 0xFF80) if (b & 0x7FFF) > 0x0100 else b):
            if (other >> 7) & 0xFF in (0, 0xFF):
                continue
            yield check_propE3(w, bf16_value(other), 1e-3)
