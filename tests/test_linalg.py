"""Tests for theory.linalg's decompositions: the one float64 SVD (any device), its errors, the spectral gap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import theory.linalg as L
from theory.errors import DecompositionError


def test_svd64_on_a_matrix_with_a_known_spectrum():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((6, 4)))[0]
    V = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    W = (U * [4.0, 3.0, 2.0, 1.0]) @ V.T
    svd = L.svd64(torch.from_numpy(W).to(torch.float32), "W")
    np.testing.assert_allclose(svd.S, [4.0, 3.0, 2.0, 1.0], atol=1e-6)  # float32 input: its rounding only
    assert np.array_equal(L.svd64(W, "W", device="cpu").S, L.svd64(W, "W").S)  # "cpu" is the LAPACK path
    np.testing.assert_allclose(L.singular_values(W, "W"), [4.0, 3.0, 2.0, 1.0], rtol=1e-14)
    assert L.spectral_gap(svd.S, 2) == svd.S[1] - svd.S[2] and L.spectral_gap(svd.S, 4) == svd.S[3]


def test_a_failed_decomposition_is_a_named_error(monkeypatch):
    def broken(*a, **kw):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(L.np.linalg, "svd", broken)
    with pytest.raises(DecompositionError, match="W0: the float64 SVD failed"):
        L.svd64(np.eye(3), "W0")
    with pytest.raises(DecompositionError, match="dW: the float64 singular values failed"):
        L.singular_values(np.eye(3), "dW")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_device_path_agrees_with_lapack():
    W = np.random.default_rng(1).standard_normal((40, 30))
    np.testing.assert_allclose(L.svd64(W, device="cuda").S, L.svd64(W).S, rtol=1e-12)
    np.testing.assert_allclose(L.singular_values(W, device="cuda"), L.singular_values(W), rtol=1e-12)


@pytest.mark.parametrize("a", [
    np.array([[0.75, -3.0]]), np.array([[-0.0, 0.0]]), np.array([[2.0**-1074, -2.0**1023]]),
    np.array([[1.0, np.nan]]), np.array([[-np.inf, 1.0]]), np.array([[5, -8]], dtype=np.int64),
    np.array([[0.5, -0.25]], dtype=np.float32),
])
def test_pow2_exponent_is_frexp_of_the_largest_magnitude(a):
    """pow2_exponent reads max |a| as max(max a, -min a) (no |a| temporary): the same exponent as frexp(max |a|),
    0 for zero / NaN / Inf inputs (as documented)."""
    amax = float(np.max(np.abs(a)))
    expected = 0 if amax == 0.0 or not np.isfinite(amax) else int(np.frexp(amax)[1])
    assert L.pow2_exponent(a) == expected
    assert L.pow2_exponent(np.zeros((0, 2)), a) == expected
