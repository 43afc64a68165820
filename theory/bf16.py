"""The exact bf16 oracle on one number: decoding, rounding bits, ULPs, neighbours, one step, and the exact
threshold at which a step changes a stored bf16 weight (the corrected Cor 3.6; the Gate III checks are
``theory.precision``, the vectorised arrays ``theory.bf16_array``).


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
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, NamedTuple

import numpy as np

from theory.errors import ComplexInputError, InputError, NonFiniteError
from theory.linalg import reject_complex

__all__ = [
    "BF16_MAX", "BF16_MIN_NORMAL", "BF16_MIN_SUBNORMAL",
    "Decoded", "decode_bf16", "decode_f32", "bf16_bits", "bf16_value", "is_bf16_representable",
    "ulp_bf16", "next_up", "next_down",
    "round_to_bf16_bits", "round_to_f32_bits", "bf16_step",
    "SEMANTICS", "Semantics", "Threshold", "realization_threshold", "exact_scalar",
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


def _torch_if_tensor(x: Any) -> Any:
    """The torch module if x is a torch tensor (without importing torch for numpy inputs), else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


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
