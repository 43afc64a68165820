"""Answer key of ``docs/02_gate2_geometry.md``: reference solutions and the expected answers behind ``check(n)``.

Not part of the student's notebook. ``SOLUTIONS[n]`` is run in the notebook in place of exercise n's cell by the
test suite (``threegate.tutorials.execute_tutorial``); ``CHECKS[n](nb)`` computes the expected answers from the
notebook's variables ``nb`` by another route than the solution where the project has one (here the registered
Gate II checks, where the solutions use ``theory.linalg`` directly).
"""

from __future__ import annotations

import numpy as np

from theory.spectral import gate2_all, thm33_as_stated
from threegate.answers import Expected

EPS = float(np.finfo(np.float64).eps)
# 2 x 2 matrices of norm <= 2.1: a backward-stable float64 SVD puts singular values and (gap >= 0.5) singular
# vectors within ~ 10 eps of exact; angles from arcsin / arccos away from 0 and pi/2 keep that. 1e-12 is ~ 4500 eps.
SMALL_SVD_TOL = 1e-12
FOUND = (np.diag([2.0, 0.0]), np.array([[1.5, -0.5], [-1.0, 0.5]]))

SOLUTIONS = {
    1: """
Ua, _, _ = top_k_subspaces(np.diag([2.0, 0.0]), 1)
Ub, _, _ = top_k_subspaces(np.array([[1.5, -0.5], [-1.0, 0.5]]), 1)
answer_1 = float(principal_angles(Ua, Ub).max())
""",
    2: """
c = 0.3
W0_ex, dW_ex = np.diag([1.0, 0.5]), c * np.diag([-1.0, 1.0])
S0 = singular_values(W0_ex)
answer_2_rhs = float(np.linalg.norm(dW_ex, 2) / (S0[0] - S0[1]))
answer_2_holds = bool(np.sin(principal_angles(top_k_subspaces(W0_ex, 1)[0],
                                               top_k_subspaces(W0_ex + dW_ex, 1)[0]).max()) <= answer_2_rhs)
""",
    3: """
A, B = np.diag([2.0, 0.0]), np.array([[1.5, -0.5], [-1.0, 0.5]])
U1, V1, S1 = top_k_subspaces(B, 1)
delta = S1[0] - singular_values(A)[1]
dW = B - A
answer_3 = float(max(np.linalg.norm(dW @ V1, 2), np.linalg.norm(dW.T @ U1, 2)) / delta)
""",
}


def exercise_1(nb) -> dict[str, Expected]:
    c = gate2_all(*FOUND, 1)["thm3.3"]
    ref = float(np.arcsin(min(1.0, max(c.details["sin_theta_U"], 0.0))))
    return {"answer_1": Expected(ref, abs_tol=SMALL_SVD_TOL,
                                 hint="top_k_subspaces(W, 1) gives the top left singular vector of each matrix; "
                                      "principal_angles of the two; take the largest")}


def exercise_2(nb) -> dict[str, Expected]:
    c = thm33_as_stated(np.diag([1.0, 0.5]), np.diag([0.7, 0.8]), 1)
    return {"answer_2_rhs": Expected(c.rhs, abs_tol=SMALL_SVD_TOL,
                                     hint="the spectral norm of dW divided by sigma_1 - sigma_2 of W0"),
            "answer_2_holds": Expected(bool(c.holds),
                                       hint="which direction is on top after the step? compare sin of the angle "
                                            "with your right side")}


def exercise_3(nb) -> dict[str, Expected]:
    c = gate2_all(*FOUND, 1)["thm3.3-wedin"]
    return {"answer_3": Expected(c.rhs, abs_tol=SMALL_SVD_TOL,
                                 hint="V_1 and U_1 of the perturbed matrix, the residual norms of dW against them, "
                                      "and delta from the perturbed sigma_1 and the unperturbed sigma_2")}


CHECKS = {1: exercise_1, 2: exercise_2, 3: exercise_3}
