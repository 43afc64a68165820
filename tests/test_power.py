"""theory.power: the seed rule, its Monte Carlo power against a closed form at two seeds, seeds needed on
constructed effect tables with known answers, the t-test sample size against published values, and the exact sign
test against hand counts and scipy."""

from __future__ import annotations

import doctest
import math
from fractions import Fraction

import numpy as np
import pytest
import scipy
from hypothesis import example, given
from hypothesis import strategies as st
from scipy import integrate, stats

import theory.power as power
from theory.errors import InputError
from theory.power import (
    MAX_SEEDS,
    POWER_DRAWS,
    seed_rule_codes,
    seed_rule_power,
    seeds_needed,
    sign_test_critical_count,
    sign_test_n_for_power,
    sign_test_power,
    sign_test_pvalue,
    t_test_pvalue,
    t_test_seeds,
)

RULE = dict(min_effect=0.05, spread_factor=1.0, min_seeds=2)


def test_docstring_examples_run():
    assert doctest.testmod(power).failed == 0


# ----------------------------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize("effects, code", [
    ([0.30, 0.32, 0.31], 1),        # for: far above the min effect, tiny spread
    ([-0.20, -0.22], -1),           # against: opposite direction
    ([0.001, 0.002], -1),           # against: no effect, tiny spread
    ([0.40, -0.05], 0),             # spread swamps the effect
    ([0.06, 0.50], 0),              # every seed above c but mean < spread
    ([0.90], 0),                    # too few seeds
    ([0.3, float("nan")], 0),
    ([0.05, 0.05], 0),              # at c exactly: neither strict inequality holds
])
def test_seed_rule_on_constructed_tables(effects, code):
    assert int(seed_rule_codes(effects, **RULE)) == code


def test_seed_rule_is_row_wise():
    got = seed_rule_codes([[0.30, 0.32], [-0.2, -0.22], [0.4, -0.05]], **RULE)
    assert got.tolist() == [1, -1, 0]


# ----------------------------------------------------------------------------------------------------------------
# Power of the rule


def _two_seed_power(mean: float, sd: float, c: float, S: float) -> tuple[float, float]:
    """P(reproduced), P(not reproduced) at n = 2 by quadrature. With e_i = m + s z_i, the half sum a = (z1+z2)/2 ~
    N(0, 1/2) and the difference d = |z1 - z2| ~ |N(0, 2)| are independent; mean = m + s a, min = m + s (a - d/2),
    spread = s d. So P(rep) = E_d[ P(a > max((c - m)/s + d/2, S d - m/s)) ], P(not) = E_d[ P(a < (c - m)/s - S d) ]."""
    fd = lambda d: 2 * stats.norm.pdf(d, scale=math.sqrt(2))  # noqa: E731
    sa = math.sqrt(0.5)
    rep = integrate.quad(lambda d: fd(d) * stats.norm.sf(max((c - mean) / sd + d / 2, S * d - mean / sd) / sa),
                         0, np.inf, epsabs=1e-12)[0]
    nrep = integrate.quad(lambda d: fd(d) * stats.norm.cdf(((c - mean) / sd - S * d) / sa), 0, np.inf,
                          epsabs=1e-12)[0]
    return rep, nrep


@pytest.mark.parametrize("mean, sd", [(0.3, 0.1), (0.2, 0.2), (0.0, 0.1), (-0.1, 0.3), (0.06, 0.01)])
def test_two_seed_power_matches_the_closed_form(mean, sd):
    """Monte Carlo error model: the estimate of a probability p from POWER_DRAWS draws has standard error
    sqrt(p (1 - p) / POWER_DRAWS); 5 standard errors (plus the quadrature's 1e-9) bound the difference."""
    P = seed_rule_power(mean, sd, **RULE)
    rep, nrep = _two_seed_power(mean, sd, RULE["min_effect"], RULE["spread_factor"])
    for got, want in ((P["reproduced"][1], rep), (P["not reproduced"][1], nrep)):
        tol = 5 * math.sqrt(max(want * (1 - want), 1e-6) / POWER_DRAWS) + 1e-9
        assert abs(got - want) <= tol, (got, want)
    assert P["reproduced"][0] == P["not reproduced"][0] == 0.0  # one seed: always inconclusive


def test_power_is_reproducible_bit_for_bit_and_identical_effects_are_exact():
    a = seed_rule_power(0.2, 0.1, **RULE)["reproduced"]
    b = seed_rule_power(0.2, 0.1, **RULE)["reproduced"]
    np.testing.assert_array_equal(a, b)
    P = seed_rule_power(0.3, 0.0, **RULE)
    assert P["reproduced"].tolist() == [0.0] + [1.0] * (MAX_SEEDS - 1)
    assert P["not reproduced"].tolist() == [0.0] * MAX_SEEDS


def test_the_spread_condition_gets_harder_with_more_seeds():
    """The rule's mean > spread: the expected spread of n normals grows like sd * d_n, so P(reproduced) falls with
    n for an effect a few sd above c (a property of the rule the seeds_needed notes report)."""
    P = seed_rule_power(1.0, 0.5, min_effect=0.0, spread_factor=1.0, min_seeds=2)["reproduced"]
    assert P[1] > P[4] > P[9] > P[39]
    assert P[39] < 0.2


# ----------------------------------------------------------------------------------------------------------------
# Seeds needed on constructed tables with known answers


def test_identical_effects_need_two_seeds_either_way():
    up = seeds_needed([0.3, 0.3, 0.3], **RULE)
    assert (up.n, up.target, up.power_now) == (2, "reproduced", 1.0)
    down = seeds_needed([0.0, 0.0], **RULE)
    assert (down.n, down.target) == (2, "not reproduced")


def test_a_strong_effect_needs_two_seeds_and_its_t_test_agrees():
    """effects [m - s, m, m + s] have sample sd exactly s; m = 3, s = 1, c = 0: the rule gives 'reproduced' at two
    seeds with P ~ 0.94, and the t-test at d = 3 needs 3 seeds (noncentral t)."""
    r = seeds_needed([2.0, 3.0, 4.0], min_effect=0.0, spread_factor=1.0, min_seeds=2)
    assert r.n == 2 and r.target == "reproduced" and r.best_n == 2
    assert r.t_test_n == t_test_seeds(3.0, 1.0, min_effect=0.0) == 3


def test_a_weak_effect_is_unreachable_by_the_rule_but_not_by_a_t_test():
    """m - c = s / 2: the rule never reaches P >= 0.8; the one-sided t-test needs 27 seeds (G*Power: d = 0.5,
    alpha = 0.05 one-tailed, power 0.8 -> n = 27)."""
    r = seeds_needed([-0.5, 0.5, 1.5], min_effect=0.0, spread_factor=1.0, min_seeds=2)
    assert r.n is None and r.note.startswith("unreachable") and r.target == "reproduced"
    assert r.best_power < 0.8 and r.t_test_n == 27
    assert r.as_numbers()["t_test_seeds"] == 27


def test_one_seed_and_nonfinite_effects_are_not_estimable():
    r = seeds_needed([0.4], **RULE)
    assert r.n is None and "one seed" in r.note and r.target == "reproduced"
    assert math.isnan(r.power_now) and r.as_numbers()["rule_power_at_observed_n"] is None
    assert seeds_needed([0.4, float("nan")], **RULE).note == "no finite per-seed effects"
    assert seeds_needed([], **RULE).n is None


@given(st.lists(st.floats(-1, 1), min_size=2, max_size=6))
@example([0.06, 0.5])
@example([0.3, 0.31])
def test_seeds_needed_is_consistent_with_its_power_curve(effects):
    """n is the first seed count with P >= 0.8, and the power at the observed count is the curve's value there."""
    r = seeds_needed(effects, **RULE)
    e = np.asarray(effects)
    P = seed_rule_power(float(e.mean()), float(e.std(ddof=1)), **RULE)[r.target]
    reach = np.flatnonzero(P >= 0.8)
    assert r.n == (int(reach[0]) + 1 if reach.size else None)
    assert r.power_now == P[len(effects) - 1]
    assert r.best_power == P.max()


# ----------------------------------------------------------------------------------------------------------------
# t-test


@pytest.mark.parametrize("d, n", [(1.0, 8), (0.5, 27)])
def test_t_test_sample_sizes_match_published_tables(d, n):
    """One-sample t-test, one-tailed alpha = 0.05, power 0.8 (Cohen's tables; G*Power 'Means: difference from
    constant'): d = 0.5 -> 27, d = 1.0 -> 8. Holds for scipy 1.17 (the noncentral t of scipy.stats)."""
    assert scipy.__version__.startswith("1.17")
    assert t_test_seeds(0.1 + d, 1.0, min_effect=0.1) == n
    assert t_test_seeds(0.1 - d, 1.0, min_effect=0.1) == n  # the 'not reproduced' direction is symmetric


@pytest.mark.parametrize("d", [0.8, 2.0])
def test_t_test_sample_size_brackets_the_simulated_power(d):
    """Independent of the noncentral t: simulate the one-sided t-test (20000 seeded samples of n normals with mean
    d, sd 1): its rejection rate at the returned n is >= 0.8 and at n - 1 below 0.8, up to 5 standard errors."""
    n = t_test_seeds(d, 1.0, min_effect=0.0)
    rng = np.random.default_rng(0)
    draws = 20000

    def rate(k: int) -> float:
        X = d + rng.standard_normal((draws, k))
        t = X.mean(axis=1) / (X.std(axis=1, ddof=1) / math.sqrt(k))
        return float(np.mean(t > stats.t.ppf(0.95, k - 1)))

    se = 5 * math.sqrt(0.8 * 0.2 / draws)
    assert rate(n) >= 0.8 - se
    assert n == 2 or rate(n - 1) < 0.8 + se


def test_t_test_edge_cases():
    assert t_test_seeds(0.3, 0.0, min_effect=0.05) == 2
    assert t_test_seeds(0.05, 0.2, min_effect=0.05) is None
    assert t_test_seeds(0.06, 10.0, min_effect=0.05, max_seeds=64) is None
    with pytest.raises(InputError):
        t_test_seeds(float("nan"), 1.0, min_effect=0.0)
    assert t_test_pvalue([0.3, 0.3], min_effect=0.05) == 0.0
    assert t_test_pvalue([0.3, 0.3], min_effect=0.05, greater=False) == 1.0
    assert math.isnan(t_test_pvalue([0.3], min_effect=0.05))
    # t = (mean - c) / (s / sqrt(n)) = 2 sqrt(3) on [1, 2, 3]: the survival function of t with 2 df
    assert t_test_pvalue([1.0, 2.0, 3.0], min_effect=0.0) == pytest.approx(
        0.5 * (1 - 2 * math.sqrt(3) / math.sqrt(2 + 12)), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Exact sign test


def test_sign_test_pvalues_are_exact_binomial_tails():
    assert sign_test_pvalue(14, 14) == Fraction(1, 2**14)
    assert sign_test_pvalue(11, 14) == Fraction(1 + 14 + 91 + 364, 2**14)
    assert sign_test_pvalue(0, 7) == 1
    assert sign_test_critical_count(14, 0.05) == 11
    assert sign_test_critical_count(5, Fraction(1, 32)) == 5  # 2^-5 = alpha exactly: p <= alpha rejects
    assert sign_test_critical_count(4, 0.05) is None  # 1/16 > 0.05: four matrices can never reject
    with pytest.raises(InputError):
        sign_test_pvalue(15, 14)
    with pytest.raises(InputError):
        sign_test_critical_count(0, 0.05)


@pytest.mark.parametrize("n, p1", [(14, Fraction(4, 5)), (10, Fraction(7, 10)), (3, Fraction(9, 10)), (40, 0.6)])
def test_sign_test_power_matches_scipy_binomial(n, p1):
    """The exact rational power against scipy.stats.binom.sf (scipy 1.17), to float rounding."""
    c = sign_test_critical_count(n, 0.05)
    want = 0.0 if c is None else stats.binom.sf(c - 1, n, float(p1))
    assert float(sign_test_power(n, p1, 0.05)) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_sign_test_n_for_power():
    n = sign_test_n_for_power(Fraction(4, 5), 0.05)
    assert sign_test_power(n, Fraction(4, 5), 0.05) >= Fraction(4, 5)
    assert all(sign_test_power(m, Fraction(4, 5), 0.05) < Fraction(4, 5) for m in range(1, n))
    assert sign_test_n_for_power(Fraction(1, 2), 0.05, max_n=50) is None  # no power against H0 itself
