"""Gate III verdicts at their boundaries (mutation audit of theory.precision / theory.bf16): hypotheses checked by
sign as well as magnitude, strict and inclusive ends of each stated interval, on dyadic values (the floats are the
rationals, so every expected verdict is exact)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from theory import precision as P


@pytest.mark.parametrize("x, y", [(1.0, -1.5), (-1.0, 1.0078125), (2.0**-126, -(2.0**-126) * 1.5)])
def test_lemE1_pairs_of_opposite_sign_fail_the_same_binade_assumption(x, y):
    """The binade [2^e, 2^(e+1)) is of the signed value: x and -y with |x|, |y| in one binade are not in one binade
    (the lemma's gap bound 2^(e-7) would otherwise read "holds" for any such pair)."""
    c = P.check_lemE1(x, y)
    assert c.verdict == "assumption-failed" and "same binade" in c.failed_assumption
