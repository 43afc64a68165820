"""Tests of theory.synthetic: prescribed spectra are what they say, perturbation families have their structure."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.synthetic import (
    SPECTRUM_FAMILIES,
    haar_orthonormal,
    kl_budgeted_perturbation,
    kl_quadratic,
    kronecker_curvature,
    matrix_with_spectrum,
    perturbation,
    random_curvature,
    scale_to_ratio,
    spectrum,
    synthetic_matrix,
    synthetic_pair,
)
from theory.errors import InputError

EPS = np.finfo(np.float64).eps


# ---------------------------------------------------------------------------------------------------------------
# Haar factors and prescribed spectra
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p", [(1, 1), (5, 5), (9, 3)])
def test_haar_orthonormal_columns_and_seeded(n, p):
    Q = haar_orthonormal(np.random.default_rng(1), n, p)
    assert Q.shape == (n, p)
    np.testing.assert_allclose(Q.T @ Q, np.eye(p), atol=10 * n * EPS)
    np.testing.assert_array_equal(Q, haar_orthonormal(np.random.default_rng(1), n, p))
    assert not np.array_equal(Q, haar_orthonormal(np.random.default_rng(2), n, p)) or n == 1


def test_haar_first_column_is_uniform_on_the_sphere():
    """Haar => E[q_1 q_1^T] = I / n. Without the sign fix of QR the first column is biased (q_11 >= 0 always)."""
    rng = np.random.default_rng(0)
    n, N = 4, 4000
    cols = np.array([haar_orthonormal(rng, n, 1)[:, 0] for _ in range(N)])
    second = cols.T @ cols / N
    np.testing.assert_allclose(second, np.eye(n) / n, atol=5 / np.sqrt(N) / n * 2)  # ~5 sigma
    assert abs(np.mean(cols[:, 0])) < 5 / np.sqrt(N) / np.sqrt(n) * 1.5  # symmetric, not half-sphere
    assert np.mean(cols[:, 0] > 0) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("family", SPECTRUM_FAMILIES)
@pytest.mark.parametrize("r,k", [(6, 1), (6, 3), (8, 5)])
def test_spectrum_families_are_descending_with_positive_gap(family, r, k):
    s = spectrum(family, r, k, rng=np.random.default_rng(0))
    assert s.shape == (r,) and s[0] == pytest.approx(1.0, abs=1e-2)
    assert np.all(np.diff(s) <= 0) and np.all(s >= 0)
    assert s[k - 1] - (s[k] if k < r else 0.0) > 0


def test_spectrum_family_specifics():
    r, k = 8, 3
    i = np.arange(1, r + 1.0)
    np.testing.assert_array_equal(spectrum("power_law", r, k, a=0.5), i**-0.5)
    g = spectrum("gapped", r, k, gap=0.4)
    assert g[k - 1] - g[k] == pytest.approx(0.4, abs=4 * EPS)
    nd = spectrum("near_degenerate", r, k, rel_gap=1e-7)
    assert (nd[k - 1] - nd[k]) / nd[k - 1] == pytest.approx(1e-7, rel=1e-6)
    rd = spectrum("rank_deficient", r, k, rank=4)
    assert np.count_nonzero(rd) == 4
    c = spectrum("clustered", r, k, gap=0.5, rng=np.random.default_rng(3))
    assert c[k - 1] - c[k] > 0.49 and np.ptp(c[:k]) < 1e-3 * 0.5


@pytest.mark.parametrize("m,n", [(7, 4), (4, 7), (5, 5)])
def test_matrix_with_spectrum_has_exactly_that_spectrum(m, n):
    rng = np.random.default_rng(4)
    sigma = spectrum("rank_deficient", min(m, n), 2, rank=3)
    syn = matrix_with_spectrum(sigma, m, n, rng)
    np.testing.assert_allclose(np.linalg.svd(syn.W, compute_uv=False), sigma, rtol=0, atol=20 * max(m, n) * EPS)
    np.testing.assert_allclose(syn.U.T @ syn.U, np.eye(min(m, n)), atol=20 * m * EPS)
    np.testing.assert_allclose(syn.Vh @ syn.Vh.T, np.eye(min(m, n)), atol=20 * n * EPS)
    np.testing.assert_allclose((syn.U * syn.S) @ syn.Vh, syn.W, atol=20 * EPS)
    assert syn.gap(2) == sigma[1] - sigma[2]


# ---------------------------------------------------------------------------------------------------------------
# Perturbation families
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def base():
    return synthetic_matrix("power_law", 9, 6, 2, np.random.default_rng(7))


def test_aligned_lives_in_the_top_block_and_orthogonal_outside(base):
    k, rng = 2, np.random.default_rng(0)
    Uk, Vk = base.U[:, :k], base.Vh[:k].T
    A = perturbation("aligned", base, k, rng)
    assert np.linalg.norm(A - Uk @ (Uk.T @ A @ Vk) @ Vk.T) <= 50 * EPS * np.linalg.norm(A)
    O = perturbation("orthogonal", base, k, rng)
    assert np.linalg.norm(Uk.T @ O) <= 50 * EPS * np.linalg.norm(O)
    assert np.linalg.norm(O @ Vk) <= 50 * EPS * np.linalg.norm(O)


def test_low_rank_has_the_rank_asked_for(base):
    for p in (1, 3):
        L = perturbation("low_rank", base, 2, np.random.default_rng(p), rank=p)
        s = np.linalg.svd(L, compute_uv=False)
        assert np.sum(s > 1e-12 * s[0]) == p


@pytest.mark.parametrize("c_over_gap,swapped", [(0.4, False), (0.6, True)])
def test_swap_exchanges_sigma_k_and_sigma_k_plus_1_past_half_the_gap(base, c_over_gap, swapped):
    k = 2
    gap = base.gap(k)
    dW = scale_to_ratio(perturbation("swap", base, k, np.random.default_rng(0)), c_over_gap, gap)
    U1, s1, _ = np.linalg.svd(base.W + dW, full_matrices=False)
    new_k, new_k1 = base.S[k - 1] - c_over_gap * gap, base.S[k] + c_over_gap * gap
    assert s1[k - 1] == pytest.approx(max(new_k, new_k1), abs=1e-13)
    assert s1[k] == pytest.approx(min(new_k, new_k1), abs=1e-13)
    # u_k leaves the top-k subspace exactly when the pair swaps: sin Theta = 1, else 0
    sin = np.linalg.norm(U1[:, :k] - base.U[:, :k] @ (base.U[:, :k].T @ U1[:, :k]), 2)
    assert sin == pytest.approx(1.0 if swapped else 0.0, abs=1e-12)


@given(st.floats(-4, 1), st.sampled_from(["gaussian", "aligned", "orthogonal", "low_rank", "swap"]))
@settings(max_examples=25, deadline=None)
def test_scale_to_ratio_sets_the_spectral_norm(log_ratio, family):
    syn = synthetic_matrix("gapped", 6, 5, 2, np.random.default_rng(1))
    dW = scale_to_ratio(perturbation(family, syn, 2, np.random.default_rng(2)), 10.0**log_ratio, syn.gap(2))
    assert np.linalg.norm(dW, 2) / syn.gap(2) == pytest.approx(10.0**log_ratio, rel=1e-13)


def test_kl_budget_hits_the_budget_and_worst_case_attains_lemma_F10():
    rng = np.random.default_rng(5)
    S = random_curvature(12, rng, mu=0.3, cond=50)
    assert np.linalg.eigvalsh(S)[0] == pytest.approx(0.3, rel=1e-12)
    for worst in (False, True):
        dW = kl_budgeted_perturbation(S, 0.02, (4, 3), rng, worst_case=worst)
        assert kl_quadratic(dW, S) == pytest.approx(0.02, rel=1e-12)
        bound = np.sqrt(2 * 0.02 / 0.3)
        if worst:
            assert np.linalg.norm(dW) == pytest.approx(bound, rel=1e-12)
        else:
            assert np.linalg.norm(dW) < bound


def test_kronecker_curvature_lambda_min_and_trace_form():
    rng = np.random.default_rng(8)
    S, mu = kronecker_curvature(4, 3, rng, mu=0.05, cond=400)
    lam = np.linalg.eigvalsh(S)
    assert lam[0] == pytest.approx(mu, rel=1e-10) and mu == pytest.approx(0.05, rel=1e-12)
    assert lam[-1] / lam[0] == pytest.approx(400, rel=1e-9)


def test_synthetic_pair_kl_budget_carries_delta_and_mu():
    inst = synthetic_pair(3, "gapped", "kl_budget", 5, 4, 2, 0.25)
    dW = inst["W1"] - inst["W0"]
    assert np.linalg.norm(dW, 2) == pytest.approx(0.25 * inst["gap"], rel=1e-12)
    assert np.linalg.norm(dW) <= np.sqrt(2 * inst["delta_W"] / inst["mu_W"]) * (1 + 1e-12)


def test_bad_inputs_name_the_problem(base):
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="unknown family 'fancy'"):
        spectrum("fancy", 5, 2)
    with pytest.raises(InputError, match="k=6 outside"):
        spectrum("power_law", 5, 6)
    with pytest.raises(InputError, match="gap"):
        spectrum("gapped", 5, 2, gap=0.95)
    with pytest.raises(InputError, match="rank"):
        spectrum("rank_deficient", 5, 3, rank=2)
    with pytest.raises(InputError, match="need 4 singular values"):
        matrix_with_spectrum([1.0, 0.5], 4, 6, rng)
    with pytest.raises(InputError, match="unknown family"):
        perturbation("nope", base, 2, rng)
    with pytest.raises(InputError, match="swap"):
        perturbation("swap", base, 6, rng)
    with pytest.raises(InputError, match="zero"):
        scale_to_ratio(np.zeros((3, 3)), 0.1, 1.0)
    with pytest.raises(InputError, match="expected"):
        kl_quadratic(np.ones((2, 2)), np.eye(3))
    with pytest.raises(InputError, match="budget"):
        kl_budgeted_perturbation(np.eye(4), 0.0, (2, 2), rng)
