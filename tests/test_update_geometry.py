"""theory.update_geometry: the subspace-projection energy share, the coordinate-mask share and ISO's fixed-spectrum
residual, on structured matrices with known answers (exact where the arithmetic is exact), the closed-form random
baseline, and metamorphic properties (2^j scaling bit-identical, orthogonal invariance, transposition)."""

from __future__ import annotations

import doctest
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import theory.update_geometry as ug
from theory.errors import InputError, ShapeMismatchError, ZeroGapError
from theory.metrics import principal_mask
from theory.update_geometry import (
    align_singular_signs,
    energy_off_principal_subspace,
    energy_off_principal_subspace_of_bases,
    energy_outside_coordinate_mask,
    fixed_spectrum_reconstruction,
    iso_residual_share,
    iso_residual_share_from_spectra,
    principal_subspace_projection,
    random_energy_off_principal_subspace,
)

EPS = np.finfo(np.float64).eps


def test_docstring_examples_run():
    assert doctest.testmod(ug).failed == 0


def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def _distinct_spectrum_matrix(m: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """W0 = Q1 diag(s) Q2ᵀ with well separated singular values (gaps 1): subspaces stable to ~eps."""
    s = np.arange(min(m, n), 0, -1, dtype=np.float64) + 1.0
    D = np.zeros((m, n))
    D[np.arange(len(s)), np.arange(len(s))] = s
    return _orthogonal(m, rng) @ D @ _orthogonal(n, rng).T, s


# ----------------------------------------------------------------------------------------------------------------
# Subspace projection: exact oracles


@given(st.integers(1, 4), st.lists(st.integers(-9, 9), min_size=30, max_size=30))
@example(1, [1] + [0] * 29)
@example(3, [0] * 30)
def test_share_with_coordinate_bases_is_the_exact_fraction_outside_the_corner(k, entries):
    """U_k = first k unit vectors of R^5, V_k of R^6: P_U dW P_V keeps the top-left k x k corner, and with small
    integer entries every operation is exact, so the share equals the rational number exactly."""
    dW = np.array(entries, dtype=np.float64).reshape(5, 6)
    total = int(np.sum(dW * dW))
    if total == 0:
        with pytest.raises(InputError, match="zero matrix"):
            energy_off_principal_subspace_of_bases(dW, np.eye(5)[:, :k], np.eye(6)[:, :k])
        return
    inside = int(np.sum(dW[:k, :k] ** 2))
    got = energy_off_principal_subspace_of_bases(dW, np.eye(5)[:, :k], np.eye(6)[:, :k])
    assert got == float(Fraction(total - inside, total))


@pytest.mark.parametrize("m, n, k", [(6, 6, 1), (8, 5, 2), (5, 9, 5)])
def test_share_of_a_diagonal_base_is_the_energy_outside_the_top_k_corner(m, n, k):
    """W0 = diag(distinct s): the top-k subspaces are the first k coordinates (the SVD returns unit vectors up to
    rounding). Error model: bases exact to ~(m + n) eps, so the share to 8 (m + n) eps."""
    rng = np.random.default_rng(m * 100 + n)
    W0 = np.zeros((m, n))
    W0[np.arange(min(m, n)), np.arange(min(m, n))] = np.linspace(9.0, 1.0, min(m, n))
    dW = rng.integers(-5, 6, size=(m, n)).astype(np.float64)
    dW[0, 0] = 3.0  # never all zero
    expected = 1.0 - np.sum(dW[:k, :k] ** 2) / np.sum(dW**2)
    assert energy_off_principal_subspace(dW, W0, k) == pytest.approx(expected, abs=8 * (m + n) * EPS)


def test_an_update_inside_the_principal_subspace_has_no_energy_off_it_and_one_orthogonal_to_it_has_all():
    rng = np.random.default_rng(1)
    W0, _ = _distinct_spectrum_matrix(7, 5, rng)
    U, _, Vh = np.linalg.svd(W0)
    k = 2
    inside = U[:, :k] @ rng.standard_normal((k, k)) @ Vh[:k, :]
    outside = U[:, k:] @ rng.standard_normal((7 - k, 5)) @ Vh  # left factor orthogonal to U_k
    assert energy_off_principal_subspace(inside, W0, k) <= 64 * EPS
    assert energy_off_principal_subspace(outside, W0, k) == pytest.approx(1.0, abs=64 * EPS)


@pytest.mark.parametrize("m, n, k", [(6, 4, 1), (6, 4, 3), (10, 12, 4)])
def test_average_share_over_an_orthonormal_basis_is_the_closed_form_random_baseline(m, n, k):
    """Σ_ij ||P_U E_ij P_V||² = tr(P_U) tr(P_V) = k², so the mean share over the unit matrices E_ij is exactly
    1 - k²/(m n) for any subspaces: the expectation for a uniformly random direction (module docstring).
    Each share carries ~(m + n) eps of rounding, so does their mean."""
    W0, _ = _distinct_spectrum_matrix(m, n, np.random.default_rng(k))
    shares = []
    for i in range(m):
        for j in range(n):
            E = np.zeros((m, n))
            E[i, j] = 1.0
            shares.append(energy_off_principal_subspace(E, W0, k))
    assert np.mean(shares) == pytest.approx(random_energy_off_principal_subspace(m, n, k), abs=16 * (m + n) * EPS)
    assert random_energy_off_principal_subspace(m, n, k) == float(Fraction(m * n - k * k, m * n))


def test_random_directions_of_a_fixed_norm_average_to_the_closed_form():
    """Gaussian directions scaled to the norm of a given update: the share is Beta(k²/2, (N - k²)/2) distributed
    (N = m n) with mean p = k²/N and variance 2 p (1 - p) / (N + 2); the mean of R draws lies within 5 standard
    errors of 1 - p."""
    m, n, k, R = 12, 10, 3, 400
    rng = np.random.default_rng(7)
    W0, _ = _distinct_spectrum_matrix(m, n, rng)
    norm = 0.37
    shares = []
    for _ in range(R):
        G = rng.standard_normal((m, n))
        shares.append(energy_off_principal_subspace(G * (norm / np.linalg.norm(G)), W0, k))
    p = k * k / (m * n)
    se = math.sqrt(2 * p * (1 - p) / (m * n + 2) / R)
    assert abs(np.mean(shares) - (1 - p)) < 5 * se


# ----------------------------------------------------------------------------------------------------------------
# Subspace projection: metamorphic properties


@given(st.integers(-30, 30), st.integers(-30, 30), st.integers(0, 2**16))
@example(0, 0, 0)
@example(-30, 30, 1)
def test_scaling_either_input_by_a_power_of_two_is_bit_identical(j_dw, j_w0, seed):
    rng = np.random.default_rng(seed)
    W0, dW = rng.standard_normal((9, 6)), rng.standard_normal((9, 6))
    base = energy_off_principal_subspace(dW, W0, 2)
    assert energy_off_principal_subspace(np.ldexp(dW, j_dw), np.ldexp(W0, j_w0), 2) == base


@given(st.integers(0, 2**16), st.integers(1, 4))
@example(0, 1)
def test_share_is_invariant_under_orthogonal_changes_of_basis_and_transposition(seed, k):
    """share(Q1 dW Q2ᵀ, Q1 W0 Q2ᵀ) = share(dW, W0) = share(dWᵀ, W0ᵀ). Error model: the subspaces move by
    ~eps ||W0|| / gap (gap >= 1 here, ||W0|| <= 8) and the share by a few times that."""
    rng = np.random.default_rng(seed)
    W0, _ = _distinct_spectrum_matrix(8, 6, rng)
    dW = rng.standard_normal((8, 6))
    Q1, Q2 = _orthogonal(8, rng), _orthogonal(6, rng)
    base = energy_off_principal_subspace(dW, W0, k)
    tol = 256 * EPS * 8
    assert energy_off_principal_subspace(Q1 @ dW @ Q2.T, Q1 @ W0 @ Q2.T, k) == pytest.approx(base, abs=tol)
    assert energy_off_principal_subspace(dW.T, W0.T, k) == pytest.approx(base, abs=tol)


def test_projection_is_idempotent_and_orthogonal():
    rng = np.random.default_rng(3)
    U, _ = np.linalg.qr(rng.standard_normal((7, 3)))
    V, _ = np.linalg.qr(rng.standard_normal((5, 3)))
    dW = rng.standard_normal((7, 5))
    P = principal_subspace_projection(dW, U, V)
    np.testing.assert_allclose(principal_subspace_projection(P, U, V), P, atol=32 * EPS)
    assert abs(np.sum(P * (dW - P))) <= 64 * EPS * np.sum(dW * dW)  # Pythagoras: the two parts are orthogonal


def test_bad_inputs_name_the_problem():
    W0 = np.diag([3.0, 2.0, 1.0])
    with pytest.raises(ShapeMismatchError, match="dW has shape"):
        energy_off_principal_subspace(np.ones((3, 2)), W0, 1)
    with pytest.raises(InputError, match="outside 1..3"):
        energy_off_principal_subspace(np.ones((3, 3)), W0, 4)
    with pytest.raises(InputError, match="k must be an integer"):
        energy_off_principal_subspace(np.ones((3, 3)), W0, 1.0)
    with pytest.raises(ZeroGapError, match="sigma_1 and sigma_2 coincide"):
        energy_off_principal_subspace(np.ones((3, 3)), np.eye(3), 1)
    with pytest.raises(InputError, match="non-finite"):
        energy_off_principal_subspace(np.full((3, 3), np.nan), W0, 1)
    with pytest.raises(InputError, match="exceeds"):
        random_energy_off_principal_subspace(3, 2, 3)
    with pytest.raises(ShapeMismatchError):
        principal_subspace_projection(np.ones((3, 3)), np.eye(3)[:, :1], np.eye(2)[:, :1])


# ----------------------------------------------------------------------------------------------------------------
# Coordinate mask: not the subspace projection


def test_coordinate_mask_share_is_exact_on_integers():
    dW = np.array([[1.0, -2.0, 0.0], [3.0, 0.0, 4.0]])
    M = np.array([[True, False, False], [False, True, True]])
    assert energy_outside_coordinate_mask(dW, M) == float(Fraction(4 + 9, 1 + 4 + 9 + 16))
    with pytest.raises(InputError, match="boolean"):
        energy_outside_coordinate_mask(dW, M.astype(int))
    with pytest.raises(ShapeMismatchError):
        energy_outside_coordinate_mask(dW, M[:, :2])


def test_same_name_different_operator_principal_mask_vs_principal_subspace():
    """dW = u1 v1ᵀ lies in the top-1 principal subspace (share off it 0), but it is dense in coordinates, so the
    paper's coordinate mask M_princ (top half of |W0^(1)|) leaves a positive share of it out."""
    rng = np.random.default_rng(5)
    W0, _ = _distinct_spectrum_matrix(6, 6, rng)
    U, _, Vh = np.linalg.svd(W0)
    dW = np.outer(U[:, 0], Vh[0])
    assert energy_off_principal_subspace(dW, W0, 1) <= 16 * EPS
    off_mask = energy_outside_coordinate_mask(dW, principal_mask(W0, 1, 0.5))
    assert 0.0 < off_mask < 0.5  # the mask holds the larger half of |u1 v1ᵀ|, but not all of it


# ----------------------------------------------------------------------------------------------------------------
# ISO: fixed-spectrum reconstruction and residual


def test_spectrum_only_change_is_all_residual_and_frame_only_change_none():
    rng = np.random.default_rng(11)
    W0, s = _distinct_spectrum_matrix(7, 5, rng)
    U, S, Vh = np.linalg.svd(W0, full_matrices=False)
    W_spec = (U * (S * np.linspace(1.1, 0.9, 5))) @ Vh  # same frames, new spectrum
    assert iso_residual_share(W0, W_spec) == pytest.approx(1.0, abs=1e-12)
    Q = _orthogonal(7, rng)
    W_rot = Q @ W0  # frames turned, spectrum kept
    # error model: absolute error ~ eps r ||W||_2 over ||W_rot - W0||_F (order 1 here)
    assert iso_residual_share(W0, W_rot) <= 64 * EPS * 5 * S[0]
    np.testing.assert_allclose(fixed_spectrum_reconstruction(W0, W_rot), W_rot, atol=64 * EPS * S[0])


@given(st.integers(0, 2**16), st.floats(1e-6, 1.0))
@example(0, 1e-6)
def test_residual_is_the_spectrum_shift_over_the_displacement_and_at_most_one(seed, scale):
    """||W1 - U1 Σ0 V1ᵀ||_F = ||σ(W1) - σ(W0)||_2 (unitary invariance) <= ||W1 - W0||_F (Mirsky). Error model:
    both sides carry ~eps r ||W1||_2 absolute error, i.e. that over ||dW||_F relative to the share."""
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((8, 5))
    dW = scale * rng.standard_normal((8, 5))
    W1 = W0 + dW
    s0, s1 = np.linalg.svd(W0, compute_uv=False), np.linalg.svd(W1, compute_uv=False)
    share = iso_residual_share(W0, W1)
    tol = 64 * EPS * 5 * max(s0[0], s1[0]) / np.linalg.norm(dW)
    assert share == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(dW), abs=tol)
    assert share <= 1.0 + tol
    assert iso_residual_share(W0, W1, squared=True) == pytest.approx(share**2, rel=1e-12)
    assert iso_residual_share_from_spectra(s0, s1, np.linalg.norm(dW)) == pytest.approx(share, abs=tol)


@given(st.integers(-40, 40), st.integers(0, 2**16))
@example(-40, 0)
def test_iso_share_scaling_both_by_a_power_of_two_is_bit_identical(j, seed):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((6, 9))
    W1 = W0 + 1e-3 * rng.standard_normal((6, 9))
    assert iso_residual_share(np.ldexp(W0, j), np.ldexp(W1, j)) == iso_residual_share(W0, W1)


def test_sign_alignment_flips_pairs_jointly_and_keeps_sign_of_zero_positive():
    rng = np.random.default_rng(2)
    W0, _ = _distinct_spectrum_matrix(5, 4, rng)
    U0, S0, _ = np.linalg.svd(W0, full_matrices=False)
    W1 = W0 + 1e-2 * rng.standard_normal((5, 4))
    U1, S1, Vh1 = np.linalg.svd(W1, full_matrices=False)
    flips = np.array([1.0, -1.0, -1.0, 1.0])
    Ua, Vha = align_singular_signs(U0, U1 * flips, Vh1 * flips[:, None])
    assert (np.sum(U0 * Ua, axis=0) >= 0).all()
    np.testing.assert_array_equal((Ua * S1) @ Vha, ((U1 * flips) * S1) @ (Vh1 * flips[:, None]))
    # the reconstruction does not depend on the signs the SVD happened to return (the pair's product is unchanged)
    np.testing.assert_allclose(fixed_spectrum_reconstruction(W0, W1), (Ua * S0) @ Vha, atol=16 * EPS * S0[0])
    # <u0, u1> = 0 counts as positive (ISO: sign(0) := +1): no flip
    Uz, Vz = align_singular_signs(np.eye(2), np.array([[0.0, 0.0], [1.0, 1.0]]), np.eye(2))
    np.testing.assert_array_equal(Uz, [[0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_array_equal(Vz, np.eye(2))


def test_iso_bad_inputs():
    with pytest.raises(InputError, match="must be finite and > 0"):
        iso_residual_share_from_spectra([1.0], [2.0], 0.0)
    with pytest.raises(ShapeMismatchError):
        iso_residual_share_from_spectra([1.0], [2.0, 1.0], 1.0)
    with pytest.raises(InputError, match="no displacement"):
        iso_residual_share(np.eye(3), np.eye(3))
    with pytest.raises(ShapeMismatchError):
        iso_residual_share(np.eye(3), np.eye(2))
    with pytest.raises(ShapeMismatchError):
        align_singular_signs(np.eye(3), np.eye(2), np.eye(2))


# ----------------------------------------------------------------------------------------------------------------
# energy_off's identity route ||D||² - ||U_kᵀ D V_k||² against an exact rational oracle


def _exact_explicit_share(D: np.ndarray, U: np.ndarray, V: np.ndarray) -> Fraction:
    """``||D - U (Uᵀ D V) Vᵀ||_F² / ||D||_F²`` in rational arithmetic on the float64 inputs (no rounding at all)."""
    Df = [[Fraction(x) for x in row] for row in D.tolist()]
    Uf = [[Fraction(x) for x in row] for row in U.tolist()]
    Vf = [[Fraction(x) for x in row] for row in V.tolist()]
    m, n, k = len(Df), len(Df[0]), len(Uf[0])
    DV = [[sum(Df[i][j] * Vf[j][b] for j in range(n)) for b in range(k)] for i in range(m)]
    C = [[sum(Uf[i][a] * DV[i][b] for i in range(m)) for b in range(k)] for a in range(k)]
    UC = [[sum(Uf[i][a] * C[a][b] for a in range(k)) for b in range(k)] for i in range(m)]
    res = sum((Df[i][j] - sum(UC[i][b] * Vf[j][b] for b in range(k))) ** 2 for i in range(m) for j in range(n))
    return res / sum(x * x for row in Df for x in row)


def _structured(kind: str, seed: int, m: int = 11, n: int = 8, k: int = 2):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    G = rng.standard_normal((m, n))
    if kind == "inside":  # share ~1e-16: the identity's absolute error would swamp it
        D = U @ rng.standard_normal((k, k)) @ V.T
    elif kind == "near-zero":  # share ~1e-12
        D = U @ rng.standard_normal((k, k)) @ V.T + 1e-6 * G
    elif kind == "outside":  # share ~1: G with its (U, V) block removed
        D = G - U @ (U.T @ G @ V) @ V.T
    else:
        D = G
    return D, U, V


@pytest.mark.parametrize("kind", ["generic", "inside", "near-zero", "outside"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identity_share_is_within_its_documented_bound_of_the_exact_residual_share(kind, seed):
    """``_identity_share`` (whichever route is then taken) lies within ``energy_off_identity_error`` of the exact
    rational value of the explicit residual share on the same float inputs; the public function takes the identity
    only where that bound is <= 2**-20 of the share, and otherwise returns the explicit residual's bits (as before
    the identity route existed). Scaling dW by 2**±300 gives the same bits on both routes."""
    D, U, V = _structured(kind, seed)
    exact = _exact_explicit_share(D, U, V)
    total = float(np.dot(D.ravel(), D.ravel()))
    share, err = ug._identity_share(total, U.T @ D @ V, U, V, D.shape)
    assert 0 < err < 1e-12
    assert abs(Fraction(share) - exact) <= Fraction(err)
    got = energy_off_principal_subspace_of_bases(D, U, V)
    if err <= ug.IDENTITY_RELATIVE_ERROR * share:
        assert kind in ("generic", "outside") and got == share
        assert abs(Fraction(got) - exact) <= ug.IDENTITY_RELATIVE_ERROR * exact * 2
    else:
        assert kind in ("inside", "near-zero")
        R = D - ug.principal_subspace_projection(D, U, V)
        assert got == float(np.sum(R * R)) / float(np.sum(D * D))  # the explicit route's bits
    for j in (300, -300):
        assert energy_off_principal_subspace_of_bases(np.ldexp(D, j), U, V) == got


def test_identity_error_bound_grows_with_size_and_orthonormality_defect():
    """The bound's terms (docstring): a larger matrix, a larger k or a defect in the bases raises it; the defect
    enters at first order (d + d²)."""
    base = ug.energy_off_identity_error(100, 80, 4, 0.0)
    assert ug.energy_off_identity_error(1000, 80, 4, 0.0) > base
    assert ug.energy_off_identity_error(100, 80, 8, 0.0) > base
    assert ug.energy_off_identity_error(100, 80, 4, 1e-10) >= base + 1e-10
    assert ug.energy_off_identity_error(2**40, 2**40, 4, 0.0) == math.inf
