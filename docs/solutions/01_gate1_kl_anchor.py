"""Answer key of ``docs/01_gate1_kl_anchor.md``: reference solutions and the expected answers behind ``check(n)``.

Not part of the student's notebook. ``SOLUTIONS[n]`` is run in the notebook in place of exercise n's cell by the
test suite (``threegate.tutorials.execute_tutorial``); ``CHECKS[n](nb)`` computes the expected answers from the
notebook's variables ``nb`` by another route than the solution where the project has one.
"""

from __future__ import annotations

import numpy as np

from theory.kl_leash import prop31, prop32, psd_rank_tol
from theory.policies import m_project, tilt
from threegate.answers import Expected

EPS = float(np.finfo(np.float64).eps)

SOLUTIONS = {
    1: """
q05 = tilt(pol.probs(theta), R, 0.5)
theta_05 = m_project(pol, theta, q05).theta_plus
answer_1 = pol.kl(theta_05, theta)
""",
    2: """
D = theta_05 - theta
D_range, D_null, mu, rank = range_split(pol.fisher(theta), D)
answer_2_norm = float(np.linalg.norm(D_range))
answer_2_radius = kl_budget_radius(pol.kl(theta_05, theta), mu)
""",
    3: """
p = mlp.probs(theta_mlp)
g = np.einsum("x,xy,xyd->d", mlp.rho, p * R_mlp, mlp.score(theta_mlp))
var_R = mlp.rho @ ((p * R_mlp**2).sum(1) - (p * R_mlp).sum(1) ** 2)
answer_3 = float(g @ np.linalg.pinv(mlp.fisher(theta_mlp)) @ g / var_R)
""",
}


def _kappa(F: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Eigen-decomposition of PSD ``F`` restricted to its range, and the condition number there."""
    lam, U = np.linalg.eigh(F)
    keep = lam > psd_rank_tol(lam)
    return lam[keep], U[:, keep], float(lam[keep].max() / lam[keep].min())


def exercise_1(nb) -> dict[str, Expected]:
    # prop31 M-projects the same tilt with the same solver; a student's KL formula may sum the terms in another
    # order: relative rounding ~ (outputs) * eps, far below 1e-9
    ref = prop31(nb.pol, nb.theta, q_tilde=tilt(nb.pol.probs(nb.theta), nb.R, 0.5)).lhs
    return {"answer_1": Expected(ref, rel_tol=1e-9,
                                 hint="tilt the policy's probabilities at beta = 0.5, M-project the tilt onto the "
                                      "policy class, then take the policy KL from the new parameters to theta")}


def exercise_2(nb) -> dict[str, Expected]:
    pol, theta = nb.pol, nb.theta
    theta_plus = m_project(pol, theta, tilt(pol.probs(theta), nb.R, 0.5)).theta_plus
    c = prop32(pol, theta, theta_plus)
    # a projection onto range(F) and a smallest eigenvalue from eigh: rounding ~ d eps (||D|| + radius) * kappa
    _, _, kappa = _kappa(pol.fisher(theta))
    tol = 64 * theta.shape[0] * EPS * kappa * (float(np.linalg.norm(theta_plus - theta)) + c.rhs)
    return {"answer_2_norm": Expected(c.lhs, abs_tol=tol,
                                      hint="split D along range(F) and its null space (range_split)"),
            "answer_2_radius": Expected(c.rhs, abs_tol=tol,
                                        hint="K is the policy KL of the step; mu is the smallest eigenvalue of F "
                                             "above psd_rank_tol; then kl_budget_radius(K, mu)")}


def exercise_3(nb) -> dict[str, Expected]:
    mlp, theta, R = nb.mlp, nb.theta_mlp, nb.R_mlp
    # another route: g from the logit Jacobian and the centred reward, F^+ from the eigenvectors of F's range
    p = mlp.probs(theta)
    g = np.einsum("x,xyd,xy->d", mlp.rho, mlp.logit_jacobian(theta), p * (R - (p * R).sum(1, keepdims=True)))
    var_R = float(mlp.rho @ ((p * R**2).sum(1) - (p * R).sum(1) ** 2))
    lam, U, kappa = _kappa(mlp.fisher(theta))
    ref = float(np.sum((U.T @ g) ** 2 / lam) / var_R)
    # two pseudo-inverses of F agree to ~ kappa * eps relative on its range (measured: 2e-15 at kappa = 438)
    return {"answer_3": Expected(ref, rel_tol=64 * kappa * EPS,
                                 hint="g is the rho- and pi-weighted sum of R * score over contexts and outputs; "
                                      "divide g @ pinv(F) @ g by the rho-weighted variance of R under pi. The sweep's "
                                      "factor at large beta is only close, not equal")}


CHECKS = {1: exercise_1, 2: exercise_2, 3: exercise_3}
