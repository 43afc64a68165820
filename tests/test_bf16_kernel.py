"""theory.bf16_kernel: every backend against independent integer oracles (bf16 values decoded by integer
arithmetic; fp32 -> bf16 round-to-nearest-even on the uint32 bits), signed zeros, subnormals, NaN payloads."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theory import bf16_kernel as K
from theory.errors import InputError, NonFiniteError, ShapeMismatchError

BACKENDS = ["blocked", "eager", "compiled"]


@pytest.fixture(autouse=True)
def compiled_pass_really_compiled():
    """A compiled test that silently ran the eager fallback would test nothing new: fail if compiling failed."""
    yield
    err = K.kernel_info()["compile_error"]
    if err is not None and shutil.which("g++") is not None:
        pytest.fail(f"torch.compile of the bf16 pass failed on CPU although a C++ compiler is present: {err}")


def bf16(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.int64).astype(np.int16)).view(torch.bfloat16)


def value_of(bits: np.ndarray) -> np.ndarray:
    """Exact float64 value of finite bf16 patterns by integer arithmetic (sign, biased exponent, 7-bit mantissa)."""
    u = bits.astype(np.int64) & 0xFFFF
    sign = np.where(u & 0x8000, -1.0, 1.0)
    e = (u >> 7) & 0xFF
    frac = u & 0x7F
    assert not np.any(e == 0xFF)
    significand = np.where(e == 0, frac, frac + 128).astype(np.float64)
    return sign * np.ldexp(significand, np.maximum(e, 1) - 127 - 7)


def oracle_changed(x_bits: np.ndarray, y_bits: np.ndarray) -> np.ndarray:
    """Changed iff the exact values differ (+0 == -0 as values): no bit formula involved."""
    return value_of(x_bits) != value_of(y_bits)


def round_fp32_to_bf16_bits(f: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even of finite float32 to bf16 on the uint32 bits (overflow carries into Inf)."""
    u = f.view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.astype(np.uint16).view(np.int16)


FINITE = np.array([b for b in range(-(2**15), 2**15) if (b & 0x7F80) != 0x7F80], dtype=np.int64)


def partner_sets() -> list[np.ndarray]:
    """Partners for every finite pattern: itself, neighbours, the sign flip, a seeded permutation, and reversal."""
    rng = np.random.default_rng(0)
    out = [FINITE, np.roll(FINITE, 1), np.roll(FINITE, 128), FINITE ^ -0x8000, FINITE[rng.permutation(FINITE.size)],
           FINITE[::-1]]
    return [p[(p & 0x7F80) != 0x7F80] if p.size == FINITE.size else p for p in out]


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_and_mask_equal_the_value_oracle_on_every_finite_pattern(backend):
    for partner in partner_sets():
        partner = np.where((partner & 0x7F80) == 0x7F80, 0, partner)  # the sign flip of a finite is finite
        expected = oracle_changed(FINITE, partner)
        a, b = bf16(FINITE), bf16(partner)
        assert K.changed_count(a, b, backend=backend) == int(expected.sum())
        assert np.array_equal(K.changed_mask(a, b, backend=backend).numpy(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zeros_and_subnormals(backend):
    x = np.array([0x0000, -0x8000, 0x0000, -0x8000, 0x0001, 0x0001, 0x007F, -0x7FFF, 0x0080, 0x0001])
    y = np.array([-0x8000, 0x0000, 0x0000, -0x8000, 0x0001, 0x0002, 0x0080, -0x7FFE, 0x007F, -0x7FFF])
    expected = [False, False, False, False, False, True, True, True, True, True]
    assert oracle_changed(x, y).tolist() == expected
    assert K.changed_mask(bf16(x), bf16(y), backend=backend).tolist() == expected
    assert K.changed_count(bf16(x), bf16(y), backend=backend) == sum(expected)
    # int16 bit patterns are taken as bf16 patterns
    assert K.changed_count(bf16(x).view(torch.int16), bf16(y).view(torch.int16), backend=backend) == sum(expected)


def fp32_cases() -> np.ndarray:
    rng = np.random.default_rng(1)
    u = rng.integers(0, 2**32, size=40_000, dtype=np.uint64).astype(np.uint32)
    u = u[(u & 0x7F800000) != 0x7F800000]  # finite float32
    hi = rng.integers(0, 2**16, size=2000, dtype=np.uint64).astype(np.uint32) << 16
    ties = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001])  # exact ties (even and odd), just below/above
    ties = ties[(ties & 0x7F800000) != 0x7F800000]
    subnormal = np.arange(0, 3000, dtype=np.uint32) * 997 % 0x00800000
    edge = np.array([0x7F7F7FFF, 0x7F7F0000, 0x00000000, 0x80000000, 0x00008000, 0x80008000], dtype=np.uint32)
    return np.concatenate([u, ties, subnormal, subnormal | 0x80000000, edge]).view(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_masters_are_rounded_to_bf16_exactly_as_the_integer_oracle(backend):
    f = fp32_cases()
    rounded = round_fp32_to_bf16_bits(f)
    assert np.array_equal(torch.from_numpy(f).to(torch.bfloat16).view(torch.int16).numpy(), rounded)  # torch 2.13
    finite = (rounded.astype(np.int64) & 0x7F80) != 0x7F80
    f, rounded = f[finite], rounded[finite]
    stored = rounded.copy()
    rng = np.random.default_rng(2)
    moved = rng.choice(stored.size, 777, replace=False)
    stored[moved] = np.where((stored[moved] & 0x7F) == 0x7F, stored[moved] - 1, stored[moved] + 1)
    expected = oracle_changed(rounded.astype(np.int64), stored.astype(np.int64))
    got = K.changed_mask(torch.from_numpy(f), bf16(stored), backend=backend).numpy()
    assert np.array_equal(got, expected)
    assert K.changed_count(torch.from_numpy(f), bf16(stored), backend=backend) == int(expected.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_that_overflows_bf16_is_rejected_naming_the_side(backend):
    f = np.array([1.0, np.float32(3.4e38), 2.0], dtype=np.float32)  # finite in fp32, Inf once rounded
    with pytest.raises(NonFiniteError, match="w0: 1 non-finite .* as bf16"):
        K.changed_count(torch.from_numpy(f), torch.ones(3, dtype=torch.bfloat16), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("payloads", [(0x7FC1, 0x7FC2), (0x7FC1, 0x7FC1), (-0x3F, 0x7FA0), (0x7F80, -0x80)])
def test_nan_and_inf_are_rejected_before_any_count(backend, payloads):
    """Two NaNs with different payloads would 'differ' bitwise, equal ones would not: neither may be counted."""
    a = bf16([0, 1, payloads[0], 3])
    b = bf16([0, 2, payloads[1], 3])
    with pytest.raises(NonFiniteError, match="w0: 1 non-finite"):
        K.changed_count(a, b, backend=backend)
    with pytest.raises(NonFiniteError, match="base: 1 non-finite"):
        K.changed_mask(a, b, names=("base", "tuned"), backend=backend)


def test_large_random_pair_agrees_across_backends_and_block_edges():
    rng = np.random.default_rng(3)
    n = 2 * K.BLOCK + 12345
    x = rng.integers(-(2**15), 2**15, size=n)
    x = np.where((x & 0x7F80) == 0x7F80, x & ~0x4000, x)  # clear one exponent bit of Inf/NaN patterns
    y = x.copy()
    idx = rng.choice(n, 5000, replace=False)
    y[idx] = rng.integers(-(2**15), 2**15, size=idx.size)
    y = np.where((y & 0x7F80) == 0x7F80, y & ~0x4000, y)
    y[K.BLOCK - 2: K.BLOCK + 2] = -0x8000  # -0 straddling a block edge
    x[K.BLOCK - 2: K.BLOCK + 2] = 0
    expected = oracle_changed(x, y)
    for backend in BACKENDS:
        assert K.changed_count(bf16(x), bf16(y), backend=backend) == int(expected.sum())
        assert np.array_equal(K.changed_mask(bf16(x), bf16(y), backend=backend).numpy(), expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**15), 2**15 - 1), min_size=1, max_size=40),
       st.lists(st.integers(-(2**15), 2**15 - 1), min_size=1, max_size=40))
@example([0], [-(2**15)])
def test_symmetric_and_invariant_under_a_common_sign_flip(xs, ys):
    n = min(len(xs), len(ys))
    x = np.array([v for v in xs[:n]])
    y = np.array([v for v in ys[:n]])
    x = np.where((x & 0x7F80) == 0x7F80, 0, x)
    y = np.where((y & 0x7F80) == 0x7F80, 0, y)
    count = K.changed_count(bf16(x), bf16(y))
    assert count == K.changed_count(bf16(y), bf16(x)) == int(oracle_changed(x, y).sum())
    flip = lambda v: ((v + 2**15) ^ 0x8000) - 2**15  # noqa: E731 - negate every value (sign bit)
    assert K.changed_count(bf16(flip(x)), bf16(flip(y))) == count


def test_bad_inputs_are_one_line_errors():
    a = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(ShapeMismatchError, match="w0 has shape"):
        K.changed_count(a, torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(InputError, match="backend must be one of"):
        K.changed_count(a, a, backend="triton")
    with pytest.raises(InputError, match="expected a torch tensor"):
        K.changed_count(np.zeros(3), a)
    with pytest.raises(InputError, match="int32 is not a bf16 value type"):
        K.changed_count(torch.zeros(3, dtype=torch.int32), a)
    assert K.changed_count(torch.zeros(0), torch.zeros(0)) == 0
    assert K.kernel_info("cpu")["auto"] == "blocked"
