"""Gate I, from the KL leash to the weights (Zhu et al., arXiv 2511.08567, Prop 3.2 and Eq 7 / Lemma F.10) as
registered checks (``theory.RESULTS[id]``) with seeded campaigns, and the beta sweep behind the plots and the
tutorial (Prop 3.1 and 3.2 along beta).

- ``"prop3.2"``  K = KL(pi+ || pi) => ||D||_{F(theta)} <= sqrt(2K)(1+o(1)), ||D||_2 <= sqrt(2K/mu)(1+o(1)) on the
                 update subspace (corrected: F is singular for softmax policies).
- ``"eq7"``      per-block Schur complement S_W, delta_W = 1/2 vec(DW)^T S_W vec(DW) <= 1/2 D^T F D,
                 ||DW||_2 <= ||DW||_F <= sqrt(2 delta_W / mu_W).

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

from theory.check import Check, assumption_failed, decide, ldexp_sat, make_check, refine, register
from theory.errors import InputError, ShapeMismatchError
from theory.linalg import as_real_scalar, pow2_exponent, scale_pow2
from theory.policies import Policy, TabularSoftmax, campaign_policies, m_project, tilt
from theory.leash_linalg import (
    EPS, _class_name, _index, _kl_with_err, _logprob_err, _not_psd, _radius_tol, _subspace_mu, _sym, _vec,
    fisher_norm, psd_rank_tol, schur_complement_with_tol,
)

__all__ = [
    "prop32",
    "prop32_from_fisher",
    "eq7",
    "eq7_policy",
    "beta_sweep",
]


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
    details: dict[str, Any] = {"delta_W": ldexp_sat(dW, eq), "half_quad": ldexp_sat(half_quad, eq),
                               "mu_W": ldexp_sat(mu, eF), "block_size": int(w.size), "subspace_dim": dim,
                               "frobenius": ldexp_sat(math.sqrt(xx), eD),
                               "off_subspace_norm": ldexp_sat(float(np.linalg.norm(x_off)), eD)}
    # x^T S x and D^T F D: S_W carries rounding s_tol (schur_complement_with_tol), each product n eps |x|^T|M||x|
    e_q = xx * s_tol + 4 * w.size * EPS * float(np.abs(x) @ np.abs(S) @ np.abs(x))
    scale = (64 * EPS * A.shape[0] * float(np.abs(d) @ np.abs(A) @ np.abs(d)) + F_err_s * float(d @ d) + e_q) / 2
    links = {"delta_W <= 1/2 D^T F D": decide(dW, half_quad, scale)}
    details["delta_W_le_half_quad"] = links["delta_W <= 1/2 D^T F D"] != "violated"
    if shape is not None:
        if int(np.prod(shape)) != w.size:
            raise ShapeMismatchError(f"block shape {shape} does not match the {w.size} selected parameters")
        spec = float(np.linalg.norm(x.reshape(shape), 2))
        details["spectral"] = ldexp_sat(spec, eD)
        links["||DW||_2 <= ||DW||_F"] = decide(spec, math.sqrt(xx), 64 * EPS * max(shape) * math.sqrt(xx))
    if K is not None:
        details["K"] = float(K)
        details["half_quad_le_K"] = bool(details["half_quad"] <= K)
    lhs = float(np.linalg.norm(x_on))
    failed = failed or _not_psd(A, err=F_err_s)
    if failed:
        return assumption_failed(rid, failed, lhs=ldexp_sat(lhs, eD), details=details)
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
