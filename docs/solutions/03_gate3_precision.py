"""Answer key of ``docs/03_gate3_precision.md``: reference solutions and the expected answers behind ``check(n)``.

Not part of the student's notebook. ``SOLUTIONS[n]`` is run in the notebook in place of exercise n's cell by the
test suite (``threegate.tutorials.execute_tutorial``); ``CHECKS[n](nb)`` computes the expected answers from the
notebook's variables ``nb`` by another route than the solution where the project has one. Every answer here is a
dyadic number or a count, so the comparisons are exact (tolerance 0).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from theory.precision import bf16_bits, bf16_value, check_cor36, next_down, realization_threshold
from threegate.answers import Expected

SOLUTIONS = {
    1: """
w = 1 + 2**-6
answer_1 = next(k * 2.0**-14 for k in range(1, 2**10) if bf16_step(w, k * 2.0**-14, "fp32") != w)
""",
    2: """
t = realization_threshold(2.0, -1, "exact")
answer_2_threshold = float(t.value)
answer_2_tie_changes = bool(t.inclusive)
""",
    3: """
import ml_dtypes
bits = np.arange(0x0080, 0x7F80, dtype=np.uint16)
values = bits.view(ml_dtypes.bfloat16)
t, inclusive = realization_threshold_array(values, np.ones(bits.shape), "exact")
half_ulp = np.array([float(ulp_bf16(float(v))) / 2 for v in values.astype(np.float64)])
answer_3 = int(np.sum((t == half_ulp) & inclusive))
""",
}


def exercise_1(nb) -> dict[str, Expected]:
    # the exact fp32 threshold, then the first multiple of 2^-14 it lets through (not bf16_step: another route)
    t = realization_threshold(1 + 2**-6, +1, "fp32")
    unit = Fraction(1, 2**14)
    k = math.floor(t.value / unit)
    k = next(j for j in (k, k + 1, k + 2) if j >= 1 and t.changes(j * unit))
    return {"answer_1": Expected(float(k * unit),
                                 hint="loop k = 1, 2, ... and stop at the first k * 2**-14 for which "
                                      "bf16_step(w, step, 'fp32') differs from w; mind the tie at half a ULP")}


def exercise_2(nb) -> dict[str, Expected]:
    # from the bits: the bf16 neighbour below 2 is next_down(2); a step of half the gap is a tie, which rounds to
    # the even one of the two (the realization rule of Sec. 2 of the tutorial, evaluated by hand here)
    below = next_down(2.0)
    threshold = (Fraction(2) - Fraction(below)) / 2
    neighbour_even = bf16_bits(below) % 2 == 0
    return {"answer_2_threshold": Expected(float(threshold),
                                           hint="the spacing of bf16 just below a power of two is half the spacing "
                                                "above it; realization_threshold gives the exact rule"),
            "answer_2_tie_changes": Expected(bool(neighbour_even),
                                             hint="a tie rounds to the neighbour with the even mantissa")}


def exercise_3(nb) -> dict[str, Expected]:
    # Cor 3.6 is right for an upward step iff the tie at ULP/2 changes w, i.e. iff w's mantissa is odd; the scalar
    # check agrees on a sample (a disagreement here is a bug in theory.precision, not in the student's answer)
    sample = np.random.default_rng(1).integers(0x0080, 0x7F80, size=64)
    if not all(check_cor36(bf16_value(int(b)), 1).holds == bool(b & 1) for b in sample):
        raise AssertionError("theory.precision.check_cor36 disagrees with the odd-mantissa rule")
    odd = int(np.sum(np.arange(0x0080, 0x7F80) & 1))
    return {"answer_3": Expected(odd, hint="compare each threshold with half of ulp_bf16 and require the tie at it "
                                           "to change w (inclusive)")}


CHECKS = {1: exercise_1, 2: exercise_2, 3: exercise_3}
