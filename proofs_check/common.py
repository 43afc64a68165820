"""The record every proof check returns, so ``threegate prove`` can print what was proved or the counterexample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ProofResult:
    """``proved`` is True when the claim was established (symbolically, or exhaustively over a finite domain).

    ``expected`` says what the suite expects: True for a claim that is right, False for a claim of the paper that
    the suite shows to be wrong (then ``counterexample`` holds the first one found). ``ok`` is True when the outcome
    matches the expectation.
    """

    name: str
    claim: str
    proved: bool
    detail: str = ""
    counterexample: Any = None
    expected: bool = True
    method: str = "sympy"  # or "exhaustive"

    @property
    def ok(self) -> bool:
        return self.proved == self.expected

    def line(self) -> str:
        mark = "PROVED" if self.proved else "REFUTED"
        exp = "" if self.ok else "  <-- UNEXPECTED"
        ce = f"; counterexample: {self.counterexample}" if self.counterexample is not None else ""
        return f"[{mark:7s}] {self.name} ({self.method}): {self.claim} -- {self.detail}{ce}{exp}"


ProofCheck = Callable[[], ProofResult]
