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

from theory.check import Check, assumption_failed, make_check, register
from theory.errors import InputError, NonFiniteError, ShapeMismatchError, ZeroGapError
from theory.policies import LogLinear, MLPPolicy, Policy, TabularSoftmax, m_project, tilt

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
    A = np.asarray(F, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ShapeMismatchError(f"{name} must be a square matrix, got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise NonFiniteError(f"{name}: non-finite entries")
    return 0.5 * (A + A.T)


def _vec(v: Any, n: int, name: str = "delta") -> Float[np.ndarray, " n"]:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.shape[0] != n:
        raise ShapeMismatchError(f"{name} has {a.shape[0]} entries, the Fisher is {n} x {n}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name}: non-finite entries")
    return a


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


def schur_complement_with_tol(F: Any, idx: Any) -> tuple[np.ndarray, float]:
    """``schur_complement`` plus the rank tolerance its eigenvalues carry: rounding in F_{W~W} F_{~W~W}^+ F_{~W W}
    is about n * eps * ||F|| * kappa(F_{~W~W} on its range), far above n * eps * ||S_W|| when F is ill conditioned,
    so eigenvalues of S_W below that level are treated as zero."""
    A = _sym(F)
    n = A.shape[0]
    w = _index(idx, n)
    rest = np.setdiff1d(np.arange(n), w)
    S = schur_complement(A, w)
    normF = float(np.max(np.abs(np.linalg.eigvalsh(A)))) if n else 0.0
    kappa = 1.0
    if rest.size:
        lam = np.linalg.eigvalsh(A[np.ix_(rest, rest)])
        pos = lam[lam > psd_rank_tol(lam)]
        kappa = float(pos.max() / pos.min()) if pos.size else 1.0
    tol = max(n * EPS * normF * kappa, psd_rank_tol(np.linalg.eigvalsh(S)) if S.size else 0.0)
    return S, tol


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


def _subspace_mu(F: np.ndarray, delta: np.ndarray, subspace: Any, tol: float | None = None) -> tuple[np.ndarray, np.ndarray, float, str | None, int]:
    """(delta_on_U, delta_off_U, mu_U, failed_assumption, dim U) for the update-subspace options."""
    nd = float(np.linalg.norm(delta))
    if subspace is None or (isinstance(subspace, str) and subspace == "range"):
        dr, dn, mu, rank = range_split(F, delta, tol)
        if rank == 0:
            return dr, dn, 0.0, ("mu > 0: the curvature matrix (F, or S_W for a block) is numerically 0 — no curvature "
                                 "of its own (for a block: fully absorbed by the other parameters)"), 0
        return dr, dn, mu, None, rank
    if isinstance(subspace, str) and subspace == "full":
        lam = np.linalg.eigvalsh(F)
        mu = float(lam.min())
        if mu <= max(psd_rank_tol(lam), tol or 0.0):
            return delta, 0 * delta, mu, (
                f"F(theta) >= mu I with mu > 0 on all of R^d (lambda_min(F) = {mu:.3e}: F is singular)"), F.shape[0]
        return delta, 0 * delta, mu, None, F.shape[0]
    if isinstance(subspace, str) and subspace == "span":
        if nd == 0:
            return delta, delta, math.nan, "the update is nonzero (span(D) needs D != 0)", 0
        mu = float(delta @ F @ delta) / nd**2
        if mu <= F.shape[0] * EPS * max(np.abs(F).max(), np.finfo(float).tiny):
            return delta, 0 * delta, mu, (
                f"F(theta) >= mu I with mu > 0 on span(D) (D^T F D / ||D||^2 = {mu:.3e}: D is a null direction)"), 1
        return delta, 0 * delta, mu, None, 1
    B = np.asarray(subspace, dtype=np.float64)
    if B.ndim == 1:
        B = B[:, None]
    if B.shape[0] != F.shape[0]:
        raise ShapeMismatchError(f"subspace basis has {B.shape[0]} rows, the Fisher is {F.shape[0]} x {F.shape[0]}")
    Q, _ = np.linalg.qr(B)
    d_on = Q @ (Q.T @ delta)
    off = float(np.linalg.norm(delta - d_on))
    if off > 1e-10 * max(nd, 1e-300):
        return d_on, delta - d_on, math.nan, f"the update lies in the given subspace (off-subspace norm {off:.3e})", Q.shape[1]
    lam = np.linalg.eigvalsh(Q.T @ F @ Q)
    mu = float(lam.min())
    if mu <= psd_rank_tol(np.linalg.eigvalsh(F)):
        return d_on, delta - d_on, mu, f"F(theta) >= mu I with mu > 0 on the given subspace (lambda_min = {mu:.3e})", Q.shape[1]
    return d_on, delta - d_on, mu, None, Q.shape[1]


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
    pi = policy.probs(theta)
    if q_tilde is None:
        if R is None or beta is None:
            raise InputError("prop3.1 needs either (R, beta) or q_tilde")
        if not (beta > 0 and math.isfinite(beta)):
            return assumption_failed(rid, f"beta > 0 (got {beta})")
        q_tilde = tilt(pi, np.asarray(R, dtype=np.float64).reshape(pi.shape), beta)
    q = np.asarray(q_tilde, dtype=np.float64).reshape(pi.shape)
    if np.any(q <= 0):
        return assumption_failed(rid, f"q~ has full support ({int(np.sum(q <= 0))} zero entries)")
    mp = m_project(policy, theta, q, **mproj_kw)
    lhs = policy.kl(mp.theta_plus, theta)
    rhs = policy.kl_from(q, theta)
    kl_q_plus = policy.kl_from(q, mp.theta_plus)
    step = float(np.linalg.norm(mp.theta_plus - np.asarray(theta, dtype=np.float64)))
    details = {
        "policy": _class_name(policy),
        "beta": float(beta) if beta is not None else math.nan,
        "kl_qtilde_plus": kl_q_plus,
        "pythagorean_defect": rhs - lhs - kl_q_plus,
        "factor": lhs / rhs if rhs > 0 else math.nan,
        "residual": mp.residual,
        "iterations": mp.iterations,
        "step_norm": step,
        "method": mp.method,
    }
    if not mp.converged:
        return assumption_failed(rid, f"the M-projection converged (residual {mp.residual:.3e})", lhs=lhs, rhs=rhs,
                                 details=details)
    # pi+ and q~ agree to relative rounding eps * |log q~| per entry; that moves a KL by <= eps |log q~| sqrt(2 KL)
    # (Cauchy-Schwarz), plus the optimizer's residual times the step
    scale = 1.0 + float(np.abs(np.log(q)).max())
    tol = 64 * EPS * scale * (math.sqrt(2 * rhs) + rhs) + mp.residual * step
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
    th = np.asarray(theta, dtype=np.float64)
    z0 = policy.logits(th)
    u = policy.logits(th + delta) - z0  # exact logit change
    v = np.einsum("xyd,d->xy", policy.logit_jacobian(th), delta)  # its linearisation J D
    p = policy.probs(th)
    kl = policy.kl(th + delta, th)
    quad = 0.5 * float(delta @ policy.fisher(th) @ delta)
    rng_u = u.max(axis=1) - u.min(axis=1)
    range_term = float(policy.rho @ rng_u**3) / 12.0
    curv_term = 0.5 * abs(float(policy.rho @ (_var_rows(p, u) - _var_rows(p, v))))
    return {"kl": kl, "quad": quad, "range_term": range_term, "curvature_term": curv_term,
            "delta_norm": float(np.linalg.norm(delta))}


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
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    if d.shape[0] != policy.n_params:
        raise ShapeMismatchError(f"delta has {d.shape[0]} entries, the policy has {policy.n_params} parameters")
    if not np.all(np.isfinite(d)):
        raise NonFiniteError("delta: non-finite entries")
    parts = _lemF5_parts(policy, theta, d)
    lhs = abs(parts["kl"] - parts["quad"])
    rhs = parts["range_term"] + parts["curvature_term"]
    nd = parts["delta_norm"]
    details = {**parts, "policy": _class_name(policy), "cubic_ratio": lhs / nd**3 if nd > 0 else math.nan}
    # rounding: kl and quad each carry ~ d * eps relative error
    tol = 64 * EPS * policy.n_params * (parts["kl"] + parts["quad"]) + 1e-300
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
        q_tilde = tilt(pi, np.asarray(R, dtype=np.float64).reshape(pi.shape), beta)
    q = np.asarray(q_tilde, dtype=np.float64).reshape(pi.shape)
    diff = policy.weighted_hessian_logp(theta, policy.rho[:, None] * (pi - q))
    lhs = float(np.linalg.norm(diff, 2))
    L_true = policy.max_hessian_logp_norm(theta)
    if L is None:
        L = L_true
    elif L < L_true * (1 - 1e-12):
        return assumption_failed(rid, f"||hess log pi||_op <= L at theta (L = {L:.6g} < max = {L_true:.6g})")
    tv = policy.tv(q, theta)
    kl = policy.kl_from(q, theta)
    mid = 2.0 * L * tv
    rhs = L * math.sqrt(2.0 * kl)
    tol = 64 * EPS * policy.n_params * (L + float(np.abs(diff).max()))
    details = {"policy": _class_name(policy), "L": L, "tv": tv, "kl_qtilde_pi": kl, "middle_2L_TV": mid,
               "lhs_le_middle": bool(lhs <= mid + tol), "middle_le_rhs": bool(mid <= rhs + tol)}
    c = make_check(rid, lhs, rhs, tol=tol, details=details)
    return dataclasses.replace(c, holds=bool(c.holds and details["lhs_le_middle"] and details["middle_le_rhs"]))


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
    tol = 16 * EPS * n_tok
    chk = make_check(rid, abs(est["k1"]), rhs, tol=tol, details=details)
    ok_k3 = est["k3"] <= details["k3_band_bound"] + tol
    return dataclasses.replace(chk, holds=bool(chk.holds and ok_k3))


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
def prop32_from_fisher(F: Any, delta: Any, K: float, *, subspace: Any = None) -> Check:
    """Prop 3.2 from a Fisher matrix, an update and a KL budget K (e.g. K = KL(pi+ || pi) measured).

    lhs = ||P_U D||_2, rhs = sqrt(2K / mu_U), mu_U = lambda_min(F) on the update subspace U (module docstring;
    default U = range(F)). ``details``: Fisher norm ||D||_F(theta) and sqrt(2K) (the first claim), their factor,
    the raw ||D||_2 and the off-subspace norm (the unrestricted statement's lhs: it can exceed rhs).
    The step ||P_U D||_2 <= ||D||_F / sqrt(mu_U) is exact; ||D||_F <= sqrt(2K) holds only to first order
    (1/2 D^T F D = K (1 + O(||D||))), hence ``exact=False``.
    """
    rid = "prop3.2"
    A = _sym(F)
    d = _vec(delta, A.shape[0])
    if not (math.isfinite(K) and K >= 0):
        raise InputError(f"KL budget K must be finite and >= 0, got {K}")
    d_on, d_off, mu, failed, dim = _subspace_mu(A, d, subspace)
    fn = fisher_norm(A, d)
    details = {"K": float(K), "mu": mu, "subspace_dim": dim, "fisher_norm": fn, "sqrt_2K": math.sqrt(2 * K),
               "fisher_factor": fn / math.sqrt(2 * K) if K > 0 else (0.0 if fn == 0 else math.inf),
               "delta_norm": float(np.linalg.norm(d)), "off_subspace_norm": float(np.linalg.norm(d_off)),
               "first_order_radius": fn / math.sqrt(mu) if mu and mu > 0 else math.nan}
    lhs = float(np.linalg.norm(d_on))
    if failed:
        return assumption_failed(rid, failed, lhs=lhs, details=details)
    rhs = kl_budget_radius(K, mu)
    # lhs is a projection: rounding ~ n eps ||D|| even when D is a pure null direction
    return make_check(rid, lhs, rhs, tol=64 * EPS * A.shape[0] * (rhs + float(np.linalg.norm(d))), details=details)


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
    """Prop 3.2 on a policy step theta -> theta_plus, with K = KL(pi_theta+ || pi_theta) and F = F(theta).

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
    th = np.asarray(theta, dtype=np.float64)
    tp = np.asarray(theta_plus, dtype=np.float64)
    K = policy.kl(tp, th)
    c = prop32_from_fisher(policy.fisher(th), tp - th, K, subspace=subspace)
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
        subspace: Any = None) -> Check:
    """Per-block leash. S_W = ``schur_complement(F, block)``; delta_W = 1/2 x^T S_W x with x = vec(DW);
    mu_W = smallest nonzero eigenvalue of S_W with x projected onto range(S_W) (or an explicit ``subspace``
    basis in the block's coordinates / ``"full"`` / ``"span"``, as for Prop 3.2).

    lhs = ||P x||_2 = ||P DW||_F, rhs = sqrt(2 delta_W / mu_W): exact (Rayleigh quotient). ``holds`` also requires
    delta_W <= 1/2 D^T F D (variational property of the Schur complement) and, when ``shape`` is given,
    ||DW||_2 <= ||DW||_F. The paper's "delta_W <= K" additionally needs 1/2 D^T F D <= K, true only to first order
    (``details["half_quad_le_K"]`` reports it when K is given).

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
    A = _sym(F)
    d = _vec(delta, A.shape[0])
    w = _index(block, A.shape[0])
    S, s_tol = schur_complement_with_tol(A, w)
    x = d[w]
    dW = 0.5 * float(x @ S @ x)
    half_quad = 0.5 * float(d @ A @ d)
    x_on, x_off, mu, failed, dim = _subspace_mu(S, x, subspace, s_tol)
    details: dict[str, Any] = {"delta_W": dW, "half_quad": half_quad, "mu_W": mu, "block_size": int(w.size),
                               "subspace_dim": dim, "frobenius": float(np.linalg.norm(x)),
                               "off_subspace_norm": float(np.linalg.norm(x_off))}
    scale = 64 * EPS * A.shape[0] * max(float(np.abs(A).max()), 1e-300) * float(d @ d) + s_tol * float(x @ x)
    details["delta_W_le_half_quad"] = bool(dW <= half_quad + scale)
    spec_ok = True
    if shape is not None:
        if int(np.prod(shape)) != w.size:
            raise ShapeMismatchError(f"block shape {shape} does not match the {w.size} selected parameters")
        spec = float(np.linalg.norm(x.reshape(shape), 2))
        details["spectral"] = spec
        spec_ok = spec <= float(np.linalg.norm(x)) * (1 + 64 * EPS)
    if K is not None:
        details["K"] = float(K)
        details["half_quad_le_K"] = bool(half_quad <= K)
    lhs = float(np.linalg.norm(x_on))
    if failed:
        return assumption_failed(rid, failed, lhs=lhs, details=details)
    rhs = math.sqrt(2 * max(dW, 0.0) / mu)
    # S_W carries rounding of size s_tol (see schur_complement_with_tol); it moves rhs by ~ ||x||^2 s_tol / (mu rhs)
    tol = 64 * EPS * w.size * max(rhs, lhs) + float(x @ x) * s_tol / (mu * max(rhs, 1e-300))
    c = make_check(rid, lhs, rhs, tol=tol, details=details)
    return dataclasses.replace(c, holds=bool(c.holds and details["delta_W_le_half_quad"] and spec_ok))


def eq7_policy(policy: Policy, theta: Any, theta_plus: Any, block: str, *, subspace: Any = None) -> Check:
    """``eq7`` for a named block of a policy (``policy.blocks[block]``), with K = KL(pi+ || pi) in details."""
    if block not in policy.blocks:
        raise InputError(f"unknown block {block!r}; the policy has {sorted(policy.blocks)}")
    th = np.asarray(theta, dtype=np.float64)
    tp = np.asarray(theta_plus, dtype=np.float64)
    shp = policy.block_shapes[block]
    c = eq7(policy.fisher(th), tp - th, policy.blocks[block], shape=shp if len(shp) == 2 else None,
            K=policy.kl(tp, th), subspace=subspace)
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
