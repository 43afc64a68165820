"""Gate III, precision: Cor 3.6, Lemma E.1 (within and across binades), Lemma E.2 and Prop E.3 as registered
checks (``theory.RESULTS``), each with a seeded campaign over bf16 values.

They are decided by the exact bf16 oracle ``theory.bf16`` (integer and ``fractions.Fraction`` arithmetic; its
module docstring gives the bf16 format, the two step semantics and the exact realization rule) and its vectorised
twin ``theory.bf16_array``.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from typing import Any, Iterator

import numpy as np

from theory.bf16 import (
    SEMANTICS, Semantics, _as_fraction, _direction, _finite_bf16, _floor_log2, bf16_value, decode_bf16,
    realization_threshold, ulp_bf16,
)
from theory.bf16_array import probe_unchanged
from theory.check import Check, assumption_failed, make_check, register
from theory.errors import ComplexInputError, InputError, NonFiniteError

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


# ---------------------------------------------------------------------------------------------------------------
# The bf16 oracle moved to theory.bf16 and theory.bf16_array; its names are re-exported for one release.
# ---------------------------------------------------------------------------------------------------------------
from theory.bf16 import (  # noqa: E402,F401  (re-exported for one release)
    BF16_MAX, BF16_MIN_NORMAL, BF16_MIN_SUBNORMAL, Decoded, Threshold, bf16_bits, bf16_step, decode_f32,
    exact_scalar, is_bf16_representable, next_down, next_up, round_to_bf16_bits, round_to_f32_bits,
)
from theory.bf16_array import (  # noqa: E402,F401  (re-exported for one release)
    _ulp_array, bf16_round_array, bf16_step_array, half_ulp_mask, predict_change_mask,
    realization_threshold_array, rule_of_thumb_mask,
)
