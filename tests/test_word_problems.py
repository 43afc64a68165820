"""Tests for sims.hf.word_problems: seeded generation, exact answers, the prompt formatter and the answer checker."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sims.hf.word_problems import (
    DIFFICULTIES,
    INSTRUCTION,
    TEMPLATES,
    WordProblem,
    extract_answer,
    format_prompt,
    generate_problems,
    is_correct,
    reward,
    sample_problems,
)
from theory.errors import InputError

# ----------------------------------------------------------------------------------------------- generator


def test_same_seed_same_problems_and_different_seed_different_problems():
    a = generate_problems(40, seed=7, difficulty=2)
    b = generate_problems(40, seed=7, difficulty=2)
    c = generate_problems(40, seed=8, difficulty=2)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]


def test_every_template_and_difficulty_is_drawn_and_labelled():
    for d in DIFFICULTIES:
        probs = generate_problems(300, seed=d, difficulty=d)
        assert {p.template for p in probs} == set(TEMPLATES)
        assert all(p.difficulty == d for p in probs)


def _equations(solution: str) -> list[tuple[str, int]]:
    """'a op b = c' pieces of a worked solution (integers, possibly negative)."""
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"(-?\d+(?: [-+*/] -?\d+)+) = (-?\d+)", solution)]


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_worked_solutions_are_exact_arithmetic_and_end_in_the_answer(difficulty):
    for p in generate_problems(200, seed=11, difficulty=difficulty):
        eqs = _equations(p.solution)
        # difficulty d means d operations (the balance template's ticket cost adds one multiplication)
        assert len(eqs) >= difficulty or p.template == "ages"
        for expr, rhs in eqs:
            left = expr.split(" ")
            val = int(left[0])
            for op, x in zip(left[1::2], left[2::2]):
                x = int(x)
                if op == "/":
                    assert val % x == 0, p  # shares divide exactly
                    val //= x
                else:
                    val = {"+": val + x, "-": val - x, "*": val * x}[op]
            assert val == rhs, (expr, rhs, p)
        assert eqs[-1][1] == p.answer
        assert p.solution.endswith(f"The answer is {p.answer}.")


def test_difficulty_raises_the_size_of_the_numbers():
    med = [np.median([abs(p.answer) for p in generate_problems(300, seed=3, difficulty=d)]) for d in DIFFICULTIES]
    assert med[0] < med[1] < med[2]


def test_negative_answers_occur():
    assert any(p.answer < 0 for p in generate_problems(300, seed=5, difficulty=2))


def test_bad_generator_inputs_name_the_problem():
    with pytest.raises(InputError, match="difficulty"):
        generate_problems(3, seed=0, difficulty=4)
    with pytest.raises(InputError, match="unknown word problem templates"):
        generate_problems(3, seed=0, templates=["nope"])
    with pytest.raises(InputError, match=">= 0"):
        sample_problems(np.random.default_rng(0), -1)


def test_templates_restrict_the_draw():
    assert {p.template for p in generate_problems(30, seed=0, templates=["boxes"])} == {"boxes"}


# ----------------------------------------------------------------------------------------------- prompt


class _ChatTok:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_plain_prompt_without_chat_template():
    p = generate_problems(1, seed=0)[0]
    text = format_prompt(p)
    assert text == f"{INSTRUCTION}\nQuestion: {p.question}\nAnswer:"
    assert format_prompt(p, object()) == text  # a tokenizer without a chat template: plain text too


def test_chat_prompt_uses_the_tokenizers_template_with_optional_system_turn():
    p = generate_problems(1, seed=0)[0]
    assert format_prompt(p, _ChatTok()) == f"<user>{INSTRUCTION}\n{p.question}</user><assistant>"
    assert format_prompt(p.question, _ChatTok(), system="Be brief.").startswith("<system>Be brief.</system><user>")


# ----------------------------------------------------------------------------------------------- checker


@pytest.mark.parametrize("text, expected", [
    ("The answer is 12.", 12),
    ("#### 12", 12),
    ("12", 12),
    ("So the total is 12", 12),
    ("  12.  \n", 12),
    ("The answer is -7.", -7),
    ("It drops to \u22124 degrees.", -4),  # Unicode minus
    ("#### -15", -15),
    ("\\boxed{42}", 42),
    ("Answer: 1,234", 1234),
    ("the answer is: $56", 56),
    ("The Answer Is 8", 8),
    ("The answer is therefore 14 apples.", 14),
    ("12.0", 12),
    # distractor numbers earlier (or later) in the text never beat an explicit final answer
    ("First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", 14),
    ("The answer is 14. (I checked step 2 with 99 examples.)", 14),
    ("#### 5\nThe answer is 6", 5),  # '####' outranks 'answer is'
    ("The answer is 3. Wait, the answer is 4.", 4),  # the last statement wins
    ("We had 5 and 7 then -3. So we get 9", 9),
    # subtraction and ranges are not negative numbers
    ("10-3=7", 7),
    ("pages 3-5", 5),
    ("a list: 3, 4", 4),
])
def test_checker_extracts_the_final_integer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [
    "",
    "no numbers here",
    "The answer is 12.5",  # not an integer: never 12 or 5
    "3.75",
    "version v1.5",  # digits glued to a word are not a number
    "The answer is x.",  # marker without a number: no fallback to earlier numbers
])
def test_checker_returns_none_when_no_integer_is_stated(text):
    assert extract_answer(text) is None


def test_marker_without_a_number_does_not_fall_back_to_distractors():
    assert extract_answer("I added 3 and 4. The answer is unknown.") is None


def test_reward_is_plus_minus_one_and_exact():
    assert reward("The answer is 12.", 12) == 1.0
    assert reward("The answer is 13.", 12) == -1.0
    assert reward("The answer is 12.5", 12) == -1.0
    assert reward("nothing", 0) == -1.0
    assert reward("The answer is -0.", 0) == 1.0
    assert is_correct("#### -3", -3) and not is_correct("#### 3", -3)


def test_checker_refuses_non_strings():
    with pytest.raises(InputError, match="str"):
        extract_answer(12)  # type: ignore[arg-type]


@given(seed=st.integers(0, 2**32 - 1), difficulty=st.sampled_from(DIFFICULTIES))
@example(seed=5, difficulty=2)  # a negative answer
def test_checker_recovers_the_answer_from_every_worked_solution(seed, difficulty):
    p: WordProblem = generate_problems(1, seed=seed, difficulty=difficulty)[0]
    assert extract_answer(p.solution) == p.answer
    assert extract_answer(p.solution.replace("The answer is ", "#### ")) == p.answer
    # the bare final steps without the marker: the last number is the answer as well
    assert extract_answer(p.solution.rsplit(" The answer is", 1)[0]) == p.answer
    assert reward(p.solution, p.answer) == 1.0 and reward(p.solution, p.answer + 1) == -1.0


@given(n=st.integers(-10**9, 10**9), prefix=st.lists(st.integers(-999, 9999), max_size=5))
def test_checker_recovers_any_integer_after_distractors(n, prefix):
    text = " ".join(f"we saw {x} items," for x in prefix) + f" The answer is {n}."
    assert extract_answer(text) == n
    assert extract_answer(f"{text.rsplit(' The', 1)[0]} so {n:,}") == n  # thousands separators, no marker
