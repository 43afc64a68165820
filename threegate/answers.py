"""Checking a student's answers to the ``docs/`` tutorials, inside the notebook's kernel.

A tutorial's exercises end with ``check(n)`` cells; ``check`` comes from ``answer_checker("NN_name", globals())``,
which loads the answer key ``docs/solutions/NN_name.py``. ``check(n)`` prints one line per answer of exercise n::

    answer_1: correct
    answer_2: not right yet - the value is off. Hint: <where to look>

and never the expected value: the reasons are about the kind of answer (None, wrong type, off value), the hint is
text the key's author wrote, and ``threegate.tutorials.execute_tutorial`` checks that neither spells the value
(:func:`value_forms`, :func:`reveals`). An answer key defines ``CHECKS[n](nb) -> {name: Expected}``, computing
the expected answers from the notebook's variables ``nb``, and ``SOLUTIONS[n]`` (see ``threegate.tutorials``).

Only the standard library and ``theory.errors``: a student's kernel needs no notebook tooling to check answers.
"""

from __future__ import annotations

import fractions
import importlib.util
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from theory.errors import CheckpointError, InputError

__all__ = ["Expected", "judge", "AnswerChecker", "answer_checker", "value_forms", "reveals", "CORRECT", "NOT_YET",
           "KEYS_ENV", "SOLUTIONS_DIR"]

CORRECT = "correct"
NOT_YET = "not right yet"
SOLUTIONS_DIR = "solutions"  # docs/solutions/NN_name.py: the answer keys
KEYS_ENV = "THREEGATE_ANSWER_KEYS"  # a folder of answer keys; threegate.tutorials sets it for the kernels it runs


@dataclass(frozen=True)
class Expected:
    """The expected answer of one ``answer_*`` name, with how close a right answer must be and a hint.

    A float answer is right iff ``|answer - value| <= abs_tol + rel_tol * |value|``; ints, bools and strings must
    be equal; tuples, lists and dicts are compared entry by entry with the same tolerances (dicts: the same keys).
    The answer key derives each tolerance from the error of the two routes it compares (a comment at the key).

    Examples
    --------
    >>> Expected(0.25, hint="a quarter").value
    0.25
    """

    value: Any
    hint: str
    rel_tol: float = 0.0
    abs_tol: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rel_tol", "abs_tol"):
            t = getattr(self, name)
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
                raise InputError(f"Expected.{name} must be a finite number >= 0, got {t!r}")
        if not self.hint.strip():
            raise InputError("Expected.hint must say where to look (it is all a wrong answer is told)")


def _kind(x: Any) -> str:
    """What kind of answer ``x`` is, in words that never contain its value."""
    if x is None:
        return "None"
    if isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_")):
        return "a bool"
    if isinstance(x, numbers.Integral):
        return "an int"
    if isinstance(x, numbers.Real):
        return "a float"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, Mapping):
        return "a dict"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    if isinstance(x, (set, frozenset)):
        return "a set"
    return f"a {type(x).__name__}"


def judge(answer: Any, expected: Expected) -> str | None:
    """``None`` if ``answer`` is right, otherwise why not, in words that never contain the expected value.

    Examples
    --------
    >>> judge(0.30000000000000004, Expected(0.3, hint="h", rel_tol=1e-12)) is None
    True
    >>> judge(None, Expected(0.3, hint="h"))
    'still None (fill in the exercise cell above)'
    >>> judge("0.3", Expected(0.3, hint="h"))
    'expected a float, got a string'
    >>> judge(0.31, Expected(0.3, hint="h", rel_tol=1e-12))
    'the value is off'
    """
    if answer is None:
        return "still None (fill in the exercise cell above)"
    return _judge(answer, expected.value, expected)


def _judge(a: Any, v: Any, e: Expected) -> str | None:
    want = _kind(v)
    if isinstance(v, bool):
        if _kind(a) != "a bool":
            return f"expected a bool, got {_kind(a)}"
        return None if bool(a) == v else "the value is off"
    if isinstance(v, numbers.Integral):
        if _kind(a) != "an int":
            return f"expected an int, got {_kind(a)}"
        return None if int(a) == int(v) else "the value is off"
    if isinstance(v, numbers.Real):
        if _kind(a) not in ("a float", "an int"):
            return f"expected a float, got {_kind(a)}"
        a, v = float(a), float(v)
        if not math.isfinite(a):
            return "the answer is not a finite number"
        return None if abs(a - v) <= e.abs_tol + e.rel_tol * abs(v) else "the value is off"
    if isinstance(v, str):
        if not isinstance(a, str):
            return f"expected a string, got {_kind(a)}"
        return None if a.strip() == v else "the value is off"
    if isinstance(v, Mapping):
        if not isinstance(a, Mapping):
            return f"expected a dict, got {_kind(a)}"
        if set(a) != set(v):
            return f"the dict has {len(a)} key(s) and not the expected ones"
        for key in v:
            why = _judge(a[key], v[key], e)
            if why is not None:
                return f"an entry is wrong ({why})"
        return None
    if isinstance(v, (tuple, list)):
        if not isinstance(a, (tuple, list)) or len(a) != len(v):
            return f"expected {want}, got {_kind(a)}"
        for i, (ai, vi) in enumerate(zip(a, v)):
            why = _judge(ai, vi, e)
            if why is not None:
                return f"entry {i} is wrong ({why})"
        return None
    if isinstance(v, (set, frozenset)):
        if not isinstance(a, (set, frozenset)):
            return f"expected a set, got {_kind(a)}"
        return None if set(a) == set(v) else "the set is off"
    raise InputError(f"no rule to compare an expected {type(v).__name__}")


class _NotebookVariables:
    """Read-only attribute view of the notebook's globals for an answer key; a missing name says which cell to
    run instead of a bare ``KeyError``."""

    def __init__(self, namespace: Mapping[str, Any]):
        self._ns = namespace

    def __getattr__(self, name: str) -> Any:
        try:
            return self._ns[name]
        except KeyError:
            raise InputError(f"the notebook has no variable {name!r} yet: run the cells above first") from None


class AnswerChecker:
    """``check(n)`` for one notebook: prints one line per answer of exercise ``n`` (see the module docstring).

    ``key`` is the answer-key module (``CHECKS[n](nb) -> {name: Expected}``), ``namespace`` the notebook's
    ``globals()``. Nothing it prints contains an expected value; :meth:`results` returns the same verdicts.
    """

    def __init__(self, key: Any, namespace: Mapping[str, Any], name: str = "tutorial"):
        checks = getattr(key, "CHECKS", None)
        if not isinstance(checks, Mapping) or not all(callable(f) for f in checks.values()):
            raise InputError(f"answer key of {name}: CHECKS must map exercise numbers to functions")
        self.name, self._checks, self._ns = name, dict(checks), namespace

    def expected(self, n: int) -> dict[str, Expected]:
        if n not in self._checks:
            raise InputError(f"{self.name} has no exercise {n} (exercises: {sorted(self._checks)})")
        return dict(self._checks[n](_NotebookVariables(self._ns)))

    def results(self, n: int) -> dict[str, str | None]:
        """``{answer name: None if right, else why not}`` for exercise ``n``."""
        out = {}
        for name, e in self.expected(n).items():
            out[name] = judge(self._ns[name], e) if name in self._ns else "not defined yet: run the exercise cell"
        return out

    def __call__(self, n: int) -> None:
        hints = self.expected(n)
        for name, why in self.results(n).items():
            print(f"{name}: {CORRECT}" if why is None else f"{name}: {NOT_YET} - {why}. Hint: {hints[name].hint}")


def _key_dirs(key_dir: str | os.PathLike | None) -> list[Path]:
    if key_dir is not None:
        return [Path(key_dir)]
    env = os.environ.get(KEYS_ENV)
    # Jupyter starts a notebook's kernel in the notebook's folder (docs/); a script may run from the repository root
    return ([Path(env)] if env else []) + [Path(SOLUTIONS_DIR), Path("docs") / SOLUTIONS_DIR]


def answer_checker(tutorial: str, namespace: Mapping[str, Any],
                   key_dir: str | os.PathLike | None = None) -> AnswerChecker:
    """The ``check`` of tutorial ``NN_name``: loads ``NN_name.py`` from ``key_dir``, else from
    ``$THREEGATE_ANSWER_KEYS``, ``./solutions`` or ``./docs/solutions`` (the first that has it). Call it in the
    notebook with ``globals()``."""
    tried = [d / f"{tutorial}.py" for d in _key_dirs(key_dir)]
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"answer key {tutorial}.py not found (looked in {', '.join(map(str, tried))}); open "
                              f"the tutorial from the docs/ folder or pass key_dir=")
    spec = importlib.util.spec_from_file_location(f"threegate_answer_key_{tutorial}", path)
    key = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(key)  # type: ignore[union-attr]
    return AnswerChecker(key, namespace, tutorial)


def value_forms(x: Any) -> set[str]:
    """The spellings of ``x`` a feedback message could leak: repr, str and every ``%.Ng`` of a float (N = 3..17)
    that keeps 3 significant digits, the elements of a container (not dict keys). Used to test that feedback never
    reveals an expected value.

    Examples
    --------
    >>> sorted(value_forms(0.125))[:3]
    ['0.125', '0.1250', '0.12500']
    >>> sorted(value_forms({0: True, 1: 7}))
    ['7', 'True']
    """
    if x is None:
        return set()
    if isinstance(x, Expected):
        return value_forms(x.value)
    if isinstance(x, bool) or isinstance(x, str):
        return {str(x)}
    if isinstance(x, numbers.Integral):
        return {str(int(x)), f"{int(x):,}"}
    if isinstance(x, fractions.Fraction):
        return {str(x)} | value_forms(float(x))
    if isinstance(x, numbers.Real):
        f = float(x)
        if not math.isfinite(f):
            return {repr(f)}
        forms = {f"{f:.{p}g}" for p in range(3, 18)} | {f"{f:#.{p}g}" for p in range(3, 6)}
        # a rounding to under 3 significant digits ("1" for 0.9995) says little and would match stray numbers
        return {repr(f), str(f)} | {s for s in forms if len(re.sub(r"e.*|[^0-9]|^[0.]+", "", s)) >= 3}
    if isinstance(x, Mapping):
        return set().union(*(value_forms(v) for v in x.values())) if x else set()
    if isinstance(x, (tuple, list, set, frozenset)):
        return set().union(*(value_forms(v) for v in x)) if x else set()
    return {str(x)}


def reveals(text: str, forms: set[str]) -> str | None:
    """The first of ``forms`` that occurs in ``text`` as a token of its own (not inside a longer number or name).

    >>> reveals("beta = 0.5, answer_1", {"5", "1"}) is None
    True
    >>> reveals("the threshold is 0.0625.", {"0.0625"})
    '0.0625'
    """
    for f in sorted(forms, key=len, reverse=True):
        if f and re.search(r"(?<![\w.])" + re.escape(f) + r"(?!\w|\.\d)", text):
            return f
    return None
