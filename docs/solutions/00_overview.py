"""Answer key of ``docs/00_overview.md``: reference solutions and the expected answers behind ``check(n)``.

Not part of the student's notebook. ``SOLUTIONS[n]`` is run in the notebook in place of exercise n's cell by the
test suite (``threegate.tutorials.execute_tutorial``); ``CHECKS[n](nb)`` computes the expected answers from the
notebook's variables ``nb`` by another route than the solution where the project has one.
"""

from __future__ import annotations

import numpy as np
import torch

from theory.linalg import singular_values, spectral_norm
from theory.precision import predict_change_mask
from threegate.answers import Expected

EPS = float(np.finfo(np.float64).eps)

SOLUTIONS = {
    1: """
answer_1 = bf16_sparsity(W, (W.float() * (1 + 2.0**-10)).to(torch.bfloat16))
""",
    2: """
def sparsity_at(j):
    rel = 2.0**-j * torch.exp(0.5 * noise)
    return bf16_sparsity(W, (W.float() * (1 + rel * torch.sign(noise))).to(torch.bfloat16))


answer_2 = next(j for j in range(1, 64) if sparsity_at(j) >= 0.95)
""",
    3: """
weyl = theory.RESULTS["cor3.4-weyl"].check(W.double().numpy(), stored["large step (SFT-like)"].double().numpy(), 1)
answer_3 = (weyl.lhs, weyl.rhs)
""",
}


def _unchanged_fraction(W: torch.Tensor, delta: torch.Tensor) -> float:
    """1 - (entries the exact fp32 rule predicts to change) / n: Gate III's rule, not torch's rounding."""
    return float(1.0 - predict_change_mask(W, delta.numpy(), "fp32").mean())


def exercise_1(nb) -> dict[str, Expected]:
    # W * (1 + 2^-10) in float32 is exact (8 + 11 significant bits), so the step is exactly W * 2^-10.
    # Sparsities are multiples of 1/n; the two routes differ only in how that ratio is rounded: half a count.
    ref = _unchanged_fraction(nb.W, nb.W.float() * 2.0**-10)
    return {"answer_1": Expected(ref, abs_tol=0.5 / nb.W.numel(),
                                 hint="multiply W.float() by (1 + 2**-10), store it with .to(torch.bfloat16) and "
                                      "compare the two with bf16_sparsity")}


def exercise_2(nb) -> dict[str, Expected]:
    W, noise = nb.W, nb.noise
    j = 1
    while _unchanged_fraction(W, W.float() * (2.0**-j * torch.exp(0.5 * noise)) * torch.sign(noise)) < 0.95:
        j += 1
    return {"answer_2": Expected(j, hint="loop over j, rebuild the stored matrix as in the demonstration with "
                                         "median 2**-j, and stop at the first j whose bf16_sparsity reaches 0.95")}


def exercise_3(nb) -> dict[str, Expected]:
    W0, W1 = nb.W.double().numpy(), nb.stored["large step (SFT-like)"].double().numpy()
    lhs = float(np.max(np.abs(singular_values(W1) - singular_values(W0))))
    rhs = spectral_norm(W1 - W0)
    # backward-stable float64 SVDs: each singular value is off by <= n eps ||M||_2 (generous for LAPACK gesdd);
    # lhs is a difference of two of them, rhs one
    tol = 2 * W0.shape[0] * EPS * max(spectral_norm(W0), spectral_norm(W1))
    return {"answer_3": Expected((lhs, rhs), abs_tol=tol,
                                 hint="theory.RESULTS['cor3.4-weyl'].check(W0, W1, k) takes float64 arrays "
                                      "(any k works for Weyl) and returns a check with both sides")}


CHECKS = {1: exercise_1, 2: exercise_2, 3: exercise_3}
