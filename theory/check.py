"""The check record every formal result returns, and the registry ``theory.RESULTS``.

A *check* evaluates one inequality (or equivalence) of the paper on concrete inputs:

    lhs  <=  rhs

computed in floating point as ``lhs~, rhs~`` together with a tolerance ``tol``: a bound, derived from an error model
written in the docstring of the result's check function, on how far the computed margin ``rhs~ - lhs~`` can be from
the exact margin ``rhs - lhs`` of the inputs. Every tolerance is a finite number >= 0 (``Check`` refuses anything
else: a ``ToleranceError``, i.e. a bug in the check function). The verdict (``decide``, exact rational comparison of
the three floats):

- ``"holds"``          ``rhs~ - lhs~ >= tol``: the exact margin is >= 0;
- ``"violated"``       ``lhs~ - rhs~ > tol``: the exact margin is < 0;
- ``"indeterminate"``  otherwise (or a side is NaN): the error model cannot separate lhs from rhs. Reported as a
                       failed assumption ("the error model separates lhs from rhs"), never as "holds". A bound that
                       is attained (lhs = rhs exactly) is indeterminate unless it is computed exactly (tol = 0).
- ``"assumption-failed"``  a hypothesis of the result failed (``failed_assumption`` says which).

``ratio = lhs / rhs`` is the tightness (1 means the bound is attained), ``slack = rhs - lhs``. A check never reports
"holds" for inputs outside its hypotheses or inside its error band.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from theory.errors import ToleranceError

__all__ = ["Check", "Result", "RESULTS", "register", "make_check", "assumption_failed", "indeterminate", "decide",
           "refine", "ldexp_sat", "VERDICTS", "SEPARATION"]

VERDICTS = ("holds", "violated", "indeterminate", "assumption-failed")
#: The failed-assumption text of an indeterminate check starts with this.
SEPARATION = "the error model separates lhs from rhs"


def _valid_tol(tol: Any) -> float:
    """``tol`` as a float, or a ToleranceError: a tolerance is a finite number >= 0 (anything else is a bug)."""
    try:
        t = float(tol)
    except (TypeError, ValueError):
        raise ToleranceError(f"tolerance must be a finite number >= 0, got {tol!r}") from None
    if not (math.isfinite(t) and t >= 0.0):
        raise ToleranceError(f"tolerance must be a finite number >= 0, got {t!r}")
    return t


def decide(lhs: float, rhs: float, tol: float) -> str:
    """``"holds"`` if rhs - lhs >= tol, ``"violated"`` if lhs - rhs > tol, else ``"indeterminate"`` (also for NaN).

    The comparison is exact (``fractions.Fraction`` of the three floats): no rounding decides a verdict.
    Infinite sides: +inf on the right holds against any finite lhs, +inf on the left violates against a finite rhs;
    two infinities of the same sign are indeterminate.

    Examples
    --------
    >>> decide(1.0, 2.0, 0.5), decide(2.0, 1.0, 0.5), decide(1.0, 1.2, 0.5), decide(1.0, 1.0, 0.0)
    ('holds', 'violated', 'indeterminate', 'holds')
    """
    lhs, rhs, t = float(lhs), float(rhs), _valid_tol(tol)
    if math.isnan(lhs) or math.isnan(rhs):
        return "indeterminate"
    if math.isinf(lhs) or math.isinf(rhs):
        if lhs == rhs:
            return "indeterminate"
        return "holds" if lhs < rhs else "violated"
    margin = Fraction(rhs) - Fraction(lhs)
    if margin >= Fraction(t):
        return "holds"
    if -margin > Fraction(t):
        return "violated"
    return "indeterminate"


@dataclass(frozen=True)
class Check:
    """Outcome of evaluating one result on one input."""

    result_id: str
    statement: str
    lhs: float
    rhs: float
    holds: bool
    assumptions_hold: bool
    failed_assumption: str | None = None
    tol: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)
    indeterminate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tol", _valid_tol(self.tol))
        if self.holds and not self.assumptions_hold:
            raise ToleranceError(f"{self.result_id}: a check cannot hold when an assumption failed")

    @property
    def slack(self) -> float:
        return self.rhs - self.lhs

    @property
    def ratio(self) -> float:
        if self.rhs == 0:
            return 0.0 if self.lhs == 0 else math.inf
        return self.lhs / self.rhs

    @property
    def verdict(self) -> str:
        if self.indeterminate:
            return "indeterminate"
        if not self.assumptions_hold:
            return "assumption-failed"
        return "holds" if self.holds else "violated"

    def as_row(self) -> dict[str, Any]:
        """Flat dict for tables (details are prefixed with ``d_``)."""
        row = {
            "result_id": self.result_id,
            "lhs": self.lhs,
            "rhs": self.rhs,
            "ratio": self.ratio,
            "slack": self.slack,
            "holds": self.holds,
            "assumptions_hold": self.assumptions_hold,
            "failed_assumption": self.failed_assumption,
            "verdict": self.verdict,
        }
        for k, v in self.details.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                row[f"d_{k}"] = v
        return row


def make_check(
    result_id: str,
    lhs: float,
    rhs: float,
    *,
    tol: float = 0.0,
    details: Mapping[str, Any] | None = None,
    exponent: int = 0,
) -> Check:
    """A check whose assumptions held, decided by ``decide(lhs, rhs, tol)``: holds, violated or indeterminate.

    ``tol`` must be a finite number >= 0 (``ToleranceError`` otherwise: the caller's error model is broken).
    ``exponent``: lhs, rhs and tol were computed on inputs scaled by ``2**-exponent`` (exact); the verdict is
    decided on those values and the check stores them times ``2**exponent`` (inf where that overflows).

    Examples
    --------
    >>> make_check("x", 1.0, 2.0, tol=0.1).verdict, make_check("x", 1.0, 1.05, tol=0.1).verdict
    ('holds', 'indeterminate')
    """
    lhs, rhs, tol = float(lhs), float(rhs), _valid_tol(tol)
    verdict = decide(lhs, rhs, tol)
    d = dict(details or {})
    if exponent:
        # the triple the verdict was decided on (scaled units): exact, where the stored values may overflow or
        # lose bits to subnormal rounding
        d.update(scale_exponent=int(exponent), lhs_scaled=lhs, rhs_scaled=rhs, tol_scaled=tol)
        lhs, rhs = ldexp_sat(lhs, exponent), ldexp_sat(rhs, exponent)
        tol = min(ldexp_sat(tol, exponent), sys.float_info.max)
    if verdict == "indeterminate":
        return indeterminate(result_id, lhs, rhs, tol, details=d)
    return Check(
        result_id=result_id,
        statement=_statement(result_id),
        lhs=lhs,
        rhs=rhs,
        holds=verdict == "holds",
        assumptions_hold=True,
        tol=tol,
        details=MappingProxyType(d),
    )


def ldexp_sat(x: float, e: int) -> float:
    """x * 2**e as a float: exact where representable, +-inf where it overflows (NaN and inf stay as they are).

    Examples
    --------
    >>> ldexp_sat(3.0, -1), ldexp_sat(1.0, 2000), ldexp_sat(-1.0, 2000)
    (1.5, inf, -inf)
    """
    if not math.isfinite(x):
        return float(x)
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)


def indeterminate(
    result_id: str,
    lhs: float,
    rhs: float,
    tol: float,
    *,
    reason: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> Check:
    """A check whose error model cannot separate lhs from rhs: verdict ``"indeterminate"``, never "holds".

    It is reported as a failed assumption whose text starts with ``SEPARATION``; ``reason`` replaces the default
    explanation (|rhs - lhs| against tol, or a NaN side).
    """
    lhs, rhs, tol = float(lhs), float(rhs), _valid_tol(tol)
    if reason is None:
        if math.isnan(lhs) or math.isnan(rhs):
            reason = f"lhs and rhs are numbers (lhs = {lhs}, rhs = {rhs})"
        else:
            gap = abs(rhs - lhs) if math.isfinite(rhs - lhs) else math.inf
            reason = f"|rhs - lhs| = {gap:.3e} is within the tolerance {tol:.3e}"
    return Check(
        result_id=result_id,
        statement=_statement(result_id),
        lhs=lhs,
        rhs=rhs,
        holds=False,
        assumptions_hold=False,
        failed_assumption=f"{SEPARATION} ({reason})",
        tol=tol,
        details=MappingProxyType(dict(details or {})),
        indeterminate=True,
    )


def refine(check: Check, links: Mapping[str, str]) -> Check:
    """Combine a decided check with further links of its statement (a chain, an identity), each a verdict from
    ``decide``: a link decided "violated" makes a holding check violated (``details["failed_link"]`` names it).

    The verdict stays that of the registered lhs and rhs otherwise; links that their tolerance cannot decide (an
    attained triangle inequality, an identity, which rounding can refute but never prove) are listed in
    ``details["undecided_links"]``. A check that is not decided is returned as is.
    """
    undecided = [name for name, v in links.items() if v == "indeterminate"]
    bad = [name for name, v in links.items() if v == "violated"]
    extra: dict[str, Any] = {"undecided_links": ", ".join(undecided)} if undecided else {}
    if check.verdict == "holds" and bad:
        extra["failed_link"] = bad[0]
        return replace(check, holds=False, details=MappingProxyType({**check.details, **extra}))
    if extra and check.verdict in ("holds", "violated"):
        return replace(check, details=MappingProxyType({**check.details, **extra}))
    return check


def assumption_failed(
    result_id: str,
    which: str,
    *,
    lhs: float = math.nan,
    rhs: float = math.nan,
    details: Mapping[str, Any] | None = None,
) -> Check:
    """A check whose hypothesis ``which`` failed: it reports neither holds nor violated."""
    return Check(
        result_id=result_id,
        statement=_statement(result_id),
        lhs=float(lhs),
        rhs=float(rhs),
        holds=False,
        assumptions_hold=False,
        failed_assumption=which,
        details=MappingProxyType(dict(details or {})),
    )


@dataclass(frozen=True)
class Result:
    """One formal result of the paper.

    ``check(**inputs) -> Check`` evaluates it on concrete inputs. ``campaign(seed) -> Iterable[Check]`` evaluates
    it on a seeded family of instances (used by ``threegate verify``); ``exact`` says whether the statement is a
    theorem that must hold on every instance satisfying its assumptions (False for the paper's as-stated,
    first-order forms, which the suite searches to break).
    """

    id: str
    statement: str
    gate: str
    check: Callable[..., Check]
    assumptions: tuple[str, ...] = ()
    exact: bool = True
    campaign: Callable[[int], Iterable[Check]] | None = None
    paper_ref: str = ""

    @property
    def module(self) -> str:
        return self.check.__module__

    @property
    def function(self) -> str:
        return self.check.__qualname__


_RESULTS: dict[str, Result] = {}
RESULTS: Mapping[str, Result] = MappingProxyType(_RESULTS)


def _statement(result_id: str) -> str:
    r = _RESULTS.get(result_id)
    return r.statement if r is not None else ""


def register(
    result_id: str,
    *,
    statement: str,
    gate: str,
    assumptions: Iterable[str] = (),
    exact: bool = True,
    paper_ref: str = "",
) -> Callable[[Callable[..., Check]], Callable[..., Check]]:
    """Decorator: register ``fn`` as the check of ``result_id``. Attach a campaign with ``@fn.campaign``."""

    def deco(fn: Callable[..., Check]) -> Callable[..., Check]:
        if result_id in _RESULTS:
            raise ValueError(f"result id {result_id!r} registered twice")
        _RESULTS[result_id] = Result(
            id=result_id,
            statement=statement,
            gate=gate,
            check=fn,
            assumptions=tuple(assumptions),
            exact=exact,
            paper_ref=paper_ref,
        )

        def set_campaign(camp: Callable[[int], Iterable[Check]]) -> Callable[[int], Iterable[Check]]:
            old = _RESULTS[result_id]
            _RESULTS[result_id] = Result(**{**old.__dict__, "campaign": camp})
            return camp

        fn.campaign = set_campaign  # type: ignore[attr-defined]
        fn.result_id = result_id  # type: ignore[attr-defined]
        return fn

    return deco
