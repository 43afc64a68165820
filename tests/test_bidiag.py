"""``theory.bidiag``: every singular value and the top-j right vectors from one bidiagonalisation.

Oracles: matrices ``Q1 diag(s) Q2ᵀ`` with a chosen spectrum (exact values, known right subspaces); the tolerance
of the values is the SVD backward-error allowance ``8 max(m, n) eps ||A||`` (``theory.spectral``), and of the
vectors Wedin's ``allowance / gap``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy
import scipy.linalg.cython_lapack
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theory import bidiag
from theory.bidiag import EXTREME_EXPONENT, QR_CROSSOVER, values_and_top_right
from theory.errors import InputError
from theory.linalg import principal_angles

EPS64 = float(np.finfo(np.float64).eps)


def _structured(c: int, r: int, s: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Q1, _ = np.linalg.qr(rng.standard_normal((c, r)))
    Q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
    return (Q1 * s) @ Q2.T, Q2


def _allowance(A: np.ndarray, s1: float) -> float:
    """The SVD backward-error allowance of ``theory.spectral`` (8 max(m, n) eps ||A||_2)."""
    return 8 * max(A.shape) * EPS64 * s1


@pytest.mark.parametrize("c, r", [(300, 300), (300, 200), (800, 120), (64, 64), (5, 1), (2000, 40)])
@pytest.mark.parametrize("j", [1, 4])
def test_values_and_subspace_against_a_known_spectrum(c, r, j):
    """Both branches (square-ish: gebrd of A; tall: QR then gebrd of R) against the exact spectrum."""
    j = min(j, r)
    s = np.sort(np.geomspace(1e-3, 7.0, r))[::-1]
    A, Q2 = _structured(c, r, s, seed=c + r)
    S, V = values_and_top_right(A, j)
    tol = _allowance(A, s[0])
    assert S.shape == (r,) and V.shape == (r, j)
    assert np.all(np.diff(S) <= 0)
    assert np.abs(S - s).max() <= tol
    gap = s[j - 1] - (s[j] if j < r else 0.0)
    assert principal_angles(V, Q2[:, :j]).max() <= 4 * tol / gap
    assert np.abs(V.T @ V - np.eye(j)).max() <= 64 * r * EPS64


@settings(max_examples=25, deadline=None)
@given(e=st.integers(-1000, 1000), transposed_input=st.booleans())
@example(e=-1020, transposed_input=False)  # subnormal entries: below float64's normal range
@example(e=1000, transposed_input=True)  # found: inverse iteration overflowed (NaN vectors) before the pre-scaling
@example(e=EXTREME_EXPONENT + 1, transposed_input=False)
def test_scaling_by_a_power_of_two_scales_the_values_exactly(e, transposed_input):
    """Householder reflections, dqds and inverse iteration commute with scaling by 2^e away from over/underflow,
    and beyond 2^±EXTREME_EXPONENT the function scales first: the values scale bit for bit and the subspace does
    not move (metamorphic; the QR branch too)."""
    s = np.array([5.0, 4.0, 3.0, 1.0, 0.5, 0.25])
    A, _ = _structured(40, 6, s, seed=1)
    if transposed_input:  # a Fortran-ordered view (compare decomposes wide matrices as their transpose)
        A = np.ascontiguousarray(A.T).T
    S0, V0 = values_and_top_right(A, 2)
    S1, V1 = values_and_top_right(np.ldexp(A, e), 2)
    if e > -1000:
        assert np.array_equal(S1, np.ldexp(S0, e))
    else:  # subnormal entries lose bits before any arithmetic: only the relative error model holds
        assert np.abs(np.ldexp(S1, -e) - S0).max() <= 1e3 * EPS64 * S0[0]
    assert principal_angles(V0, V1).max() <= 1e-12


def test_exact_zero_on_the_bidiagonal_takes_the_splitting_branch():
    """A zero column makes a zero on the bidiagonal: the Golub-Kahan tridiagonal splits, and the vectors come from
    bisection instead of inverse iteration; still exact."""
    s = np.array([3.0, 2.0, 1.0, 0.5])
    A, Q2 = _structured(30, 4, s, seed=2)
    A = np.hstack([A, np.zeros((30, 1))])
    S, V = values_and_top_right(A, 2)
    assert np.abs(S - np.r_[s, 0.0]).max() <= _allowance(A, 3.0)
    target = np.vstack([Q2[:, :2], np.zeros((1, 2))])
    assert principal_angles(V, target).max() <= 1e-13


def test_clustered_values_span_the_cluster():
    """Equal singular values inside the top j: individual vectors are not defined, the subspace is (dstein's
    reorthogonalisation keeps the block orthonormal)."""
    s = np.array([2.0, 1.0, 1.0, 1.0, 0.1, 0.05, 0.01])
    A, Q2 = _structured(50, 7, s, seed=3)
    S, V = values_and_top_right(A, 4)
    assert np.abs(V.T @ V - np.eye(4)).max() <= 1e-12
    assert principal_angles(V, Q2[:, :4]).max() <= 1e-12


def test_input_is_not_modified_and_torch_input_is_accepted():
    A, _ = _structured(60, 20, np.linspace(3, 1, 20), seed=4)
    for given_ in (A, np.asfortranarray(A), torch.from_numpy(A.copy())):
        as_array = (lambda x: x.numpy()) if torch.is_tensor(given_) else np.asarray
        before = as_array(given_).copy()
        values_and_top_right(given_, 3)
        assert np.array_equal(as_array(given_), before)


@pytest.mark.parametrize("bad, j, match", [
    (np.ones((3, 5)), 1, "rows >= cols"),
    (np.ones((5, 3)), 0, "1 <= j"),
    (np.ones((5, 3)), 4, "1 <= j"),
    (np.ones((5, 3), np.float32), 1, "float64"),
    (np.ones((2, 5, 3)), 1, "2-D"),
])
def test_bad_input_is_named(bad, j, match):
    with pytest.raises(InputError, match=match):
        values_and_top_right(bad, j)


def test_non_finite_entries_are_named():
    A = np.eye(4)
    A[2, 1] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        values_and_top_right(A, 1)


def test_qr_crossover_is_lapacks():
    """LAPACK dgesdd's MNTHR = int(minmn * 11 / 6): the same branch point."""
    assert QR_CROSSOVER == 11 / 6


def test_scipy_cython_lapack_signatures_are_the_ones_bound():
    """A fact about scipy (holds for scipy 1.17.1, the locked version): the C signatures of the capsules this module
    calls through ctypes. A change here would make the ctypes binding wrong, so it is checked, not assumed."""
    expected = {
        "dgebrd": "void (int *, int *, d *, int *, d *, d *, d *, d *, d *, int *, int *)",
        "dlasq1": "void (int *, d *, d *, d *, int *)",
        "dormbr": "void (char *, char *, char *, int *, int *, int *, d *, int *, d *, d *, int *, d *, int *, "
                  "int *)",
    }
    for name, signature in expected.items():
        text = re.sub(r"__pyx_t_\w+?cython_lapack_", "", str(scipy.linalg.cython_lapack.__pyx_capi__[name]))
        assert f'"{signature}"' in text, (scipy.__version__, name, text)


def test_lapack_failure_is_a_named_error(monkeypatch):
    """A non-zero LAPACK info becomes a DecompositionError naming the routine (callers fall back on it)."""
    from theory.errors import DecompositionError

    def failing(*args):
        args[-1]._obj.value = 3

    monkeypatch.setattr(bidiag, "_routine", lambda name: failing)
    with pytest.raises(DecompositionError, match="dgebrd failed"):
        values_and_top_right(np.eye(4), 1)
