"""Tests for theory.fast_spectral: matrices with known spectra and singular subspaces; the bound vs the truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theory.errors import InputError, NonFiniteError, ZeroGapError
from theory.fast_spectral import certify_topk, spectral_norm_fast, topk_svd
from theory.linalg import principal_angles

EPS64 = np.finfo(np.float64).eps


def known_matrix(m: int, n: int, s: np.ndarray, seed: int):
    """W = U diag(s) Vᵀ with Haar-random orthonormal U (m, r), V (n, r): spectrum and subspaces known."""
    rng = np.random.default_rng(seed)
    r = s.shape[0]
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return (U * s) @ V.T, U, V


def power_law(r: int, a: float) -> np.ndarray:
    return np.arange(1, r + 1, dtype=np.float64) ** (-a)


def true_angle(U, V, k, out) -> float:
    return float(max(principal_angles(U[:, :k], out.U).max(), principal_angles(V[:, :k], out.V).max()))


def reference_slack(W_shape, s, k) -> float:
    """Rounding error of the known-basis reference itself: ~ dim·eps·σ_1 / gap_k."""
    gap = s[k - 1] - (s[k] if k < s.shape[0] else 0.0)
    return 10 * max(W_shape) * EPS64 * s[0] / gap


@pytest.mark.parametrize("m,n,k,a", [(240, 160, 5, 1.0), (160, 240, 12, 0.6), (300, 300, 1, 1.5)])
def test_randomized_agrees_with_known_subspaces_within_its_bound(m, n, k, a):
    s = power_law(min(m, n), a)
    W, U, V = known_matrix(m, n, s, seed=m + k)
    out = topk_svd(W, k, method="randomized", tol=1e-6)
    assert out.method_used == "randomized"
    assert out.angle_err_bound <= 1e-6
    assert true_angle(U, V, k, out) <= out.angle_err_bound + reference_slack(W.shape, s, k)
    assert np.max(np.abs(out.S - s[:k])) <= out.sigma_err_bound
    assert out.U.shape == (m, k) and out.V.shape == (n, k) and out.S.shape == (k,)


def test_exact_and_auto_paths_on_known_spectrum():
    s = power_law(60, 1.0)
    W, U, V = known_matrix(80, 60, s, seed=3)
    for method in ("exact", "auto"):
        out = topk_svd(W, 7, method=method)
        assert out.method_used == "exact"  # auto picks exact at this size
        assert true_angle(U, V, 7, out) <= out.angle_err_bound + reference_slack(W.shape, s, 7)
        assert out.angle_err_bound < 1e-10
        assert np.allclose(out.S, s[:7], rtol=0, atol=out.sigma_err_bound)


def test_lanczos_path_within_bound():
    s = power_law(150, 1.0)
    W, U, V = known_matrix(150, 150, s, seed=11)
    out = topk_svd(W, 6, method="lanczos", tol=1e-6)
    assert out.method_used in ("lanczos", "lanczos->exact")
    assert true_angle(U, V, 6, out) <= out.angle_err_bound + reference_slack(W.shape, s, 6)


def test_fallback_triggers_on_near_degenerate_gap():
    """σ_k - σ_{k+1} = 1e-11: no residual can certify 1e-6 rad, so the exact path answers (and says so)."""
    s = power_law(200, 1.0)
    k = 8
    s[k] = s[k - 1] - 1e-11
    W, U, V = known_matrix(200, 200, s, seed=5)
    out = topk_svd(W, k, method="randomized", tol=1e-6)
    assert out.method_used == "randomized->exact"
    assert out.gap_lower < 1.1e-11


def test_exact_gap_zero_raises_and_fallback_reports_it():
    s = power_law(100, 1.0)
    s[3] = s[2]  # σ_3 = σ_4 exactly
    W, _, _ = known_matrix(100, 100, s, seed=2)
    with pytest.raises(ZeroGapError, match="σ_3 .* σ_4"):
        topk_svd(W, 3, method="exact")
    with pytest.raises(ZeroGapError, match="not determined"):
        topk_svd(W, 3, method="randomized")
    with pytest.raises(ZeroGapError, match="zero matrix"):
        topk_svd(np.zeros((5, 5)), 1)


def test_bad_inputs_name_the_problem():
    W = np.eye(6)
    W[2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="W: 1 non-finite"):
        topk_svd(W, 2)
    with pytest.raises(InputError, match="k=9 outside"):
        topk_svd(np.eye(6), 9)
    with pytest.raises(InputError, match="method"):
        topk_svd(np.eye(6), 2, method="magic")
    with pytest.raises(InputError, match="2-d"):
        spectral_norm_fast(np.ones(4))


def test_deterministic_for_a_seed():
    s = power_law(120, 0.8)
    W, _, _ = known_matrix(120, 120, s, seed=9)
    a = topk_svd(W, 4, method="randomized", seed=3, tol=1e-4)
    b = topk_svd(torch.from_numpy(W), 4, method="randomized", seed=3, tol=1e-4)
    assert np.array_equal(a.U, b.U) and np.array_equal(a.S, b.S) and a.angle_err_bound == b.angle_err_bound


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([(40, 30), (30, 40), (50, 50)]),
    k=st.integers(1, 6),
    decay=st.floats(0.3, 2.0),
    eps_rot=st.floats(1e-9, 1e-2),
)
@example(seed=1, shape=(50, 50), k=6, decay=0.3, eps_rot=1e-2)
def test_certificate_never_below_true_error_for_perturbed_triplets(seed, shape, k, decay, eps_rot):
    """Property: for exact triplets rotated by a small random skew, the certified bound >= the true angle."""
    m, n = shape
    s = power_law(min(m, n), decay)
    W, U, V = known_matrix(m, n, s, seed)
    rng = np.random.default_rng(seed + 1)
    j = k + 1

    def rotate(B):
        X = eps_rot * rng.standard_normal((B.shape[0], j))
        Q, _ = np.linalg.qr(B[:, :j] + X - B[:, :j] @ (B[:, :j].T @ X))
        return Q

    Ut, Vt = rotate(U), rotate(V)
    St = np.diag(Ut.T @ W @ Vt).copy()
    St = np.abs(St)
    order = np.argsort(St)[::-1]
    Ut, Vt, St = Ut[:, order], Vt[:, order], St[order]
    angle, serr, _ = certify_topk(W, Ut, St, Vt, k)
    err = max(principal_angles(U[:, :k], Ut[:, :k]).max(), principal_angles(V[:, :k], Vt[:, :k]).max())
    assert angle + reference_slack(W.shape, s, k) >= err


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 5), decay=st.floats(0.5, 2.0), iters=st.integers(0, 4))
def test_randomized_bound_never_below_true_error_at_any_stage(seed, k, decay, iters):
    """Property: stopping early (few steps, loose tol) still returns a bound >= the true error."""
    s = power_law(70, decay)
    W, U, V = known_matrix(70, 70, s, seed)
    out = topk_svd(W, k, method="randomized", tol=math.pi / 2, max_iter=iters, seed=seed)
    assert true_angle(U, V, k, out) <= out.angle_err_bound + reference_slack(W.shape, s, k)
    assert np.max(np.abs(out.S - s[:k])) <= out.sigma_err_bound


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_spectral_norm_fast_known_value(a):
    s = 3.0 * power_law(100, a)
    W, _, _ = known_matrix(130, 100, s, seed=int(10 * a))
    res = spectral_norm_fast(W, rtol=1e-8)
    assert res.method_used == "randomized"
    assert res.value <= s[0] + 4 * 130 * EPS64 * s[0]
    assert s[0] <= res.value + res.err_bound
    assert res.err_bound <= 1e-8 * res.value


def test_spectral_norm_fast_flat_spectrum_and_zero():
    """σ_1 = σ_2: Temple cannot help, Weyl converges slowly; the answer is still enclosed (possibly via exact)."""
    s = np.ones(120)
    s[0] = 1 + 1e-9
    W, _, _ = known_matrix(120, 120, s, seed=4)
    res = spectral_norm_fast(W, rtol=1e-10)
    assert res.value <= s[0] * (1 + 1e-13) and s[0] <= res.value + res.err_bound
    assert spectral_norm_fast(np.zeros((7, 5))) == (0.0, 0.0, "zero")
    small = spectral_norm_fast(np.diag([2.0, 1.0]))
    assert small.method_used == "exact" and abs(small.value - 2.0) <= small.err_bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_within_bounds():
    s = power_law(300, 1.0)
    W, U, V = known_matrix(300, 300, s, seed=1)
    out = topk_svd(W, 8, method="randomized", device="cuda")
    assert out.method_used == "randomized"
    assert true_angle(U, V, 8, out) <= out.angle_err_bound + reference_slack(W.shape, s, 8)
    res = spectral_norm_fast(W, device="cuda")
    assert abs(res.value - s[0]) <= res.err_bound + 10 * 300 * EPS64


def test_certificate_catches_a_missed_top_direction():
    """Exact triplets 2..k+2 have zero residual but are not the top-k: the fresh probe sees σ_1 in the deflated
    matrix, so the certificate refuses (bound π/2) instead of certifying the wrong subspace."""
    s = power_law(60, 1.0)
    W, U, V = known_matrix(60, 60, s, seed=8)
    k = 3
    idx = np.arange(1, k + 2)
    angle, _, gap_lower = certify_topk(W, U[:, idx], s[idx], V[:, idx], k)
    assert gap_lower < 0 and angle == pytest.approx(math.pi / 2)
    # the same call on the true top triplets certifies to rounding level
    angle_ok, _, _ = certify_topk(W, U[:, : k + 1], s[: k + 1], V[:, : k + 1], k)
    assert angle_ok < 1e-10


def test_give_up_rule_waits_for_an_unresolved_early_ritz_gap():
    """Regression (k = 256 at n = 4096 once fell back to exact): early Ritz gaps can be far below the true gap; while
    the residual exceeds the Ritz gap the iteration goes on instead of declaring the gap degenerate. It gives up
    once a resolved gap is at rounding level, or when the residual stalls (less than 2x over two steps)."""
    from theory.fast_spectral import _hopeless

    f = 4096 * EPS64
    S = torch.tensor([1.0, 0.5, 0.5 - 1e-15, 0.1], dtype=torch.float64)  # σ̃_2 - σ̃_3 = 1e-15: below rounding
    assert not _hopeless(1e-3, [], S, k=2, tol=1e-6, f=f)  # unresolved: go on
    assert _hopeless(1e-17, [], S, k=2, tol=1e-6, f=f)  # resolved and degenerate: give up
    S = torch.tensor([1.0, 0.5, 0.4, 0.1], dtype=torch.float64)
    assert not _hopeless(1e-9, [1e-5, 1e-7], S, k=2, tol=1e-6, f=f)  # 100x per step: go on
    assert _hopeless(0.6e-5, [1e-5, 0.8e-5], S, k=2, tol=1e-6, f=f)  # stalled


@pytest.mark.parametrize("method", ["randomized", "lanczos", "exact"])
def test_spectral_norm_every_method_encloses_the_known_value(method):
    s = 2.0 * power_law(100, 1.0)
    W, _, _ = known_matrix(120, 100, s, seed=6)
    res = spectral_norm_fast(W, method=method, rtol=1e-7)
    assert res.method_used == method
    slack = 4 * 120 * EPS64 * s[0]  # the construction's own rounding
    assert res.value - slack <= s[0] <= res.value + res.err_bound + slack
    assert res.err_bound <= 1e-7 * res.value


def test_float32_phase_cannot_spoil_the_certificate_on_a_wide_dynamic_range():
    """σ spans 1 .. 1e-12, far beyond float32: phase 1 sees the small singular values as noise, yet what comes back
    is either certified in float64 (and the bound holds against the known subspaces) or the exact answer."""
    s = np.logspace(0, -12, 160)
    k = 40  # σ_40 ≈ 3e-3 sits well above float32 noise; the tail below it does not
    W, U, V = known_matrix(220, 160, s, seed=21)
    out = topk_svd(W, k, method="randomized", tol=1e-6)
    assert out.method_used in ("randomized", "randomized->exact")
    assert true_angle(U, V, k, out) <= out.angle_err_bound + reference_slack(W.shape, s, k)
    assert np.max(np.abs(out.S - s[:k])) <= out.sigma_err_bound + 10 * 220 * EPS64


def test_backends_agree_within_their_bounds():
    """randomized, lanczos and exact on one matrix: pairwise principal angles within the sum of their bounds."""
    s = power_law(180, 0.9)
    W, _, _ = known_matrix(200, 180, s, seed=13)
    k = 10
    outs = {m: topk_svd(W, k, method=m, tol=1e-7) for m in ("randomized", "lanczos", "exact")}
    assert outs["randomized"].method_used == "randomized" and outs["exact"].method_used == "exact"
    slack = reference_slack(W.shape, s, k)
    for a in outs:
        for b in outs:
            ang = max(principal_angles(outs[a].U, outs[b].U).max(), principal_angles(outs[a].V, outs[b].V).max())
            assert ang <= outs[a].angle_err_bound + outs[b].angle_err_bound + 2 * slack
            assert np.max(np.abs(outs[a].S - outs[b].S)) <= outs[a].sigma_err_bound + outs[b].sigma_err_bound


def test_thin_products_equal_the_plain_ones():
    """_mul / _tmul (computed through the transposes for speed) are the same products up to float64 rounding."""
    from theory.fast_spectral import _mul, _tmul

    g = torch.Generator().manual_seed(0)
    W = torch.randn(70, 50, dtype=torch.float64, generator=g)
    X, Y = torch.randn(50, 7, dtype=torch.float64, generator=g), torch.randn(70, 7, dtype=torch.float64, generator=g)
    tol = 70 * EPS64 * float(W.abs().sum(1).max()) * float(X.abs().max() + Y.abs().max())
    assert torch.allclose(_mul(W, X), W @ X, rtol=0, atol=tol)
    assert torch.allclose(_tmul(W, Y), W.T @ Y, rtol=0, atol=tol)


@pytest.mark.parametrize("k", [1, 5, 30])
def test_krylov_basis_stays_orthonormal_and_projection_is_exact(k):
    """The block Golub-Kahan-Lanczos bases are orthonormal to rounding and the incrementally built projection equals
    Uᵀ W V computed directly, so the Rayleigh-Ritz step is the exact projection the certificate assumes."""
    from theory.fast_spectral import _BlockKrylov, _block_size

    s = power_law(120, 1.0)
    W, _, _ = known_matrix(150, 120, s, seed=k)
    Wt = torch.from_numpy(W)
    b = _block_size(k, 120, None)
    V1 = torch.linalg.qr(torch.randn(120, b, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).Q
    kr = _BlockKrylov(Wt, V1)
    for _ in range(3):
        if kr.dim + b <= 120:
            kr.step()
    d = kr.dim
    U, V = kr._U[:, :d], kr._V[:, :d]
    assert torch.linalg.matrix_norm(U.T @ U - torch.eye(d, dtype=torch.float64)) <= 100 * d * EPS64
    assert torch.linalg.matrix_norm(V.T @ V - torch.eye(d, dtype=torch.float64)) <= 100 * d * EPS64
    assert torch.allclose(kr._B, U.T @ Wt @ V, rtol=0, atol=100 * 150 * EPS64 * s[0])


# ---------------------------------------------------------------------------------------------------------------
# Issue 11: certificates at every scale, named errors, complex input
# ---------------------------------------------------------------------------------------------------------------

SPECTRA = ("power_law", "clustered", "gap_at_k")


def scale_spectrum(kind: str, r: int, k: int) -> np.ndarray:
    if kind == "clustered":  # clusters of near-equal values, k on a cluster boundary
        return np.sort(np.concatenate([np.full(k, 2.0), np.full(r - k, 1.0)]) + np.linspace(0, 1e-3, r))[::-1]
    if kind == "gap_at_k":  # flat above and below, one clear gap exactly at k
        return np.concatenate([np.linspace(3.0, 2.9, k), np.linspace(1.0, 0.9, r - k)])
    return power_law(r, 1.0)


@given(st.integers(0, 2**16), st.sampled_from(SPECTRA), st.sampled_from(["exact", "randomized", "lanczos"]),
       st.sampled_from([1, 2, "r-1", "r"]), st.integers(-1000, 1000))
@example(0, "power_law", "randomized", 2, -997)  # ~1e-300: Gram matrices underflowed
@example(1, "power_law", "randomized", 1, -565)  # ~1e-170
@example(2, "gap_at_k", "lanczos", 2, 531)  # ~1e160: Gram matrices overflowed
@example(3, "clustered", "randomized", "r-1", 996)  # ~1e300, k near n
@example(4, "gap_at_k", "exact", "r", -1000)
def test_certificates_contain_the_truth_at_every_scale(seed, kind, method, kk, j):
    """topk_svd's certified angle, sigma and gap bounds and spectral_norm_fast's interval contain the values of a
    float64 full SVD of the unscaled matrix, for W scaled by 2^j from 1e-300 to 1e300 (scaling is exact)."""
    m, n = 40, 24
    r = min(m, n)
    k = {"r-1": r - 1, "r": r}.get(kk, kk)
    s = scale_spectrum(kind, r, k)
    W, U, V = known_matrix(m, n, s, seed)
    top = np.abs(W).max()
    j = int(min(max(j, -1021 - int(np.frexp(np.abs(W[W != 0]).min())[1])), 1023 - int(np.frexp(top)[1])))
    Ws = np.ldexp(W, j)
    assert np.array_equal(np.ldexp(Ws, -j), W)
    try:
        out = topk_svd(Ws, k, method=method, tol=1e-6, seed=seed)
    except ZeroGapError:
        assert kind == "clustered" and s[k - 1] - (s[k] if k < r else 0) < 1e-12
        return
    Ur, Sr, Vhr = np.linalg.svd(W, full_matrices=False)  # the reference, in W's own units
    gap = Sr[k - 1] - (Sr[k] if k < r else 0.0)
    ref_err = 10 * max(m, n) * EPS64 * Sr[0] / gap
    angle = max(principal_angles(Ur[:, :k], out.U).max(), principal_angles(Vhr[:k].T, out.V).max())
    assert angle <= out.angle_err_bound + ref_err, (angle, out)
    S_back = np.ldexp(out.S, -j)
    assert np.max(np.abs(S_back - Sr[:k])) <= math.ldexp(out.sigma_err_bound, -j) + 4 * max(m, n) * EPS64 * Sr[0]
    nrm = spectral_norm_fast(Ws, method=method, seed=seed)
    lo, hi = math.ldexp(nrm.value, -j), math.ldexp(nrm.value + nrm.err_bound, -j)
    slack = 4 * max(m, n) * EPS64 * Sr[0]
    assert lo - slack <= Sr[0] <= hi + slack, (lo, Sr[0], hi, nrm)


@pytest.mark.parametrize("j", [-1000, -560, 0, 530, 1000])
def test_certify_topk_sees_triplets_that_are_pi_over_2_off_at_any_scale(j):
    """The old residual norms went through Gram matrices that underflowed: triplets pi/2 off were certified ~1e-15."""
    W, U, V = known_matrix(6, 5, np.array([3.0, 2.0, 1.0, 0.5, 0.1]), seed=0)
    Ur, Sr, Vhr = np.linalg.svd(W, full_matrices=False)
    swapped = [2, 1, 0]  # the third singular pair where the first belongs
    angle, _, gap = certify_topk(np.ldexp(W, j), Ur[:, swapped], np.ldexp(Sr[swapped], j), Vhr[swapped].T, 1)
    assert angle == pytest.approx(math.pi / 2) and gap <= 0
    good, err, _ = certify_topk(np.ldexp(W, j), Ur[:, :2], np.ldexp(Sr[:2], j), Vhr[:2].T, 1)
    assert good < 1e-12 and err >= 0


def test_float32_phase_above_float32_range_does_not_overflow():
    """Entries ~1e39 overflow float32 (max 3.4e38): the randomized phase used to raise a raw LinAlgError."""
    s = power_law(300, 1.0)
    W, U, V = known_matrix(320, 300, s, seed=3)
    out = topk_svd(W * 1e39, 4, method="randomized", tol=1e-6)
    assert out.method_used == "randomized"
    assert true_angle(U, V, 4, out) <= out.angle_err_bound + reference_slack(W.shape, s, 4)
    assert np.max(np.abs(out.S / 1e39 - s[:4])) <= out.sigma_err_bound / 1e39 + 1e-14


def test_solver_failures_fall_back_or_raise_a_named_error(monkeypatch):
    from scipy.sparse.linalg import ArpackNoConvergence

    from theory import fast_spectral
    from theory.errors import DecompositionError

    s = power_law(60, 1.0)
    W, U, V = known_matrix(70, 60, s, seed=1)

    def no_arpack(*a, **kw):
        raise ArpackNoConvergence("no convergence", np.zeros(0), np.zeros((0, 0)))

    monkeypatch.setattr("scipy.sparse.linalg.svds", no_arpack)
    out = topk_svd(W, 3, method="lanczos")
    assert out.method_used == "lanczos->exact" and true_angle(U, V, 3, out) <= out.angle_err_bound + 1e-12

    def broken_svd(*a, **kw):
        raise torch.linalg.LinAlgError("The algorithm failed to converge")

    monkeypatch.setattr(fast_spectral.torch.linalg, "svd", broken_svd)
    with pytest.raises(DecompositionError, match="W: the float64 SVD failed"):
        topk_svd(W, 3, method="exact")


def test_complex_input_is_refused_by_name():
    from theory.errors import ComplexInputError

    for f in (lambda W: topk_svd(W, 1), lambda W: spectral_norm_fast(W)):
        with pytest.raises(ComplexInputError):
            f(torch.eye(4, dtype=torch.complex128))
        with pytest.raises(ComplexInputError):
            f(np.eye(4) * 1j)
