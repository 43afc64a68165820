"""Arithmetic word problems with exact integer answers, a prompt formatter, and an exact answer checker.

The verifiable task of the Hugging Face backend (``sims.hf.backend``): short grade-school problems built from
templates x seeded numbers, each with its integer answer and a worked solution that ends in
``"The answer is N."``. The reward is the paper's: +1 when the integer extracted from a completion equals the
answer exactly, else -1 (``reward``).

Difficulty knob ``difficulty in {1, 2, 3}``: the number of arithmetic operations (1, 2, 3) and the range of the
numbers (up to 20, 100, 1000). Some templates (temperature, bank balance) have negative answers.

The checker ``extract_answer(completion) -> int | None`` reads, in order of precedence, the **last**

1. ``#### N`` (GSM8K style),
2. ``\\boxed{N}``,
3. ``answer is ... N`` / ``answer: N`` / ``answer = N`` (case-insensitive; the first number in the rest of that
   sentence),
4. otherwise the last number anywhere in the text;

so earlier numbers (the worked steps, distractors) never win over an explicit final answer, and a marker whose
sentence states no integer (``The answer is unknown.``) gives None, not an earlier number. Numbers: an optional
minus sign (``-`` or the Unicode minus ``U+2212``) counts only when it is not glued to a preceding letter or
digit (``10-3`` is 10 and 3; ``drops to -4`` is -4); thousands separators ``1,234`` are read as 1234 (a comma
followed by a space separates numbers); ``12.0`` is 12; a number with a non-zero fraction (``12.5``) is not an
integer, so a completion whose answer is ``12.5`` gets ``None`` (never 12 or 5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np

from theory.errors import InputError

__all__ = [
    "WordProblem",
    "DIFFICULTIES",
    "TEMPLATES",
    "generate_problems",
    "sample_problems",
    "format_prompt",
    "INSTRUCTION",
    "extract_answer",
    "is_correct",
    "reward",
]

DIFFICULTIES = (1, 2, 3)
INSTRUCTION = "Solve the problem. End your reply with 'The answer is N.' where N is an integer."


@dataclass(frozen=True)
class WordProblem:
    """One problem: ``question`` text, exact integer ``answer``, a worked ``solution`` ending in the answer."""

    question: str
    answer: int
    solution: str
    template: str
    difficulty: int


# ----------------------------------------------------------------------------------------------------------------
# Templates. Each draws its numbers from ``rng`` and returns (question, steps, answer); the steps are the worked
# solution's equations, computed from the same numbers (so solution and answer cannot disagree).

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena")
_ITEMS = ("apple", "marble", "pencil", "sticker", "cookie", "book", "shell", "card")


def _top(difficulty: int) -> int:
    return {1: 20, 2: 100, 3: 1000}[difficulty]


def _num(rng: np.random.Generator, difficulty: int, low: int = 2) -> int:
    return int(rng.integers(low, _top(difficulty) + 1))


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _t_collect(rng, d):
    name, item = _pick(rng, _NAMES), _pick(rng, _ITEMS)
    a, b = _num(rng, d), _num(rng, d)
    q = f"{name} has {a} {item}s and gets {b} more."
    steps, total = [f"{a} + {b} = {a + b}."], a + b
    if d >= 2:
        c = int(rng.integers(1, total + 1))
        q += f" Then {name} gives away {c}."
        steps.append(f"{total} - {c} = {total - c}.")
        total -= c
    if d >= 3:
        k = int(rng.integers(2, 6))
        q += f" Finally the pile is multiplied by {k}."
        steps.append(f"{total} * {k} = {total * k}.")
        total *= k
    return q + f" How many {item}s does {name} have now?", steps, total


def _t_boxes(rng, d):
    item = _pick(rng, _ITEMS)
    top = {1: 10, 2: 20, 3: 50}[d]
    a, b = int(rng.integers(2, top + 1)), int(rng.integers(2, top + 1))
    q = f"There are {a} boxes with {b} {item}s in each box."
    steps, total = [f"{a} * {b} = {a * b}."], a * b
    if d >= 2:
        c = _num(rng, d)
        q += f" There are also {c} loose {item}s."
        steps.append(f"{total} + {c} = {total + c}.")
        total += c
    if d >= 3:
        e = int(rng.integers(1, total + 1))
        q += f" Then {e} {item}s are lost."
        steps.append(f"{total} - {e} = {total - e}.")
        total -= e
    return q + f" How many {item}s are there in total?", steps, total


def _t_share(rng, d):
    name, item = _pick(rng, _NAMES), _pick(rng, _ITEMS)
    top = {1: 6, 2: 12, 3: 30}[d]
    each, friends = int(rng.integers(1, top + 1)), int(rng.integers(2, top + 1))
    n = each * friends
    q = f"{name} shares {n} {item}s equally among {friends} friends."
    steps, total = [f"{n} / {friends} = {each}."], each
    if d >= 2:
        extra = _num(rng, d)
        q += f" Each friend already had {extra} {item}s."
        steps.append(f"{total} + {extra} = {total + extra}.")
        total += extra
    if d >= 3:
        k = int(rng.integers(2, 5))
        q += f" Then each friend doubles their {item}s and eats {k}."
        steps.append(f"{total} * 2 - {k} = {total * 2 - k}.")
        total = total * 2 - k
    return q + f" How many {item}s does each friend have now?", steps, total


def _t_temperature(rng, d):
    t0 = int(rng.integers(-10, _top(d) // 2 + 1))
    drop = _num(rng, d, low=1)
    q = f"In the morning the temperature was {t0} degrees. It dropped by {drop} degrees."
    steps, t = [f"{t0} - {drop} = {t0 - drop}."], t0 - drop
    if d >= 2:
        rise = _num(rng, d, low=1)
        q += f" Then it rose by {rise} degrees."
        steps.append(f"{t} + {rise} = {t + rise}.")
        t += rise
    if d >= 3:
        drop2 = _num(rng, d, low=1)
        q += f" At night it fell by {drop2} degrees."
        steps.append(f"{t} - {drop2} = {t - drop2}.")
        t -= drop2
    return q + " What is the temperature now, in degrees?", steps, t


def _t_balance(rng, d):
    name = _pick(rng, _NAMES)
    a, b = _num(rng, d), _num(rng, d)
    q = f"{name}'s bank balance is {a} dollars. {name} pays a bill of {b} dollars."
    steps, bal = [f"{a} - {b} = {a - b}."], a - b
    if d >= 2:
        k = int(rng.integers(2, 5))
        c = int(rng.integers(1, _top(d) // 4 + 2))
        q += f" Then {name} buys {k} tickets at {c} dollars each."
        steps.append(f"{k} * {c} = {k * c}, and {bal} - {k * c} = {bal - k * c}.")
        bal -= k * c
    if d >= 3:
        e = _num(rng, d)
        q += f" Then a refund of {e} dollars arrives."
        steps.append(f"{bal} + {e} = {bal + e}.")
        bal += e
    return q + f" What is {name}'s balance now, in dollars?", steps, bal


def _t_ages(rng, d):
    n1, n2 = rng.choice(len(_NAMES), size=2, replace=False)
    n1, n2 = _NAMES[int(n1)], _NAMES[int(n2)]
    a, b = int(rng.integers(2, 40)), int(rng.integers(1, 30))
    q = f"{n1} is {a} years old. {n2} is {b} years older than {n1}."
    steps, age = [f"{a} + {b} = {a + b}."], a + b
    if d >= 2:
        c = int(rng.integers(1, 20))
        q += f" How old will {n2} be in {c} years?"
        steps.append(f"{age} + {c} = {age + c}.")
        return q, steps, age + c
    return q + f" How old is {n2}?", steps, age


TEMPLATES: dict[str, Callable[[np.random.Generator, int], tuple[str, list[str], int]]] = {
    "collect": _t_collect,
    "boxes": _t_boxes,
    "share": _t_share,
    "temperature": _t_temperature,
    "balance": _t_balance,
    "ages": _t_ages,
}


def _check_difficulty(difficulty: int) -> int:
    if difficulty not in DIFFICULTIES:
        raise InputError(f"word problem difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    return int(difficulty)


def sample_problems(rng: np.random.Generator, n: int, *, difficulty: int = 1,
                    templates: Sequence[str] | None = None) -> list[WordProblem]:
    """``n`` problems drawn from ``rng`` (a template uniformly, then its numbers)."""
    d = _check_difficulty(difficulty)
    names = list(TEMPLATES) if templates is None else list(templates)
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown or not names:
        raise InputError(f"unknown word problem templates {unknown}; known: {list(TEMPLATES)}")
    if n < 0:
        raise InputError(f"number of problems must be >= 0, got {n}")
    out = []
    for _ in range(n):
        tname = names[int(rng.integers(len(names)))]
        q, steps, ans = TEMPLATES[tname](rng, d)
        solution = " ".join(steps) + f" The answer is {ans}."
        out.append(WordProblem(q, int(ans), solution, tname, d))
    return out


def generate_problems(n: int, *, seed: int, difficulty: int = 1,
                      templates: Sequence[str] | None = None) -> list[WordProblem]:
    """``n`` problems from ``numpy.random.default_rng(seed)``: the same seed gives the same problems."""
    return sample_problems(np.random.default_rng(seed), n, difficulty=difficulty, templates=templates)


# ----------------------------------------------------------------------------------------------------------------
# Prompt


def format_prompt(problem: WordProblem | str, tokenizer: Any = None, *, system: str | None = None) -> str:
    """The prompt text for a problem.

    With a tokenizer that has a chat template: ``tokenizer.apply_chat_template`` of one user turn (the instruction
    and the question; an optional system turn) with the generation prompt appended. Otherwise plain text
    ``"<instruction>\\nQuestion: <question>\\nAnswer:"``.
    """
    question = problem.question if isinstance(problem, WordProblem) else str(problem)
    user = f"{INSTRUCTION}\n{question}"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system}\n" if system else ""
    return f"{head}{INSTRUCTION}\nQuestion: {question}\nAnswer:"


# ----------------------------------------------------------------------------------------------------------------
# The exact checker

# a number: sign only when not glued to a preceding word character; 1,234,567 groups or plain digits; a fraction
_NUM = r"(?<![\w.])(?P<sign>[-\u2212])?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?(?![\d])"
_NUMBER = re.compile(_NUM)
_SENTENCE = r"(?P<n>(?:[^.\n]|\.(?=\d))*)"  # up to the end of the sentence ('.' not before a digit) or line
_MARKERS = (
    re.compile(r"####" + _SENTENCE),
    re.compile(r"\\boxed\{(?P<n>[^}]*)\}"),
    re.compile(r"answer\s*(?:is|:|=)" + _SENTENCE, re.IGNORECASE),
)


def _value(m: re.Match) -> int | None:
    """The integer a number match denotes, or None if it has a non-zero fraction."""
    digits = m.group("int").replace(",", "")
    v = Fraction(int(digits))
    if m.group("frac"):
        v += Fraction(int(m.group("frac")), 10 ** len(m.group("frac")))
    if m.group("sign"):
        v = -v
    return int(v) if v.denominator == 1 else None


def _number_in(text: str) -> int | None:
    """The integer of the first number in a marker's sentence (None when it states none)."""
    m = _NUMBER.search(text)
    return None if m is None else _value(m)


def extract_answer(completion: str) -> int | None:
    """The final integer a completion states (see the module docstring for the rules), or None."""
    if not isinstance(completion, str):
        raise InputError(f"extract_answer expects a str completion, got {type(completion).__name__}")
    for marker in _MARKERS:
        hits = list(marker.finditer(completion))
        if hits:
            return _number_in(hits[-1].group("n"))
    hits = list(_NUMBER.finditer(completion))
    return _value(hits[-1]) if hits else None


def is_correct(completion: str, answer: int) -> bool:
    """True iff the extracted integer equals ``answer`` exactly."""
    got = extract_answer(completion)
    return got is not None and got == int(answer)


def reward(completion: str, answer: int) -> float:
    """The paper's verifiable reward: +1.0 if correct, -1.0 otherwise."""
    return 1.0 if is_correct(completion, answer) else -1.0
