"""Gate III claims decided over all 65,536 bf16 bit patterns (vectorised numpy, exact arithmetic).

Every check is a zero-argument function returning a ``ProofResult`` with ``method="exhaustive"``. Values are
decoded from bits by integer arithmetic (``bf16 bits << 16`` is the float32 with the same value, and float32 ->
float64 is exact); every quantity compared below (differences of bf16 neighbours, ULPs, relative gaps of
neighbours scaled by powers of two) is exact in float64, so the comparisons are exact.

**Why neighbours suffice for relative gaps (Lemma E.1 across binades, Prop E.3).** For 0 < x < y,
r(x, y) = |x - y| / max(|x|, |y|) = 1 - x/y, which increases as y grows and as x shrinks. So over distinct
positive pairs the minimum of r is attained at a pair of bf16 neighbours (y = next_up(x)), and a pair (x, y) has
r(x, y) >= r(x, next_up(x)). Pairs of opposite sign have r >= 1, pairs with a zero have r = 1, and r is symmetric
under x, y -> -x, -y. Hence "r > eta for every distinct pair" holds iff it holds for every neighbour pair, which
is 65,280 pairs instead of 4.3e9. The same argument with the probe of Def 2.1 (unchanged iff r <= eta) makes the
neighbour check exhaustive for Prop E.3: a distinct pair is misjudged "unchanged" iff r <= eta, and if any pair
is, so is a neighbour pair.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from proofs_check.common import ProofResult
import ml_dtypes

from theory import precision as P

_ALL = np.arange(1 << 16, dtype=np.uint16)


def _values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _exp_field(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.int64) >> 7) & 0xFF


def _positive_normals() -> np.ndarray:
    b = _ALL[: 0x8000]
    E = _exp_field(b)
    return b[(E >= 1) & (E <= 254)]


def _finite_bits() -> np.ndarray:
    return _ALL[_exp_field(_ALL) != 0xFF]


def _neighbour_pairs(normal_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (x, next_up(x)) of positive finite bf16 values (normal ones only if asked), as values."""
    if normal_only:
        b = _positive_normals()
        lo, hi = b[:-1], b[1:]  # consecutive patterns are consecutive values for positive numbers
    else:
        b = _ALL[: 0x7F81]  # +0 .. +inf
        lo, hi = b[:-2], b[1:-1]  # up to (max, 2^128 excluded): pairs of finite values
    return _values(lo), _values(hi)


def _fmt_pair(x: float, y: float) -> str:
    return f"x={x!r} ({P.bf16_bits(x):#06x}), y={y!r} ({P.bf16_bits(y):#06x})"


def lemE1_within_binade() -> ProofResult:
    """Every pair of distinct normal bf16 values in one binade (all 254 x 128 x 127 ordered pairs per sign)."""
    b = _positive_normals().reshape(254, 128)  # one row per binade, mantissas 0..127
    v = _values(b)
    e = np.floor(np.log2(v[:, :1]))  # exact for powers of two
    diff = np.abs(v[:, :, None] - v[:, None, :])
    big = np.maximum(v[:, :, None], v[:, None, :])
    off = ~np.eye(128, dtype=bool)[None]
    abs_ok = (diff >= np.ldexp(1.0, (e - 7).astype(np.int64))[:, :, None]) | ~off
    rel_ok = (diff > big / 256) | ~off  # big/256 exact (power-of-two scaling)
    n_pairs = 2 * 254 * 128 * 127
    ok = bool(abs_ok.all() and rel_ok.all())
    min_rel = float((diff[np.broadcast_to(off, diff.shape)] / big[np.broadcast_to(off, diff.shape)]).min())
    return ProofResult(
        "lemE.1 within a binade",
        "distinct normal bf16 x != y in [2^e, 2^(e+1)): |x-y| >= 2^(e-7) and |x-y|/max > 2^-8",
        ok, f"all {n_pairs} ordered pairs (both signs by symmetry); min relative gap {min_rel!r} "
            f"= 2^{np.log2(min_rel):.4f} > 2^-8", method="exhaustive")


def lemE1_across_binade_strict() -> ProofResult:
    """The paper's 'also across the binade boundary' with the strict '> 2^-8': refuted at every power of two."""
    x, y = _neighbour_pairs(normal_only=True)
    rel = (y - x) / y
    bad = np.flatnonzero(~(rel > 2.0**-8))
    ce = None if bad.size == 0 else (float(x[bad[0]]), float(y[bad[0]]))
    detail = (f"{bad.size} of {x.size} positive normal neighbour pairs have relative gap exactly 2^-8 "
              f"(same count for negatives), all of the form (2^e - 2^(e-8), 2^e); e.g. (0.99609375, 1.0)")
    return ProofResult(
        "lemE.1 across binades (as stated, strict)",
        "distinct normal bf16 x != y satisfy |x-y|/max(|x|,|y|) > 2^-8 also across the binade boundary",
        bad.size == 0, detail + ("" if ce is None else f"; first: {_fmt_pair(*ce)}"),
        counterexample=ce, expected=False, method="exhaustive")


def lemE1_across_binade_corrected() -> ProofResult:
    """Corrected: >= 2^-8 for all distinct normal pairs, equality exactly at (pred(2^e), 2^e)."""
    x, y = _neighbour_pairs(normal_only=True)
    rel = (y - x) / y
    is_pow2 = (P.bf16_round_array(y) & 0x7F) == 0
    eq = rel == 2.0**-8
    ok = bool((rel >= 2.0**-8).all() and np.array_equal(eq, is_pow2))
    return ProofResult(
        "lemE.1 across binades (corrected)",
        "distinct normal bf16 x != y: |x-y|/max(|x|,|y|) >= 2^-8, with equality iff {|x|,|y|} = "
        "{2^e - 2^(e-8), 2^e} (same sign)",
        ok, f"{x.size} neighbour pairs per sign ({int(eq.sum())} equalities, all at powers of two); "
            "neighbours suffice by monotonicity (module docstring)", method="exhaustive")


def lemE2_relative_ulp() -> ProofResult:
    b = P.bf16_round_array(_values(_positive_normals()))
    v = _values(b)
    ulp = np.ldexp(1.0, _exp_field(b) - 127 - 7)
    r = ulp / v
    is_pow2 = (b & 0x7F) == 0
    ok = bool((r > 2.0**-8).all() and (r <= 2.0**-7).all() and np.array_equal(r == 2.0**-7, is_pow2))
    return ProofResult(
        "lemE.2", "normal bf16 x: ULP(x)/|x| in (2^-8, 2^-7], = 2^-7 iff x is a power of two",
        ok, f"{v.size} positive normals (negatives identical); min {float(r.min())!r} = 2^-7 * 128/255, max 2^-7",
        method="exhaustive")


def _probe_equivalence(eta: Fraction, normal_only: bool) -> tuple[bool, tuple[float, float] | None, int]:
    """Does probe-unchanged <=> same value hold for every pair, at this eta? (neighbour check, exact)."""
    x, y = _neighbour_pairs(normal_only)
    lhs, big = y - x, np.abs(y)
    # the probe misjudges a distinct pair iff lhs <= eta * big. Decide it in float64 and re-decide near ties with
    # Fractions (lhs and big are exact; eta * big may not be).
    wrong = lhs <= float(eta) * big
    near = np.abs(lhs - float(eta) * big) <= 2.0**-40 * lhs
    for i in np.flatnonzero(near):
        wrong[i] = Fraction(float(lhs[i])) <= eta * Fraction(float(big[i]))
    bad = np.flatnonzero(wrong)
    ce = None if bad.size == 0 else (float(x[bad[0]]), float(y[bad[0]]))
    return bad.size == 0, ce, int(bad.size)


def _propE3(eta: Fraction, label: str, expected: bool, normal_only: bool = True) -> ProofResult:
    ok, ce, n_bad = _probe_equivalence(eta, normal_only)
    scope = "normal" if normal_only else "finite (zero and subnormals included)"
    return ProofResult(
        f"propE.3 at eta = {label}" + ("" if normal_only else " (all finite)"),
        f"for all {scope} bf16 w, w_hat: |w_hat-w| <= eta*max(|w|,|w_hat|) <=> same value, eta = {label}",
        ok, f"{n_bad} misjudged neighbour pairs (neighbours are exhaustive by monotonicity)"
            + ("" if ce is None else f"; first: {_fmt_pair(*ce)}, relative gap {(ce[1] - ce[0]) / ce[1]!r}"),
        counterexample=ce, expected=expected, method="exhaustive")


def propE3_eta_1e3() -> ProofResult:
    return _propE3(Fraction(1e-3), "1e-3", True)


def propE3_eta_2m9() -> ProofResult:
    return _propE3(Fraction(1, 512), "2^-9", True)


def propE3_eta_above_2m9() -> ProofResult:
    return _propE3(Fraction(np.nextafter(2.0**-9, 1.0)), "nextafter(2^-9, 1)", True)


def propE3_eta_below_2m8() -> ProofResult:
    """The paper's assumption eta < 2^-9 is not sharp: the equivalence holds for every eta < 2^-8."""
    return _propE3(Fraction(np.nextafter(2.0**-8, 0.0)), "nextafter(2^-8, 0)", True)


def propE3_eta_2m8() -> ProofResult:
    """At eta = 2^-8 the probe breaks (first at the power-of-two neighbour pairs)."""
    return _propE3(Fraction(1, 256), "2^-8", False)


def propE3_all_finite() -> ProofResult:
    """Normality is not needed either: with zero and subnormals included it still holds for eta < 2^-8."""
    return _propE3(Fraction(np.nextafter(2.0**-8, 0.0)), "nextafter(2^-8, 0)", True, normal_only=False)


def _rule_vs_exact(semantics: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every finite w and both directions: half ULP, exact threshold, inclusive flag, w bits, direction."""
    wb = np.concatenate([_finite_bits(), _finite_bits()])
    sgn = np.concatenate([np.ones(wb.size // 2), -np.ones(wb.size // 2)])
    half = np.ldexp(1.0, np.maximum(_exp_field(wb), 1) - 127 - 8)
    t, incl = P.realization_threshold_array(wb.view(ml_dtypes.bfloat16), sgn, semantics)
    return half, t, incl, wb, sgn


def cor36_as_stated_exact() -> ProofResult:
    """Cor 3.6 read as 'changes iff |delta| >= ULP/2', under one exact rounding: refuted, with the cases counted."""
    half, t, incl, wb, sgn = _rule_vs_exact("exact")
    agree = (half == t) & incl
    mag = wb & 0x7FFF
    pow2_down = (t == half / 2)
    tie = (half == t) & ~incl
    zero = mag == 0
    n = half.size
    even_nonzero = ((wb & 1) == 0) & ~zero
    bad = np.flatnonzero(~agree)
    detail = (f"{n} (w, direction) cases: rule exact in {int(agree.sum())}; wrong in {bad.size}: "
              f"{int(pow2_down.sum())} power-of-two steps towards zero (threshold ULP/4), "
              f"{int(tie.sum())} ties at exactly ULP/2 that round back to an even w "
              f"({int(even_nonzero.sum() - pow2_down.sum())} nonzero + {int((tie & zero).sum())} at +-0); "
              f"no other disagreement: {bool(np.array_equal(~agree, pow2_down | tie))}")
    # illustrate both kinds at w = 1 (both are in the counted sets above)
    i_tie = int(np.flatnonzero((wb == 0x3F80) & (sgn > 0))[0])
    i_pow = int(np.flatnonzero((wb == 0x3F80) & (sgn < 0))[0])
    assert tie[i_tie] and pow2_down[i_pow]
    d_pow = -0.75 * float(half[i_pow])  # between ULP/4 and ULP/2 towards zero
    ce = (f"tie: w=1.0, delta=+ULP/2={float(half[i_tie])!r} -> {P.bf16_step(1.0, float(half[i_tie]))!r} "
          f"(unchanged); power of two: w=1.0, delta={d_pow!r} (< ULP/2) -> {P.bf16_step(1.0, d_pow)!r}")
    return ProofResult(
        "cor3.6 as stated (exact rounding)", "stored w changes iff |delta| >= ULP(w)/2",
        bad.size == 0, detail, counterexample=ce,
        expected=False, method="exhaustive")


def cor36_as_stated_fp32() -> ProofResult:
    """The same rule against fp32 master semantics (double rounding): wrong almost everywhere, by a hair."""
    half, t, incl, wb, sgn = _rule_vs_exact("fp32")
    agree = (half == t) & incl
    below = t < half
    above = t > half
    rel = np.abs(t - half) / half
    not_pow2_down = t > 0.75 * half  # power-of-two steps towards zero have t close to ULP/4 instead
    detail = (f"{half.size} cases: rule exact in {int(agree.sum())}; exact threshold below ULP/2 in "
              f"{int(below.sum())} (double rounding realises steps slightly under ULP/2), above in "
              f"{int(above.sum())}, equal but not attained in {int(((t == half) & ~incl).sum())}; "
              f"away from power-of-two downward steps |t - ULP/2|/(ULP/2) <= {rel[not_pow2_down].max():.3g}")
    i = int(np.flatnonzero(below)[0])
    w0 = float(_values(wb[i:i + 1])[0])
    return ProofResult(
        "cor3.6 as stated (fp32 master)", "stored w changes iff |delta| >= ULP(w)/2, w <- bf16(f32(w + f32(delta)))",
        bool(agree.all()), detail, counterexample=f"w={w0!r}, direction {int(sgn[i]):+d}, threshold {float(t[i])!r} < "
                                                  f"ULP/2 = {float(half[i])!r}",
        expected=False, method="exhaustive")


def cor36_exact_rule() -> ProofResult:
    """The corrected rule (``predict_change_mask``) equals the simulated step for every finite w, both directions,
    both semantics, at the threshold and at the float64 neighbours on either side of it."""
    ok, n = True, 0
    first = None
    for sem in P.SEMANTICS:
        half, t, incl, wb, sgn = _rule_vs_exact(sem)
        w = wb.view(ml_dtypes.bfloat16)
        for d_abs in (np.nextafter(t, 0.0), t, np.nextafter(t, np.inf), half, 2 * half):
            d = sgn * d_abs
            pred = P.predict_change_mask(w, d, sem)
            after = P.bf16_step_array(w, d, sem).astype(np.float64)
            real = after != w.astype(np.float64)
            n += d.size
            if not np.array_equal(pred, real):
                ok = False
                i = int(np.flatnonzero(pred != real)[0])
                first = first or (sem, float(w.astype(np.float64)[i]), float(d[i]))
    return ProofResult(
        "cor3.6 exact realization rule", "changes iff |delta| > t or (|delta| = t and the neighbour is even), "
        "t = half the gap to the neighbour in the step's direction (fp32: the double-rounding threshold)",
        ok, f"{n} (w, delta, semantics) cases, rule vs integer-bit simulation of the step", counterexample=first,
        method="exhaustive")


CHECKS = [
    lemE1_within_binade,
    lemE1_across_binade_strict,
    lemE1_across_binade_corrected,
    lemE2_relative_ulp,
    propE3_eta_1e3,
    propE3_eta_2m9,
    propE3_eta_above_2m9,
    propE3_eta_below_2m8,
    propE3_eta_2m8,
    propE3_all_finite,
    cor36_as_stated_exact,
    cor36_as_stated_fp32,
    cor36_exact_rule,
]
