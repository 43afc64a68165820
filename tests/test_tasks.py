"""Tests for sims.tinygpt.tasks: tokenizer round trips, exact checkers against Python's own arithmetic, the noisy corpus."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sims.tinygpt.tasks import (
    AdditionTask,
    CountTask,
    Example,
    ModularTask,
    SortTask,
    Tokenizer,
    default_tasks,
    encode_demonstrations,
    pad_left,
    pad_right,
    pretraining_corpus,
    task_by_name,
)
from theory.errors import InputError

TOK = Tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def test_special_ids_and_vocab():
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 1, 2)
    assert TOK.vocab_size == len(set(TOK.itos)) == 3 + len(set("".join(TOK.itos[3:])))
    for c in "0123456789+%=:abcz ":
        assert c in TOK.stoi


@given(st.text(alphabet="".join(TOK.itos[3:]), max_size=30))
def test_encode_decode_round_trip(text):
    ids = TOK.encode(text, bos=True, eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and len(ids) == len(text) + 2
    assert TOK.decode(ids) == text


def test_decode_stops_at_eos_and_skips_pad():
    ids = TOK.encode("12", bos=True) + [TOK.eos_id] + TOK.encode("99") + [TOK.pad_id]
    assert TOK.decode(ids) == "12"
    assert TOK.decode(ids, stop_at_eos=False) == "1299"
    assert TOK.decode(torch.tensor([TOK.pad_id, *TOK.encode("7")])) == "7"


def test_tokenizer_rejects_unknown_characters_and_ids():
    with pytest.raises(InputError, match="'A'"):
        TOK.encode("1A")
    with pytest.raises(InputError, match="outside the vocabulary"):
        TOK.decode([TOK.vocab_size])


# ---------------------------------------------------------------------------------------------------------------
# exact checkers on hand-checked examples


@pytest.mark.parametrize("task, prompt, answer", [
    (AdditionTask(), "37+485=", "522"),
    (AdditionTask(), "0+0=", "0"),
    (AdditionTask(), "99+1=", "100"),
    (ModularTask(), "913%7=", "3"),
    (ModularTask(), "6%7=", "6"),
    (ModularTask(), "14%7=", "0"),
    (SortTask(), "sort:4193=", "1349"),
    (SortTask(), "sort:0000=", "0000"),
    (SortTask(), "sort:9081=", "0189"),
    (CountTask(), "cnt:b:abbcab=", "3"),
    (CountTask(), "cnt:d:abca=", "0"),
])
def test_checker_on_hand_checked_examples(task, prompt, answer):
    assert task.solve(prompt) == answer
    assert task.reward(prompt, answer) == 1.0 and task.is_correct(prompt, answer)


@pytest.mark.parametrize("task, prompt, wrong", [
    (AdditionTask(), "37+485=", "523"),
    (AdditionTask(), "37+485=", "0522"),  # no leading zeros: the answer is canonical
    (AdditionTask(), "37+485=", "522 "),
    (AdditionTask(), "37+485=", ""),
    (ModularTask(), "913%7=", "10"),
    (SortTask(), "sort:4193=", "1394"),
    (SortTask(), "sort:4193=", "134"),
    (CountTask(), "cnt:b:abbcab=", "2"),
])
def test_checker_rejects_wrong_completions(task, prompt, wrong):
    assert task.reward(prompt, wrong) == -1.0 and not task.is_correct(prompt, wrong)


@pytest.mark.parametrize("task, prompt", [
    (AdditionTask(), "37-485="), (AdditionTask(), "37+485"), (ModularTask(), "5%0="),
    (SortTask(), "sort:41a="), (CountTask(), "cnt:bb:abc="),
])
def test_checker_rejects_unparseable_prompts(task, prompt):
    with pytest.raises(InputError):
        task.reward(prompt, "1")


# ---------------------------------------------------------------------------------------------------------------
# checkers agree with Python's arithmetic / sorting / counting (hypothesis)


@given(st.integers(0, 10**6), st.integers(0, 10**6))
@example(0, 0)  # pinned edge cases: zeros, a carry into a new digit
@example(999, 1)
def test_addition_checker_agrees_with_python(a, b):
    t = AdditionTask()
    prompt = f"{a}+{b}="
    assert t.reward(prompt, str(a + b)) == 1.0
    assert t.reward(prompt, str(a + b + 1)) == -1.0


@given(st.integers(0, 10**6), st.integers(1, 97))
@example(0, 1)
def test_modular_checker_agrees_with_python(x, m):
    t = ModularTask()
    assert t.solve(f"{x}%{m}=") == str(x % m)


@given(st.lists(st.integers(0, 9), min_size=1, max_size=12))
def test_sort_checker_agrees_with_python(digits):
    t = SortTask()
    s = "".join(map(str, digits))
    assert t.solve(f"sort:{s}=") == "".join(map(str, sorted(digits)))


@given(st.sampled_from("abcd"), st.text(alphabet="abcd", min_size=1, max_size=15))
def test_count_checker_agrees_with_python(c, s):
    assert CountTask().solve(f"cnt:{c}:{s}=") == str(Counter(s)[c])


# ---------------------------------------------------------------------------------------------------------------
# sampling, difficulty knobs, wrong answers


@pytest.mark.parametrize("task", default_tasks(), ids=lambda t: t.name)
def test_sample_is_seeded_correct_and_tokenizable(task):
    a = task.sample(np.random.default_rng(5), 50)
    b = task.sample(np.random.default_rng(5), 50)
    assert a == b and len(a) == 50
    assert len({e.prompt for e in a}) > 10  # not degenerate
    for e in a:
        assert e.prompt.endswith("=") and task.is_correct(e.prompt, e.answer)
        assert len(e.answer) <= task.max_answer_len
        TOK.encode(e.text, bos=True, eos=True)
        assert task.demonstration(e) == e.prompt + e.answer


def test_difficulty_parameters_are_respected():
    rng = np.random.default_rng(0)
    for e in AdditionTask(2, 3).sample(rng, 200):
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", e.prompt).groups())
        assert 10 <= a < 1000 and 10 <= b < 1000
    for e in ModularTask(5, 30).sample(rng, 200):
        x = int(e.prompt.split("%")[0])
        assert 0 <= x <= 30 and e.prompt.endswith("%5=") and 0 <= int(e.answer) < 5
    for e in SortTask(2, 3).sample(rng, 200):
        assert 2 <= len(e.answer) <= 3
    for e in CountTask("xy", 3, 4).sample(rng, 200):
        s = e.prompt.split(":")[2][:-1]
        assert set(s) <= {"x", "y"} and 3 <= len(s) <= 4


@pytest.mark.parametrize("task", default_tasks(), ids=lambda t: t.name)
def test_wrong_answer_is_always_wrong(task):
    rng = np.random.default_rng(1)
    for e in task.sample(rng, 200):
        w = task.wrong_answer(rng, e.prompt)
        assert task.reward(e.prompt, w) == -1.0 and w != ""


def test_task_by_name():
    assert isinstance(task_by_name("modular"), ModularTask)
    with pytest.raises(InputError, match="unknown task"):
        task_by_name("division")


# ---------------------------------------------------------------------------------------------------------------
# corpus


def _classify(doc: str):
    """(task, prompt, answer) for a task document, None for a distractor."""
    for t in default_tasks():
        i = doc.find("=")
        if i < 0:
            return None
        try:
            t.solve(doc[: i + 1])
        except InputError:
            continue
        return t, doc[: i + 1], doc[i + 1:]
    return None


def test_corpus_mixes_correct_wrong_and_distractor_documents():
    docs = pretraining_corpus(np.random.default_rng(0), 4000, p_correct=0.6, p_distractor=0.2)
    assert docs == pretraining_corpus(np.random.default_rng(0), 4000, p_correct=0.6, p_distractor=0.2)
    parsed = [_classify(d) for d in docs]
    n_task = sum(p is not None for p in parsed)
    correct = sum(p is not None and p[0].is_correct(p[1], p[2]) for p in parsed)
    # binomial: 4000 docs, sd of the distractor fraction ~ 0.0063, of the correct fraction ~ 0.0087; 5 sd margins
    assert abs(1 - n_task / 4000 - 0.2) < 0.035
    assert abs(correct / n_task - 0.6) < 0.045
    names = Counter(p[0].name for p in parsed if p is not None)
    assert set(names) == {"addition", "modular", "sorting", "counting"}
    assert min(names.values()) > 0.2 * n_task * 0.8
    for d in docs:
        TOK.encode(d)


def test_corpus_extremes_and_bad_probabilities():
    rng = np.random.default_rng(0)
    all_right = pretraining_corpus(rng, 300, p_correct=1.0, p_distractor=0.0)
    assert all(p is not None and p[0].is_correct(p[1], p[2]) for p in map(_classify, all_right))
    all_wrong = pretraining_corpus(rng, 300, p_correct=0.0, p_distractor=0.0)
    assert not any(p[0].is_correct(p[1], p[2]) for p in map(_classify, all_wrong))
    with pytest.raises(InputError):
        pretraining_corpus(rng, 3, p_correct=1.5)


# ---------------------------------------------------------------------------------------------------------------
# batching


def test_pad_right_and_left():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]
    with pytest.raises(InputError):
        pad_right([], 0)


def test_encode_demonstrations_marks_answer_and_eos():
    exs = [Example("1+2=", "3"), Example("sort:31=", "13")]
    ids, mask, comp = encode_demonstrations(TOK, exs)
    assert ids.shape == mask.shape == comp.shape == (2, 12)
    assert TOK.decode(ids[0]) == "1+2=3" and TOK.decode(ids[1]) == "sort:31=13"
    # row 0: BOS 1 + 2 = | 3 EOS | pads
    assert comp[0].tolist() == [False] * 5 + [True, True] + [False] * 5
    assert comp[1].tolist() == [False] * 9 + [True] * 3
    assert ids[0, 6] == TOK.eos_id and not mask[0, 7:].any()
    assert (comp <= mask).all()
