"""Verifiable tasks with exact checkers, over a fixed character-level tokenizer.

Each task writes a prompt ending in ``=`` and expects a short canonical answer followed by EOS:

    addition   "37+485="       -> "522"        (decimal, no leading zeros)
    modular    "913%7="        -> "3"          (x mod m, m = 7 by default)
    sorting    "sort:4193="    -> "1349"       (ascending digits)
    counting   "cnt:b:abbcab=" -> "3"          (occurrences of one letter)

``Task.reward(prompt, completion)`` is the paper's reward: +1 when the completion (text before EOS) equals the
canonical answer exactly, else -1. The checker re-derives the answer from the prompt itself (it never trusts the
``Example``), so it also scores prompts it did not generate; an unparseable prompt raises ``InputError``.

``pretraining_corpus`` mixes the four formats with noisy/partially wrong answers and distractor text, so a small
model pretrained on it is weak but not zero on the tasks and RL has room to raise it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from sims.tinygpt.model import left_pad
from theory.errors import InputError

__all__ = [
    "PAD", "BOS", "EOS",
    "Tokenizer",
    "Example",
    "Task",
    "AdditionTask",
    "ModularTask",
    "SortTask",
    "CountTask",
    "default_tasks",
    "task_by_name",
    "pretraining_corpus",
    "encode_demonstrations",
    "pad_right",
    "pad_left",
]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARS = string.digits + "+-*%=:,;|. " + string.ascii_lowercase


class Tokenizer:
    """Character-level tokenizer with a fixed vocabulary: ids 0, 1, 2 are PAD, BOS, EOS; then one id per char."""

    def __init__(self, chars: str = CHARS):
        if len(set(chars)) != len(chars):
            raise InputError("Tokenizer: duplicate characters in the vocabulary")
        self.specials = (PAD, BOS, EOS)
        self.itos: list[str] = [*self.specials, *chars]
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError as e:
            raise InputError(f"Tokenizer.encode: character {e.args[0]!r} is not in the vocabulary") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int] | Tensor, *, stop_at_eos: bool = True) -> str:
        """Text of the non-special tokens; with ``stop_at_eos`` everything from the first EOS on is dropped."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise InputError(f"Tokenizer.decode: token id {i} outside the vocabulary [0, {self.vocab_size})")
            if i == self.eos_id and stop_at_eos:
                break
            if i >= len(self.specials):
                out.append(self.itos[i])
        return "".join(out)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


class Task:
    """A verifiable task. Subclasses define ``name``, ``_draw(rng) -> prompt`` and ``solve(prompt) -> answer``
    (the exact checker) and ``_corrupt(rng, prompt, answer) -> wrong answer`` (for the noisy corpus)."""

    name: str = "task"
    max_answer_len: int = 8

    def _draw(self, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def solve(self, prompt: str) -> str:
        raise NotImplementedError

    def _corrupt(self, rng: np.random.Generator, prompt: str, answer: str) -> str:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            p = self._draw(rng)
            out.append(Example(p, self.solve(p)))
        return out

    def is_correct(self, prompt: str, completion: str) -> bool:
        """True iff ``completion`` (text after the prompt, up to EOS) is exactly the canonical answer."""
        return completion == self.solve(prompt)

    def reward(self, prompt: str, completion: str) -> float:
        """The paper's verifiable reward: +1.0 if correct, -1.0 otherwise."""
        return 1.0 if self.is_correct(prompt, completion) else -1.0

    def demonstration(self, example: Example) -> str:
        """Prompt + answer text for SFT (the tokenizer adds BOS/EOS)."""
        return example.prompt + example.answer

    def wrong_answer(self, rng: np.random.Generator, prompt: str) -> str:
        """A plausible answer that is guaranteed wrong (used for noisy pretraining text)."""
        ans = self.solve(prompt)
        for _ in range(50):
            w = self._corrupt(rng, prompt, ans)
            if w != ans and w != "":
                return w
        return ans + "0" if ans != "0" else "1"

    def _match(self, pattern: re.Pattern, prompt: str) -> re.Match:
        m = pattern.fullmatch(prompt)
        if m is None:
            raise InputError(f"{self.name}: cannot parse prompt {prompt!r}")
        return m


def _rand_int_with_digits(rng: np.random.Generator, lo_digits: int, hi_digits: int) -> int:
    d = int(rng.integers(lo_digits, hi_digits + 1))
    lo = 0 if d == 1 else 10 ** (d - 1)
    return int(rng.integers(lo, 10**d))


class AdditionTask(Task):
    """a+b with a, b having min_digits..max_digits digits."""

    _re = re.compile(r"(\d+)\+(\d+)=")

    def __init__(self, min_digits: int = 1, max_digits: int = 2):
        self.name = "addition"
        self.min_digits, self.max_digits = min_digits, max_digits
        self.max_answer_len = max_digits + 1

    def _draw(self, rng):
        a = _rand_int_with_digits(rng, self.min_digits, self.max_digits)
        b = _rand_int_with_digits(rng, self.min_digits, self.max_digits)
        return f"{a}+{b}="

    def solve(self, prompt):
        m = self._match(self._re, prompt)
        return str(int(m.group(1)) + int(m.group(2)))

    def _corrupt(self, rng, prompt, answer):
        kind = rng.integers(3)
        v = int(answer)
        if kind == 0:  # off by a small amount (a carry slip)
            return str(max(0, v + int(rng.choice([-10, -2, -1, 1, 2, 10]))))
        if kind == 1:  # one digit wrong
            i = int(rng.integers(len(answer)))
            return answer[:i] + str(int(rng.integers(10))) + answer[i + 1:]
        return str(int(rng.integers(0, 2 * 10**self.max_digits - 1)))


class ModularTask(Task):
    """x % m with x in [0, max_value]."""

    _re = re.compile(r"(\d+)%(\d+)=")

    def __init__(self, modulus: int = 7, max_value: int = 99):
        self.name = "modular"
        self.modulus, self.max_value = modulus, max_value
        self.max_answer_len = len(str(modulus - 1))

    def _draw(self, rng):
        return f"{int(rng.integers(0, self.max_value + 1))}%{self.modulus}="

    def solve(self, prompt):
        m = self._match(self._re, prompt)
        mod = int(m.group(2))
        if mod == 0:
            raise InputError(f"{self.name}: modulus 0 in prompt {prompt!r}")
        return str(int(m.group(1)) % mod)

    def _corrupt(self, rng, prompt, answer):
        mod = int(self._match(self._re, prompt).group(2))
        return str(int(rng.integers(0, mod)))


class SortTask(Task):
    """sort:<digits>= -> digits ascending."""

    _re = re.compile(r"sort:(\d+)=")

    def __init__(self, min_len: int = 4, max_len: int = 7):
        self.name = "sorting"
        self.min_len, self.max_len = min_len, max_len
        self.max_answer_len = max_len

    def _draw(self, rng):
        n = int(rng.integers(self.min_len, self.max_len + 1))
        return "sort:" + "".join(str(int(d)) for d in rng.integers(0, 10, n)) + "="

    def solve(self, prompt):
        return "".join(sorted(self._match(self._re, prompt).group(1)))

    def _corrupt(self, rng, prompt, answer):
        chars = list(answer)
        if rng.random() < 0.5 and len(chars) > 1:  # one adjacent swap (partially sorted)
            i = int(rng.integers(len(chars) - 1))
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        else:  # one digit replaced
            chars[int(rng.integers(len(chars)))] = str(int(rng.integers(10)))
        return "".join(chars)


class CountTask(Task):
    """cnt:<c>:<letters>= -> number of times letter c occurs."""

    _re = re.compile(r"cnt:([a-z]):([a-z]+)=")

    def __init__(self, alphabet: str = "abcd", min_len: int = 4, max_len: int = 8):
        self.name = "counting"
        self.alphabet, self.min_len, self.max_len = alphabet, min_len, max_len
        self.max_answer_len = len(str(max_len))

    def _draw(self, rng):
        n = int(rng.integers(self.min_len, self.max_len + 1))
        s = "".join(self.alphabet[int(i)] for i in rng.integers(0, len(self.alphabet), n))
        c = self.alphabet[int(rng.integers(len(self.alphabet)))]
        return f"cnt:{c}:{s}="

    def solve(self, prompt):
        m = self._match(self._re, prompt)
        return str(m.group(2).count(m.group(1)))

    def _corrupt(self, rng, prompt, answer):
        return str(max(0, int(answer) + int(rng.choice([-2, -1, 1, 2]))))


def default_tasks() -> list[Task]:
    """The four tasks at the difficulty the simulations use (2-digit addition, mod 7 of 0..99, 4-7 digit sort,
    counting in 4-8 letters)."""
    return [AdditionTask(), ModularTask(), SortTask(), CountTask()]


def task_by_name(name: str, tasks: Sequence[Task] | None = None) -> Task:
    for t in tasks if tasks is not None else default_tasks():
        if t.name == name:
            return t
    raise InputError(f"unknown task {name!r}")


def _distractor(rng: np.random.Generator) -> str:
    """Text that shares the characters but not the task formats: words, number lists, junk equations."""
    kind = rng.integers(3)
    if kind == 0:
        n = int(rng.integers(2, 5))
        return " ".join("".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(2, 6)))) for _ in range(n))
    if kind == 1:
        return ",".join(str(int(x)) for x in rng.integers(0, 100, int(rng.integers(2, 6))))
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    return f"{a}*{b}:{int(rng.integers(0, 100))}"


def pretraining_corpus(
    rng: np.random.Generator,
    n_docs: int,
    tasks: Sequence[Task] | None = None,
    *,
    p_correct: float = 0.6,
    p_distractor: float = 0.2,
) -> list[str]:
    """``n_docs`` documents (one line each, no BOS/EOS). A document is distractor text with probability
    ``p_distractor``; otherwise a task example (task chosen uniformly) whose answer is correct with probability
    ``p_correct`` and a plausible wrong answer otherwise."""
    if not (0 <= p_correct <= 1 and 0 <= p_distractor <= 1):
        raise InputError(f"pretraining_corpus: probabilities out of [0, 1]: {p_correct=}, {p_distractor=}")
    tasks = list(tasks) if tasks is not None else default_tasks()
    docs = []
    for _ in range(n_docs):
        if rng.random() < p_distractor:
            docs.append(_distractor(rng))
            continue
        task = tasks[int(rng.integers(len(tasks)))]
        prompt = task._draw(rng)
        answer = task.solve(prompt) if rng.random() < p_correct else task.wrong_answer(rng, prompt)
        docs.append(prompt + answer)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Batching helpers


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """(B, L) long ids right-padded with ``pad_id`` + bool mask (True = real token)."""
    if len(seqs) == 0:
        raise InputError("pad_right: empty batch")
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """(B, L) long ids left-padded (the layout ``generate`` uses for prompts) + bool mask."""
    return left_pad(seqs, pad_id, device)


def encode_demonstrations(
    tok: Tokenizer, examples: Sequence[Example], device=None
) -> tuple[Tensor, Tensor, Tensor]:
    """SFT batch: ``BOS prompt answer EOS`` right-padded. Returns (ids, attention_mask, completion_mask) all (B, L);
    completion_mask is True on the answer tokens and EOS (the tokens an SFT loss scores, aligned for
    ``sims.tinygpt.model.sequence_logprobs``)."""
    seqs, comp = [], []
    for ex in examples:
        p = tok.encode(ex.prompt, bos=True)
        a = tok.encode(ex.answer, eos=True)
        seqs.append(p + a)
        comp.append([False] * len(p) + [True] * len(a))
    ids, mask = pad_right(seqs, tok.pad_id, device)
    cmask = torch.zeros_like(mask)
    for i, c in enumerate(comp):
        cmask[i, : len(c)] = torch.as_tensor(c)
    return ids, mask, cmask.to(device)
