"""Tests for proofs_check.exhaustive_bf16: every check reaches its expected outcome over all 65,536 patterns, the
reported counterexamples are true ones (exact Fractions), and the neighbour reduction used for relative gaps
agrees with brute force over every pair on a smaller domain."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proofs_check import exhaustive_bf16 as X
from proofs_check.common import ProofResult
from theory import precision as P


def rel_gap(x: Fraction, y: Fraction) -> Fraction:
    return abs(x - y) / max(abs(x), abs(y))


@pytest.fixture(scope="module")
def results() -> dict[str, ProofResult]:
    return {chk.__name__: chk() for chk in X.CHECKS}


def test_every_check_is_exhaustive_and_as_expected(results):
    assert len(results) == len(X.CHECKS) >= 12
    for name, r in results.items():
        assert isinstance(r, ProofResult) and r.method == "exhaustive"
        assert r.ok, f"{name}: {r.line()}"


def test_refuted_claims_are_the_expected_ones(results):
    refuted = {n for n, r in results.items() if not r.proved}
    assert refuted == {"lemE1_across_binade_strict", "propE3_eta_2m8", "cor36_as_stated_exact",
                       "cor36_as_stated_fp32"}


def test_cross_binade_counterexample_is_true_and_first(results):
    x, y = results["lemE1_across_binade_strict"].counterexample
    assert (P.bf16_bits(x), P.bf16_bits(y)) == (0x00FF, 0x0100)  # largest mantissa of 2^-126's binade, 2^-125
    assert rel_gap(Fraction(x), Fraction(y)) == Fraction(1, 256)  # not > 2^-8
    assert not P.check_lemE1_across(x, y).holds


def test_probe_breaks_first_at_eta_2m8_and_not_at_2m9(results):
    x, y = results["propE3_eta_2m8"].counterexample
    assert x != y and P.probe_unchanged(x, y, 2.0**-8)  # different values the probe calls unchanged
    assert not P.probe_unchanged(x, y, np.nextafter(2.0**-8, 0))
    for name in ("propE3_eta_1e3", "propE3_eta_2m9", "propE3_eta_above_2m9", "propE3_eta_below_2m8"):
        assert results[name].proved and results[name].counterexample is None


def test_cor36_counterexamples_contradict_the_rule(results):
    r = results["cor36_as_stated_exact"]
    assert "506 power-of-two steps towards zero" in r.detail  # 253 powers of two per sign (all but 2^-126)
    assert "no other disagreement: True" in r.detail
    # recount independently with the scalar oracle on the power-of-two cases
    pow2 = [P.bf16_value((s << 15) | (E << 7)) for s in (0, 1) for E in range(2, 255)]
    for w in pow2[::17]:
        quarter, half = P.ulp_bf16(w) / 4, P.ulp_bf16(w) / 2
        d = -np.sign(w) * (quarter + half) / 2  # between ULP/4 and ULP/2 towards zero: the rule says "no"
        assert P.bf16_step(w, d) != w


def test_exact_rule_matches_step_everywhere(results):
    assert results["cor36_exact_rule"].proved and "1305600" in results["cor36_exact_rule"].detail


def brute_misjudged(vals: list[Fraction], eta: Fraction) -> set[tuple[Fraction, Fraction]]:
    """All unordered distinct pairs the probe calls unchanged (r <= eta), by brute force over every pair.

    Exact integer arithmetic: the values are integers after scaling by the common denominator, and
    r <= num/den  <=>  den * |X - Y| <= num * max(|X|, |Y|) (Python ints in object arrays, no overflow)."""
    scale = max(v.denominator for v in vals)
    ints = np.array([int(v * scale) for v in vals], dtype=object)
    X, Y = ints[:, None], ints[None, :]
    big = np.maximum(np.abs(X), np.abs(Y))
    hit = (eta.denominator * np.abs(X - Y) <= eta.numerator * big) & (X < Y)
    i, j = np.nonzero(hit)
    return {(vals[a], vals[b]) for a, b in zip(i.tolist(), j.tolist())}


def test_neighbour_reduction_agrees_with_all_pairs_brute_force():
    """On all bf16 values in +-[0.5, 4) and zero (769 values, 295,296 pairs): the pairs the probe misjudges at
    eta = 2^-8 are exactly the power-of-two neighbour pairs, and none at eta just below 2^-8 -- as the neighbour
    check concludes."""
    pos = [P.decode_bf16(b).value for b in range(0x3F00, 0x4080)]  # 0.5 .. 4 - ulp
    vals = [Fraction(0)] + pos + [-v for v in pos]
    bad = brute_misjudged(vals, Fraction(1, 256))
    expected = {(Fraction(p) - Fraction(p) / 256, Fraction(p)) for p in (1, 2)}
    expected |= {(-b, -a) for a, b in expected}
    assert bad == expected
    assert not brute_misjudged(vals, Fraction(np.nextafter(2.0**-8, 0)))


@given(st.integers(0x0080, 0x7F7F), st.integers(0x0080, 0x7F7F))
@example(0x3F80, 0x3F7F)
@example(0x0080, 0x7F7F)
def test_relative_gap_is_at_least_the_neighbour_gap(a, b):
    """The monotonicity the reduction rests on: for positive x < y, r(x, y) >= r(x, next_up(x))."""
    if a == b:
        return
    lo, hi = min(a, b), max(a, b)
    x, y, nx = (P.decode_bf16(v).value for v in (lo, hi, lo + 1))
    assert rel_gap(x, y) >= rel_gap(x, nx)
