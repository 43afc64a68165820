"""theory.metrics at its boundaries (mutation audit): the Inf/NaN bit test on every bf16 pattern, both backends;
the principal mask's tie rule when every score ties (W0 = 0) and its gap rule inside the rounding band; the fixed
absolute-tolerance probe at exactly atol (dyadic, so exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from theory import metrics
from theory.errors import ZeroGapError

EPS = np.finfo(np.float64).eps


def test_nonfinite_bit_test_is_the_exponent_rule_on_every_pattern_numpy_and_torch():
    """A bf16 pattern is Inf/NaN iff its exponent bits are all ones ((b & 0x7F80) == 0x7F80): +Inf 0x7F80 and -Inf
    0xFF80 (int16 -128) are the edges of the reduction-only test, checked for every one of the 65536 patterns."""
    patterns = np.arange(1 << 16, dtype=np.uint32)
    expected = (patterns & 0x7F80) == 0x7F80
    i16 = patterns.astype(np.uint16).view(np.int16)
    got_np = np.array([metrics._has_nonfinite_bits(i16[i:i + 1]) for i in range(i16.size)])
    np.testing.assert_array_equal(got_np, expected)
    t = torch.from_numpy(i16.copy())
    got_t = np.array([metrics._has_nonfinite_bits(t[i:i + 1]) for i in range(t.shape[0])])
    np.testing.assert_array_equal(got_t, expected)


@pytest.mark.parametrize("shape, alpha", [((2, 3), 0.5), ((4, 4), 0.25), ((3, 2), 1.0 / 6)])
def test_principal_mask_of_the_zero_matrix_selects_exactly_the_count_by_flat_index(shape, alpha):
    """W0 = 0 at k = min(m, n): every score is exactly 0 (tie tolerance 0), all tie, and the mask is the first
    floor(alpha n + 1/2) entries in row-major order -- the documented tie rule, not an empty mask."""
    m, n = shape
    mask = metrics.principal_mask(np.zeros(shape), min(m, n), alpha)
    count = metrics.selection_count(alpha, m * n)
    assert count > 0 and int(mask.sum()) == count
    assert mask.ravel()[:count].all() and not mask.ravel()[count:].any()


def test_principal_mask_gap_inside_the_rounding_band_is_refused():
    """gamma_k = sigma_k - sigma_(k+1) must exceed 2 eps_s, eps_s = 8 max(m, n) eps sigma_1 (reconstruction_tie_tol's
    error model): a gap of eps_s leaves the rank-k reconstruction undetermined (ZeroGapError), one of 4 eps_s not."""
    sigma = 0.75
    eps_s = 8 * 3 * EPS * sigma
    with pytest.raises(ZeroGapError):
        metrics.principal_mask(np.diag([sigma, sigma - eps_s, 0.25]), 1, 0.5)
    assert metrics.principal_mask(np.diag([sigma, sigma - 4 * eps_s, 0.25]), 1, 1.0 / 9).sum() == 1


def test_abs_tol_probe_is_inclusive_at_exactly_atol():
    """|w1 - w0| <= atol (App. E.1): a change of exactly atol = 2^-17 reads unchanged, one ulp more reads changed."""
    atol = 2.0**-17
    w0 = np.array([1.0, 1.0, 0.5])
    w1 = np.array([1.0 + atol, np.nextafter(1.0 + atol, 2.0), 0.5 - atol])
    np.testing.assert_array_equal(metrics.abs_tol_unchanged(w0, w1, atol), [True, False, True])
