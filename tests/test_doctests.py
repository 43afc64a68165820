"""The Examples of the public theory API run as doctests: every theory module (and sims.tables), and one runnable
Example per registered result (``theory.RESULTS``) that calls the result's own check."""

from __future__ import annotations

import doctest
import importlib
import inspect
from pathlib import Path

import pytest

import theory

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(f"theory.{p.stem}" for p in (REPO / "theory").glob("*.py") if p.stem != "__init__") + ["sims.tables"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_pass(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=FLAGS, report=False)
    assert res.failed == 0, f"{name}: {res.failed} of {res.attempted} examples failed (run python -m doctest -v)"


@pytest.mark.parametrize("rid", sorted(theory.RESULTS))
def test_every_result_has_a_runnable_example_of_its_check(rid):
    fn = theory.RESULTS[rid].check
    doc = inspect.getdoc(fn) or ""
    assert "Examples\n--------" in doc, f"{rid}: {fn.__name__} has no Examples section"
    test = doctest.DocTestParser().get_doctest(doc, dict(fn.__globals__), f"{rid}", None, 0)
    calls = {name for name, obj in fn.__globals__.items() if obj is fn}
    assert any(any(f"{name}(" in ex.source for name in calls) for ex in test.examples), \
        f"{rid}: the Examples never call {sorted(calls)}"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test, out=lambda _: None)
    assert runner.failures == 0 and runner.tries > 0


def test_a_wrong_example_fails(tmp_path):
    mod = tmp_path / "planted_doctest_mod.py"
    mod.write_text('def f():\n    """\n    >>> 1 + 1\n    3\n    """\n')
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        res = doctest.testmod(importlib.import_module("planted_doctest_mod"), report=False)
    finally:
        sys.path.remove(str(tmp_path))
    assert (res.failed, res.attempted) == (1, 1)
