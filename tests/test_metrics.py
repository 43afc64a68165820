"""Tests for theory.metrics: exact oracles (integer bits, Fractions, structured matrices with known spectra)."""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from theory import metrics as M
from theory.errors import InputError, NonFiniteError, ShapeMismatchError, ZeroGapError
from theory.linalg import svd64

EPS64 = np.finfo(np.float64).eps


# ------------------------------------------------------------------------------------------------ bf16 helpers


def all_finite_bf16_bits() -> np.ndarray:
    bits = np.arange(-(2**15), 2**15, dtype=np.int32).astype(np.int16)
    finite = (bits.astype(np.int32) & 0x7F80) != 0x7F80
    return bits[finite]


def bf16_from_bits(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.int16).copy()).view(torch.bfloat16)


def bf16_fraction(bits: int) -> Fraction:
    """Exact value of a finite bf16 bit pattern by integer arithmetic (the oracle)."""
    u = bits & 0xFFFF
    sign = -1 if u & 0x8000 else 1
    e = (u >> 7) & 0xFF
    frac = u & 0x7F
    assert e != 0xFF
    if e == 0:
        return sign * Fraction(frac, 2**7) * Fraction(1, 2**126)
    return sign * (1 + Fraction(frac, 2**7)) * Fraction(2) ** (e - 127)


def oracle_unchanged(b0: int, b1: int, eta: float) -> bool:
    x, y = bf16_fraction(b0), bf16_fraction(b1)
    return abs(y - x) <= Fraction(eta) * max(abs(x), abs(y))


# ------------------------------------------------------------------------------------------------ Def 2.1 probe


def test_bf16_oracle_matches_ml_dtypes_on_every_finite_pattern():
    bits = all_finite_bf16_bits()
    vals = bits.view(ml_dtypes.bfloat16).astype(np.float64)
    for b, v in zip(bits[::97], vals[::97]):  # the oracle itself, spot-checked against ml_dtypes
        assert bf16_fraction(int(b)) == Fraction(float(v))


def test_min_relative_gap_between_neighbours_is_exactly_2_pow_minus_8():
    """Sharpened Prop. E.3: distinct finite bf16 neighbours differ by >= 2**-8 relative, attained at 2**e."""
    pos = np.arange(1, 0x7F80, dtype=np.int16)  # +smallest subnormal .. largest finite, ascending
    x = pos[:-1].view(ml_dtypes.bfloat16).astype(np.float64)
    y = pos[1:].view(ml_dtypes.bfloat16).astype(np.float64)
    # 2**8 * (y - x) >= y is exact in float64 (power-of-two scaling, exact difference of neighbours)
    assert np.all(2.0**8 * (y - x) >= y)
    attained = np.nonzero(2.0**8 * (y - x) == y)[0]
    assert attained.size > 0
    # attained exactly at powers of two (the upper neighbour is 2**e, the lower one 2**e - 2**(e-8))
    assert np.all(np.log2(y[attained]) == np.round(np.log2(y[attained])))


@pytest.mark.parametrize("eta", [1e-3, 2.0**-9, 0.0038, 0.0])
def test_fast_bits_path_equals_formula_on_all_neighbour_pairs(eta):
    """For every eta < 2**-8 (wider than the paper's eta < 2**-9) bit equality == the formula."""
    bits = all_finite_bf16_bits()
    a = bf16_from_bits(bits[:-1])
    b = bf16_from_bits(bits[1:])
    for x, y in ((a, b), (b, a), (a, a)):
        fast = M.bf16_unchanged(x, y, eta)
        ref = M.bf16_unchanged_formula(x, y, eta)
        assert torch.equal(fast, ref)


def test_paper_eta_bound_is_not_sharp_and_2_pow_minus_8_is():
    """Counterexample to reading eta < 2**-9 as necessary: eta = 0.0038 > 2**-9 still gives bit equality;
    at eta = 2**-8 the neighbours 1 - 2**-8 and 1 count as unchanged although their bits differ."""
    one = bf16_from_bits([0x3F80])
    below = bf16_from_bits([0x3F7F])  # 1 - 2**-8
    assert float(below) == 1 - 2.0**-8
    assert bool(M.bf16_unchanged(below, one, 0.0038)) is False
    assert bool(M.bf16_unchanged(below, one, 2.0**-8)) is True
    assert oracle_unchanged(0x3F7F, 0x3F80, 2.0**-8) is True
    assert M.ETA_BIT_EQUALITY_LIMIT == 2.0**-8


finite_bits = st.integers(-(2**15), 2**15 - 1).filter(lambda b: (b & 0x7F80) != 0x7F80)


@given(finite_bits, finite_bits, st.sampled_from([1e-3, 2.0**-9, 0.003, 0.01, 0.5]))
@example(0x0000, -0x8000, 1e-3)  # +0 vs -0: unchanged
@example(0x0000, 0x0001, 1e-3)  # 0 vs smallest subnormal: changed
@example(0x3F7F, 0x3F80, 0.01)  # neighbours across a binade with a large eta: unchanged
def test_probe_equals_exact_fraction_oracle(b0, b1, eta):
    x, y = bf16_from_bits([b0]), bf16_from_bits([b1])
    expected = oracle_unchanged(b0, b1, eta)
    assert bool(M.bf16_unchanged(x, y, eta)) is expected
    assert bool(M.bf16_unchanged_formula(x, y, eta)) is expected
    assert bool(M.update_mask(x, y, eta)) is (not expected)


def test_zeros_and_subnormals():
    z, nz = bf16_from_bits([0x0000]), bf16_from_bits([-0x8000])
    sub1, sub2 = bf16_from_bits([0x0001]), bf16_from_bits([0x0002])
    assert bool(M.bf16_unchanged(z, nz)) and bool(M.bf16_unchanged(nz, z))
    assert not bool(M.bf16_unchanged(z, sub1))
    assert not bool(M.bf16_unchanged(sub1, sub2))
    assert bool(M.bf16_unchanged(sub2, sub2))


def test_nonfinite_inputs_raise_naming_the_count():
    w0 = torch.zeros(4, 4, dtype=torch.bfloat16)
    w1 = w0.clone()
    w1[0, 0] = float("nan")
    w1[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="w1: 2 non-finite"):
        M.bf16_unchanged(w0, w1)
    big = np.full((2, 2), 3.4e38, dtype=np.float32)  # finite fp32, overflows to Inf in bf16
    with pytest.raises(NonFiniteError, match="w0: 4 non-finite .* as bf16"):
        M.bf16_sparsity(big, big)
    with pytest.raises(NonFiniteError, match="w0: 1 non-finite"):
        M.bf16_sparsity(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))


def test_shape_mismatch_and_bad_eta():
    with pytest.raises(ShapeMismatchError, match="w0 has shape"):
        M.update_mask(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(InputError, match="eta"):
        M.bf16_unchanged(np.zeros(2), np.zeros(2), eta=-1.0)
    with pytest.raises(InputError, match="empty"):
        M.bf16_sparsity(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(InputError, match="float array"):
        M.bf16_sparsity(np.array(["a"]), np.array(["b"]))


def test_float64_inputs_round_through_float32_as_torch_stores_them():
    """1 + 2**-8 + 2**-30 rounds to 1 + 2**-7 directly, but to 1.0 via float32 (two roundings); we model torch."""
    x = np.array([1 + 2.0**-8 + 2.0**-30])
    assert float(M.to_bf16(x)) == 1.0
    assert bool(M.bf16_unchanged(x, np.array([1.0])))


def test_sparsity_counts_exact_number_of_nudged_entries(rng):
    w0 = torch.from_numpy(rng.standard_normal((64, 48)).astype(np.float32)).to(torch.bfloat16)
    idx = rng.choice(w0.numel(), size=137, replace=False)
    w1 = w0.clone().view(-1)
    w1.view(torch.int16)[idx] += 1  # next bf16 value away from zero: one stored step
    w1 = w1.view(64, 48)
    assert M.bf16_changed_count(w0, w1) == 137
    assert M.bf16_sparsity(w0, w1) == 1 - 137 / w0.numel()
    mask = M.update_mask(w0, w1)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert set(np.nonzero(mask.view(-1).numpy())[0]) == set(idx)
    # numpy bf16 (ml_dtypes) in -> numpy out, same answer
    n0 = w0.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    n1 = w1.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    nmask = M.update_mask(n0, n1)
    assert isinstance(nmask, np.ndarray) and np.array_equal(nmask, mask.numpy())
    # the formula path (eta above the bit-equality limit) agrees with an exact oracle too
    assert M.bf16_changed_count(w0, w1, eta=0.5) == 0


def test_abs_tolerance_probe_is_wrong_in_both_directions():
    # small magnitude: one stored bf16 step at 2**-12 is 2**-19 < 1e-5 -> the abs probe says "unchanged"
    small0 = bf16_from_bits([0x3980])  # 2**-12
    small1 = bf16_from_bits([0x3981])
    assert float(small1) - float(small0) == 2.0**-19
    assert bool(M.update_mask(small0, small1)) is True
    assert bool(M.abs_tol_unchanged(small0, small1, atol=1e-5)) is True
    # large magnitude fp32 master weight: a sub-half-step change 1e-4 at 8.0 reads "changed", bf16 stays put
    big0, big1 = np.array([8.0], np.float32), np.array([8.0001], np.float32)
    assert bool(M.abs_tol_unchanged(big0, big1, atol=1e-5)) is False
    assert bool(M.bf16_unchanged(big0, big1)) is True


# ------------------------------------------------------------------------------------------------ Jaccard


def test_jaccard_known_sets():
    a = np.zeros(10, bool); a[[0, 1, 2, 3]] = True
    b = np.zeros(10, bool); b[[2, 3, 4, 5, 6, 7]] = True
    assert M.jaccard(a, b) == 2 / 8 == M.jaccard(b, a)
    assert M.jaccard(a, a) == 1.0
    assert M.jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert M.jaccard(torch.tensor(a), b) == 0.25
    with pytest.raises(ShapeMismatchError):
        M.jaccard(a, b[:5])
    with pytest.raises(InputError, match="boolean"):
        M.jaccard(a.astype(float) * 0.5, b)


masks_pair = st.integers(1, 40).flatmap(
    lambda n: st.tuples(st.lists(st.booleans(), min_size=n, max_size=n), st.lists(st.booleans(), min_size=n, max_size=n))
)


@given(masks_pair)
def test_jaccard_properties(pair):
    a, b = (np.array(x, dtype=bool) for x in pair)
    j = M.jaccard(a, b)
    assert j == M.jaccard(b, a)
    assert 0.0 <= j <= 1.0
    assert (j == 1.0) == bool(np.array_equal(a, b))
    union = int((a | b).sum())
    if union:
        assert j == float(Fraction(int((a & b).sum()), union))


def exact_expected_jaccard(n: int, p: Fraction, q: Fraction) -> Fraction:
    """E[J] for independent Bernoulli masks by exact enumeration over the multinomial (both, only a, only b)."""
    p11, p10, p01 = p * q, p * (1 - q), (1 - p) * q
    p00 = 1 - p11 - p10 - p01
    total = Fraction(0)
    for n11 in range(n + 1):
        for n10 in range(n + 1 - n11):
            for n01 in range(n + 1 - n11 - n10):
                n00 = n - n11 - n10 - n01
                c = math.factorial(n) // (
                    math.factorial(n11) * math.factorial(n10) * math.factorial(n01) * math.factorial(n00))
                prob = c * p11**n11 * p10**n10 * p01**n01 * p00**n00
                u = n11 + n10 + n01
                total += prob * (Fraction(n11, u) if u else 1)
    return total


def expected_counts_ratio(n: int, p: Fraction, q: Fraction) -> Fraction:
    """E|A∩B| / E|A∪B| by the same enumeration."""
    p11, p10, p01 = p * q, p * (1 - q), (1 - p) * q
    return (n * p11) / (n * (p11 + p10 + p01))


@pytest.mark.parametrize("p,q", [(Fraction(1, 2), Fraction(1, 3)), (Fraction(3, 10), Fraction(3, 10))])
def test_bernoulli_baseline_is_the_ratio_of_expectations_not_E_J_at_finite_n(p, q):
    """The paper calls pq/(p+q-pq) 'E[J]'. Exactly, it is E|A∩B|/E|A∪B|; E[J] differs at finite n and
    converges to it (error shrinking with n)."""
    formula = Fraction(M.bernoulli_jaccard_baseline(float(p), float(q))).limit_denominator(10**6)
    assert formula == p * q / (p + q - p * q)
    assert expected_counts_ratio(5, p, q) == formula
    errs = [abs(exact_expected_jaccard(n, p, q) - formula) for n in (1, 4, 16)]
    assert errs[0] > 0  # n = 1: E[J] is not the formula (counterexample)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < Fraction(1, 50)


def test_bernoulli_baseline_monte_carlo_at_large_n(rng):
    """Seeded Monte Carlo at n = 20000: mean J within 6 standard errors of the formula (+ O(1/n) bias)."""
    n, p, q, R = 20000, 0.3, 0.45, 200
    js = np.array([M.jaccard(rng.random(n) < p, rng.random(n) < q) for _ in range(R)])
    se = js.std(ddof=1) / math.sqrt(R)
    assert abs(js.mean() - M.bernoulli_jaccard_baseline(p, q)) <= 6 * se + 1.0 / n


def test_bernoulli_baseline_edges_and_errors():
    assert M.bernoulli_jaccard_baseline(0.0, 0.0) == 1.0
    assert M.bernoulli_jaccard_baseline(1.0, 1.0) == 1.0
    assert M.bernoulli_jaccard_baseline(0.0, 0.5) == 0.0
    with pytest.raises(InputError, match="density"):
        M.bernoulli_jaccard_baseline(1.5, 0.2)


def test_jaccard_matrix_matches_pairwise_and_mean_offdiag(rng):
    masks = [rng.random((7, 9)) < d for d in (0.1, 0.3, 0.5, 0.0)]
    J = M.jaccard_matrix(masks)
    assert J.shape == (4, 4)
    for r in range(4):
        for s in range(4):
            assert J[r, s] == M.jaccard(masks[r], masks[s])
    assert np.array_equal(M.jaccard_matrix(np.stack(masks)), J)
    off = [J[r, s] for r in range(4) for s in range(4) if r != s]
    assert M.mean_offdiag(J) == pytest.approx(sum(off) / 12, rel=4 * EPS64)
    with pytest.raises(InputError, match="at least 2"):
        M.mean_offdiag(np.ones((1, 1)))
    with pytest.raises(ShapeMismatchError):
        M.jaccard_matrix([masks[0], masks[1][:3]])


def test_consensus_identical_and_complementary():
    a = np.array([[True, False], [False, True]])
    assert np.array_equal(M.consensus([a] * 5), a.astype(float))
    assert np.array_equal(M.consensus([a, ~a]), np.full((2, 2), 0.5))
    assert np.array_equal(M.consensus([a, a, ~a, a]), np.where(a, 0.75, 0.25))


def test_row_and_col_ratios():
    Mk = np.zeros((4, 5), bool)
    Mk[1, :] = True  # a row stripe
    Mk[:, 3] = True  # a column stripe
    assert np.array_equal(M.row_ratios(Mk), [0.2, 1.0, 0.2, 0.2])
    assert np.array_equal(M.col_ratios(Mk), [0.25, 0.25, 0.25, 1.0, 0.25])
    with pytest.raises(InputError, match="2-d"):
        M.row_ratios(np.zeros(3, bool))


# ------------------------------------------------------------------------------------------------ spectral metrics


def random_orthogonal(rng, n):
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def test_nss_structured_known_value(rng):
    m, n = 12, 8
    s0 = np.array([8.0, 5, 4, 3, 2, 1, 0.5, 0.25])
    s1 = s0 + np.array([0.5, -0.25, 0, 0, 0.125, 0, 0, 0])
    U, V = random_orthogonal(rng, m), random_orthogonal(rng, n)
    U2, V2 = random_orthogonal(rng, m), random_orthogonal(rng, n)
    W0 = U[:, :n] @ np.diag(s0) @ V.T
    W1 = U2[:, :n] @ np.diag(s1) @ V2.T  # spectrum alone decides NSS; the rotations do not matter
    expected = np.linalg.norm(s1 - s0) / np.linalg.norm(s0)
    tol = 50 * n * EPS64 * s0[0] / np.linalg.norm(s0) / expected
    assert M.nss(W0, W1) == pytest.approx(expected, rel=tol)
    assert M.nss(W0, W0) <= 50 * n * EPS64
    with pytest.raises(InputError, match="zero matrix"):
        M.nss(np.zeros((3, 3)), np.eye(3))
    with pytest.raises(ShapeMismatchError):
        M.nss(W0, W1[:, :4])


@pytest.mark.parametrize("theta,phi", [(0.3, 1.1), (1e-7, 0.0), (math.pi / 2 - 1e-3, 0.5)])
def test_principal_angles_topk_known_rotation(rng, theta, phi):
    """Rotate u_k toward u_{k+1} by theta and v_1 toward v_{k+2} by phi: angles are (0, ..., 0, angle)."""
    m, n, k = 10, 9, 3
    s = np.array([9.0, 7, 5, 3, 2, 1, 0.5, 0.3, 0.1])
    U, V = random_orthogonal(rng, m)[:, :n], random_orthogonal(rng, n)
    W0 = U @ np.diag(s) @ V.T
    U1, V1 = U.copy(), V.copy()
    U1[:, k - 1] = math.cos(theta) * U[:, k - 1] + math.sin(theta) * U[:, k]
    U1[:, k] = -math.sin(theta) * U[:, k - 1] + math.cos(theta) * U[:, k]
    V1[:, 0] = math.cos(phi) * V[:, 0] + math.sin(phi) * V[:, k + 1]
    V1[:, k + 1] = -math.sin(phi) * V[:, 0] + math.cos(phi) * V[:, k + 1]
    W1 = U1 @ np.diag(s) @ V1.T
    tol = 100 * n * EPS64 * s[0] / (s[k - 1] - s[k])
    for a, b in ((W0, W1), (W1, W0)):  # both argument orders
        aU, aV = M.principal_angles_topk(a, b, k)
        assert np.allclose(aU, [0, 0, theta], atol=tol, rtol=0)
        assert np.allclose(aV, [0, 0, phi], atol=tol, rtol=0)


def test_principal_angles_topk_zero_gap_raises():
    W = np.diag([3.0, 2.0, 2.0, 1.0])
    with pytest.raises(ZeroGapError, match="σ_2 .* σ_3"):
        M.principal_angles_topk(W, W, 2)


# ------------------------------------------------------------------------------------------------ masks & overlap


def test_principal_mask_on_diagonal_with_ties_and_exact_count():
    W0 = np.diag([5.0, 4.0, 3.0, 2.0])  # rank-2 reconstruction = diag(5, 4, 0, 0): 14 tied zeros
    mask = M.principal_mask(W0, 2, 0.25)  # 0.25 * 16 = 4 entries: (0,0), (1,1), then the two lowest-index zeros
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[1, 1] = expected[0, 1] = expected[0, 2] = True
    assert np.array_equal(mask, expected)
    for alpha in (0.0, 0.05, 0.5, 0.53, 1.0):
        assert M.principal_mask(W0, 2, alpha).sum() == math.floor(alpha * 16 + 0.5)


def test_principal_mask_rank_one_scores():
    u, v = np.array([3.0, 1.0, 2.0]), np.array([1.0, 4.0])
    W0 = np.outer(u, v)  # [[3, 12], [1, 4], [2, 8]]: rank 1, so W0^(1) = W0
    mask = M.principal_mask(W0, 1, 0.5)  # top 3 of the scores 12, 8, 4, 3, 2, 1
    assert np.array_equal(mask, [[False, True], [False, True], [False, True]])


@given(st.integers(1, 60), st.floats(0, 1))
@example(10, 0.05)  # 0.5 rounds up to 1
@example(3, 0.5)  # 1.5 rounds up to 2
def test_selection_count_is_round_half_up(n, alpha):
    c = M.selection_count(alpha, n)
    assert 0 <= c <= n
    assert abs(c - alpha * n) <= 0.5
    if Fraction(alpha) * n - math.floor(alpha * n) == Fraction(1, 2):
        assert c == math.floor(alpha * n) + 1


def test_low_magnitude_mask_known_and_ties():
    W0 = np.array([[0.5, -0.1, 2.0], [0.1, -3.0, 0.0]])
    assert np.array_equal(M.low_magnitude_mask(W0, 1 / 3), [[False, True, False], [False, False, True]])
    # |−0.1| = |0.1| tie: the lower flat index (0, 1) wins
    assert np.array_equal(M.low_magnitude_mask(W0, 0.5), [[False, True, False], [True, False, True]])
    with pytest.raises(InputError, match="alpha"):
        M.low_magnitude_mask(W0, 1.2)


def test_overlap_known_and_baseline(rng):
    ref = np.array([True, True, False, False, False])
    Mk = np.array([True, False, True, True, False])
    assert M.overlap(ref, Mk) == 1 / 3
    assert M.random_overlap_baseline(ref) == 0.4
    with pytest.raises(InputError, match="M is empty"):
        M.overlap(ref, np.zeros(5, bool))
    # a uniformly random mask of size s overlaps ref hypergeometrically: mean = density, derived 6-sigma band
    n, d, s = 4000, 0.3, 400
    ref = np.zeros(n, bool); ref[: int(d * n)] = True
    ov = [M.overlap(ref, np.isin(np.arange(n), rng.choice(n, s, replace=False))) for _ in range(100)]
    sd = math.sqrt(d * (1 - d) / s * (n - s) / (n - 1))
    assert abs(np.mean(ov) - d) <= 6 * sd / 10


def test_fused_count_equals_formula_across_chunks_with_signed_zeros(rng):
    """The blocked count path (CPU) equals the reference formula, +0/-0 pairs and block edges included."""
    n = M.CHUNK_CPU + 5000
    w0 = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(torch.bfloat16)
    w1 = w0.clone()
    i0, i1 = w0.view(torch.int16), w1.view(torch.int16)
    late = np.arange(M.CHUNK_CPU - 3, M.CHUNK_CPU + 40)  # straddles the block edge
    i0[late[:20]] = 0
    i1[late[:20]] = -32768  # +0 -> -0: unchanged
    i0[late[20:25]] = -32768
    i1[late[20:25]] = -32768  # -0 -> -0: unchanged
    i1[late[25:30]] = 1  # -> smallest subnormal: changed
    step = rng.choice(n, 999, replace=False)
    i1[step] ^= 0x0001  # flip the last mantissa bit: changed
    expected = int((~M.bf16_unchanged_formula(w0, w1)).sum())
    assert M.bf16_changed_count(w0, w1) == expected
    assert M.bf16_changed_count(w1, w0) == expected
    assert M.bf16_sparsity(w0, w1) == 1 - expected / n
    assert int(M.update_mask(w0, w1).sum()) == expected


@pytest.mark.parametrize("bits", [0x7F80, -0x80, 0x7FC1, -0x3F])  # +Inf, -Inf, NaN, negative NaN
def test_fused_count_finds_nonfinite_in_a_late_block(bits):
    n = M.CHUNK_CPU * 2 + 7
    w0 = torch.ones(n, dtype=torch.bfloat16)
    w1 = w0.clone()
    w1.view(torch.int16)[n - 2] = bits
    with pytest.raises(NonFiniteError, match="w1: 1 non-finite"):
        M.bf16_changed_count(w0, w1)
    with pytest.raises(NonFiniteError, match="w1: 1 non-finite"):
        M.update_mask(w0, w1)


# ------------------------------------------------------------------------------------------------ issue 11


@pytest.mark.parametrize("scale", [1e200, 1e-200, 2.0**1000, 2.0**-1000])
def test_nss_defined_at_every_magnitude(scale):
    """||sigma||_2 overflowed at 1e200 (NaN) and underflowed at 1e-200 ("the zero matrix"): scaled first, NSS is
    the same number at any magnitude (bit for bit for powers of two)."""
    W0, W1 = np.diag([2.0, 1.0]), np.diag([2.0, 1.5])
    ref = M.nss(W0, W1)
    got = M.nss(W0 * scale, W1 * scale)
    assert got == pytest.approx(ref, rel=1e-14) and math.isfinite(got)
    if math.frexp(scale)[0] == 0.5:
        assert got == ref


@pytest.mark.parametrize("shape", [(4, 2), (2, 4)])
def test_principal_angles_topk_rank_deficient_at_full_k_is_not_unique(shape):
    """At k = min(m, n) < max(m, n) the complement holds |m - n| zero singular values: a rank-deficient tall (wide)
    matrix has a non-unique top-k left (right) subspace, so angles would be an artefact of the solver."""
    W0 = np.zeros(shape)
    W0[0, 0] = 1.0  # rank 1 < k = 2
    W1 = np.zeros(shape)
    W1[0, 0], W1[1, 1] = 1.0, 0.5  # full rank: fine on its own
    for a, b in ((W0, W1), (W1, W0), (W0 * 1e-300, W1 * 1e-300)):
        with pytest.raises(ZeroGapError, match="rank-deficient at k = min"):
            M.principal_angles_topk(a, b, 2)
    aU, aV = M.principal_angles_topk(W1, W1 * 2.0, 2)  # full rank: unique
    assert np.allclose(aU, 0, atol=1e-7) and np.allclose(aV, 0, atol=1e-7)
    sq = np.diag([1.0, 0.0])  # square: both top-2 subspaces are the whole space, unique even when singular
    assert np.allclose(M.principal_angles_topk(sq, np.eye(2), 2)[0], 0, atol=1e-7)


def test_principal_angles_rejects_non_orthonormal_bases_and_nan():
    from theory.errors import NotOrthonormalError
    from theory.linalg import principal_angles

    e = np.eye(3)
    with pytest.raises(NotOrthonormalError, match="A: columns are not orthonormal"):
        principal_angles(2 * e[:, :2], e[:, :2])
    with pytest.raises(NotOrthonormalError, match="B"):
        principal_angles(e[:, :2], np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(NonFiniteError, match="B"):
        principal_angles(e[:, :1], np.array([[np.nan], [0.0], [0.0]]))
    with pytest.raises(NotOrthonormalError, match="3 columns"):
        principal_angles(np.ones((2, 3)), np.ones((2, 1)))


@pytest.mark.parametrize("W0,k,alpha", [
    (np.ones((3, 4)), 1, 0.5),  # rank one, every score 1 up to rounding
    (np.outer([1.0, -1.0, 1.0], [3.0, 3.0]), 1, 0.5),
    (np.array([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]), 4, 0.25),  # Hadamard, k = r
    (0.1 * np.ones((5, 5)) + np.diag([0, 0, 0, 0, 0.0]), 1, 0.3),
])
def test_principal_mask_ties_follow_the_documented_rule_despite_reconstruction_rounding(W0, k, alpha):
    """Exact ties in |W0^(k)| (every score equal) must be broken by lower flat index; the computed reconstruction
    carries rounding noise of a few ulps that used to decide the order instead."""
    R = M.rank_k_reconstruction(W0, k)
    scores = np.abs(R).ravel()
    assert np.ptp(scores) < 1e-12  # equal in exact arithmetic, the computed ones differ by rounding (or not)
    count = M.selection_count(alpha, W0.size)
    mask = M.principal_mask(W0, k, alpha)
    assert np.array_equal(mask.ravel(), np.arange(W0.size) < count)
    from theory.linalg import svd64
    assert np.array_equal(M.principal_mask_from_svd(svd64(W0), k, alpha), mask)


def test_principal_mask_refuses_an_undetermined_reconstruction():
    with pytest.raises(ZeroGapError, match="rank-1 reconstruction"):
        M.principal_mask(np.eye(3), 1, 0.5)  # sigma_1 = sigma_2: W0^(1) depends on the solver's choice


def test_complex_inputs_are_refused_by_name():
    from theory.errors import ComplexInputError

    z = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(ComplexInputError, match="w0"):
        M.bf16_sparsity(z, torch.ones(3))
    with pytest.raises(ComplexInputError, match="w1"):
        M.update_mask(np.ones(3), np.ones(3) * 1j)
    with pytest.raises(ComplexInputError, match="W0"):
        M.nss(np.eye(2) * (1 + 0j), np.eye(2))
    with pytest.raises(ComplexInputError, match="W0"):
        M.principal_mask(torch.eye(2, dtype=torch.complex128), 1, 0.5)


@pytest.mark.parametrize("shape, k, alpha", [((30, 20), 3, 0.5), ((7, 40), 2, 0.1), ((25, 25), 5, 0.9), ((9, 6), 6, 0.5)])
def test_principal_mask_from_svd_equals_the_selection_on_a_freshly_formed_score(shape, k, alpha):
    """principal_mask_from_svd partitions its score buffer in place and forms the product again: the mask equals the
    tie-band selection on a score formed once (np.partition on a copy), bit for bit, including exact ties."""
    rng = np.random.default_rng(sum(shape) + k)
    W0 = rng.integers(-3, 4, size=shape).astype(np.float64)  # integer entries: many equal scores
    svd = svd64(W0)
    U, S, Vh = svd
    score = np.abs((U[:, :k] * S[:k]) @ Vh[:k, :])
    count = M.selection_count(alpha, score.size)
    tie = 2 * M.reconstruction_tie_tol(S, k, shape)
    expected = M._select_top_with_ties(score.copy(), count, tie)
    assert np.array_equal(M.principal_mask_from_svd(svd, k, alpha), expected)
    assert int(expected.sum()) == count
