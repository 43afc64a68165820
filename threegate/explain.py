"""``threegate explain RESULT_ID``: statement, assumptions, where the code is, which tests cover it, a live example."""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import inspect
import itertools
from pathlib import Path

import theory
from theory.errors import InputError

REPO = Path(__file__).resolve().parent.parent
#: Test files of ``threegate explain`` itself: never listed as covering a result.
SELF_TESTS = ("test_explain.py",)


def covering_tests(result_id: str, tests_dir: Path = REPO / "tests", *, function: str | None = None) -> list[str]:
    """The test functions that exercise ``result_id``, as ``path::test`` (``path::TestClass::test`` for methods).

    Found by reading the tests' syntax trees (``ast``), not their text: a test covers the id when its body or
    decorators hold the id as a whole string constant (``"lemE.2"``, a ``parametrize`` list entry, or an explicit
    ``@pytest.mark.covers("lemE.2")``), or name the id's check function ``function`` (``P.check_lemE2(...)``), or
    use a module-level helper, constant or fixture that does (followed transitively). A string that merely
    contains the id (``'check("thm3.3")'``) does not count, nor does a mention outside any test, nor the tests
    of this command (``SELF_TESTS``: they pass ids to ``explain`` as input, they do not exercise the results).
    ``function`` defaults to the registered check function of ``result_id``.
    """
    if function is None and result_id in theory.RESULTS:
        function = theory.RESULTS[result_id].function
    base = tests_dir.parent
    found = []
    for path in sorted(tests_dir.rglob("test_*.py")):
        if path.name in SELF_TESTS:
            continue
        tree = _syntax_tree(str(path), path.stat().st_mtime_ns)
        rel = path.relative_to(base).as_posix()
        found.extend(f"{rel}::{name}" for name in _tests_covering(tree, result_id, function))
    return found


@functools.lru_cache(maxsize=256)
def _syntax_tree(path: str, mtime_ns: int) -> ast.Module:
    """A test file's syntax tree, parsed once per version of the file (``mtime_ns`` is the cache key's version)."""
    return ast.parse(Path(path).read_text(), filename=path)


def _direct(node: ast.AST, result_id: str, function: str | None) -> bool:
    """Whether ``node``'s subtree holds ``result_id`` as a string constant or names ``function``."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and n.value == result_id:
            return True
        if function and ((isinstance(n, ast.Name) and n.id == function)
                         or (isinstance(n, ast.Attribute) and n.attr == function)):
            return True
    return False


def _names_used(node: ast.AST) -> set[str]:
    """Names a definition refers to: loaded names and its parameters (pytest injects fixtures by parameter name)."""
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        used |= {a.arg for a in node.args.args + node.args.kwonlyargs}
    return used


def _tests_covering(tree: ast.Module, result_id: str, function: str | None) -> list[str]:
    helpers: dict[str, ast.AST] = {}  # module-level functions (fixtures included) and constants that are not tests
    tests: list[tuple[str, ast.AST]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            (tests.append((node.name, node)) if node.name.startswith("test") else helpers.__setitem__(node.name, node))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            tests.extend((f"{node.name}::{m.name}", m) for m in node.body
                         if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name.startswith("test"))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        helpers[n.id] = node
    carriers = {name for name, node in helpers.items() if _direct(node, result_id, function)}
    changed = True
    while changed:  # helpers that use a carrier carry the id too
        changed = False
        for name, node in helpers.items():
            if name not in carriers and _names_used(node) & carriers:
                carriers.add(name)
                changed = True
    return [name for name, node in tests if _direct(node, result_id, function) or _names_used(node) & carriers]


def resolve_id(result_id: str) -> str:
    """The registered id matching ``result_id`` case-insensitively; an unknown id is an ``InputError`` naming the
    closest ids."""
    by_lower = {k.lower(): k for k in theory.RESULTS}
    key = result_id.strip().lower()
    if key in by_lower:
        return by_lower[key]
    close = [by_lower[c] for c in difflib.get_close_matches(key, list(by_lower), n=3, cutoff=0.5)]
    hint = (f"did you mean {', '.join(map(repr, close))}?" if close else
            f"known ids: {', '.join(sorted(theory.RESULTS))}")
    raise InputError(f"unknown result id {result_id!r} ({hint})")


def explain(result_id: str, seed: int = 0) -> str:
    """The explanation of ``result_id`` (matched case-insensitively; see ``resolve_id``)."""
    r = theory.RESULTS[resolve_id(result_id)]
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
    p.add_argument("result_id", help="an id of theory.RESULTS, e.g. thm3.3 (any case)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print(explain(args.result_id, args.seed))
    return 0
