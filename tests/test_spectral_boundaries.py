"""Gate II verdicts at their boundaries (mutation audit of theory.spectral_bounds): bounds that are attained in exact
arithmetic on rotated (so rounded) inputs must read "indeterminate", never "holds"; a looser right side, a dropped
absolute value, the norm of the smaller matrix in the error model, a gap inside the resolution band and a top-k
subspace that is not determined each change a verdict here.

Oracles are structural: for W0 = Q1 diag(s) Q2^T and W1 = Q1 diag(s + d) Q2^T with s + d still descending and
positive, sigma_i(W1) - sigma_i(W0) = d_i and dW = Q1 diag(d) Q2^T exactly, so ||dW||_2 = max|d_i| and
||dW||_F = ||d||_2; for W1 = c W0 every sigma scales by c.
"""

from __future__ import annotations

import numpy as np
import pytest

from theory.spectral import cor34_mirsky, cor34_weyl, cor35_kyfan, gate2_all, thm33_wedin

EPS = np.finfo(np.float64).eps


def _frames(seed: int, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Q1, _ = np.linalg.qr(rng.standard_normal((m, m)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return Q1, Q2


def _rotated(Q1: np.ndarray, Q2: np.ndarray, s) -> np.ndarray:
    m, n = Q1.shape[0], Q2.shape[0]
    D = np.zeros((m, n))
    D[np.arange(len(s)), np.arange(len(s))] = s
    return Q1 @ D @ Q2.T


def _assert_attained(c) -> None:
    assert c.verdict == "indeterminate" and not c.holds, (c.result_id, c.verdict, c.lhs, c.rhs, c.tol)
    assert abs(c.lhs - c.rhs) <= c.tol


SHAPES = [(6, 4), (4, 6), (5, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("c", [1e-3, 0.25, 4.0, 1e3])
@pytest.mark.parametrize("seed", range(3))
def test_scaling_attains_weyl_mirsky_and_kyfan_and_never_reads_holds(shape, c, seed):
    """W1 = c W0: |sigma_1(W1) - sigma_1(W0)| = |1 - c| sigma_1 = ||dW||_2 (Weyl attained), ||sigma(W1) - sigma(W0)||_2
    = |1 - c| ||W0||_F = ||dW||_F (Mirsky attained) and, with sigma_1 = sigma_2, |Ky Fan-2 change| = 2 ||dW||_2.
    The error model must use the larger of the two matrices (c = 1e3) and the smaller (c = 1e-3) alike: an
    allowance built from the smaller norm reads a rounded attained bound as "holds" or "violated"."""
    m, n = shape
    Q1, Q2 = _frames(seed, m, n)
    W0 = _rotated(Q1, Q2, [2.0, 2.0, 1.0, 0.5][: min(m, n)])
    W1 = c * W0
    _assert_attained(cor34_weyl(W0, W1, 1))
    _assert_attained(cor34_mirsky(W0, W1, 1))
    _assert_attained(cor35_kyfan(W0, W1, 2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("seed", range(3))
def test_order_preserving_shifts_attain_each_bound_with_its_own_right_side(shape, sign, seed):
    """d = sign (0.1, 0.1, 0.05, 0.025): Weyl's rhs is ||dW||_2 = 0.1 (not ||dW||_F = 0.1541), Mirsky's is
    ||dW||_F (not sqrt(r) ||dW||_2 = 0.2), Ky Fan's is k ||dW||_2 = 0.2 at k = 2 (not (k + 1) ||dW||_2), and its lhs
    is | ||W1||_(2) - ||W0||_(2) | = 0.2 also when the singular values shrink (sign = -1)."""
    m, n = shape
    r = min(m, n)
    Q1, Q2 = _frames(100 + seed, m, n)
    s = np.array([3.0, 2.0, 1.0, 0.5])[:r]
    d = sign * np.array([0.1, 0.1, 0.05, 0.025])[:r]
    W0, W1 = _rotated(Q1, Q2, s), _rotated(Q1, Q2, s + d)
    weyl, mirsky, kyfan = cor34_weyl(W0, W1, 2), cor34_mirsky(W0, W1, 2), cor35_kyfan(W0, W1, 2)
    for chk in (weyl, mirsky, kyfan):
        _assert_attained(chk)
    assert weyl.rhs == pytest.approx(0.1, rel=1e-13)
    assert mirsky.rhs == pytest.approx(float(np.linalg.norm(d)), rel=1e-13)
    assert kyfan.lhs == pytest.approx(0.2, rel=1e-13) and kyfan.rhs == pytest.approx(0.2, rel=1e-13)


@pytest.mark.parametrize("transpose", [False, True])
def test_rank_deficient_tall_matrix_at_k_equal_r_has_no_determined_subspace(transpose):
    """W0 = [[1, 0], [0, 0], [0, 0]] (3 x 2, rank 1), k = r = 2: the top-2 left subspace of W0 is any plane containing
    e1 (sigma_2 = 0 ties with the structural zero of the 3 x 2 shape), so sin Theta is not a function of the inputs.
    Wedin's gap delta = sigma_2(W1) - 0 = 0.5 is fine; the subspace assumption must fail, not be decided."""
    W0 = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    W1 = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.5]])
    if transpose:
        W0, W1 = W0.T, W1.T
    for rid in ("thm3.3-wedin", "corF.13"):
        chk = gate2_all(W0, W1, 2)[rid]
        assert chk.verdict == "assumption-failed", (rid, chk.verdict)
        assert "singular subspaces of W0 and W1 are determined" in chk.failed_assumption
    assert thm33_wedin(W0, W1, 2).verdict == "assumption-failed"


def test_a_gap_inside_the_resolution_band_fails_the_assumption():
    """The module's rule: a gap counts as resolved only above RESOLVED = 2 times its rounding bound 2 eps_s, with
    eps_s = 8 max(m, n) eps max(||W0||_2, ||W1||_2). A gap of 3 eps_s (resolved at 1x, not at 2x) must fail the
    assumption, never yield a tolerance built on a denominator gamma_k - 2 eps_s of one eps_s."""
    sigma = 0.75  # largest entry in [1/2, 1): the power-of-two scaling is the identity
    eps_s = 8 * 2 * EPS * sigma
    W0 = np.diag([sigma, sigma - 3 * eps_s])
    W1 = np.diag([sigma, sigma - 3 * eps_s - 1e-3])
    checks = gate2_all(W0, W1, 1)
    for rid in ("thm3.3", "thm3.3-rigorous"):
        assert checks[rid].verdict == "assumption-failed", (rid, checks[rid].verdict)
        assert "resolved above float64 rounding" in checks[rid].failed_assumption
    assert all(np.isfinite(c.tol) and c.tol >= 0 for c in checks.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2])
def test_identical_inputs_are_decided_exactly_even_where_the_decomposition_rounds(shape, k):
    """W1 == W0 (a rotated, so rounded, matrix): every left side is exactly 0 and every right side exactly 0, so each
    check is decided with tol 0 ("holds", 0 <= 0) -- also those whose computed sides carry rounding and would
    otherwise read "indeterminate"."""
    m, n = shape
    Q1, Q2 = _frames(7, m, n)
    W = _rotated(Q1, Q2, [3.0, 2.0, 1.0, 0.5][: min(m, n)])
    for rid, chk in gate2_all(W, W.copy(), k).items():
        assert chk.verdict == "holds" and chk.lhs == 0.0 and chk.rhs == 0.0 and chk.tol == 0.0, (rid, chk.verdict)
        assert chk.details["identical_inputs"]


def test_a_step_equal_to_the_gap_fails_the_rigorous_hypothesis_by_name():
    """W0 = diag(1, 0.5), W1 = diag(1.5, 0.5): ||dW||_2 = gamma_1 = 0.5 exactly (dyadic). The rigorous form needs
    ||dW||_2 < gamma_k (strict); at equality that hypothesis is the one reported, not a rounding-resolution one."""
    chk = gate2_all(np.diag([1.0, 0.5]), np.diag([1.5, 0.5]), 1)["thm3.3-rigorous"]
    assert chk.verdict == "assumption-failed" and chk.failed_assumption.startswith("||dW||_2 < gamma_k")
