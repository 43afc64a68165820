"""``threegate explain RESULT_ID``: statement, assumptions, where the code is, which tests cover it, a live example."""

from __future__ import annotations

import argparse
import inspect
import itertools
import re
from pathlib import Path

import theory
from theory.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def covering_tests(result_id: str, tests_dir: Path = REPO / "tests") -> list[str]:
    """Test functions whose body names the result id as a string literal (``"thm3.3"`` or ``'thm3.3'``)."""
    base = tests_dir.parent
    pat = re.compile(r"""["']""" + re.escape(result_id) + r"""["']""")
    found = []
    for path in sorted(tests_dir.glob("test_*.py")):
        current = None
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:async\s+)?def (test_\w+)|\s*class (Test\w+)", line)
            if m:
                current = m.group(1) or m.group(2)
            if pat.search(line):
                rel = path.relative_to(base)
                found.append(f"{rel}::{current}" if current else str(rel))
    return sorted(set(found))


def explain(result_id: str, seed: int = 0) -> str:
    if result_id not in theory.RESULTS:
        known = ", ".join(sorted(theory.RESULTS))
        raise InputError(f"unknown result id {result_id!r}; known ids: {known}")
    r = theory.RESULTS[result_id]
    src = inspect.getsourcefile(r.check)
    line = inspect.getsourcelines(r.check)[1]
    lines = [
        f"{r.id}  (Gate {r.gate}{', ' + r.paper_ref if r.paper_ref else ''})",
        f"statement:   {r.statement}",
        "assumptions: " + ("; ".join(r.assumptions) if r.assumptions else "(none beyond finite inputs)"),
        f"kind:        {'exact theorem (must hold on every admissible input)' if r.exact else 'as stated in the paper (first-order / not a theorem; the suite searches for violations)'}",
        f"code:        {r.module}.{r.function}  ({Path(src).relative_to(REPO) if src else '?'}:{line})",
    ]
    tests = covering_tests(r.id)
    lines.append("tests:       " + (("\n             ".join(tests)) if tests else "(none found)"))
    if r.campaign is not None:
        checks = list(itertools.islice(r.campaign(seed), 3))
        lines.append(f"live example (first instances of its seeded campaign, seed {seed}):")
        for c in checks:
            extra = f", failed assumption: {c.failed_assumption}" if c.failed_assumption else ""
            lines.append(f"  lhs = {c.lhs:.6g}   rhs = {c.rhs:.6g}   lhs/rhs = {c.ratio:.4g}   -> {c.verdict}{extra}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("result_id", help="an id of theory.RESULTS, e.g. thm3.3")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print(explain(args.result_id, args.seed))
    return 0
