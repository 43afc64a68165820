"""Gate I, the KL anchor itself (Zhu et al., arXiv 2511.08567, Sec. 3.1 and App. F): Prop 3.1, Lemma F.5, F.6, F.9
as registered checks (``theory.RESULTS[id]``), each with a seeded ``campaign(seed)`` over tabular, log-linear and
MLP policies (``theory.policies.campaign_policies``). The weight bounds that follow (Prop 3.2, Eq 7) are
``theory.fisher_bounds``.

- ``"prop3.1"``  one-step leash KL(pi+ || pi) <= (1 + o(1)) KL(q~ || pi), pi+ the M-projection of the Gibbs tilt.
                 Tabular: equality. Log-linear: the Pythagorean identity KL(q~||pi) = KL(q~||pi+) + KL(pi+||pi)
                 makes it hold with constant 1 at every beta. MLP (curved class): the factor is measured
                 (``exact=False``).
- ``"lemF.5"``   KL(pi_{theta+D} || pi_theta) = 1/2 D^T F D + O(||D||^3), with a rigorous, computable remainder bound.
- ``"lemF.6"``   ||H_q~ - F||_op <= 2 L TV(q~, pi) <= L sqrt(2 KL(q~ || pi)).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from theory.check import Check, assumption_failed, decide, make_check, refine, register
from theory.errors import InputError, NonFiniteError, ShapeMismatchError
from theory.linalg import as_real_array, as_real_scalar
from theory.policies import MLPPolicy, Policy, TabularSoftmax, campaign_policies, m_project, tilt
from theory.leash_linalg import (
    EPS, _class_name, _kl_with_err, _logit_err, _logprob_err, _table, psd_rank_tol,
)

__all__ = [
    "prop31",
    "lemF5",
    "lemF5_scaling",
    "lemF6",
    "lemF9",
    "kl_estimates",
    "count_band_violations",
]


# ---------------------------------------------------------------------------------------------------------------
# Prop 3.1 — one-step policy-KL leash
# ---------------------------------------------------------------------------------------------------------------


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
    with np.errstate(over="ignore"):  # a tiny step with a non-zero remainder: the ratio is +inf, said as such
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
