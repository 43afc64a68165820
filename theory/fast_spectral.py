"""Top-k singular subspaces and ||M||_2 without a full SVD, with an a-posteriori error bound and a fall-back.

Fast path (``method="randomized"``): a two-phase block Krylov method (block Golub-Kahan-Lanczos with full
reorthogonalisation, block size ``b = k + 1 + p``, default ``p = max(16, k/4)``; Musco & Musco 2015). Phase 1 runs in
float32 from a Gaussian block until the Ritz residual reaches the float32 floor (~16 ulps of σ̃_1) or stops halving;
phase 2 restarts in float64 from phase 1's top-b right Ritz vectors and stops at the first step whose certificate
meets ``tol``. Krylov convergence depends on ``sqrt`` of the relative gap where subspace iteration depends on the gap
itself, and float32 products cost a third to a half of float64 ones, so most of the work runs in the cheap phase.
Rounding in phase 1 cannot make the answer wrong, only the start of phase 2 worse: the projection, the Ritz triplets
and every residual used below are float64. All products with W are formed as ``(Xᵀ Wᵀ)ᵀ`` (see ``_mul``).
``method="lanczos"`` uses ``scipy.sparse.linalg.svds`` (ARPACK) for the triplets; ``method="exact"`` the full float64
SVD.

A-posteriori certificate (the same formula for every method). For the Ritz block of size ``j`` let
``R_j = W Ṽ_j - Ũ_j Σ̃_j`` and ``S_j = Wᵀ Ũ_j - Ṽ_j Σ̃_j``, ``e_j = sqrt(||R_j||² + ||S_j||²)`` (spectral norms).

1. ``E = -(I - ŨŨᵀ) R Ṽᵀ - Ũ Sᵀ`` (``||E||_2 <= e_j``) makes ``W + E = Ũ Σ̃ Ṽᵀ ⊕ D`` with
   ``D = (I - ŨŨᵀ) W (I - ṼṼᵀ)``. If ``||D||_2 <= σ̃_j`` (*no singular direction above σ̃_j was missed*), Weyl gives
   ``|σ_i(W) - σ̃_i| <= e_j`` for ``i <= j``. So ``σ_{k+1}(W) <= σ̃_{k+1} + e_{k+1}`` (j = k+1) and
   ``|σ_i - σ̃_i| <= e_k`` for ``i <= k`` (``sigma_err_bound``).
2. Wedin's sin-θ theorem in residual form (Stewart & Sun V.4.4; its proof uses only orthonormal Ũ_k, Ṽ_k):
   with ``δ = σ̃_k - σ_{k+1}(W) > 0``, ``max(||sin Θ(Ũ_k, U_k)||_2, ||sin Θ(Ṽ_k, V_k)||_2) <= max(||R_k||, ||S_k||) / δ``.
   ``angle_err_bound = arcsin(min(1, (ρ_k + f) / δ_low))`` with ``δ_low = σ̃_k - (max(σ̃_{k+1}, d̂) + e_{k+1} + f)``,
   ``f = max(m, n) · eps · σ̃_1 + (||ŨᵀŨ - I||_F + ||ṼᵀṼ - I||_F) · σ̃_1`` an allowance for float64 rounding in the
   residuals and (to first order) for bases that are orthonormal only to rounding, and ``d̂`` a lower estimate of
   ``||D||_2`` from a fresh random power probe, which raises the bound if the sketch visibly missed a direction.

The "no missed direction" hypothesis is the one every residual-based convergence test (ARPACK's included) rests
on; it holds by construction for the exact path. For a Gaussian start it fails only with vanishing probability,
and the fresh probe guards against it; the bound is otherwise rigorous, rounding included.

Fall-back: when the certified bound exceeds ``tol`` after ``max_iter`` steps, or earlier when the float64 residual
stalls (falls less than 2× over two steps) or a resolved Ritz gap ``σ̃_k - σ̃_{k+1}`` is at rounding level, or the
Krylov basis would exceed ``min(m, n)`` columns, ``topk_svd`` returns the exact path's answer and says so in
``method_used`` (``"randomized->exact"``). The exact path raises ``ZeroGapError`` when ``σ_k - σ_{k+1}`` is below
rounding resolution: the top-k subspace is then not determined.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float

from theory.errors import (
    ComplexInputError,
    DecompositionError,
    InputError,
    NonFiniteError,
    ShapeMismatchError,
    ZeroGapError,
)

__all__ = ["TopK", "SpectralNorm", "topk_svd", "spectral_norm_fast", "certify_topk"]

EPS64 = float(np.finfo(np.float64).eps)
METHODS = ("auto", "randomized", "lanczos", "exact")


class TopK(NamedTuple):
    """Top-k singular triplets (float64 numpy) and their certified errors.

    ``angle_err_bound``: bound (radians) on the largest principal angle between span(U) and the exact top-k left
    subspace, and likewise for V. ``sigma_err_bound``: bound on ``max_i |S_i - σ_i(W)|``. ``gap_lower``: the
    certified lower bound on ``σ̃_k - σ_{k+1}(W)`` used by Wedin's bound. ``iterations``: subspace-iteration steps.
    """

    U: Float[np.ndarray, "m k"]
    S: Float[np.ndarray, " k"]
    V: Float[np.ndarray, "n k"]
    angle_err_bound: float
    method_used: str
    sigma_err_bound: float = math.nan
    gap_lower: float = math.nan
    iterations: int = 0


class SpectralNorm(NamedTuple):
    """``||M||_2 ∈ [value, value + err_bound]`` (``value`` is a Ritz value, a lower bound)."""

    value: float
    err_bound: float
    method_used: str


# ----------------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------------


def _as_tensor64(W: Any, device: str | torch.device, name: str = "W") -> torch.Tensor:
    return _checked64(W, device, name)[0]


def _checked64(W: Any, device: str | torch.device, name: str = "W") -> tuple[torch.Tensor, float]:
    """``W`` as a float64 tensor on ``device`` and ``max |W_ij|`` (0.0 when empty), or an error naming the problem
    (complex input is refused with ``ComplexInputError``, never cast to its real part)."""
    if isinstance(W, torch.Tensor):
        if W.is_complex():
            raise ComplexInputError(f"{name}: a complex tensor ({W.dtype}); only real matrices are supported")
        t = W.detach()
    else:
        arr = np.asarray(W)
        if arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
        if arr.dtype.kind == "c":
            raise ComplexInputError(f"{name}: a complex array ({arr.dtype}); only real matrices are supported")
        if arr.dtype.kind not in "fiub":
            raise InputError(f"{name}: cannot be read as a float array (dtype {arr.dtype})")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        raise InputError(f"{name}: expected a 2-d matrix, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float64)
    amax = float(t.abs().max()) if t.numel() else 0.0
    if not math.isfinite(amax):  # one pass over W: NaN and Inf both propagate to the max
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{name}: {bad} non-finite entries (NaN or Inf)")
    return t, amax


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _pow2_exponent(amax: float) -> int:
    """e with amax * 2**-e in [1/2, 1) (0 for amax = 0): the scaling every entry point applies first."""
    return int(np.frexp(amax)[1]) if amax > 0 and math.isfinite(amax) else 0


def _scale(t: torch.Tensor, e: int) -> torch.Tensor:
    """``t * 2**-e``, exact: two multiplications by powers of two that are each representable (|e| <= ~2100)."""
    if e == 0:
        return t
    h = -e // 2
    return t * (2.0**h) * (2.0 ** (-e - h))


def _unscale(x: float, e: int) -> float:
    """``x * 2**e`` (inf where it overflows)."""
    if e == 0 or not math.isfinite(x):
        return x
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.inf


def _norm2(A: torch.Tensor) -> float:
    """Spectral norm of a tall-thin matrix through the small Gram matrix (k × k), on a copy scaled by a power of two
    (so the Gram matrix neither overflows above ~1e154 nor underflows below ~1e-154)."""
    if A.numel() == 0:
        return 0.0
    amax = float(A.abs().max())
    if amax == 0.0:
        return 0.0
    e = _pow2_exponent(amax)
    A = _scale(A, e)
    G = A.T @ A if A.shape[0] >= A.shape[1] else A @ A.T
    return _unscale(math.sqrt(max(float(torch.linalg.eigvalsh(G)[-1]), 0.0)), e)


# ----------------------------------------------------------------------------------------------------------------
# the certificate
# ----------------------------------------------------------------------------------------------------------------


class _Cert(NamedTuple):
    angle: float
    sigma_err: float
    gap_lower: float
    rho: float


def _wide_svd(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a wide ``B (l, n)``, l <= n, through ``Bᵀ = Q R`` and the SVD of the small ``Rᵀ (l, l)``
    (LAPACK's direct SVD of a wide matrix is many times slower here); returns ``(U (l, l), S, V (n, l))``."""
    Q2, R2 = torch.linalg.qr(B.T)
    # the small (l, l) SVD runs in numpy on the CPU: about 10x faster than torch's at these sizes, on any device
    Us, Ss, Vsh = (torch.from_numpy(x).to(B.device) for x in np.linalg.svd(_np(R2.T)))
    return Us, Ss, Q2 @ Vsh.T


def _missed_direction_probe(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, seed: int, iters: int = 3,
                            width: int = 4) -> float:
    """Lower estimate of ||(I - UUᵀ) W (I - VVᵀ)||_2 by a few power steps from a fresh Gaussian block."""
    n = W.shape[1]
    g = torch.Generator(device=W.device).manual_seed(seed + 7919)
    X = torch.randn(n, width, dtype=torch.float64, device=W.device, generator=g)

    def D(x):
        x = x - V @ (V.T @ x)
        y = _mul(W, x)
        return y - U @ (U.T @ y)

    def Dt(y):
        y = y - U @ (U.T @ y)
        x = _tmul(W, y)
        return x - V @ (V.T @ x)

    for _ in range(iters):
        X, _ = torch.linalg.qr(Dt(D(X)))
    return _norm2(D(X))


def _certificate(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: int,
                 WV: torch.Tensor | None = None, WtU: torch.Tensor | None = None,
                 probe_norm: float = 0.0, extra: float = 0.0) -> _Cert:
    """Certificate for the top-k block from j = k+1 (or k when k = r) Ritz triplets (U, S, V).

    ``probe_norm``: a (lower) estimate of ||D||_2 for the deflated D, or its exact value when known. ``extra``: an
    additional allowance added to the rounding term ``f`` (e.g. for bases that are orthonormal only to rounding)."""
    m, n = W.shape
    j = U.shape[1]
    WV = W @ V if WV is None else WV
    WtU = W.T @ U if WtU is None else WtU
    R = WV - U * S
    Sres = WtU - V * S
    rk, sk = _norm2(R[:, :k]), _norm2(Sres[:, :k])
    f = max(m, n) * EPS64 * float(S[0]) + extra
    rho = max(rk, sk)
    sigma_err = math.hypot(rk, sk) + f
    if j > k:
        e_next = math.hypot(_norm2(R), _norm2(Sres))
        next_up = max(float(S[k]), probe_norm) + e_next + f
    else:  # k = r: σ_{k+1} := 0, and D vanishes up to the residual (its estimate enters through probe_norm)
        next_up = probe_norm + f
    gap = float(S[k - 1]) - next_up
    if gap <= 0:
        return _Cert(math.pi / 2, sigma_err, gap, rho)
    return _Cert(math.asin(min(1.0, (rho + f) / gap)), sigma_err, gap, rho)


def certify_topk(W: Any, U: Any, S: Any, V: Any, k: int, *, device: str = "cpu") -> tuple[float, float, float]:
    """Certify given triplets ``(U (m, j), S (j,), V (n, j))``, ``j >= k`` (k+1 columns give the gap):
    returns ``(angle_err_bound, sigma_err_bound, gap_lower)``. Useful to audit a decomposition from elsewhere.

    W and S are scaled by one power of two first (exact), so the residual norms neither overflow nor underflow at
    any scale; bases that are orthonormal only approximately widen the bound by their defect (as in the Krylov
    path). Shapes and values are checked (``InputError`` / ``ShapeMismatchError`` / ``NonFiniteError``)."""
    Wt, amax = _checked64(W, device)
    Ut, _ = _checked64(U, device, "U")
    Vt, _ = _checked64(V, device, "V")
    S_arr = np.asarray(S, dtype=np.float64).reshape(-1)
    m, n = Wt.shape
    if Ut.shape[0] != m or Vt.shape[0] != n or Ut.shape[1] != Vt.shape[1] or S_arr.shape[0] < Ut.shape[1]:
        raise ShapeMismatchError(f"U {tuple(Ut.shape)}, S {S_arr.shape}, V {tuple(Vt.shape)} do not fit W {(m, n)}")
    if not np.all(np.isfinite(S_arr)):
        raise NonFiniteError("S: non-finite singular values")
    if not 1 <= int(k) <= Ut.shape[1]:
        raise InputError(f"k={k} outside 1..{Ut.shape[1]} (the number of triplets given)")
    k = int(k)
    e = _pow2_exponent(max(amax, float(np.max(np.abs(S_arr))) if S_arr.size else 0.0))
    Wt = _scale(Wt, e)
    St = torch.as_tensor(np.ldexp(S_arr, -e), device=Wt.device)
    j = min(k + 1, Ut.shape[1])
    U_j, V_j = Ut[:, :j], Vt[:, :j]
    slack = (_orth_defect(U_j) + _orth_defect(V_j)) * float(St[:j].abs().max())
    probe = _missed_direction_probe(Wt, U_j, V_j, 0)
    c = _certificate(Wt, U_j, St[:j], V_j, k, probe_norm=probe, extra=slack)
    return c.angle, _unscale(c.sigma_err, e), _unscale(c.gap_lower, e)


# ----------------------------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------------------------


def _exact(W: torch.Tensor, k: int, require_gap: bool = True, exponent: int = 0) -> TopK:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = S.shape[0]
    j = min(k + 1, r)
    V = Vh[:j].T
    res = W @ V
    nxt = float(S[k]) if k < r else 0.0
    resolution = max(W.shape) * EPS64 * float(S[0]) * 4
    if require_gap and float(S[k - 1]) - nxt <= resolution:
        raise ZeroGapError(
            f"W: σ_{k} = {_unscale(float(S[k - 1]), exponent):.17g} and σ_{k + 1} = {_unscale(nxt, exponent):.17g} "
            f"coincide to rounding (gap <= {_unscale(resolution, exponent):.3g}); the top-{k} singular subspace is "
            f"not determined")
    c = _certificate(W, U[:, :j], S[:j], V, k, WV=res, probe_norm=float(S[j]) if j < r else 0.0)
    return TopK(_np(U[:, :k]), _np(S[:k]), _np(V[:, :k]), c.angle, "exact", c.sigma_err, c.gap_lower, 0)


def _orth_fast(Z: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(Z) by CholeskyQR2 (Gram + Cholesky + triangular solve, twice: BLAS-3 throughout,
    orthogonal to ~eps when cond(Z) < ~1e7). Householder QR when Cholesky fails or Z is worse conditioned."""
    X = Z
    for first in (True, False):
        L, info = torch.linalg.cholesky_ex(X.T @ X)
        d = torch.diagonal(L)
        if int(info) != 0 or (first and float(d.min()) <= 1e-7 * float(d.max())):
            return torch.linalg.qr(Z).Q
        X = torch.linalg.solve_triangular(L.T, X, upper=True, left=False)  # X L^{-T}
    return X


def _mul(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``W X`` for a thin X, computed as ``(Xᵀ Wᵀ)ᵀ``: MKL's float64 GEMM with a thin output (W @ X) measured 2-3×
    slower on CPU than the same product with a wide output (n = 4096, width 33-160, one thread)."""
    return (X.T @ W.T).T


def _tmul(W: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``Wᵀ Y`` as ``(Yᵀ W)ᵀ`` (``W.T @ Y`` with a thin Y was up to 6× slower, as above)."""
    return (Y.T @ W).T


def _orth_against(P: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal basis of the part of span(P) orthogonal to the orthonormal ``basis`` (two rounds of classical
    Gram-Schmidt, "twice is enough", then Householder QR of the block)."""
    if basis is not None:
        for _ in range(2):
            P = P - basis @ (basis.T @ P)
    return torch.linalg.qr(P).Q


class _BlockKrylov:
    """Block Golub-Kahan-Lanczos with full reorthogonalisation, in the dtype of ``W``.

    From an orthonormal start ``V_1 (n, b)`` a step forms ``U_i = orth(W V_i ⟂ U_<i)`` and
    ``V_{i+1} = orth(Wᵀ U_i ⟂ V_<=i)``: after q steps span(V) is the block Krylov space
    ``K_q(WᵀW, V_1)`` of dimension ``q·b`` (two products with W of width b per step, no product is ever repeated:
    ``W V`` and ``Wᵀ U`` are kept, so the projection ``B = Uᵀ W V`` and every residual come from stored products).
    Krylov acceleration converges like a Chebyshev polynomial in the gap, ~ exp(-2q·sqrt(σ_k/σ_{b+1} - 1)) per
    block, against ``(σ_{b+1}/σ_k)^(2q)`` for subspace iteration (Musco & Musco 2015)."""

    def __init__(self, W: torch.Tensor, V1: torch.Tensor):
        m, n = W.shape
        self.W, self.b = W, V1.shape[1]
        cap = 4 * self.b
        new = lambda rows: torch.empty(rows, cap, dtype=W.dtype, device=W.device)  # noqa: E731
        # column buffers: U (m, D), V (n, D + b: the next block is kept), W V (m, D), Wᵀ U (n, D); B (D, D)
        self._U, self._V, self._WV, self._WtU = new(m), new(n), new(m), new(n)
        self._V[:, : self.b] = V1
        self._B = torch.zeros(0, 0, dtype=W.dtype, device=W.device)
        self.dim = 0

    def _reserve(self, cols: int) -> None:
        if cols <= self._V.shape[1]:
            return
        cap = max(cols, 2 * self._V.shape[1])
        for name in ("_U", "_V", "_WV", "_WtU"):
            old = getattr(self, name)
            buf = torch.empty(old.shape[0], cap, dtype=old.dtype, device=old.device)
            buf[:, : old.shape[1]] = old
            setattr(self, name, buf)

    def step(self) -> None:
        W, b, d = self.W, self.b, self.dim
        self._reserve(d + 2 * b)
        U, V, WV, WtU = self._U, self._V, self._WV, self._WtU
        P = _mul(W, V[:, d : d + b])
        WV[:, d : d + b] = P
        U[:, d : d + b] = _orth_against(P, U[:, :d] if d else None)
        Z = _tmul(W, U[:, d : d + b])
        WtU[:, d : d + b] = Z
        V[:, d + b : d + 2 * b] = _orth_against(Z, V[:, : d + b])
        # B = Uᵀ W V grows by a block row U_newᵀ (W V) and a block column U_oldᵀ (W V_new): m·b·D work per step
        Bn = torch.zeros(d + b, d + b, dtype=W.dtype, device=W.device)
        Bn[:d, :d] = self._B
        Bn[d:, : d + b] = U[:, d : d + b].T @ WV[:, : d + b]
        Bn[:d, d:] = U[:, :d].T @ P
        self._B, self.dim = Bn, d + b

    def ritz(self, j: int, start: int = 0):
        """Rayleigh-Ritz on (span U, span V): ``B = Uᵀ W V = X Σ Yᵀ``. Returns ``Σ`` (all of them), the top-j
        ``Ũ = U X_j``, ``Ṽ = V Y_j``, ``W Ṽ`` and ``Wᵀ Ũ`` (from the stored products), and the top-``start`` right
        Ritz vectors (the next phase's start) when ``start > 0``."""
        d = self.dim
        U, V, WV, WtU = self._U[:, :d], self._V[:, :d], self._WV[:, :d], self._WtU[:, :d]
        # the small SVD runs in numpy on the CPU: faster than torch's at these sizes, on any device
        X, S, Yh = (torch.from_numpy(a) for a in np.linalg.svd(_np(self._B.double())))
        Xj = X[:, :j].to(WV.device, WV.dtype)
        Yh = Yh.to(WV.device, WV.dtype)
        Yj = Yh[:j].T
        Vstart = V @ Yh[:start].T if start else None
        return S, U @ Xj, V @ Yj, WV @ Yj, WtU @ Xj, Vstart


def _orth_defect(A: torch.Tensor) -> float:
    """``||AᵀA - I||_F`` (an upper bound on the spectral norm): how far a computed basis is from orthonormal."""
    return float(torch.linalg.matrix_norm(A.T @ A - torch.eye(A.shape[1], dtype=A.dtype, device=A.device)))


def _block_size(k: int, r: int, oversample: int | None) -> int:
    # b = k + 1 + p: a block a little wider than k+1 puts σ_{b+1} well below σ_k (fast Chebyshev rate) without making
    # each step's products much wider; p = max(16, k/4) measured best on power-law spectra (n = 2048-4096).
    p = max(16, k // 4) if oversample is None else int(oversample)
    return max(1, min(k + 1 + p, r))


def _randomized(W: torch.Tensor, k: int, *, tol: float, oversample: int | None, max_iter: int, seed: int) -> TopK | None:
    """Two-phase block Krylov (block Golub-Kahan-Lanczos); None when ``tol`` is out of reach.

    Phase 1 runs in float32 from a Gaussian block (products ~3× cheaper than float64 on CPUs) until its Ritz
    residual stops falling (it floors at a few float32 ulps of σ_1). Phase 2 restarts in float64 from the top-b
    Ritz vectors of phase 1 and runs until the float64 certificate (``_certificate``: Weyl + Wedin from residuals of
    stored float64 products) meets ``tol``. Rounding in the float32 phase can only make the start worse, never the
    certificate wrong: phase 2's Rayleigh-Ritz and residuals are float64 throughout.
    """
    m, n = W.shape
    r = min(m, n)
    j = min(k + 1, r)
    b = _block_size(k, r, oversample)
    max_dim = r  # a Krylov basis can hold at most r directions
    if r >= 1024 and 8 * b > r:
        # ~8 blocks per phase are typical; bases that large cost more than the full SVD (measured: k = 256 at
        # n = 2048 took 2x the full SVD). Small matrices are cheap either way and keep the Krylov path testable.
        return None
    g = torch.Generator(device=W.device).manual_seed(seed)
    V1 = torch.linalg.qr(torch.randn(n, b, dtype=torch.float64, device=W.device, generator=g)).Q
    steps = 0
    # ---- phase 1: float32 ----------------------------------------------------------------------------------
    if b * 3 <= max_dim and max_iter >= 2:
        kr = _BlockKrylov(W.to(torch.float32), V1.to(torch.float32))
        prev, Vall = math.inf, None
        eps32 = float(np.finfo(np.float32).eps)
        while steps < max_iter - 1 and kr.dim + b <= max_dim:
            kr.step()
            steps += 1
            if kr.dim < 2 * b:
                continue
            S, _, V, _, WtU, Vall = kr.ritz(j, start=b)
            rho = _norm2((WtU - V * S[:j].to(V)).double()[:, :k])
            if rho <= 16 * eps32 * float(S[0]) or rho > prev / 2:  # at the float32 floor, or no longer falling fast
                break
            prev = rho
        if Vall is not None:
            V1 = torch.linalg.qr(Vall.double()).Q
    # ---- phase 2: float64, certified -----------------------------------------------------------------------
    kr = _BlockKrylov(W, V1)
    f0 = max(m, n) * EPS64
    last_rho = []
    while True:
        kr.step()
        steps += 1
        S, U, V, WV, WtU, _ = kr.ritz(j)
        Sj = S[:j].to(W.device)
        slack = (_orth_defect(U) + _orth_defect(V)) * float(S[0])  # first-order allowance for non-orthonormality
        cert = _certificate(W, U, Sj, V, k, WV=WV, WtU=WtU, extra=slack)
        if cert.angle <= tol:
            probe = _missed_direction_probe(W, U, V, seed)
            cert = _certificate(W, U, Sj, V, k, WV=WV, WtU=WtU, probe_norm=probe, extra=slack)
            if cert.angle <= tol:
                return TopK(_np(U[:, :k]), _np(Sj[:k]), _np(V[:, :k]), cert.angle, "randomized", cert.sigma_err,
                            cert.gap_lower, steps)
        if _hopeless(cert.rho, last_rho, S, k, tol, f0) or steps >= max_iter or kr.dim + b > max_dim:
            return None
        last_rho.append(cert.rho)


def _hopeless(rho: float, history: list[float], S: torch.Tensor, k: int, tol: float, f: float) -> bool:
    """Give up (fall back to exact) when no further step can certify ``tol``: the residual has resolved a Ritz gap
    ``σ̃_k - σ̃_{k+1}`` that is at rounding level, or the residual stalled (fell less than 2× over two steps)."""
    s1 = float(S[0])
    ritz_gap = float(S[k - 1] - S[k]) if k < S.shape[0] else float(S[k - 1])
    if rho < ritz_gap / 4:  # the residual is below the gap: the Ritz gap is resolved and can be trusted
        if ritz_gap <= 4 * f * s1 or math.sin(min(tol, 1.0)) * ritz_gap / 2 <= f * s1:
            return True
    return len(history) >= 2 and rho > history[-2] / 2


def _lanczos(W: torch.Tensor, k: int, *, tol: float, seed: int) -> TopK | None:
    from scipy.sparse.linalg import svds  # scipy's ARPACK only for the lanczos path

    A = _np(W)
    r = min(A.shape)
    j = min(k + 1, r)
    if j >= r:  # ARPACK needs k < min(m, n)
        return None
    v0 = np.random.default_rng(seed).standard_normal(min(A.shape))
    U, S, Vh = svds(A, k=j, tol=0, v0=v0, random_state=seed)
    order = np.argsort(S)[::-1]
    Ut = torch.from_numpy(np.ascontiguousarray(U[:, order])).to(W.device)
    St = torch.from_numpy(np.ascontiguousarray(S[order])).to(W.device)
    Vt = torch.from_numpy(np.ascontiguousarray(Vh[order].T)).to(W.device)
    probe = _missed_direction_probe(W, Ut, Vt, seed)
    cert = _certificate(W, Ut, St, Vt, k, probe_norm=probe)
    if cert.angle > tol:
        return None
    return TopK(_np(Ut[:, :k]), _np(St[:k]), _np(Vt[:, :k]), cert.angle, "lanczos", cert.sigma_err,
                cert.gap_lower, 0)


def _auto_method(m: int, n: int, k: int) -> str:
    r = min(m, n)
    # A sketch of width l = 3k + 1 (at least k + 49) only pays off when it is a small fraction of the matrix.
    return "exact" if r < 256 or 4 * max(3 * k + 1, k + 49) > r else "randomized"


_LINALG_ERRORS: tuple[type[BaseException], ...] = (np.linalg.LinAlgError, torch.linalg.LinAlgError)


def _arpack_errors() -> tuple[type[BaseException], ...]:
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence  # scipy only for the lanczos path

    return (ArpackError, ArpackNoConvergence)


def topk_svd(W: Any, k: int, *, method: str = "auto", device: str | torch.device = "cpu", tol: float = 1e-6,
             oversample: int | None = None, max_iter: int = 60, seed: int = 0) -> TopK:
    """Top-k singular triplets of ``W (m, n)`` with a certified principal-angle bound ``<= tol`` (radians).

    ``method``: ``"auto"`` (exact for small matrices or large k, else randomized), ``"randomized"`` (torch on
    ``device``, CPU or CUDA), ``"lanczos"`` (scipy ARPACK, CPU), ``"exact"`` (full float64 SVD on ``device``).
    A fast method whose certified bound exceeds ``tol`` (or whose solver fails: LinAlgError, ARPACK) falls back
    to the exact path; ``method_used`` then reads ``"<method>->exact"``. Deterministic for a given ``seed`` on a
    given machine. W is first scaled by a power of two (exact) so that its largest entry lies in [1/2, 1): no
    Gram matrix, residual norm or float32 copy overflows or underflows at any scale; S, ``sigma_err_bound`` and
    ``gap_lower`` are returned in W's units. Errors: ``InputError`` subclasses naming W (``ComplexInputError``,
    ``NonFiniteError``, ``ZeroGapError``, ``DecompositionError`` if even the exact SVD fails).
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    Wt, amax = _checked64(W, device)
    m, n = Wt.shape
    r = min(m, n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= r:
        raise InputError(f"W: k={k!r} outside 1..{r}")
    k = int(k)
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise InputError(f"tol must be a finite number > 0, got {tol!r}")
    if amax == 0.0:
        raise ZeroGapError("W is the zero matrix: every singular value is 0, no top-k subspace")
    e = _pow2_exponent(amax)
    Wt = _scale(Wt, e)
    if method == "auto":
        method = _auto_method(m, n, k)
    out = None
    if method != "exact":
        try:
            if method == "randomized":
                out = _randomized(Wt, k, tol=tol, oversample=oversample, max_iter=max_iter, seed=seed)
            else:
                out = _lanczos(Wt, k, tol=tol, seed=seed)
        except _LINALG_ERRORS + _arpack_errors():
            out = None  # a solver failure is a reason to fall back, never a raw error
    if out is None:
        try:
            out = _exact(Wt, k, exponent=e)
        except _LINALG_ERRORS as err:
            raise DecompositionError(f"W: the float64 SVD failed ({type(err).__name__}: {err})") from None
        if method != "exact":
            out = out._replace(method_used=f"{method}->exact")
    return out._replace(S=np.ldexp(out.S, e), sigma_err_bound=_unscale(out.sigma_err_bound, e),
                        gap_lower=_unscale(out.gap_lower, e))


def spectral_norm_fast(M: Any, *, device: str | torch.device = "cpu", rtol: float = 1e-6, method: str = "auto",
                       max_iter: int = 60, seed: int = 0) -> SpectralNorm:
    """``||M||_2`` with a certified bound: ``value <= ||M||_2 <= value + err_bound``, ``err_bound <= rtol·value``.

    The lower end is the Rayleigh quotient ``||M ṽ_1||`` (always a lower bound). The upper end is Temple's
    inequality for ``MᵀM``: ``σ_1² <= θ + ||MᵀM ṽ - θ ṽ||² / (θ - σ_2_up²)`` with ``θ = ||M ṽ||²`` and ``σ_2_up``
    from the certificate above (same "no missed direction" hypothesis), falling back to Weyl ``σ̃_1 + e_1``.
    Falls back to the exact singular values when the bound exceeds ``rtol`` (or a solver fails); the zero matrix
    gives (0, 0). M is scaled by a power of two first, as in ``topk_svd``: the interval contains ``||M||_2`` at
    every scale (values near the float64 limits: ``value`` and ``err_bound`` may round to inf).
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    Wt, amax = _checked64(M, device, "M")
    m, n = Wt.shape
    r = min(m, n)
    if amax == 0.0:
        return SpectralNorm(0.0, 0.0, "zero")
    e = _pow2_exponent(amax)
    Wt = _scale(Wt, e)
    res = None
    if method == "auto":
        method = "exact" if r < 64 else "randomized"
    try:
        if method == "randomized" and r >= 3:
            res = _randomized_norm(Wt, rtol=rtol, max_iter=max_iter, seed=seed)
            method = method if res is not None else "randomized->exact"
        elif method == "lanczos" and r >= 3:
            t = _lanczos(Wt, 1, tol=math.pi / 2, seed=seed)
            if t is not None:
                cand = _norm_from_triplets(Wt, torch.from_numpy(t.V).to(Wt.device), seed, "lanczos")
                res = cand if cand.err_bound <= rtol * cand.value else None
            method = method if res is not None else "lanczos->exact"
    except _LINALG_ERRORS + _arpack_errors():
        res, method = None, f"{method}->exact"
    if res is None:
        try:
            S = torch.linalg.svdvals(Wt)
        except _LINALG_ERRORS as err:
            raise DecompositionError(f"M: the float64 singular values failed ({type(err).__name__}: {err})") from None
        value = float(S[0])
        res = SpectralNorm(value, max(m, n) * EPS64 * value, method if "->" in method else "exact")
    return SpectralNorm(_unscale(res.value, e), _unscale(res.err_bound, e), res.method_used)


def _norm_from_triplets(W: torch.Tensor, V2: torch.Tensor, seed: int, label: str) -> SpectralNorm:
    """Temple/Weyl enclosure from (at least) two right Ritz vectors V2 (n, >=2) or one (Weyl only)."""
    m, n = W.shape
    WV = W @ V2
    # Rayleigh-Ritz on span(V2): the small SVD gives the Ritz triplets in that span.
    Uq, Sq, Vqh = torch.linalg.svd(WV, full_matrices=False)
    V = V2 @ Vqh.T
    U = Uq
    S = Sq
    j = min(2, S.shape[0])
    U, S, V = U[:, :j], S[:j], V[:, :j]
    v = V[:, 0]
    Wv = W @ v
    theta = float(Wv @ Wv)
    value = math.sqrt(theta)
    f = max(m, n) * EPS64 * value
    probe = _missed_direction_probe(W, U, V, seed)
    cert = _certificate(W, U, S, V, 1, probe_norm=probe)
    weyl_up = float(S[0]) + cert.sigma_err
    up = weyl_up
    if j == 2:
        s2_up = float(S[0]) - cert.gap_lower  # = max(σ̃_2, probe) + e_2 + f
        alpha = s2_up**2
        if theta > alpha:
            r = W.T @ Wv - theta * v
            temple = math.sqrt(theta + float(r @ r) / (theta - alpha))
            up = min(up, temple)
    return SpectralNorm(value, max(up - value, 0.0) + 2 * f, label)


def _randomized_norm(W: torch.Tensor, *, rtol: float, max_iter: int, seed: int) -> SpectralNorm | None:
    m, n = W.shape
    l = min(12, min(m, n))
    g = torch.Generator(device=W.device).manual_seed(seed)
    Q, _ = torch.linalg.qr(W @ torch.randn(n, l, dtype=torch.float64, device=W.device, generator=g))
    prev_err = math.inf
    for it in range(max_iter + 1):
        _, _, Vb = _wide_svd(Q.T @ W)
        res = _norm_from_triplets(W, Vb[:, :2], seed, "randomized")
        if res.err_bound <= rtol * res.value:
            return res
        if it >= 3 and res.err_bound >= prev_err:  # stalled: no further progress expected
            return None
        prev_err = res.err_bound
        Q = _orth_fast(W @ Vb)
    return None
