"""How many seeds a verdict needs: the seed rule of the claim experiments, its power, and the exact sign test.

**The seed rule** (``seed_rule_codes``; ``sims.claims.base.effect_verdict`` judges every effect claim with it). A
claim about an effect is judged on its per-seed effects e_1..e_n against the smallest effect it needs, ``c``:

* reproduced (+1) iff n >= ``min_seeds``, every e_s > c and mean(e) > S * spread;
* not reproduced (-1) iff n >= ``min_seeds`` and mean(e) + S * spread < c;
* inconclusive (0) otherwise,

with spread = max(e) - min(e) and S the spread factor.

**Seeds needed** (``seeds_needed``): a plug-in power estimate. The per-seed effects are modelled as independent
normal draws with the observed mean ``m`` and sample standard deviation ``s`` (ddof = 1); the verdict the
observed mean points to (reproduced when m > c, else not reproduced) is the *target*; ``P_n`` = the probability
that n seeds give the target verdict under the rule, estimated by Monte Carlo with ``POWER_DRAWS`` seeded draws
of n standard normals (common random numbers for every n: column prefixes of one seeded matrix, so the result is
bit-reproducible); ``seeds_needed`` = the smallest n in [min_seeds, ``MAX_SEEDS``] with ``P_n >= TARGET_POWER``.
Its Monte Carlo error is ``sqrt(P (1 - P) / POWER_DRAWS)`` <= 0.0036.

Two consequences of the rule that the numbers show, and that a reader should know:

* the spread of n normal draws grows with n (its mean is ``s * d_n``: d_2 = 1.128, d_5 = 2.326, d_10 = 3.078,
  d_64 = 4.8), so the condition mean > S * spread gets *harder* with more seeds. An effect below about 1.3 standard
  deviations (S = 1) never reaches P_n >= 0.8 at any n: ``seeds_needed`` is then None with the note
  ``unreachable``, and more seeds cannot settle the claim under this rule;
* the standard-statistics answer is given beside it: ``t_test_seeds`` = the smallest n at which a one-sided
  one-sample t-test of ``mean > c`` (or ``< c``) at level ``T_TEST_ALPHA`` has power ``TARGET_POWER`` under the same
  normal model (noncentral t), e.g. 8 seeds when (m - c) / s = 1 and 27 when it is 0.5; and ``t_test_pvalue``, the
  one-sided p-value of the observed effects under that test.

With fewer than two seeds (or zero spread) ``s`` is not estimable; the result says so, except that identical
effects (s = 0) are taken at face value: every n >= min_seeds gives the same verdict as n = 2.

**Exact sign test** (``sign_test_pvalue``, ``sign_test_critical_count``, ``sign_test_power``,
``sign_test_n_for_power``): one-sided binomial test of H0: P(X > 0) = 1/2 against H1: > 1/2, in exact rational
arithmetic (``fractions.Fraction``): the p-value of k successes in n is ``sum_{i >= k} C(n, i) / 2^n``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations
from typing import Any, Sequence

import numpy as np

from theory.errors import InputError

__all__ = [
    "REPRODUCED", "NOT_REPRODUCED", "INCONCLUSIVE", "CODES", "TARGET_POWER", "MAX_SEEDS", "POWER_DRAWS",
    "POWER_SEED", "T_TEST_ALPHA", "seed_rule_codes", "seed_rule_power", "SeedsNeeded", "seeds_needed",
    "t_test_seeds", "t_test_pvalue", "rank_sum_pvalue", "sign_test_pvalue", "sign_test_critical_count", "sign_test_power", "sign_test_n_for_power",
]

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
#: The integer code of each verdict in ``seed_rule_codes``.
CODES = {REPRODUCED: 1, NOT_REPRODUCED: -1, INCONCLUSIVE: 0}
#: A verdict counts as reachable at n seeds when the rule gives it with at least this probability.
TARGET_POWER = 0.8
#: The largest number of seeds searched.
MAX_SEEDS = 64
#: Monte Carlo draws per n (the estimate's standard error is at most 0.5 / sqrt(POWER_DRAWS) = 0.0035).
POWER_DRAWS = 20_000
#: Seed of the standard-normal matrix shared by every power estimate.
POWER_SEED = 20251111
#: Level of the one-sided t-test whose sample size ``t_test_seeds`` reports.
T_TEST_ALPHA = 0.05


def seed_rule_codes(effects: Any, *, min_effect: float, spread_factor: float, min_seeds: int) -> np.ndarray:
    """The seed rule (module docstring) on the last axis of ``effects``: +1 reproduced, -1 not reproduced, 0
    inconclusive, one code per row. Rows with a non-finite effect are inconclusive.

    Examples
    --------
    >>> seed_rule_codes([[0.3, 0.4], [-0.2, -0.1], [0.3, 0.9]], min_effect=0.05, spread_factor=1.0, min_seeds=2)
    array([ 1, -1,  0], dtype=int8)
    """
    E = np.asarray(effects, dtype=np.float64)
    if E.ndim == 0:
        raise InputError("effects must have at least one axis (the seeds)")
    n = E.shape[-1]
    if n < min_seeds or n == 0:
        return np.zeros(E.shape[:-1], dtype=np.int8)
    finite = np.isfinite(E).all(axis=-1)
    with np.errstate(invalid="ignore"):
        mean = E.mean(axis=-1)
        spread = E.max(axis=-1) - E.min(axis=-1)
        rep = finite & (E.min(axis=-1) > min_effect) & (mean > spread_factor * spread)
        nrep = finite & (mean + spread_factor * spread < min_effect)
    return np.where(rep, 1, np.where(nrep, -1, 0)).astype(np.int8)


@functools.lru_cache(maxsize=8)
def _running_statistics(draws: int, max_n: int, seed: int, spread_factor: float) -> tuple[np.ndarray, ...]:
    """For a seeded (draws, max_n) matrix Z of standard normals and every prefix of n = 1..max_n columns: min(Z),
    mean(Z) - S spread(Z) and mean(Z) + S spread(Z) (read-only). Effects m + s Z (s > 0) have min m + s min(Z),
    mean m + s mean(Z) and spread s spread(Z), so the rule's conditions read min(Z) > (c - m) / s,
    mean(Z) - S spread(Z) > -m / s and mean(Z) + S spread(Z) < (c - m) / s: one matrix serves every (m, s)."""
    Z = np.random.default_rng(seed).standard_normal((draws, max_n))
    z_mean = np.cumsum(Z, axis=1) / np.arange(1, max_n + 1)
    z_min = np.minimum.accumulate(Z, axis=1)
    z_spread = np.maximum.accumulate(Z, axis=1) - z_min
    out = (z_min, z_mean - spread_factor * z_spread, z_mean + spread_factor * z_spread)
    for a in out:
        a.setflags(write=False)
    return out


def seed_rule_power(mean: float, sd: float, *, min_effect: float, spread_factor: float, min_seeds: int,
                    max_seeds: int = MAX_SEEDS, draws: int = POWER_DRAWS, seed: int = POWER_SEED) -> dict[str, np.ndarray]:
    """``{verdict: P}`` with ``P[n - 1]`` the probability that n independent N(mean, sd²) effects get that verdict
    from the seed rule, for n = 1..max_seeds (0 below ``min_seeds``). Monte Carlo over ``draws`` seeded rows (one
    shared standard-normal matrix; the prefixes of its columns give every n), so bit-reproducible; ``sd = 0`` is
    exact (every draw equals the mean).

    Examples
    --------
    >>> P = seed_rule_power(1.0, 0.0, min_effect=0.05, spread_factor=1.0, min_seeds=2, max_seeds=3, draws=10)
    >>> P["reproduced"].tolist(), P["not reproduced"].tolist()
    ([0.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """
    if not (math.isfinite(mean) and math.isfinite(sd) and sd >= 0):
        raise InputError(f"need a finite mean and a finite sd >= 0, got {mean}, {sd}")
    if max_seeds < 1 or draws < 1:
        raise InputError(f"max_seeds and draws must be >= 1, got {max_seeds}, {draws}")
    enough = np.arange(1, max_seeds + 1) >= max(min_seeds, 1)
    if sd == 0.0:  # identical effects: the spread is 0 at every n
        rep, nrep = mean > min_effect and mean > 0.0, mean < min_effect
        return {REPRODUCED: np.where(enough, float(rep), 0.0), NOT_REPRODUCED: np.where(enough, float(nrep), 0.0)}
    z_min, low, high = _running_statistics(draws, max_seeds, seed, float(spread_factor))
    a = (min_effect - mean) / sd
    rep = np.count_nonzero((z_min > a) & (low > -mean / sd), axis=0) / draws
    nrep = np.count_nonzero(high < a, axis=0) / draws
    return {REPRODUCED: np.where(enough, rep, 0.0), NOT_REPRODUCED: np.where(enough, nrep, 0.0)}


@dataclass(frozen=True)
class SeedsNeeded:
    """``n``: seeds the observed effect needs for its verdict (None: not estimable or unreachable, see ``note``);
    ``target``: that verdict; ``power_now``: P(target) at the observed number of seeds; ``best_n`` /
    ``best_power``: where P(target) peaks in 1..MAX_SEEDS; ``t_test_n`` / ``t_test_pvalue``: the one-sided
    t-test's sample size for the target power, and its p-value on the observed effects."""

    n: int | None
    target: str
    note: str
    power_now: float = math.nan
    best_n: int | None = None
    best_power: float = math.nan
    t_test_n: int | None = None
    t_test_pvalue: float = math.nan

    def as_numbers(self) -> dict:
        """The fields for a verdict's numbers (NaN as None: the numbers are written as JSON)."""
        nan_none = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
        return {k: nan_none(v) for k, v in {"seeds_needed_target": self.target, "seeds_needed_note": self.note,
                "rule_power_at_observed_n": self.power_now, "rule_power_best_n": self.best_n,
                "rule_power_best": self.best_power, "t_test_seeds": self.t_test_n,
                "t_test_pvalue": self.t_test_pvalue}.items()}


def seeds_needed(effects: Sequence[float], *, min_effect: float, spread_factor: float, min_seeds: int,
                 target_power: float = TARGET_POWER, max_seeds: int = MAX_SEEDS) -> SeedsNeeded:
    """Seeds the observed per-seed ``effects`` would need for the seed rule to give the verdict their mean points to
    with probability >= ``target_power`` (module docstring).

    Examples
    --------
    >>> seeds_needed([0.30, 0.31], min_effect=0.05, spread_factor=1.0, min_seeds=2).n  # 25 sd above c
    2
    >>> r = seeds_needed([0.0, 0.3], min_effect=0.05, spread_factor=1.0, min_seeds=2)  # 0.5 sd above c
    >>> r.n, r.note.split(":")[0], r.t_test_n
    (None, 'unreachable', 30)
    >>> seeds_needed([0.4], min_effect=0.05, spread_factor=1.0, min_seeds=2).note
    'one seed: the seed-to-seed spread, and so the power, cannot be estimated'
    """
    e = np.asarray([float(x) for x in effects], dtype=np.float64)
    if e.size == 0 or not np.isfinite(e).all():
        return SeedsNeeded(None, "", "no finite per-seed effects")
    m = float(e.mean())
    target = REPRODUCED if m > min_effect else NOT_REPRODUCED
    if e.size < 2:
        return SeedsNeeded(None, target, "one seed: the seed-to-seed spread, and so the power, cannot be estimated")
    sd = float(e.std(ddof=1))
    P = seed_rule_power(m, sd, min_effect=min_effect, spread_factor=spread_factor, min_seeds=min_seeds,
                        max_seeds=max_seeds)[target]
    now = float(P[e.size - 1]) if e.size <= max_seeds else math.nan
    best = int(np.argmax(P)) + 1
    t_n = t_test_seeds(m, sd, min_effect=min_effect, power=target_power, max_seeds=max_seeds)
    reach = np.flatnonzero(P >= target_power)
    common = dict(power_now=now, best_n=best, best_power=float(P[best - 1]), t_test_n=t_n,
                  t_test_pvalue=t_test_pvalue(e, min_effect=min_effect, greater=target == REPRODUCED))
    if reach.size:
        n = int(reach[0]) + 1
        how = "identical effects (sd 0)" if sd == 0.0 else f"P = {P[n - 1]:.3f} under N({m:.4g}, {sd:.4g}^2)"
        return SeedsNeeded(n, target, f"{target} at {n} seeds: {how}", **common)
    return SeedsNeeded(None, target, f"unreachable: P({target}) <= {P[best - 1]:.3f} (at n = {best}) for every "
                                     f"n <= {max_seeds} under N({m:.4g}, {sd:.4g}^2): the spread grows with n", **common)


def t_test_seeds(mean: float, sd: float, *, min_effect: float, alpha: float = T_TEST_ALPHA,
                 power: float = TARGET_POWER, max_seeds: int = MAX_SEEDS) -> int | None:
    """Smallest n in 2..max_seeds at which the one-sided one-sample t-test of ``mean > min_effect`` (or ``<`` when
    the mean is below) at level ``alpha`` has at least ``power`` against N(mean, sd²): the noncentral t with n - 1
    degrees of freedom and noncentrality |mean - min_effect| sqrt(n) / sd exceeds the critical value with that
    probability. ``sd = 0`` gives 2 (when mean != min_effect); None when no n <= max_seeds suffices.

    Examples
    --------
    >>> t_test_seeds(1.0, 1.0, min_effect=0.0), t_test_seeds(0.5, 1.0, min_effect=0.0)
    (8, 27)
    """
    from scipy import stats  # heavy (~0.3 s): only when a power is asked for

    d = abs(mean - min_effect)
    if not (math.isfinite(d) and math.isfinite(sd)) or sd < 0:
        raise InputError(f"need finite mean, min_effect and sd >= 0, got {mean}, {min_effect}, {sd}")
    if d == 0.0:
        return None
    if sd == 0.0:
        return 2
    n = np.arange(2, max_seeds + 1)
    reached = np.flatnonzero(stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, d * np.sqrt(n) / sd) >= power)
    return int(n[reached[0]]) if reached.size else None


def t_test_pvalue(effects: Sequence[float], *, min_effect: float, greater: bool = True) -> float:
    """One-sided one-sample t-test p-value of H1: mean > min_effect (``greater``) or mean < min_effect, from the
    observed effects (n >= 2). Identical effects give 0 or 1 (the statistic is then +-inf), or NaN at equality.

    Examples
    --------
    >>> round(t_test_pvalue([1.0, 2.0, 3.0], min_effect=0.0), 4)  # t = 2 * sqrt(3) with 2 degrees of freedom
    0.0371
    """
    from scipy import stats  # heavy (~0.3 s): only when a p-value is asked for

    e = np.asarray(effects, dtype=np.float64)
    if e.size < 2 or not np.isfinite(e).all():
        return math.nan
    d, sd = float(e.mean() - min_effect), float(e.std(ddof=1))
    if sd == 0.0:
        return math.nan if d == 0.0 else (0.0 if (d > 0) == greater else 1.0)
    t = d / (sd / math.sqrt(e.size))
    return float(stats.t.sf(t, e.size - 1) if greater else stats.t.cdf(t, e.size - 1))


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    return int(n)


def sign_test_pvalue(successes: int, n: int) -> Fraction:
    """Exact one-sided p-value P(X >= successes) for X ~ Binomial(n, 1/2).

    Examples
    --------
    >>> sign_test_pvalue(11, 14)
    Fraction(235, 8192)
    """
    n = _check_n(n)
    if not 0 <= successes <= n:
        raise InputError(f"successes must be in 0..{n}, got {successes}")
    return Fraction(sum(math.comb(n, i) for i in range(successes, n + 1)), 2**n)


def sign_test_critical_count(n: int, alpha: float | Fraction) -> int | None:
    """Smallest count c with P(X >= c) <= alpha under H0 (reject H0 at c or more successes); None when even n
    successes have p > alpha (2^-n > alpha: n is too small to ever reject).

    Examples
    --------
    >>> sign_test_critical_count(14, 0.05), sign_test_critical_count(4, 0.05)
    (11, None)
    """
    n = _check_n(n)
    a = Fraction(alpha)
    if not 0 < a < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    for c in range(0, n + 1):
        if sign_test_pvalue(c, n) <= a:
            return c
    return None


def sign_test_power(n: int, p1: float | Fraction, alpha: float | Fraction) -> Fraction:
    """Exact power P(X >= c) for X ~ Binomial(n, p1), c = ``sign_test_critical_count(n, alpha)`` (0 when the test
    can never reject). ``p1`` is taken exactly (a float as its binary value).

    Examples
    --------
    >>> float(sign_test_power(14, Fraction(4, 5), 0.05))  # doctest: +ELLIPSIS
    0.6981...
    """
    p = Fraction(p1)
    if not 0 <= p <= 1:
        raise InputError(f"p1 must be a probability, got {p1}")
    c = sign_test_critical_count(n, alpha)
    if c is None:
        return Fraction(0)
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(c, n + 1)), Fraction(0))


def sign_test_n_for_power(p1: float | Fraction, alpha: float | Fraction, power: float | Fraction = TARGET_POWER,
                          max_n: int = 1000) -> int | None:
    """Smallest n whose exact sign-test power against ``p1`` reaches ``power`` (None when no n <= max_n does; the
    power is not monotone in n, the first n is returned).

    Examples
    --------
    >>> sign_test_n_for_power(Fraction(4, 5), 0.05)
    18
    """
    target = Fraction(power)
    for n in range(1, max_n + 1):
        if sign_test_power(n, p1, alpha) >= target:
            return n
    return None


def rank_sum_pvalue(a: Sequence[float], b: Sequence[float]) -> Fraction:
    """Exact one-sided permutation p-value that the values ``a`` tend to exceed ``b`` (Wilcoxon rank sum): the share
    of the C(len(a) + len(b), len(a)) ways to split the pooled values whose ``a``-part rank sum is at least the
    observed one (ties get mid-ranks). With 4 and 4 values the smallest attainable p is 1/70.

    Examples
    --------
    >>> rank_sum_pvalue([5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0])
    Fraction(1, 70)
    >>> rank_sum_pvalue([1.0, 2.0], [1.0, 2.0])
    Fraction(5, 6)
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    pooled = np.concatenate([x, y])
    if x.size == 0 or y.size == 0 or not np.isfinite(pooled).all():
        raise InputError("rank_sum_pvalue: need finite, non-empty samples")
    ranks = np.empty(pooled.size)
    ranks[np.argsort(pooled, kind="stable")] = np.arange(1, pooled.size + 1)
    for val in np.unique(pooled):  # mid-ranks for ties (sums of halves: exact in float64)
        ranks[pooled == val] = ranks[pooled == val].mean()
    observed = ranks[: x.size].sum()
    sums = [ranks[list(idx)].sum() for idx in combinations(range(pooled.size), x.size)]
    return Fraction(sum(1 for s in sums if s >= observed), len(sums))
