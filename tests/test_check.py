"""Tests of theory.check: the three-way verdict (exact comparison), tolerances that are finite and >= 0 by
construction, indeterminate checks that never read "holds", links that can only refute."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from theory.check import (
    SEPARATION,
    Check,
    assumption_failed,
    decide,
    indeterminate,
    ldexp_sat,
    make_check,
    refine,
)
from theory.errors import ToleranceError

finite = st.floats(allow_nan=False, allow_infinity=False)
any_float = st.floats(allow_nan=True, allow_infinity=True)
tolerance = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
bad_tolerance = st.one_of(st.floats(max_value=-5e-324), st.just(math.inf), st.just(math.nan), st.just(-math.inf))


@given(finite, finite, tolerance)
@example(1.0, 1.0, 0.0)  # attained, computed exactly: holds
@example(1.0, 1.0, 1e-16)  # attained, with rounding: indeterminate
@example(0.1, 0.3, 0.2)  # 0.3 - 0.1 = 0.19999999999999998 in float64 but 0.2 - ... exactly: see the oracle
@example(1e308, -1e308, 0.0)  # the float difference overflows; the exact one does not
@example(5e-324, 0.0, 0.0)
@example(1.5, 1.0, 0.5)  # lhs - rhs == tol exactly: indeterminate, not violated (violated needs lhs - rhs > tol)
@example(1.0, 1.5, 0.5)  # rhs - lhs == tol exactly: holds (the "holds" comparison is inclusive)
def test_decide_is_the_exact_three_way_comparison(lhs, rhs, tol):
    """holds iff rhs - lhs >= tol, violated iff lhs - rhs > tol, else indeterminate -- on the exact rationals."""
    m, t = Fraction(rhs) - Fraction(lhs), Fraction(tol)
    expected = "holds" if m >= t else "violated" if -m > t else "indeterminate"
    assert decide(lhs, rhs, tol) == expected
    c = make_check("x", lhs, rhs, tol=tol)
    assert c.verdict == expected and c.holds == (expected == "holds")
    assert c.tol == tol and math.isfinite(c.tol) and c.tol >= 0
    if expected == "indeterminate":
        assert not c.assumptions_hold and c.failed_assumption.startswith(SEPARATION)


@given(any_float, any_float, tolerance)
@example(math.nan, 1.0, 0.0)
@example(math.inf, math.inf, 0.0)
@example(1.0, math.inf, 0.0)
@example(math.inf, 1.0, 1e300)
def test_nan_and_infinite_sides(lhs, rhs, tol):
    v = decide(lhs, rhs, tol)
    if math.isnan(lhs) or math.isnan(rhs) or (math.isinf(lhs) and lhs == rhs):
        assert v == "indeterminate"  # a NaN side (or inf <= inf) decides nothing -- never "holds"
    elif math.isinf(lhs) or math.isinf(rhs):
        assert v == ("holds" if lhs < rhs else "violated")
    assert make_check("x", lhs, rhs, tol=tol).verdict == v


@given(finite, finite, bad_tolerance)
@example(1.0, 2.0, -1e-300)
def test_a_tolerance_that_is_not_finite_and_nonnegative_is_refused_everywhere(lhs, rhs, tol):
    with pytest.raises(ToleranceError):
        make_check("x", lhs, rhs, tol=tol)
    with pytest.raises(ToleranceError):
        decide(lhs, rhs, tol)
    with pytest.raises(ToleranceError):
        indeterminate("x", lhs, rhs, tol)
    with pytest.raises(ToleranceError):
        Check("x", "", lhs, rhs, True, True, tol=tol)


def test_a_check_cannot_hold_outside_its_assumptions():
    with pytest.raises(ToleranceError, match="cannot hold"):
        Check("x", "", 0.0, 1.0, holds=True, assumptions_hold=False)
    c = assumption_failed("x", "gap > 0")
    assert c.verdict == "assumption-failed" and not c.holds and c.tol == 0.0


@given(finite.filter(lambda x: abs(x) < 1e300), finite.filter(lambda x: abs(x) < 1e300), tolerance.filter(lambda t: t < 1e300),
       st.integers(-1000, 1000))
@example(-1e300, 1.0, 0.0, 1000)  # a negative side that overflows when scaled back: -inf, not +inf
@example(1e300, -1e300, 1.0, 1000)
def test_exponent_decides_on_the_scaled_values_and_reports_the_inputs_units(lhs, rhs, tol, e):
    c = make_check("x", lhs, rhs, tol=tol, exponent=e)
    assert c.verdict == decide(lhs, rhs, tol)  # decided before scaling back: no overflow can change it
    for got, x in ((c.lhs, lhs), (c.rhs, rhs)):
        try:
            assert got == math.ldexp(x, e)
        except OverflowError:
            assert math.isinf(got) and (got > 0) == (x > 0)
    assert math.isfinite(c.tol) and c.tol >= 0


def test_refine_links_can_refute_but_never_turn_indeterminate_into_holds():
    ok = make_check("x", 1.0, 2.0, tol=0.1)
    assert refine(ok, {"a": "holds"}).verdict == "holds"
    bad = refine(ok, {"a": "holds", "b": "violated"})
    assert bad.verdict == "violated" and bad.details["failed_link"] == "b"
    und = refine(ok, {"a": "indeterminate"})  # an attained link (e.g. a triangle inequality) is listed, not judged
    assert und.verdict == "holds" and und.details["undecided_links"] == "a"
    ind = make_check("x", 1.0, 1.0, tol=0.1)
    assert refine(ind, {"a": "holds"}).verdict == "indeterminate"
    assert refine(ind, {"a": "violated"}).verdict == "indeterminate"  # no lhs/rhs verdict to refute
    fa = assumption_failed("x", "gap > 0")
    assert refine(fa, {"a": "violated"}) is fa


def test_the_boundary_of_each_verdict_is_exactly_at_tol():
    """At |rhs - lhs| == tol exactly (dyadic values, so the floats are the rationals): the "holds" side is inclusive,
    the "violated" side strict; one ulp of the tolerance either way moves the verdict."""
    tol = 0.5
    assert decide(1.0, 1.5, tol) == "holds"
    assert decide(1.5, 1.0, tol) == "indeterminate"
    assert decide(1.5, 1.0, math.nextafter(tol, 0.0)) == "violated"
    assert decide(1.0, 1.5, math.nextafter(tol, 1.0)) == "indeterminate"
    assert make_check("x", 1.5, 1.0, tol=tol).verdict == "indeterminate"


def test_ldexp_sat_saturates_with_the_sign_of_x():
    assert ldexp_sat(-1.0, 2000) == -math.inf and ldexp_sat(1.0, 2000) == math.inf
    assert ldexp_sat(-3.0, -1) == -1.5 and ldexp_sat(-5e-324, -1) == 0.0
    c = make_check("x", -1.0, 1.0, tol=0.0, exponent=2000)  # decided on (-1, 1): holds; stored as (-inf, inf)
    assert c.verdict == "holds" and c.lhs == -math.inf and c.rhs == math.inf


@pytest.mark.parametrize("lhs, rhs, ratio", [(1.0, 4.0, 0.25), (0.0, 0.0, 0.0), (3.0, 0.0, math.inf), (0.0, 2.0, 0.0)])
def test_ratio_is_lhs_over_rhs_and_defined_at_rhs_zero(lhs, rhs, ratio):
    """ratio = lhs / rhs (tightness); a bound 0 <= 0 is attained trivially (ratio 0), a nonzero lhs against rhs 0 is
    infinitely far off (inf)."""
    c = make_check("x", lhs, rhs)
    assert c.ratio == ratio and c.slack == rhs - lhs


def test_refine_keeps_the_undecided_links_of_a_violated_check():
    v = make_check("x", 2.0, 1.0, tol=0.1)
    r = refine(v, {"a": "indeterminate", "b": "holds"})
    assert r.verdict == "violated" and r.details["undecided_links"] == "a" and "failed_link" not in r.details
