"""theory.bf16_kernel at its boundaries (mutation audit): the Inf/NaN test at the edge patterns +Inf (0x7F80) and
-Inf (0xFF80), on either side, for each CPU backend; the block test on every pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from theory import bf16_kernel
from theory.errors import NonFiniteError

EDGES = [0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x7F81]  # +Inf, -Inf, a quiet NaN, the last NaN, the first NaN


def _bits(values) -> torch.Tensor:
    return torch.tensor(np.array(values, dtype=np.uint16).view(np.int16))


@pytest.mark.parametrize("backend", ["blocked", "eager"])
@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("pattern", EDGES)
def test_a_nonfinite_pattern_on_either_side_is_refused_by_name(backend, side, pattern):
    finite = _bits([0x3F80, 0x0000, 0x8000, 0x0001])  # 1.0, +0, -0, the smallest subnormal
    bad = finite.clone()
    bad[2] = _bits([pattern])[0]
    a, b = (bad, finite) if side == 0 else (finite, bad)
    for fn in (bf16_kernel.changed_count, bf16_kernel.changed_mask):
        with pytest.raises(NonFiniteError, match=("w0" if side == 0 else "w1")):
            fn(a, b, backend=backend)


def test_block_nonfinite_test_is_the_exponent_rule_on_every_pattern():
    patterns = np.arange(1 << 16, dtype=np.uint32)
    expected = (patterns & 0x7F80) == 0x7F80
    i16 = patterns.astype(np.uint16).view(np.int16)
    got = np.array([bf16_kernel._block_has_nonfinite(i16[i:i + 1]) for i in range(i16.size)])
    np.testing.assert_array_equal(got, expected)
