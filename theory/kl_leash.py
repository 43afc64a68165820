"""Gate I — the KL anchor (Zhu et al., arXiv 2511.08567, Sec. 3.1 and App. F) as executable checks.

Registered ids (``theory.RESULTS[id]``), each with a seeded ``campaign(seed)`` over tabular, log-linear and MLP
policies (``theory.policies``):

- ``"prop3.1"``  one-step leash KL(pi+ || pi) <= (1 + o(1)) KL(q~ || pi), pi+ the M-projection of the Gibbs tilt.
                 Tabular: equality. Log-linear: the Pythagorean identity KL(q~||pi) = KL(q~||pi+) + KL(pi+||pi)
                 makes it hold with constant 1 at every beta. MLP (curved class): the factor is measured
                 (``exact=False``).
- ``"lemF.5"``   KL(pi_{theta+D} || pi_theta) = 1/2 D^T F D + O(||D||^3), with a rigorous, computable remainder bound.
- ``"lemF.6"``   ||H_q~ - F||_op <= 2 L TV(q~, pi) <= L sqrt(2 KL(q~ || pi)).
- ``"lemF.9"``   clip band => batch KL estimate <= E[T] max(-log(1-eps), log(1+eps)); counts band violations.
- ``"prop3.2"``  K = KL(pi+ || pi) => ||D||_{F(theta)} <= sqrt(2K)(1+o(1)), ||D||_2 <= sqrt(2K/mu)(1+o(1)) on the
                 update subspace (corrected: F is singular for softmax policies).
- ``"eq7"``      per-block Schur complement S_W, delta_W = 1/2 vec(DW)^T S_W vec(DW) <= 1/2 D^T F D,
                 ||DW||_2 <= ||DW||_F <= sqrt(2 delta_W / mu_W).

Plain helpers for other modules (a transformer's Fisher works as well): ``fisher_norm(F, delta)``,
``kl_budget_radius(K, mu)``, ``schur_complement(F, idx)``, ``range_split(M, v)``, ``beta_sweep(...)``.

"Update subspace", precisely. F(theta) of a softmax policy is singular (shifting all logits of a context changes
nothing: F 1 = 0), so "F >= mu I" fails on R^d and the unrestricted Prop 3.2 is false: D = c 1 has K = 0 and
||D||_2 > 0. We use the subspace U = range(F) (eigenvectors with eigenvalue > d * eps * lambda_max), bound the
component P_U D, and report the null component ||D - P_U D|| separately (it does not move the policy to first
order). Callers may instead pass an explicit basis of U (then D must lie in it) or ``"span"`` (U = span(D)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float

from theory.check import Check, assumption_failed, decide, make_check, refine, register
from theory.errors import InputError, NonFiniteError, ShapeMismatchError, ZeroGapError
from theory.linalg import as_real_array, as_real_scalar, pow2_exponent, scale_pow2
from theory.policies import LogLinear, MLPPolicy, Policy, TabularSoftmax, kl_rows, m_project, tilt

__all__ = [
    "fisher_norm",
    "kl_budget_radius",
    "psd_rank_tol",
    "range_split",
    "schur_complement",
    "schur_complement_with_tol",
    "prop31",
    "lemF5",
    "lemF5_scaling",
    "lemF6",
    "lemF9",
    "kl_estimates",
    "count_band_violations",
    "prop32",
    "prop32_from_fisher",
    "eq7",
    "eq7_policy",
    "beta_sweep",
    "campaign_policies",
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


def _ldexp(x: float, e: int) -> float:
    """x * 2**e (inf where it overflows; NaN and inf as they are)."""
    if not math.isfinite(x):
        return x
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)


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


# ---------------------------------------------------------------------------------------------------------------
# Prop 3.1 — one-step policy-KL leash
# ---------------------------------------------------------------------------------------------------------------
def _class_name(policy: Policy) -> str:
    return type(policy).__name__


@register(
    "prop3.1",
    statement="KL(pi_theta+ || pi_theta) <= (1 + o(1)) KL(q~_beta || pi_theta), theta+ = M-projection of the tilt",
    gate="I",
    assumptions=("beta > 0", "q~ has full support", "the M-projection converged", "small step (o(1) term)"),
    exact=False,
    paper_ref="Prop. 3.1, Lemmas F.2-F.3",
)
def prop31(
    policy: Policy, theta: Any, R: Any = None, beta: float | None = None, *, q_tilde: Any = None, **mproj_kw: Any
) -> Check:
    """lhs = KL(pi+ || pi), rhs = KL(q~ || pi); ``ratio`` is the measured (1 + o(1)) factor.

    Either (R, beta) — then q~ = tilt(pi_theta, R, beta) — or an explicit ``q_tilde``. ``details``: the
    Pythagorean defect rhs - lhs - KL(q~ || pi+) (0 to rounding for tabular and log-linear classes; its sign on the
    MLP says whether the curved class beats or misses the identity), the optimizer residual and the class.
    ``holds`` means constant 1 (lhs <= rhs up to rounding and the optimizer residual); the as-stated bound allows
    (1 + o(1)), so on curved classes a violation at finite beta is a measurement, not a bug.

    Examples
    --------
    On a tabular softmax the M-projection of the tilt is the tilt itself, so the bound is attained (ratio 1):

    >>> import numpy as np
    >>> from theory.policies import TabularSoftmax
    >>> policy = TabularSoftmax(n_outputs=4)
    >>> c = prop31(policy, policy.init_theta(0), R=np.array([[1.0, 0.0, 0.0, -1.0]]), beta=2.0)
    >>> round(c.ratio, 6)
    1.0
    """
    rid = "prop3.1"
    th = policy._np(policy._t(theta))
    pi = policy.probs(th)
    if q_tilde is None:
        if R is None or beta is None:
            raise InputError("prop3.1 needs either (R, beta) or q_tilde")
        beta = as_real_scalar(beta, "beta")
        if not (beta > 0 and math.isfinite(beta)):
            return assumption_failed(rid, f"beta > 0 (got {beta})")
        q_tilde = tilt(pi, _table(R, pi.shape, "R"), beta)
    q = _table(q_tilde, pi.shape, "q_tilde")
    if np.any(q <= 0):
        return assumption_failed(rid, f"q~ has full support ({int(np.sum(q <= 0))} zero entries)")
    mp = m_project(policy, th, q, **mproj_kw)
    step = float(np.linalg.norm(mp.theta_plus - th))
    details = {
        "policy": _class_name(policy),
        "beta": float(beta) if beta is not None else math.nan,
        "residual": mp.residual,
        "iterations": mp.iterations,
        "step_norm": step,
        "method": mp.method,
    }
    lp, lp_plus, lq = policy.log_probs(th), policy.log_probs(mp.theta_plus), np.log(q)
    e_lp, e_plus = _logprob_err(policy, th), _logprob_err(policy, mp.theta_plus)
    lhs, e_lhs = _kl_with_err(policy.rho, lp_plus, lp, e_lp + e_plus)
    rhs, e_rhs = _kl_with_err(policy.rho, lq, lp, e_lp + 2 * EPS * float(np.abs(lq).max()))
    kl_q_plus = policy.kl_from(q, mp.theta_plus)
    details.update(kl_qtilde_plus=kl_q_plus, pythagorean_defect=rhs - lhs - kl_q_plus,
                   factor=lhs / rhs if rhs > 0 else math.nan)
    if not mp.converged:
        return assumption_failed(rid, f"the M-projection converged (residual {mp.residual:.3e})", lhs=lhs, rhs=rhs,
                                 details=details)
    # Error model: each KL from log-probability differences (``_kl_with_err``), and theta+ is the M-projection only
    # to its residual: ||theta+ - theta*|| <= residual / mu_F (strong convexity on range(F)), which moves
    # KL(pi_theta' || pi) by <= ||F|| step there, i.e. residual * step * kappa(F on its range).
    # A closed-form projection (tabular: pi+ = q~) is exact up to the rounding of theta+, already in e_lhs.
    e_mp = 0.0
    if mp.method != "closed-form":
        lam = np.linalg.eigvalsh(policy.fisher(mp.theta_plus))
        pos = lam[lam > psd_rank_tol(lam)]
        e_mp = mp.residual * step * (float(pos.max() / pos.min()) if pos.size else 1.0)
    tol = e_lhs + e_rhs + e_mp
    details["tol_m_projection"] = e_mp
    return make_check(rid, lhs, rhs, tol=tol, details=details)


@prop31.campaign
def _prop31_campaign(seed: int) -> Iterable[Check]:
    for policy, theta, R in campaign_policies(seed):
        for beta in (30.0, 3.0, 0.5):
            yield prop31(policy, theta, R, beta)
    # the pinned curved-class instance where the factor exceeds 1 at finite beta (KL(pi+||pi) = 1.05 KL(q~||pi))
    mlp = MLPPolicy(5, 2, 12, activation="tanh")
    yield prop31(mlp, mlp.init_theta(7, scale=2.0), np.random.default_rng(7).uniform(-1, 1, mlp.shape), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Lemma F.5 — second-order KL with a rigorous remainder
# ---------------------------------------------------------------------------------------------------------------
def _var_rows(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    m = np.sum(p * u, axis=1, keepdims=True)
    return np.sum(p * (u - m) ** 2, axis=1)


def _lemF5_parts(policy: Policy, theta: Any, delta: np.ndarray) -> dict[str, float]:
    """KL, the quadratic term, the two remainder terms, and the error bound of each (see ``lemF5``)."""
    th = policy._np(policy._t(theta))
    tp = th + delta
    J = policy.logit_jacobian(th)
    z0, z1 = policy.logits(th), policy.logits(tp)
    u = z1 - z0  # exact logit change (up to rounding)
    v = np.einsum("xyd,d->xy", J, delta)  # its linearisation J D
    p = policy.probs(th)
    rho = policy.rho
    lp0, lp1 = policy.log_probs(th), policy.log_probs(tp)
    err_z = _logit_err(policy, th, J) + _logit_err(policy, tp)
    err_lp = err_z + 8 * EPS * (float(np.abs(z0).max()) + float(np.abs(z1).max())
                                + float(np.abs(lp0).max()) + float(np.abs(lp1).max()))
    kl, e_kl = _kl_with_err(rho, lp1, lp0, err_lp)
    quad = 0.5 * float(delta @ policy.fisher(th) @ delta)
    # F = A^T A - B^T B (two GEMMs over Y outputs and d parameters, and J itself): D^T F D is off by
    # <= c (Y + d) eps D^T (|A|^T|A| + |B|^T|B|) D <= 2 c (Y + d) eps E_rho E_pi (|J| |D|)^2
    jd_abs = np.einsum("xyd,d->xy", np.abs(J), np.abs(delta))
    e_quad = 8 * (policy.n_outputs + policy.n_params) * EPS * float(rho @ np.sum(p * jd_abs**2, axis=1))
    err_u = err_z + EPS * float(np.abs(u).max())
    err_v = 2 * policy.n_params * EPS * float(jd_abs.max())
    rng_u = u.max(axis=1) - u.min(axis=1)
    range_term = float(rho @ rng_u**3) / 12.0
    e_range = float(rho @ (3 * (rng_u + 2 * err_u) ** 2 * 2 * err_u)) / 12.0 + 4 * EPS * range_term
    var_u, var_v = _var_rows(p, u), _var_rows(p, v)
    curv_term = 0.5 * abs(float(rho @ (var_u - var_v)))

    def mad(w: np.ndarray) -> np.ndarray:
        return np.sum(p * np.abs(w - np.sum(p * w, axis=1, keepdims=True)), axis=1)

    e_curv = 0.5 * float(rho @ (2 * err_u * mad(u) + err_u**2 + 2 * err_v * mad(v) + err_v**2
                                + 4 * policy.n_outputs * EPS * (var_u + var_v)))
    return {"kl": kl, "quad": quad, "range_term": range_term, "curvature_term": curv_term,
            "delta_norm": float(np.linalg.norm(delta)), "err_kl": e_kl, "err_quad": e_quad,
            "err_rhs": e_range + e_curv}


@register(
    "lemF.5",
    statement="|KL(pi_{theta+D} || pi_theta) - 1/2 D^T F(theta) D| <= E_rho[range_y(u)^3]/12 + 1/2|E_rho(Var_pi u - Var_pi JD)|"
              " = O(||D||^3), u = z(theta+D) - z(theta)",
    gate="I",
    assumptions=("softmax policy with twice-differentiable logits",),
    exact=True,
    paper_ref="Lemma F.5",
)
def lemF5(policy: Policy, theta: Any, delta: Any) -> Check:
    """Second-order expansion of the policy KL with a remainder bound we can prove for every softmax class.

    Proof. Per context, with logits z and logit change u, f(t) = logsumexp(z + t u) gives
    KL(softmax(z+u) || softmax(z)) = f(0) - f(1) + f'(1) = int_0^1 t f''(t) dt, and f''(0) = Var_pi(u). Hence
    |KL - Var_pi(u)/2| = |int_0^1 t (f''(t) - f''(0)) dt| <= max|f'''| / 3, and f'''(t) is the third central moment
    of u under pi_t, bounded by max|u - mean| * Var <= r * r^2/4 (Popoviciu), r = max_y u - min_y u. So
    |KL_x - Var(u)/2| <= r^3/12. Finally 1/2 D^T F D = 1/2 E_rho Var_pi(J D), so
    |KL - 1/2 D^T F D| <= E_rho r^3/12 + 1/2|E_rho(Var_pi u - Var_pi JD)|.
    For tabular and log-linear policies u = J D exactly and the second term is 0; for the MLP it is the logits'
    own curvature, u - J D = O(||D||^2), so the whole bound is O(||D||^3). ``details["cubic_ratio"]`` is the
    measured |KL - quad| / ||D||^3 (see ``lemF5_scaling`` for the curve as D shrinks).

    Examples
    --------
    >>> import numpy as np
    >>> from theory.policies import TabularSoftmax
    >>> policy = TabularSoftmax(n_outputs=4)
    >>> c = lemF5(policy, policy.init_theta(0), 1e-2 * np.array([1.0, -2.0, 0.5, 0.0]))
    >>> c.verdict, c.lhs < c.rhs  # |KL - D^T F D / 2| is inside the O(||D||^3) remainder bound
    ('holds', True)
    """
    d = as_real_array(delta, "delta").reshape(-1)
    if d.shape[0] != policy.n_params:
        raise ShapeMismatchError(f"delta has {d.shape[0]} entries, the policy has {policy.n_params} parameters")
    if not np.all(np.isfinite(d)):
        raise NonFiniteError("delta: non-finite entries")
    if not np.any(d):
        # D = 0 exactly: KL, the quadratic term and the remainder bound are all exactly 0 -- decided with tol 0
        policy._t(theta)  # theta is still validated
        return make_check("lemF.5", 0.0, 0.0, details={"policy": _class_name(policy), "delta_norm": 0.0,
                                                       "kl": 0.0, "quad": 0.0, "range_term": 0.0,
                                                       "curvature_term": 0.0, "cubic_ratio": math.nan,
                                                       "zero_step": True})
    parts = _lemF5_parts(policy, theta, d)
    lhs = abs(parts["kl"] - parts["quad"])
    rhs = parts["range_term"] + parts["curvature_term"]
    nd = parts["delta_norm"]
    # lhs / ||D||^3 without forming ||D||^3 (it underflows for ||D|| < ~1e-103)
    cubic = float(np.float64(lhs) / nd / nd / nd) if nd > 0 else math.nan
    details = {**parts, "policy": _class_name(policy), "cubic_ratio": cubic}
    # Error model (every term >= 0): the KL from log-probability differences carries its cancellation error
    # (``_kl_with_err``: relative ~ eps / ||D|| for a small step D), the quadratic term the rounding of F and of
    # D^T F D, |kl - quad| one more rounding, and the right side the rounding of u = z(theta + D) - z(theta) and
    # J D propagated through range^3 and the variances (``_lemF5_parts``).
    tol = (parts["err_kl"] + parts["err_quad"] + EPS * (parts["kl"] + abs(parts["quad"])) + parts["err_rhs"])
    return make_check("lemF.5", lhs, rhs, tol=tol, details=details)


@lemF5.campaign
def _lemF5_campaign(seed: int) -> Iterable[Check]:
    rng = np.random.default_rng(seed + 5)
    for policy, theta, _ in campaign_policies(seed):
        direction = rng.standard_normal(policy.n_params)
        direction /= np.linalg.norm(direction)
        for s in (1.0, 0.1, 0.01):
            yield lemF5(policy, theta, s * direction)


def lemF5_scaling(policy: Policy, theta: Any, direction: Any, scales: Sequence[float]) -> pd.DataFrame:
    """One row per scale s (D = s * direction): ||D||, KL, 1/2 D^T F D, |KL - quad|, |KL - quad| / ||D||^3 and the
    rigorous bound. A bounded, converging ``cubic_ratio`` as s -> 0 is the O(||D||^3) of Lemma F.5, measured."""
    u = np.asarray(direction, dtype=np.float64).reshape(-1)
    rows = []
    for s in scales:
        c = lemF5(policy, theta, s * u)
        rows.append({"scale": float(s), "delta_norm": c.details["delta_norm"], "kl": c.details["kl"],
                     "quad": c.details["quad"], "abs_remainder": c.lhs, "bound": c.rhs,
                     "cubic_ratio": c.details["cubic_ratio"], "holds": c.holds})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# Lemma F.6 — curvature under the tilted target vs the Fisher
# ---------------------------------------------------------------------------------------------------------------
@register(
    "lemF.6",
    statement="||H_q~ - F||_op <= 2 L TV(q~, pi_theta) <= L sqrt(2 KL(q~ || pi_theta)), L = max ||hess log pi||_op",
    gate="I",
    assumptions=("||hess log pi(y|x)||_op <= L at theta for every (x, y)",),
    exact=True,
    paper_ref="Lemma F.6",
)
def lemF6(policy: Policy, theta: Any, q_tilde: Any = None, *, R: Any = None, beta: float | None = None,
          L: float | None = None) -> Check:
    """lhs = ||H_q~ - F||_op with H_q~ = -E_rho E_q~[hess log pi]; middle 2 L TV; rhs = L sqrt(2 KL(q~ || pi)).

    H_q~ - F = sum_{x,y} rho(x) (pi - q~)(y|x) hess log pi(y|x) exactly (F = -E_pi[hess log pi]), so the first
    inequality is the triangle inequality and only L *at theta* is needed; the second is Pinsker with Jensen over
    contexts (E_rho TV_x <= E_rho sqrt(KL_x/2) <= sqrt(E_rho KL_x / 2)). For tabular and log-linear softmax,
    hess log pi(y|x) = -F_x for every y, so H_q~ = F and lhs = 0 (to rounding): the lemma is trivial there and
    nontrivial only for the MLP. L is computed exactly (eigenvalues of every per-(x, y) Hessian); a caller-supplied
    L is verified when the policy is small enough, and an L below the true maximum fails the assumption.

    Examples
    --------
    Tabular softmax: every Hessian of log pi is -F_x, so H_q~ = F and the left side is 0 up to rounding:

    >>> import numpy as np
    >>> from theory.policies import TabularSoftmax
    >>> policy = TabularSoftmax(n_outputs=4)
    >>> c = lemF6(policy, policy.init_theta(0), R=np.array([[1.0, 0.0, 0.0, -1.0]]), beta=2.0)
    >>> c.verdict, c.lhs < 1e-12 < c.rhs
    ('holds', True)
    """
    rid = "lemF.6"
    pi = policy.probs(theta)
    if q_tilde is None:
        if R is None or beta is None:
            raise InputError("lemF.6 needs q_tilde or (R, beta)")
        q_tilde = tilt(pi, _table(R, pi.shape, "R"), as_real_scalar(beta, "beta"))
    q = _table(q_tilde, pi.shape, "q_tilde")
    diff = policy.weighted_hessian_logp(theta, policy.rho[:, None] * (pi - q))
    lhs = float(np.linalg.norm(diff, 2))
    L_true = policy.max_hessian_logp_norm(theta)
    if L is None:
        L = L_true
    elif not (math.isfinite(L := as_real_scalar(L, "L")) and L >= 0):
        raise InputError(f"L must be a finite number >= 0 (a bound on ||hess log pi||_op), got {L}")
    elif L < L_true * (1 - 1e-12):
        return assumption_failed(rid, f"||hess log pi||_op <= L at theta (L = {L:.6g} < max = {L_true:.6g})")
    tv = policy.tv(q, theta)
    th = policy._np(policy._t(theta))
    with np.errstate(divide="ignore"):
        lq = np.log(q)
    kl, e_kl = _kl_with_err(policy.rho, lq, policy.log_probs(th),
                            _logprob_err(policy, th) + 2 * EPS * float(np.abs(lq[np.isfinite(lq)]).max(initial=0.0)))
    mid = 2.0 * L * tv
    rhs = L * math.sqrt(2.0 * kl)
    # Error model: the Hessians (and L, from their eigenvalues) carry ~ d eps ||hess|| each, summed over (x, y)
    # with weights |pi - q~| <= 2; TV is a sum of Y terms |q - pi| <= 1 (relative Y eps, plus eps per entry); the KL
    # from log-probability differences carries its cancellation error e_kl (``_kl_with_err``), which moves
    # L sqrt(2 KL) by <= L (sqrt(2 (KL + e_kl)) - sqrt(2 KL)).
    e_rhs = L * (math.sqrt(2.0 * (kl + e_kl)) - math.sqrt(2.0 * kl)) + 4 * EPS * rhs
    tol = (64 * EPS * policy.n_params * (L + float(np.abs(diff).max())) + 4 * EPS * policy.n_outputs * (mid + L)
           + e_rhs)
    links = {"||H - F|| <= 2 L TV": decide(lhs, mid, tol), "2 L TV <= L sqrt(2 KL)": decide(mid, rhs, tol)}
    details = {"policy": _class_name(policy), "L": L, "tv": tv, "kl_qtilde_pi": kl, "middle_2L_TV": mid,
               "lhs_le_middle": links["||H - F|| <= 2 L TV"] != "violated",
               "middle_le_rhs": links["2 L TV <= L sqrt(2 KL)"] != "violated"}
    return refine(make_check(rid, lhs, rhs, tol=tol, details=details), links)


@lemF6.campaign
def _lemF6_campaign(seed: int) -> Iterable[Check]:
    for policy, theta, R in campaign_policies(seed):
        for beta in (10.0, 1.0):
            yield lemF6(policy, theta, R=R, beta=beta)


# ---------------------------------------------------------------------------------------------------------------
# Lemma F.9 — clipping and the batch KL estimate (beta = 0)
# ---------------------------------------------------------------------------------------------------------------
def _ratios(ratios: Any) -> list[np.ndarray]:
    if isinstance(ratios, np.ndarray) and ratios.ndim == 2:
        seqs = [row for row in ratios]
    elif isinstance(ratios, np.ndarray) and ratios.ndim == 1:
        seqs = [ratios]
    else:
        seqs = [np.asarray(s, dtype=np.float64).reshape(-1) for s in ratios]
    if not seqs:
        raise InputError("ratios: empty batch (no sequences)")
    out = []
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(s)):
            raise NonFiniteError(f"ratios: sequence {i} has non-finite token ratios")
        if np.any(s <= 0):
            raise InputError(f"ratios: sequence {i} has non-positive token ratios (a ratio pi+/pi must be > 0)")
        out.append(s)
    return out


def count_band_violations(ratios: Any, eps: float) -> int:
    """Number of token ratios outside [1 - eps, 1 + eps] (PPO/DAPO clipping does not prevent these)."""
    return int(sum(np.sum((s < 1 - eps) | (s > 1 + eps)) for s in _ratios(ratios)))


def kl_estimates(ratios: Any) -> dict[str, float]:
    """Batch KL estimates from token ratios r_t = pi_theta+(y_t) / pi_theta(y_t), tokens sampled from pi_theta.

    - ``k1``: mean over sequences of sum_t (-log r_t) — the per-token log-ratio sum;
    - ``k3``: mean over sequences of sum_t (r_t - 1 - log r_t) >= 0 (Schulman's k3, nonnegative, lower variance);
    both estimate the sequence-level KL(pi_theta || pi_theta+) under samples from pi_theta (the reverse direction
    of Prop 3.1's KL; the two agree to second order in the step).
    - ``small_step``: mean over sequences of sum_t (r_t - 1)^2 / 2, the second-order term both reduce to (k3 =
      (r-1)^2/2 + O((r-1)^3)); this is the quantity to test for O(eps^2) scaling;
    - ``mean_len``: E[T].
    """
    seqs = _ratios(ratios)
    k1 = np.mean([float(np.sum(-np.log(s))) for s in seqs])
    k3 = np.mean([float(np.sum(s - 1.0 - np.log(s))) for s in seqs])
    ss = np.mean([float(np.sum(0.5 * (s - 1.0) ** 2)) for s in seqs])
    return {"k1": float(k1), "k3": float(k3), "small_step": float(ss),
            "mean_len": float(np.mean([s.size for s in seqs]))}


@register(
    "lemF.9",
    statement="all token ratios in [1-eps, 1+eps] => batch KL estimate <= E[T] max(-log(1-eps), log(1+eps))",
    gate="I",
    assumptions=("every token ratio r_t lies in [1 - eps, 1 + eps]",),
    exact=True,
    paper_ref="Lemma F.9",
)
def lemF9(ratios: Any, eps: float) -> Check:
    """lhs = |k1| (per-token log-ratio sums, averaged over sequences); rhs = E[T] max(-log(1-eps), log(1+eps)).

    Ragged batches are fine (a list of 1-d arrays). If any ratio leaves the band the assumption fails and
    ``details["n_violations"]`` says how many. ``details`` also carries k3 (<= E[T] (-eps - log(1-eps)) under the
    band), the O(eps^2) small-step quantity and its band bound E[T] max((r-1)^2/2) = E[T] eps^2 / 2.

    Examples
    --------
    >>> import numpy as np
    >>> lemF9([np.array([0.95, 1.05, 1.0]), np.array([0.9, 1.1])], eps=0.2).verdict
    'holds'
    >>> lemF9([np.array([0.5, 1.0])], eps=0.2).verdict  # a token ratio outside [0.8, 1.2]
    'assumption-failed'
    """
    rid = "lemF.9"
    if not (isinstance(eps, (int, float, np.floating)) and 0 < eps < 1):
        raise InputError(f"eps must be in (0, 1), got {eps!r}")
    est = kl_estimates(ratios)
    n_viol = count_band_violations(ratios, eps)
    n_tok = int(sum(s.size for s in _ratios(ratios)))
    c = max(-math.log1p(-eps), math.log1p(eps))
    rhs = est["mean_len"] * c
    details = {**est, "eps": float(eps), "n_violations": n_viol, "n_tokens": n_tok,
               "violation_fraction": n_viol / max(n_tok, 1),
               "k3_band_bound": est["mean_len"] * (-eps - math.log1p(-eps)),
               "small_step_band_bound": est["mean_len"] * eps**2 / 2}
    if n_viol:
        return assumption_failed(rid, f"every token ratio lies in [1-eps, 1+eps] ({n_viol} of {n_tok} outside)",
                                 lhs=abs(est["k1"]), rhs=rhs, details=details)
    # Error model: every log r_t is within eps |log r_t| (+ eps) of the truth, a sequence sum of T terms adds
    # T eps sum|log r_t|, the batch mean one more eps; the band constants -log(1-eps), log(1+eps) are log1p's
    # (relative eps) and E[T] is exact up to one rounding.
    seqs = _ratios(ratios)
    abs_logs = float(np.mean([(s.size + 2) * float(np.sum(np.abs(np.log(s)) + 1.0)) for s in seqs]))
    tol = 4 * EPS * (abs_logs + 2 * rhs)
    chk = make_check(rid, abs(est["k1"]), rhs, tol=tol, details=details)
    k3_tol = 4 * EPS * (abs_logs + n_tok + 2 * details["k3_band_bound"])
    return refine(chk, {"k3 <= E[T] (-eps - log(1 - eps))": decide(est["k3"], details["k3_band_bound"], k3_tol)})


@lemF9.campaign
def _lemF9_campaign(seed: int) -> Iterable[Check]:
    """Token ratios of a tabular softmax step: sample sequences from pi, ratios pi+/pi, for steps of several sizes;
    some steps stay in the band, larger ones leave it (assumption failed, with the count)."""
    rng = np.random.default_rng(seed + 9)
    n = 50
    theta = rng.standard_normal(n)
    direction = rng.standard_normal(n)
    pol = TabularSoftmax(n)
    for s in (0.005, 0.05, 0.5):
        lr = (pol.log_probs(theta + s * direction) - pol.log_probs(theta))[0]
        p = pol.probs(theta)[0]
        seqs = [np.exp(lr[rng.choice(n, size=int(rng.integers(5, 40)), p=p)]) for _ in range(32)]
        yield lemF9(seqs, 0.2)


# ---------------------------------------------------------------------------------------------------------------
# Prop 3.2 — KL leash => weight bound
# ---------------------------------------------------------------------------------------------------------------
def prop32_from_fisher(F: Any, delta: Any, K: float, *, subspace: Any = None, K_err: float = 0.0,
                       F_err: float = 0.0) -> Check:
    """Prop 3.2 from a Fisher matrix, an update and a KL budget K (e.g. K = KL(pi+ || pi) measured).

    lhs = ||P_U D||_2, rhs = sqrt(2K / mu_U), mu_U = lambda_min(F) on the update subspace U (module docstring;
    default U = range(F)). ``details``: Fisher norm ||D||_F(theta) and sqrt(2K) (the first claim), their factor,
    the raw ||D||_2 and the off-subspace norm (the unrestricted statement's lhs: it can exceed rhs).
    The step ||P_U D||_2 <= ||D||_F / sqrt(mu_U) is exact; ||D||_F <= sqrt(2K) holds only to first order
    (1/2 D^T F D = K (1 + O(||D||))), hence ``exact=False``. ``K_err``: a bound on the error of K when it was
    computed rather than given (``prop32`` passes the rounding of a KL from log-probability differences);
    ``F_err`` likewise for F (``Policy.fisher_with_error``): it widens the rank tolerance and mu's error.
    """
    rid = "prop3.2"
    A0 = _sym(F)
    d0 = _vec(delta, A0.shape[0])
    K = as_real_scalar(K, "K")
    if not (math.isfinite(K) and K >= 0):
        raise InputError(f"KL budget K must be finite and >= 0, got {K}")
    # Scale first (exact): F by 2^-eF, D by 2^-eD, K by 2^-(eF + 2 eD) leave the verdict unchanged and keep every
    # product finite; lhs and rhs come back in D's units.
    eF, eD = pow2_exponent(A0), pow2_exponent(d0)
    A, d, K_s = scale_pow2(A0, eF), scale_pow2(d0, eD), math.ldexp(K, -eF - 2 * eD)
    F_err_s = math.ldexp(float(F_err), -eF)
    rank_tol = psd_rank_tol(np.linalg.eigvalsh(A)) + F_err_s if F_err_s else None
    d_on, d_off, mu, failed, dim, e_mu, e_proj = _subspace_mu(A, d, subspace, rank_tol)
    fn = fisher_norm(A0, d0)
    mu_u = math.ldexp(mu, eF) if math.isfinite(mu) else mu
    details = {"K": float(K), "mu": mu_u, "subspace_dim": dim, "fisher_norm": fn, "sqrt_2K": math.sqrt(2 * K),
               "fisher_factor": fn / math.sqrt(2 * K) if K > 0 else (0.0 if fn == 0 else math.inf),
               "delta_norm": float(np.linalg.norm(d0)), "off_subspace_norm": math.ldexp(float(np.linalg.norm(d_off)), eD),
               "first_order_radius": fn / math.sqrt(mu_u) if mu_u and mu_u > 0 else math.nan}
    lhs = float(np.linalg.norm(d_on))
    failed = failed or _not_psd(A, err=F_err_s)
    if failed:
        return assumption_failed(rid, failed, lhs=math.ldexp(lhs, eD), details=details)
    rhs = math.sqrt(2.0 * K_s / mu)
    # Error model: lhs is a projection, off by ||D|| (e_proj + n eps) (the projector onto U moves by e_proj, see
    # _subspace_mu); rhs = sqrt(2K / mu) with mu known to e_mu and K to K_err.
    K_err_s = math.ldexp(float(K_err), -eF - 2 * eD)
    tol = float(np.linalg.norm(d)) * (e_proj + 8 * A.shape[0] * EPS) + _radius_tol(2 * K_s, 2 * K_err_s, mu, e_mu)
    return make_check(rid, lhs, rhs, tol=tol, details=details, exponent=eD)


@register(
    "prop3.2",
    statement="K = KL(pi+ || pi), F >= mu I on the update subspace => ||D||_F(theta) <= sqrt(2K)(1+o(1)), "
              "||P_U D||_2 <= sqrt(2K/mu)(1+o(1))",
    gate="I",
    assumptions=("F(theta) >= mu I with mu > 0 on the update subspace U", "small K (o(1) term)"),
    exact=False,
    paper_ref="Prop. 3.2",
)
def prop32(policy: Policy, theta: Any, theta_plus: Any, *, subspace: Any = None) -> Check:
    """Prop 3.2 on a policy step theta -> theta_plus, with K = KL(pi_theta+ || pi_theta) and F = F(theta); K's
    rounding (a KL from log-probability differences, ``_kl_with_err``) enters the tolerance.

    Examples
    --------
    >>> import numpy as np
    >>> from theory.policies import TabularSoftmax
    >>> policy = TabularSoftmax(n_outputs=4)
    >>> theta = policy.init_theta(0)
    >>> c = prop32(policy, theta, theta + 1e-2 * np.array([1.0, -2.0, 0.5, 0.0]))
    >>> c.verdict, round(c.ratio, 2)  # ||P_U D||_2 against sqrt(2K / mu) for a small step
    ('holds', 0.98)
    """
    th = policy._np(policy._t(theta))
    tp = policy._np(policy._t(theta_plus, "theta_plus"))
    K, K_err = _kl_with_err(policy.rho, policy.log_probs(tp), policy.log_probs(th),
                            _logprob_err(policy, th) + _logprob_err(policy, tp))
    F, F_err = policy.fisher_with_error(th)
    c = prop32_from_fisher(F, tp - th, K, subspace=subspace, K_err=K_err, F_err=F_err)
    return dataclasses.replace(c, details={**c.details, "policy": _class_name(policy)})


@prop32.campaign
def _prop32_campaign(seed: int) -> Iterable[Check]:
    for policy, theta, R in campaign_policies(seed):
        for beta in (100.0, 10.0):
            mp = m_project(policy, theta, tilt(policy.probs(theta), R, beta))
            yield prop32(policy, theta, mp.theta_plus)


# ---------------------------------------------------------------------------------------------------------------
# Eq 7 / Lemma F.10 — per-block bound through the Schur complement
# ---------------------------------------------------------------------------------------------------------------
@register(
    "eq7",
    statement="delta_W = 1/2 vec(DW)^T S_W vec(DW) <= 1/2 D^T F D and ||DW||_2 <= ||P DW||_F <= sqrt(2 delta_W / mu_W)",
    gate="I",
    assumptions=("mu_W = lambda_min(S_W) > 0 on the update subspace of the block",),
    exact=True,
    paper_ref="Eq. 7, Lemma F.10",
)
def eq7(F: Any, delta: Any, block: Any, *, shape: tuple[int, int] | None = None, K: float | None = None,
        subspace: Any = None, F_err: float = 0.0) -> Check:
    """Per-block leash. S_W = ``schur_complement(F, block)``; delta_W = 1/2 x^T S_W x with x = vec(DW);
    mu_W = smallest nonzero eigenvalue of S_W with x projected onto range(S_W) (or an explicit ``subspace``
    basis in the block's coordinates / ``"full"`` / ``"span"``, as for Prop 3.2).

    lhs = ||P x||_2 = ||P DW||_F, rhs = sqrt(2 delta_W / mu_W): exact (Rayleigh quotient). ``holds`` also requires
    delta_W <= 1/2 D^T F D (variational property of the Schur complement) and, when ``shape`` is given,
    ||DW||_2 <= ||DW||_F. The paper's "delta_W <= K" additionally needs 1/2 D^T F D <= K, true only to first order
    (``details["half_quad_le_K"]`` reports it when K is given). ``F_err``: a bound on ||F_computed - F_exact||_2
    when F was computed (``Policy.fisher_with_error``; ``eq7_policy`` passes it), else F is taken as exact.

    Examples
    --------
    Block {0, 1} of a diagonal Fisher: S_W = diag(1, 4), x = (1, 1), delta_W = 5/2, mu_W = 1, so
    ||x|| = sqrt(2) <= sqrt(2 delta_W / mu_W) = sqrt(5):

    >>> import numpy as np
    >>> c = eq7(np.diag([1.0, 4.0, 1.0]), np.array([1.0, 1.0, 0.5]), [0, 1])
    >>> c.verdict, round(c.lhs ** 2, 12), round(c.rhs ** 2, 12)
    ('holds', 2.0, 5.0)
    """
    rid = "eq7"
    A0 = _sym(F)
    d0 = _vec(delta, A0.shape[0])
    w = _index(block, A0.shape[0])
    # Scale first (exact): F by 2^-eF and D by 2^-eD change neither verdict (rhs and lhs both scale with D, the
    # F scale cancels in delta_W / mu_W) nor any bit of the decision, and keep every product finite.
    eF, eD = pow2_exponent(A0), pow2_exponent(d0)
    A, d = scale_pow2(A0, eF), scale_pow2(d0, eD)
    F_err_s = math.ldexp(float(F_err), -eF)
    S, s_tol = schur_complement_with_tol(A, w, F_err_s)
    x = d[w]
    xx = float(x @ x)
    dW = 0.5 * float(x @ S @ x)
    half_quad = 0.5 * float(d @ A @ d)
    x_on, x_off, mu, failed, dim, e_mu, e_proj = _subspace_mu(S, x, subspace, s_tol)
    eq = eF + 2 * eD  # units of delta_W
    details: dict[str, Any] = {"delta_W": _ldexp(dW, eq), "half_quad": _ldexp(half_quad, eq),
                               "mu_W": _ldexp(mu, eF), "block_size": int(w.size), "subspace_dim": dim,
                               "frobenius": _ldexp(math.sqrt(xx), eD),
                               "off_subspace_norm": _ldexp(float(np.linalg.norm(x_off)), eD)}
    # x^T S x and D^T F D: S_W carries rounding s_tol (schur_complement_with_tol), each product n eps |x|^T|M||x|
    e_q = xx * s_tol + 4 * w.size * EPS * float(np.abs(x) @ np.abs(S) @ np.abs(x))
    scale = (64 * EPS * A.shape[0] * float(np.abs(d) @ np.abs(A) @ np.abs(d)) + F_err_s * float(d @ d) + e_q) / 2
    links = {"delta_W <= 1/2 D^T F D": decide(dW, half_quad, scale)}
    details["delta_W_le_half_quad"] = links["delta_W <= 1/2 D^T F D"] != "violated"
    if shape is not None:
        if int(np.prod(shape)) != w.size:
            raise ShapeMismatchError(f"block shape {shape} does not match the {w.size} selected parameters")
        spec = float(np.linalg.norm(x.reshape(shape), 2))
        details["spectral"] = _ldexp(spec, eD)
        links["||DW||_2 <= ||DW||_F"] = decide(spec, math.sqrt(xx), 64 * EPS * max(shape) * math.sqrt(xx))
    if K is not None:
        details["K"] = float(K)
        details["half_quad_le_K"] = bool(details["half_quad"] <= K)
    lhs = float(np.linalg.norm(x_on))
    failed = failed or _not_psd(A, err=F_err_s)
    if failed:
        return assumption_failed(rid, failed, lhs=_ldexp(lhs, eD), details=details)
    rhs = math.sqrt(2 * max(dW, 0.0) / mu)
    # Error model: lhs = ||P x|| with the projector onto range(S_W) known to e_proj; rhs = sqrt(x^T S x / mu) with
    # x^T S x known to e_q and mu to e_mu = s_tol (both finite: mu > 3 s_tol is required above). No division by
    # rhs, so a vanishing delta_W gives a small tolerance, not an infinite one.
    tol = math.sqrt(xx) * (e_proj + 8 * w.size * EPS) + _radius_tol(2 * dW, e_q, mu, e_mu)
    return refine(make_check(rid, lhs, rhs, tol=tol, details=details, exponent=eD), links)


def eq7_policy(policy: Policy, theta: Any, theta_plus: Any, block: str, *, subspace: Any = None) -> Check:
    """``eq7`` for a named block of a policy (``policy.blocks[block]``), with K = KL(pi+ || pi) in details."""
    if block not in policy.blocks:
        raise InputError(f"unknown block {block!r}; the policy has {sorted(policy.blocks)}")
    th = np.asarray(theta, dtype=np.float64)
    tp = np.asarray(theta_plus, dtype=np.float64)
    shp = policy.block_shapes[block]
    F, F_err = policy.fisher_with_error(th)
    c = eq7(F, tp - th, policy.blocks[block], shape=shp if len(shp) == 2 else None,
            K=policy.kl(tp, th), subspace=subspace, F_err=F_err)
    return dataclasses.replace(c, details={**c.details, "policy": _class_name(policy), "block": block})


@eq7.campaign
def _eq7_campaign(seed: int) -> Iterable[Check]:
    for policy, theta, R in campaign_policies(seed):
        mp = m_project(policy, theta, tilt(policy.probs(theta), R, 10.0))
        for name in policy.blocks:
            yield eq7_policy(policy, theta, mp.theta_plus, name)
        if isinstance(policy, TabularSoftmax):  # the first context's logits as a block
            yield eq7(policy.fisher(theta), mp.theta_plus - theta, slice(0, policy.n_outputs))


# ---------------------------------------------------------------------------------------------------------------
# The beta sweep behind the plots and the tutorial
# ---------------------------------------------------------------------------------------------------------------
def beta_sweep(policy: Policy, theta: Any, R: Any, betas: Sequence[float], **mproj_kw: Any) -> pd.DataFrame:
    """One row per beta: the tilt q~_beta of pi_theta, its M-projection theta+, and both leashes.

    Columns: beta, kl_qtilde_pi (= KL(q~||pi), Prop 3.1 rhs), kl_step (= K = KL(pi+||pi), lhs), ratio_31,
    kl_qtilde_plus, pythagorean_defect, delta_norm (||P_U D||_2), off_subspace_norm, mu, radius (sqrt(2K/mu)),
    ratio_32, fisher_norm, sqrt_2K, residual, converged.
    """
    th = np.asarray(theta, dtype=np.float64)
    pi = policy.probs(th)
    F = policy.fisher(th)
    rows = []
    for beta in betas:
        q = tilt(pi, np.asarray(R, dtype=np.float64).reshape(pi.shape), float(beta))
        mp = m_project(policy, th, q, **mproj_kw)
        K = policy.kl(mp.theta_plus, th)
        rhs31 = policy.kl_from(q, th)
        klp = policy.kl_from(q, mp.theta_plus)
        c32 = prop32_from_fisher(F, mp.theta_plus - th, K)
        rows.append({
            "beta": float(beta), "kl_qtilde_pi": rhs31, "kl_step": K,
            "ratio_31": K / rhs31 if rhs31 > 0 else math.nan, "kl_qtilde_plus": klp,
            "pythagorean_defect": rhs31 - K - klp, "delta_norm": c32.lhs,
            "off_subspace_norm": c32.details["off_subspace_norm"], "mu": c32.details["mu"], "radius": c32.rhs,
            "ratio_32": c32.ratio, "fisher_norm": c32.details["fisher_norm"], "sqrt_2K": c32.details["sqrt_2K"],
            "residual": mp.residual, "converged": mp.converged,
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# Seeded instance families
# ---------------------------------------------------------------------------------------------------------------
def campaign_policies(seed: int, *, mlp_outputs: int = 30) -> list[tuple[Policy, np.ndarray, np.ndarray]]:
    """(policy, theta, R) triples for the campaigns: a 2-context tabular softmax (Y = 8), a log-linear policy
    (3 contexts, Y = 12, d = 4 features) and a curved MLP (6 contexts, hidden 3, ``mlp_outputs`` outputs, tanh;
    hidden + 1 < contexts so the class is a proper curved subset). Rewards are uniform in [-1, 1]."""
    rng = np.random.default_rng(seed)
    tab = TabularSoftmax(8, n_contexts=2)
    ll = LogLinear(rng.standard_normal((3, 12, 4)))
    mlp = MLPPolicy(6, 3, mlp_outputs, activation="tanh")
    out = []
    for pol in (tab, ll, mlp):
        theta = pol.init_theta(int(rng.integers(2**31))) if isinstance(pol, MLPPolicy) else rng.standard_normal(pol.n_params)
        out.append((pol, theta, rng.uniform(-1.0, 1.0, size=pol.shape)))
    return out
