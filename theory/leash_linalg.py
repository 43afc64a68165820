"""The linear algebra of the KL leash (Gate I), as plain functions: the Fisher norm, the KL-budget radius, range
splits of a PSD matrix, the Schur complement of a block (Lemma F.10), the update-subspace curvature mu, and the
rounding-error bounds of policy KLs that the checks in ``theory.kl_anchor`` and ``theory.fisher_bounds`` use as
their tolerances. The simulation engine calls them with a transformer's Fisher as well.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from jaxtyping import Float

from theory.errors import InputError, NonFiniteError, ShapeMismatchError, ZeroGapError
from theory.linalg import as_real_array
from theory.policies import Policy, kl_rows

__all__ = [
    "fisher_norm",
    "kl_budget_radius",
    "psd_rank_tol",
    "range_split",
    "schur_complement",
    "schur_complement_with_tol",
]

EPS = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------------------------------------------
# Linear algebra of the leash (plain functions: the simulation engine calls them with a transformer's Fisher)
# ---------------------------------------------------------------------------------------------------------------
def _sym(F: Any, name: str = "F") -> Float[np.ndarray, "d d"]:
    A = as_real_array(F, name)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ShapeMismatchError(f"{name} must be a square matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise NonFiniteError(f"{name}: non-finite entries")
    return 0.5 * (A + A.T)


def _vec(v: Any, n: int, name: str = "delta") -> Float[np.ndarray, " n"]:
    a = as_real_array(v, name).reshape(-1)
    if a.shape[0] != n:
        raise ShapeMismatchError(f"{name} has {a.shape[0]} entries, the Fisher is {n} x {n}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name}: non-finite entries")
    return a


def _table(x: Any, shape: tuple[int, int], name: str) -> Float[np.ndarray, "X Y"]:
    """A per-(context, output) table (q~, R) of the policy's output shape (X, Y), or a named error: a (Y,) vector is
    accepted for X = 1; any other size raises ``ShapeMismatchError`` naming ``name`` (never a raw reshape error)."""
    a = as_real_array(x, name)
    if a.size != shape[0] * shape[1] or (a.ndim == 2 and a.shape != shape) or a.ndim > 2:
        raise ShapeMismatchError(f"{name} has shape {a.shape}, the policy's outputs have shape {shape} (X, Y)")
    a = a.reshape(shape)
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name}: non-finite entries")
    return a


def _not_psd(A: np.ndarray, name: str = "F", err: float = 0.0) -> str | None:
    """The failed assumption when the symmetric A is indefinite beyond rounding (lambda_min < -16 n eps ||A||, and
    beyond ``err``, a known error of A), else None. A Fisher matrix E[score score^T] is PSD; one with a negative
    eigenvalue is not a Fisher."""
    lam = np.linalg.eigvalsh(A) if A.size else np.zeros(0)
    if lam.size and lam[0] < -16 * psd_rank_tol(lam) - err:
        return f"{name} is positive semidefinite (a Fisher matrix; lambda_min = {lam[0]:.3e} < 0)"
    return None


def psd_rank_tol(eigenvalues: np.ndarray) -> float:
    """Eigenvalues <= n * eps * max|lambda| count as zero (the standard numerical-rank threshold)."""
    lam = np.asarray(eigenvalues)
    return float(lam.shape[0] * EPS * max(np.max(np.abs(lam)), np.finfo(np.float64).tiny))


def fisher_norm(F: Any, delta: Any) -> float:
    """||D||_{F} = sqrt(D^T F D) (Fisher norm; F symmetric PSD). Negative rounding of D^T F D is clipped to 0."""
    A = _sym(F)
    d = _vec(delta, A.shape[0])
    return math.sqrt(max(float(d @ A @ d), 0.0))


def kl_budget_radius(K: float, mu: float) -> float:
    """sqrt(2K / mu): the Euclidean radius a KL budget K allows when F >= mu I (Prop 3.2, Eq 7)."""
    if not (math.isfinite(K) and K >= 0):
        raise InputError(f"KL budget K must be finite and >= 0, got {K}")
    if not (math.isfinite(mu) and mu > 0):
        raise ZeroGapError(f"curvature mu must be > 0 on the update subspace, got {mu}")
    return math.sqrt(2.0 * K / mu)


def range_split(M: Any, v: Any, tol: float | None = None) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Split v = v_range + v_null along range(M) / null(M) of a symmetric PSD M.

    Returns (v_range, v_null, mu_pos, rank) with mu_pos the smallest eigenvalue counted as nonzero (rank tolerance
    ``psd_rank_tol``); mu_pos = 0.0 when M is numerically zero.
    """
    A = _sym(M, "M")
    x = _vec(v, A.shape[0], "v")
    lam, U = np.linalg.eigh(A)
    keep = lam > (psd_rank_tol(lam) if tol is None else tol)
    Ur = U[:, keep]
    v_range = Ur @ (Ur.T @ x)
    mu = float(lam[keep].min()) if keep.any() else 0.0
    return v_range, x - v_range, mu, int(keep.sum())


def _pinv_psd(A: np.ndarray) -> np.ndarray:
    lam, U = np.linalg.eigh(0.5 * (A + A.T))
    keep = lam > psd_rank_tol(lam) if lam.size else np.zeros(0, bool)
    return (U[:, keep] / lam[keep]) @ U[:, keep].T


def _index(idx: Any, n: int) -> np.ndarray:
    if isinstance(idx, slice):
        out = np.arange(n)[idx]
    else:
        a = np.asarray(idx)
        out = np.flatnonzero(a) if a.dtype == bool else a.astype(np.int64).reshape(-1)
        if a.dtype == bool and a.shape != (n,):
            raise ShapeMismatchError(f"block mask has shape {a.shape}, expected ({n},)")
    if out.size == 0:
        raise InputError("block index selects no parameters")
    if out.min() < 0 or out.max() >= n or np.unique(out).size != out.size:
        raise InputError(f"block index must be distinct indices in 0..{n - 1}")
    return out


def schur_complement_with_tol(F: Any, idx: Any, F_err: float = 0.0) -> tuple[np.ndarray, float]:
    """``schur_complement`` plus the rank tolerance its eigenvalues carry: rounding in F_{W~W} F_{~W~W}^+ F_{~W W}
    is about n * eps * ||F|| * kappa(F_{~W~W} on its range), far above n * eps * ||S_W|| when F is ill conditioned,
    so eigenvalues of S_W below that level are treated as zero. ``F_err``: a bound on the error of F itself (when it
    was computed, e.g. ``Policy.fisher_with_error``); it moves S_W by <= F_err (1 + ||F_{W~W} F_{~W~W}^+||)^2 (first
    order in dS = dF_WW - dF_{W~W} X^T - X dF_{~W W} + X dF_{~W~W} X^T, X = F_{W~W} F_{~W~W}^+)."""
    A = _sym(F)
    n = A.shape[0]
    w = _index(idx, n)
    rest = np.setdiff1d(np.arange(n), w)
    S = schur_complement(A, w)
    normF = float(np.max(np.abs(np.linalg.eigvalsh(A)))) if n else 0.0
    kappa, xnorm = 1.0, 0.0
    if rest.size:
        Frr = A[np.ix_(rest, rest)]
        lam = np.linalg.eigvalsh(Frr)
        pos = lam[lam > psd_rank_tol(lam)]
        kappa = float(pos.max() / pos.min()) if pos.size else 1.0
        if F_err:
            xnorm = float(np.linalg.norm(A[np.ix_(w, rest)] @ _pinv_psd(Frr), 2))
    tol = max(n * EPS * normF * kappa, psd_rank_tol(np.linalg.eigvalsh(S)) if S.size else 0.0)
    return S, tol + float(F_err) * (1 + xnorm) ** 2


def schur_complement(F: Any, idx: Any) -> Float[np.ndarray, "w w"]:
    """S_W = F_WW - F_{W,~W} F_{~W,~W}^+ F_{~W,W} for the block W = ``idx`` (slice, index array or bool mask).

    F_{~W~W} may be singular (it is, for softmax policies): we use its Moore-Penrose pseudo-inverse (eigenvalues
    below ``psd_rank_tol`` dropped). For PSD F, range(F_{~W W}) lies in range(F_{~W~W}), so this generalised Schur
    complement does not depend on the choice of generalised inverse, is PSD, and satisfies the variational identity
    x^T S_W x = min_z [x; z]^T F [x; z] — hence delta_W <= 1/2 D^T F D for every D with W-part x.
    """
    A = _sym(F)
    n = A.shape[0]
    w = _index(idx, n)
    rest = np.setdiff1d(np.arange(n), w)
    Fww = A[np.ix_(w, w)]
    if rest.size == 0:
        return Fww
    Fwr = A[np.ix_(w, rest)]
    S = Fww - Fwr @ _pinv_psd(A[np.ix_(rest, rest)]) @ Fwr.T
    return 0.5 * (S + S.T)


def _subspace_mu(F: np.ndarray, delta: np.ndarray, subspace: Any, tol: float | None = None) -> tuple[np.ndarray, np.ndarray, float, str | None, int, float, float]:
    """(delta_on_U, delta_off_U, mu_U, failed_assumption, dim U, e_mu, e_proj) for the update-subspace options.

    Error model: F (or S_W) is known to ``e_mu`` in spectral norm (``tol`` if given, else ``psd_rank_tol``), so mu_U
    moves by <= e_mu; for U = range(F) every kept eigenvalue must exceed 3 e_mu (resolved: true zeros are computed
    within +-e_mu, so the split into range and null space is then the true one) and the projector moves by
    ``e_proj = e_mu / (mu - 2 e_mu)`` (Davis-Kahan). An unresolved split fails the assumption.
    """
    nd = float(np.linalg.norm(delta))
    if subspace is None or (isinstance(subspace, str) and subspace == "range"):
        lam_all = np.linalg.eigvalsh(F)
        t = psd_rank_tol(lam_all) if tol is None else tol
        dr, dn, mu, rank = range_split(F, delta, t)
        if rank == 0:
            return dr, dn, 0.0, ("mu > 0: the curvature matrix (F, or S_W for a block) is numerically 0 — no curvature "
                                 "of its own (for a block: fully absorbed by the other parameters)"), 0, t, 0.0
        if not mu > 3 * t:
            return dr, dn, mu, (f"the range of the curvature matrix is resolved above rounding (an eigenvalue "
                                f"{mu:.3e} lies within 3x the rounding level {t:.3e})"), rank, t, 0.0
        return dr, dn, mu, None, rank, t, t / (mu - 2 * t)
    if isinstance(subspace, str) and subspace == "full":
        lam = np.linalg.eigvalsh(F)
        mu = float(lam.min())
        t = max(psd_rank_tol(lam), tol or 0.0)
        if mu <= 3 * t:
            return delta, 0 * delta, mu, (
                f"F(theta) >= mu I with mu > 0 on all of R^d (lambda_min(F) = {mu:.3e}: F is singular)"), F.shape[0], t, 0.0
        return delta, 0 * delta, mu, None, F.shape[0], t, 0.0
    if isinstance(subspace, str) and subspace == "span":
        if nd == 0:
            return delta, delta, math.nan, "the update is nonzero (span(D) needs D != 0)", 0, 0.0, 0.0
        mu = float(delta @ F @ delta) / nd**2
        t = max(F.shape[0] * EPS * max(np.abs(F).max(), np.finfo(float).tiny), tol or 0.0)
        if mu <= 3 * t:
            return delta, 0 * delta, mu, (
                f"F(theta) >= mu I with mu > 0 on span(D) (D^T F D / ||D||^2 = {mu:.3e}: D is a null direction)"), 1, t, 0.0
        return delta, 0 * delta, mu, None, 1, t, 0.0
    B = as_real_array(subspace, "subspace")
    if B.ndim == 1:
        B = B[:, None]
    if B.shape[0] != F.shape[0]:
        raise ShapeMismatchError(f"subspace basis has {B.shape[0]} rows, the Fisher is {F.shape[0]} x {F.shape[0]}")
    Q, _ = np.linalg.qr(B)
    d_on = Q @ (Q.T @ delta)
    off = float(np.linalg.norm(delta - d_on))
    if off > 1e-10 * max(nd, 1e-300):
        return d_on, delta - d_on, math.nan, f"the update lies in the given subspace (off-subspace norm {off:.3e})", Q.shape[1], 0.0, 0.0
    lam = np.linalg.eigvalsh(Q.T @ F @ Q)
    mu = float(lam.min())
    t = max(psd_rank_tol(np.linalg.eigvalsh(F)), tol or 0.0)
    if mu <= 3 * t:
        return d_on, delta - d_on, mu, f"F(theta) >= mu I with mu > 0 on the given subspace (lambda_min = {mu:.3e})", Q.shape[1], t, 0.0
    return d_on, delta - d_on, mu, None, Q.shape[1], t, 0.0


def _radius_tol(q: float, e_q: float, mu: float, e_mu: float) -> float:
    """Worst-case change of sqrt(q / mu) when q moves by e_q and mu by e_mu (mu > e_mu), plus its rounding."""
    r = math.sqrt(max(q, 0.0) / mu)
    hi = math.sqrt(max(q + e_q, 0.0) / (mu - e_mu))
    lo = math.sqrt(max(q - e_q, 0.0) / (mu + e_mu))
    return max(hi - r, r - lo) + 4 * EPS * r


def _logit_err(policy: Policy, theta: np.ndarray, J: np.ndarray | None = None) -> float:
    """Bound on the absolute rounding of the computed logits z(theta) per entry: the forward pass (a sum of d
    products per logit, first order) and the rounding of theta itself, both ~ eps (|z| + sum_d |J_xyd| |theta_d|).
    Exact for tabular logits (a reshape); a first-order model for the MLP."""
    z = policy.logits(theta)
    if J is None:
        J = policy.logit_jacobian(theta)
    return 8 * (policy.n_params + 1) * EPS * (float(np.abs(z).max()) + float(np.max(np.abs(J) @ np.abs(theta))))


def _kl_with_err(rho: np.ndarray, lp_a: np.ndarray, lp_b: np.ndarray, err_lp: float) -> tuple[float, float]:
    """E_rho KL(a || b) from log-probabilities (as ``Policy.kl`` computes it) and a bound on its error when every
    log-probability is off by <= err_lp.

    KL = sum_y pi_b phi(d), d = log pi_a - log pi_b, phi' (d) = d e^d: an error eps_d <= 2 err_lp in d moves the sum
    by <= e^eps_d eps_d (S1 + eps_d), S1 = sum_y pi_a |d| (a KL computed from log-probability differences has
    relative error ~ eps / ||D|| for a step D: the cancellation is in d, not in the sum), and the weights pi_b by
    <= err_lp KL; plus the summation's Y eps KL."""
    kl = float(rho @ kl_rows(lp_a, lp_b))
    ed = 2 * err_lp
    fin = np.isfinite(lp_a) & np.isfinite(lp_b)
    s1 = float(rho @ np.where(fin, np.exp(np.where(fin, lp_a, 0.0)) * np.abs(np.where(fin, lp_a - lp_b, 0.0)), 0.0).sum(axis=1))
    e = math.exp(ed) * ed * (s1 + ed) + err_lp * kl + lp_a.shape[-1] * EPS * kl
    return kl, e


def _logprob_err(policy: Policy, theta: np.ndarray, J: np.ndarray | None = None) -> float:
    """Bound on the error of the computed log pi_theta(y|x): the logits' (``_logit_err``, twice: log-softmax moves
    by at most twice the largest logit error) plus the rounding of log-softmax itself."""
    z, lp = policy.logits(theta), policy.log_probs(theta)
    return 2 * _logit_err(policy, theta, J) + 8 * EPS * (float(np.abs(z).max()) + float(np.abs(lp[np.isfinite(lp)]).max(initial=0.0)))


def _class_name(policy: Policy) -> str:
    return type(policy).__name__
