"""The check record every formal result returns, and the registry ``theory.RESULTS``.

A *check* evaluates one inequality (or equivalence) of the paper on concrete inputs:

    lhs  <=  rhs          (holds when assumptions_hold and lhs <= rhs + tol)

``ratio = lhs / rhs`` is the tightness (1 means the bound is attained), ``slack = rhs - lhs``.
When an assumption fails the check says which one in ``failed_assumption``; ``holds`` is then False and
``verdict`` is ``"assumption-failed"``: a check never reports "holds" for inputs outside its hypotheses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Check", "Result", "RESULTS", "register", "make_check", "assumption_failed"]


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
) -> Check:
    """A check whose assumptions held: ``holds`` iff ``lhs <= rhs + tol`` (NaN never holds)."""
    lhs, rhs = float(lhs), float(rhs)
    holds = bool(lhs <= rhs + tol)  # False for NaN on either side
    return Check(
        result_id=result_id,
        statement=_statement(result_id),
        lhs=lhs,
        rhs=rhs,
        holds=holds,
        assumptions_hold=True,
        tol=float(tol),
        details=MappingProxyType(dict(details or {})),
    )


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
