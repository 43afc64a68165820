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


@pytest.mark.parametrize("w", [1.0, 1.0078125, 1.5, 2.0, 0.75, -1.0, -1.0078125, 3.0 * 2.0**-120, 2.0**-126])
@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("semantics", ["exact", "fp32"])
def test_threshold_changes_exactly_at_its_value_iff_inclusive(w, direction, semantics):
    """At |delta| = t itself the step changes w iff the threshold is inclusive (a tie that rounds away from w); the
    exclusive case (w's own mantissa even: the tie rounds back to w) must read "does not change". Checked against
    one step of the Fraction oracle, not against the threshold's own rule."""
    t = P.realization_threshold(w, direction, semantics)
    moved = P.bf16_step(w, direction * t.value, semantics) != w
    assert t.changes(t.value) == moved == t.inclusive
    assert t.changes(t.value * (1 + Fraction(1, 2**40)))  # just above t: always changes
