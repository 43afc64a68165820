"""Gate II — spectral perturbation: Thm 3.3 (three forms), Cor F.13, Cor 3.4 (Weyl, Mirsky), Cor 3.5 (Ky Fan).

Every check takes ``(W0, W1, k)`` with ``W1 = W0 + dW`` (numpy or torch, any float dtype, bf16 included; upcast to
float64 before any decomposition) and returns a ``theory.check.Check``. Notation: sigma_i descending,
``r = min(m, n)``, ``gamma_k = sigma_k(W0) - sigma_{k+1}(W0)`` with ``sigma_{r+1} := 0``, ``U_k, V_k`` the top-k
left/right singular subspaces, ``sin_k = max(||sin Theta(U_k(W0), U_k(W1))||_2, ||sin Theta(V_k(W0), V_k(W1))||_2)``.

Results (id: statement):

- ``thm3.3``          sin_k <= ||dW||_2 / gamma_k                          (as stated; first order, NOT a theorem;
                      it fails by at most a factor 2: sin_k <= 2 ||dW||_2 / gamma_k always, ``rhs_factor2``)
- ``thm3.3-wedin``    sin_k <= max(||dW V_k(W1)||_2, ||dW^T U_k(W1)||_2) / delta,
                      delta = sigma_k(W1) - alpha > 0, alpha = sigma_{k+1}(W0)   (Wedin 1972; Stewart & Sun V.4.4)
- ``thm3.3-rigorous`` sin_k <= ||dW||_2 / (gamma_k - ||dW||_2)            (needs ||dW||_2 < gamma_k)
- ``corF.13``         ||P_{U_k(W0)} - P_{U_k(W1)}||_2 = ||sin Theta(U)||_2 (same for V; identity) and the
                      projector distance <= ||dW||_2 / delta (the Wedin gap; the as-stated chain is in details)
- ``cor3.4-weyl``     max_i |sigma_i(W1) - sigma_i(W0)| <= ||dW||_2
- ``cor3.4-mirsky``   ||sigma(W1) - sigma(W0)||_2 <= ||dW||_F             (the paper squares both sides)
- ``cor3.5``          |‖W1‖_(k) - ‖W0‖_(k)| <= sum_{i<=k} |dsigma_i| <= ||dW||_(k) <= k ||dW||_2  (whole chain)

Wedin's hypotheses, exactly. Stewart & Sun Thm V.4.4 needs alpha >= 0 and delta > 0 with
sigma_min(Sigma~_1) >= alpha + delta and sigma_max(Sigma_2) <= alpha, where Sigma_2 is the complement block of W0,
an (m-k) x (n-k) matrix that carries |m - n| structural zero singular values. For k < r this is
Wedin's usual delta = sigma_k(W1) - sigma_{k+1}(W0) (and sigma_k(W1) >= delta follows from alpha >= 0, so the zeros
never bind). At k = r < max(m, n) there is no sigma_{k+1}(W0) but the complement is not empty: its singular values
are the zeros, so alpha = 0 and delta = sigma_r(W1). Reading "no sigma_{k+1}" as "no constraint" (delta = inf,
bound 0) is wrong: W0 = [[1], [0]], W1 = [[1], [1]] rotates U_1 by 45 degrees (see ``wedin_gap``).

Optional ``delta_W``, ``mu_W`` (Lemma F.10: 1/2 vec(dW)^T S_W vec(dW) = delta_W, lambda_min(S_W) = mu_W) add the
KL-form right side sqrt(2 delta_W / mu_W) (divided by gamma_k for Thm 3.3, times k for Cor 3.5) to ``details``,
with ``kl_chain_holds`` (whether the weight-space quantity is <= that bound).

Scale. Both matrices are first multiplied by one power of two ``2**-e`` (exact) that puts the largest entry in
[1/2, 1): W1 - W0, the norms and the SVDs then neither overflow nor underflow at any input scale (1e-300 .. 1e300),
and inputs that differ by a factor 2**j give bit-identical verdicts. Degree-one quantities (singular values,
||dW||) are reported back in the inputs' units.

Error model and tolerances (``theory.check``: holds iff rhs - lhs >= tol, violated iff lhs - rhs > tol, else
indeterminate). A float64 SVD is backward stable: the computed factors are exact for W + E with
||E||_2 <= p(m, n) eps ||W||_2. We allow every matrix to move by
``eps_s = 8 * max(m, n) * eps64 * max(||W0||_2, ||W1||_2)`` (this also covers the rounding of W1 - W0), so
a singular value moves by <= eps_s (Weyl). Weyl: 3 eps_s; Mirsky: (2 sqrt(r) + 1) eps_s; Ky Fan chain: 3k eps_s (plus
the rounding of the sums). A bound num/den moves by at most ``(num + e_num) / (den - e_den) - num / den``; the
denominators (gamma_k, delta, gamma_k - ||dW||_2) must exceed twice their own rounding (``RESOLVED``), else the
hypothesis "> 0" is not resolved and the check fails that assumption (so an exactly repeated singular value at k
fails it in every form, and no tolerance is ever infinite). The subspace left sides move with the computed bases:
by eps_s / (g - 3 eps_s) per matrix, g the gap that determines its top-k subspace, plus 8 max(m, n) eps64 for
bases orthonormal only to rounding (``_lhs_error``); when a g is not resolved the lhs is not a function of the
inputs and the check fails "the top-k singular subspaces ... are determined". F.13's identity is checked to
``16 * max(m, n) * eps64``.

``gate2_all(W0, W1, k)`` evaluates all of them from one SVD of W0, one of W1 and the singular values of dW
(``spectral_pair`` builds that once; pass ``svd0=`` to reuse W0's SVD across tuned checkpoints).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from threadpoolctl import threadpool_limits

from theory.check import RESULTS, Check, assumption_failed, decide, make_check, refine, register
from theory.errors import ComplexInputError, DecompositionError, InputError, NonFiniteError, ShapeMismatchError
from theory.linalg import SVD, pow2_exponent, scale_pow2, sin_theta, singular_values, spectral_gap, svd64, to_f64
from theory.synthetic import PERTURBATION_FAMILIES, SPECTRUM_FAMILIES, synthetic_pair

__all__ = [
    "GATE2_IDS",
    "counterexample_as_stated",
    "SpectralPair",
    "spectral_pair",
    "wedin_gap",
    "projector_distance_lowrank",
    "gate2_all",
    "gate2_checks",
    "thm33_as_stated",
    "thm33_wedin",
    "thm33_rigorous",
    "corF13",
    "cor34_weyl",
    "cor34_mirsky",
    "cor35_kyfan",
    "gate2_synthetic",
    "gate2_grid",
    "synthetic_sweep",
]

EPS64 = float(np.finfo(np.float64).eps)
GATE2_IDS = ("thm3.3", "thm3.3-wedin", "thm3.3-rigorous", "corF.13", "cor3.4-weyl", "cor3.4-mirsky", "cor3.5")


# ----------------------------------------------------------------------------------------------------------------
# Shared internals: one SVD of W0, one of W1, the singular values of dW
# ----------------------------------------------------------------------------------------------------------------


def _ldexp(x: float, e: int) -> float:
    """x * 2**e (exact where representable, +-inf where it overflows)."""
    if not math.isfinite(x) or e == 0:
        return float(x)
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)


@dataclass(frozen=True)
class SpectralPair:
    """W0, W1 scaled by one power of two ``2**-exponent`` (exact) with their thin float64 SVDs and the singular
    values of dW = W1 - W0, computed once on the scaled copies.

    The ``*_s`` fields are the scaled data every check decides on (nothing overflows or underflows: the largest
    entry is in [1/2, 1)); ``W0``, ``W1``, ``dW``, ``svd0``, ``svd1``, ``sv_dW``, ``dW_2``, ``dW_F``, ``gap`` are
    the same quantities in the units of the inputs (+-inf where those overflow float64).
    """

    W0_s: Float[np.ndarray, "m n"]
    W1_s: Float[np.ndarray, "m n"]
    dW_s: Float[np.ndarray, "m n"]
    svd0_s: SVD
    svd1_s: SVD
    sv_dW_s: Float[np.ndarray, " r"]
    exponent: int = 0

    # ---- the units of the inputs ---------------------------------------------------------------------------
    def unscale(self, x: float) -> float:
        return _ldexp(float(x), self.exponent)

    def _arr(self, a: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return np.ldexp(a, self.exponent)

    @property
    def W0(self) -> np.ndarray:
        return self._arr(self.W0_s)

    @property
    def W1(self) -> np.ndarray:
        return self._arr(self.W1_s)

    @property
    def dW(self) -> np.ndarray:
        return self._arr(self.dW_s)

    @property
    def svd0(self) -> SVD:
        return SVD(self.svd0_s.U, self._arr(self.svd0_s.S), self.svd0_s.Vh)

    @property
    def svd1(self) -> SVD:
        return SVD(self.svd1_s.U, self._arr(self.svd1_s.S), self.svd1_s.Vh)

    @property
    def sv_dW(self) -> np.ndarray:
        return self._arr(self.sv_dW_s)

    @property
    def dW_2(self) -> float:
        return self.unscale(self.dW2_s)

    @property
    def dW_F(self) -> float:
        return self.unscale(self.dWF_s)

    def gap(self, k: int) -> float:
        """gamma_k(W0) = sigma_k - sigma_{k+1} (sigma_{r+1} := 0), in the units of the inputs."""
        return self.unscale(self.gap_s(k))

    # ---- scaled quantities the checks use ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.W0_s.shape  # type: ignore[return-value]

    @property
    def r(self) -> int:
        return min(self.shape)

    @property
    def dW2_s(self) -> float:
        return float(self.sv_dW_s[0]) if self.sv_dW_s.size else 0.0

    @property
    def dWF_s(self) -> float:
        return float(np.sqrt(np.sum(self.sv_dW_s**2)))

    @property
    def eps_s(self) -> float:
        """Backward-error allowance of one float64 SVD, scaled units (see the module docstring)."""
        norm = max(float(self.svd0_s.S[0]), float(self.svd1_s.S[0]))
        return 8.0 * max(self.shape) * EPS64 * norm

    @property
    def eps_basis(self) -> float:
        return 8.0 * max(self.shape) * EPS64

    def gap_s(self, k: int) -> float:
        return spectral_gap(self.svd0_s.S, k)

    def subspace_gap_s(self, which: int, k: int) -> float:
        """The gap that determines the top-k singular subspaces of W``which`` (0 or 1), scaled units:
        sigma_k - sigma_{k+1} for k < r; sigma_r for k = r < max(m, n) (the complement holds |m - n| zero singular
        values); inf for k = r = m = n (both subspaces are the whole space)."""
        S = (self.svd0_s if which == 0 else self.svd1_s).S
        m, n = self.shape
        if k < self.r:
            return float(S[k - 1] - S[k])
        return math.inf if m == n else float(S[k - 1])

    def U0(self, k: int) -> np.ndarray:
        return self.svd0_s.U[:, :k]

    def U1(self, k: int) -> np.ndarray:
        return self.svd1_s.U[:, :k]

    def V0(self, k: int) -> np.ndarray:
        return self.svd0_s.Vh[:k].T

    def V1(self, k: int) -> np.ndarray:
        return self.svd1_s.Vh[:k].T

    def sin_thetas(self, k: int) -> tuple[float, float]:
        """(||sin Theta(U_k(W0), U_k(W1))||_2, ||sin Theta(V_k(W0), V_k(W1))||_2)."""
        return sin_theta(self.U0(k), self.U1(k)), sin_theta(self.V0(k), self.V1(k))


def spectral_pair(W0: Any, W1: Any, *, svd0: SVD | None = None, device: Any = None) -> SpectralPair:
    """Upcast, validate (real, finite, 2-d, same shape, non-empty), scale by one power of two and decompose once.

    ``svd0``: a precomputed thin SVD of W0 in the units of W0 (e.g. ``spectral_pair(...).svd0``) to reuse.
    ``device``: where the SVDs run (torch float64; None or "cpu" uses numpy/LAPACK). Both matrices are first
    multiplied by ``2**-e`` with ``e = pow2_exponent(W0, W1)`` (exact), so W1 - W0, the norms and the SVDs never
    overflow or underflow, and inputs that differ by a power of two give the same bits. Raises
    ``ComplexInputError``, ``NonFiniteError``, ``ShapeMismatchError``, ``DecompositionError`` or ``InputError``
    naming the problem.
    """
    A = to_f64(W0, "W0")
    B = to_f64(W1, "W1")
    if A.shape != B.shape:
        raise ShapeMismatchError(f"W0 has shape {A.shape} but W1 has shape {B.shape}")
    if A.size == 0:
        raise InputError(f"W0 and W1 are empty (shape {A.shape})")
    e = pow2_exponent(A, B)
    A, B = scale_pow2(A, e), scale_pow2(B, e)
    if svd0 is None:
        svd0_s = svd64(A, "W0", device=device)
    elif svd0.U.shape[0] != A.shape[0] or svd0.Vh.shape[1] != A.shape[1]:
        raise ShapeMismatchError(f"svd0 is for a {svd0.U.shape[0]}x{svd0.Vh.shape[1]} matrix, W0 is {A.shape}")
    else:
        svd0_s = SVD(svd0.U, scale_pow2(svd0.S, e), svd0.Vh)
    dW = B - A
    svd1_s = svd64(B, "W1", device=device)
    return SpectralPair(A, B, dW, svd0_s, svd1_s, singular_values(dW, "W1 - W0", device=device), e)


def wedin_gap(
    S0: Float[np.ndarray, " r"],
    S1: Float[np.ndarray, " r"],
    k: int,
    shape: tuple[int, int],
    *,
    count_zero_singular_values: bool = True,
) -> tuple[float, float]:
    """Wedin's (alpha, delta) for the top-k singular subspaces: alpha = sigma_max of W0's complement block,
    delta = sigma_k(W1) - alpha.

    For k < r, alpha = sigma_{k+1}(W0). For k = r the complement is (m - r) x (n - r): when m != n it holds
    |m - n| zero singular values, so alpha = 0. ``count_zero_singular_values=False`` is the incomplete reading
    (no listed sigma_{k+1} => no constraint: alpha = -inf, delta = inf) kept only so the tests can show it failing.
    For m = n and k = r the complement is empty and both subspaces are the whole space (sin Theta = 0).
    """
    m, n = shape
    r = min(m, n)
    if k < r:
        alpha = float(S0[k])
    elif m != n and count_zero_singular_values:
        alpha = 0.0
    elif m != n:
        return -math.inf, math.inf
    else:
        alpha = 0.0
    return alpha, float(S1[k - 1]) - alpha


def projector_distance_lowrank(A: Float[np.ndarray, "p k"], B: Float[np.ndarray, "p k"]) -> float:
    """||A A^T - B B^T||_2 for orthonormal A, B without forming p x p projectors.

    Both projectors vanish off span[A, B]; with [A, B] = Q R (Householder QR, Q orthonormal, span[A, B] within
    span Q) the norm equals that of (Q^T A)(Q^T A)^T - (Q^T B)(Q^T B)^T, a matrix of size <= 2k.
    """
    Q, _ = np.linalg.qr(np.concatenate([A, B], axis=1))
    a, b = Q.T @ A, Q.T @ B
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


#: A gap (or denominator) counts as resolved when it exceeds this many times its own rounding bound: then
#: ``den - e_den >= den / 2`` and every tolerance below is finite.
RESOLVED = 2.0


def _ratio_tol(num: float, den: float, e_num: float, e_den: float) -> float:
    """Worst-case change of num/den when num moves by e_num and den by e_den (den > RESOLVED * e_den, so finite),
    plus the rounding of the division itself: ``(num + e_num) / (den - e_den) - num / den + 2 eps num / den``
    (the upper move is the larger of the two)."""
    return (num + e_num) / (den - e_den) - num / den + 2 * EPS64 * num / den


def _kl_bound(delta_W: float | None, mu_W: float | None) -> float | None:
    """sqrt(2 delta_W / mu_W) (Lemma F.10), or None when not given; bad values raise InputError."""
    if delta_W is None and mu_W is None:
        return None
    if delta_W is None or mu_W is None:
        raise InputError("delta_W and mu_W go together (Lemma F.10 needs both); got only one")
    if not (math.isfinite(delta_W) and math.isfinite(mu_W)) or delta_W < 0 or mu_W <= 0:
        raise InputError(f"need delta_W >= 0 and mu_W > 0, finite (got delta_W={delta_W}, mu_W={mu_W})")
    return math.sqrt(2.0 * delta_W / mu_W)


def _check(result_id: str, lhs: float, rhs: float, tol: float, details: dict, exponent: int = 0) -> Check:
    """make_check, recording whether lhs is resolved above rounding (lhs > tol): where it is not, lhs / rhs is
    rounding noise (e.g. both sides ~1e-16 when dW leaves the subspaces fixed) and only the verdict means anything."""
    details["lhs_resolved"] = bool(lhs > tol)
    return make_check(result_id, lhs, rhs, tol=tol, details=details, exponent=exponent)


def _validate_k(k: Any, r: int) -> str | None:
    """Failure message for a k outside 1..r (None if fine)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        return f"k is an integer (got {k!r})"
    if not 1 <= int(k) <= r:
        return f"1 <= k <= min(m, n) = {r} (got k={k})"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The checks, evaluated on a decomposed pair
# ----------------------------------------------------------------------------------------------------------------


def _subspace_details(P: SpectralPair, k: int) -> dict:
    sU, sV = P.sin_thetas(k)
    gap = P.gap_s(k)
    alpha, delta = wedin_gap(P.svd0_s.S, P.svd1_s.S, k, P.shape)
    u = P.unscale
    return {
        "k": k, "m": P.shape[0], "n": P.shape[1], "sin_theta_U": sU, "sin_theta_V": sV,
        "dW_2": u(P.dW2_s), "dW_F": u(P.dWF_s), "gamma_k": u(gap),
        "dW_over_gap": P.dW2_s / gap if gap > 0 else math.inf,
        "sigma_k_W0": u(P.svd0_s.S[k - 1]), "sigma_k_W1": u(P.svd1_s.S[k - 1]),
        "wedin_alpha": u(alpha), "wedin_delta": u(delta), "eps_s": u(P.eps_s),
    }


def _unresolved(rid: str, what: str, value: float, e: float, P: SpectralPair, d: dict) -> Check:
    """The hypothesis ``what > 0`` is not resolved above float64 rounding (value <= RESOLVED * e)."""
    return assumption_failed(
        rid, f"{what} > 0, resolved above float64 rounding ({what} = {P.unscale(value):.3e} <= "
             f"{P.unscale(RESOLVED * e):.3e})", details=d)


def _lhs_error(P: SpectralPair, k: int, rid: str, d: dict) -> tuple[float, Check | None]:
    """Bound on |computed sin_k - exact sin_k|, or the failed check when a subspace is not determined.

    The computed U_k(W_i) is an exact singular subspace of W_i + E_i, ||E_i||_2 <= eps_s; with g_i the gap that
    determines it (``subspace_gap_s``; itself known to +-2 eps_s) the rigorous sin-theta bound gives
    ||sin Theta(computed, exact)||_2 <= eps_s / (g_i - 3 eps_s). ||sin Theta||_2 obeys the triangle inequality (it
    is the projector distance), so the lhs moves by at most the sum over W0 and W1, plus eps_basis for bases that
    are orthonormal only to rounding. A gap g_i <= 4 eps_s leaves the subspace undetermined: the lhs is then not a
    function of the inputs and the check fails that assumption."""
    err = P.eps_basis
    for i in (0, 1):
        g = P.subspace_gap_s(i, k)
        if math.isinf(g):
            continue
        if not g > RESOLVED * 2 * P.eps_s:
            return 0.0, assumption_failed(
                rid, f"the top-{k} singular subspaces of W0 and W1 are determined (the gap of W{i} at k, "
                     f"{P.unscale(g):.3e}, is not resolved above float64 rounding {P.unscale(4 * P.eps_s):.3e})",
                details=d)
        err += P.eps_s / (g - 3 * P.eps_s)
    d["lhs_err"] = err
    return err, None


def _thm33_as_stated(P: SpectralPair, k: int, kl: float | None) -> Check:
    """sin_k <= ||dW||_2 / gamma_k. tol = lhs error (``_lhs_error``) + the change of the ratio when ||dW||_2 moves
    by eps_s and gamma_k by 2 eps_s (each singular value by eps_s, Weyl)."""
    rid = "thm3.3"
    d = _subspace_details(P, k)
    gap, es = P.gap_s(k), P.eps_s
    if not gap > RESOLVED * 2 * es:
        return _unresolved(rid, "gamma_k", gap, 2 * es, P, d)
    e_lhs, bad = _lhs_error(P, k, rid, d)
    if bad:
        return bad
    lhs = max(d["sin_theta_U"], d["sin_theta_V"])
    rhs = P.dW2_s / gap
    if P.dW2_s < gap:
        d["rhs_rigorous"] = P.dW2_s / (gap - P.dW2_s)
    tol = e_lhs + _ratio_tol(P.dW2_s, gap, es, 2 * es)
    # The as-stated form is off by at most a factor 2: with rho = ||dW||_2 / gamma_k, the rigorous form gives
    # sin <= rho / (1 - rho) <= 2 rho for rho < 1/2, and sin <= 1 <= 2 rho otherwise. So 2 ||dW||_2 / gamma_k is a
    # valid W0-only bound at every step size (sup of lhs/rhs = 2, approached by the swap family as rho -> 1/2+).
    d["rhs_factor2"] = 2.0 * rhs
    d["factor2_verdict"] = decide(lhs, 2.0 * rhs, e_lhs + 2 * (tol - e_lhs))
    d["factor2_holds"] = d["factor2_verdict"] != "violated"
    if kl is not None:
        d["rhs_kl"] = kl / P.unscale(gap)
        d["kl_chain_holds"] = bool(P.dW_2 <= kl + P.unscale(es))
    return _check(rid, lhs, rhs, tol, d)


def _thm33_wedin(P: SpectralPair, k: int, kl: float | None) -> Check:
    """sin_k <= max(||dW V_k(W1)||, ||dW^T U_k(W1)||) / delta. The residuals move by 2 eps_s (dW's rounding and
    backward error) plus ||dW||_2 times the basis error of W1's subspaces; delta by 2 eps_s."""
    rid = "thm3.3-wedin"
    d = _subspace_details(P, k)
    delta, es = float(P.svd1_s.S[k - 1]) - wedin_gap(P.svd0_s.S, P.svd1_s.S, k, P.shape)[0], P.eps_s
    R = float(np.linalg.norm(P.dW_s @ P.V1(k), 2))
    S = float(np.linalg.norm(P.dW_s.T @ P.U1(k), 2))
    d.update(residual_R=P.unscale(R), residual_S=P.unscale(S))
    if not delta > RESOLVED * 2 * es:
        if not delta > 0:
            return assumption_failed(
                rid, f"Wedin gap delta = sigma_k(W1) - sigma_(k+1)(W0) > 0 (delta = {P.unscale(delta):.3e})",
                details=d)
        return _unresolved(rid, "Wedin gap delta = sigma_k(W1) - sigma_(k+1)(W0)", delta, 2 * es, P, d)
    e_lhs, bad = _lhs_error(P, k, rid, d)
    if bad:
        return bad
    lhs = max(d["sin_theta_U"], d["sin_theta_V"])
    num = max(R, S)
    d["rhs_crude"] = P.dW2_s / delta  # residuals <= ||dW||_2
    if kl is not None:
        d["rhs_kl"] = kl / P.unscale(delta)
        d["kl_chain_holds"] = bool(P.dW_2 <= kl + P.unscale(es))
    e_num = 2 * es + P.dW2_s * (e_lhs + P.eps_basis)
    tol = e_lhs + _ratio_tol(num, delta, e_num, 2 * es)
    return _check(rid, lhs, num / delta, tol, d)


def _thm33_rigorous(P: SpectralPair, k: int, kl: float | None) -> Check:
    """sin_k <= ||dW||_2 / (gamma_k - ||dW||_2): numerator moves by eps_s, denominator by 3 eps_s."""
    rid = "thm3.3-rigorous"
    d = _subspace_details(P, k)
    gap, es = P.gap_s(k), P.eps_s
    if not gap > RESOLVED * 2 * es:
        return _unresolved(rid, "gamma_k", gap, 2 * es, P, d)
    if not P.dW2_s < gap:
        return assumption_failed(
            rid, f"||dW||_2 < gamma_k (||dW||_2 / gamma_k = {P.dW2_s / gap:.3g})", details=d)
    den = gap - P.dW2_s
    if not den > RESOLVED * 3 * es:
        return _unresolved(rid, "gamma_k - ||dW||_2", den, 3 * es, P, d)
    e_lhs, bad = _lhs_error(P, k, rid, d)
    if bad:
        return bad
    lhs = max(d["sin_theta_U"], d["sin_theta_V"])
    if kl is not None:
        gap_u = P.unscale(gap)
        d["rhs_kl"] = kl / (gap_u - kl) if kl < gap_u else math.inf
        d["kl_chain_holds"] = bool(P.dW_2 <= kl + P.unscale(es))
    tol = e_lhs + _ratio_tol(P.dW2_s, den, es, 3 * es)
    return _check(rid, lhs, P.dW2_s / den, tol, d)


def _corF13(P: SpectralPair, k: int, kl: float | None) -> Check:
    """Projector distance = sin_k (identity, to 16 max(m, n) eps) and <= ||dW||_2 / delta (Wedin's gap)."""
    rid = "corF.13"
    d = _subspace_details(P, k)
    pU = projector_distance_lowrank(P.U0(k), P.U1(k))
    pV = projector_distance_lowrank(P.V0(k), P.V1(k))
    id_tol = 16.0 * max(P.shape) * EPS64
    errU, errV = abs(pU - d["sin_theta_U"]), abs(pV - d["sin_theta_V"])
    identity_holds = bool(errU <= id_tol and errV <= id_tol)
    d.update(proj_dist_U=pU, proj_dist_V=pV, identity_err_U=errU, identity_err_V=errV,
             identity_tol=id_tol, identity_holds=identity_holds)
    gap, es = P.gap_s(k), P.eps_s
    if gap > 0:
        d["rhs_as_stated"] = P.dW2_s / gap
    delta = float(P.svd1_s.S[k - 1]) - wedin_gap(P.svd0_s.S, P.svd1_s.S, k, P.shape)[0]
    if not delta > RESOLVED * 2 * es:
        if not delta > 0:
            return assumption_failed(
                rid, f"Wedin gap delta = sigma_k(W1) - sigma_(k+1)(W0) > 0 (delta = {P.unscale(delta):.3e})",
                details=d)
        return _unresolved(rid, "Wedin gap delta = sigma_k(W1) - sigma_(k+1)(W0)", delta, 2 * es, P, d)
    e_lhs, bad = _lhs_error(P, k, rid, d)
    if bad:
        return bad
    if kl is not None:
        d["rhs_kl"] = kl / P.unscale(delta)
    lhs = max(pU, pV)
    tol = e_lhs + id_tol + _ratio_tol(P.dW2_s, delta, es, 2 * es)
    c = _check(rid, lhs, P.dW2_s / delta, tol, d)
    # the identity is an equality: it can only be refuted (error above its tolerance), never decided "holds"
    return refine(c, {"projector distance = ||sin Theta||_2": "holds" if identity_holds else "violated"})


def _cor34_weyl(P: SpectralPair, k: int, kl: float | None) -> Check:
    """max_i |sigma_i(W1) - sigma_i(W0)| <= ||dW||_2: each computed sigma is within eps_s of the exact one (Weyl
    on the backward error), so the lhs moves by 2 eps_s and the rhs (dW's rounding and SVD) by eps_s."""
    diff = np.abs(P.svd1_s.S - P.svd0_s.S)
    d = {"k": k, "argmax_i": int(np.argmax(diff)) + 1, "dW_2": P.dW_2, "eps_s": P.unscale(P.eps_s)}
    if kl is not None:
        d["rhs_kl"] = kl
        d["kl_chain_holds"] = bool(P.dW_2 <= kl + P.unscale(P.eps_s))
    return _check("cor3.4-weyl", float(diff.max()), P.dW2_s, 3 * P.eps_s, d, P.exponent)


def _cor34_mirsky(P: SpectralPair, k: int, kl: float | None) -> Check:
    """||sigma(W1) - sigma(W0)||_2 <= ||dW||_F: the r differences move by 2 eps_s each (2 sqrt(r) eps_s in norm),
    ||dW||_F by eps_s."""
    lhs = float(np.linalg.norm(P.svd1_s.S - P.svd0_s.S))
    d = {"k": k, "lhs_squared": P.unscale(P.unscale(lhs**2)), "rhs_squared": P.unscale(P.unscale(P.dWF_s**2)),
         "eps_s": P.unscale(P.eps_s)}
    if kl is not None:
        d["rhs_kl"] = kl
        d["kl_chain_holds"] = bool(P.dW_F <= kl * (1 + 4 * EPS64) + P.unscale(P.eps_s))
    tol = (2 * math.sqrt(P.r) + 1) * P.eps_s + 4 * EPS64 * (lhs + P.dWF_s)
    return _check("cor3.4-mirsky", lhs, P.dWF_s, tol, d, P.exponent)


def _cor35_kyfan(P: SpectralPair, k: int, kl: float | None) -> Check:
    """The chain | ||W1||_(k) - ||W0||_(k) | <= sum |dsigma_i| <= ||dW||_(k) <= k ||dW||_2, every link to
    3 k eps_s (k singular values, each within eps_s, on each side)."""
    S0, S1 = P.svd0_s.S, P.svd1_s.S
    kf0, kf1 = float(np.sum(S0[:k])), float(np.sum(S1[:k]))
    lhs = abs(kf1 - kf0)
    sum_abs = float(np.sum(np.abs(S1[:k] - S0[:k])))
    kf_dW = float(np.sum(P.sv_dW_s[:k]))
    rhs = k * P.dW2_s
    tol = 3 * k * P.eps_s + 4 * k * EPS64 * (kf0 + kf1 + kf_dW)
    chain = (lhs, sum_abs, kf_dW, rhs)
    links = [decide(a, b, tol) for a, b in zip(chain, chain[1:])]
    u = P.unscale
    d = {"k": k, "kyfan_W0": u(kf0), "kyfan_W1": u(kf1), "sum_abs_dsigma": u(sum_abs), "kyfan_dW": u(kf_dW),
         "k_dW_2": u(rhs), "link_sum_abs": links[0] != "violated", "link_kyfan_dW": links[1] != "violated",
         "link_k_dW_2": links[2] != "violated", "eps_s": u(P.eps_s)}
    if kl is not None:
        d["rhs_kl"] = k * kl
        d["kl_chain_holds"] = bool(P.dW_2 <= kl + u(P.eps_s))
    c = _check("cor3.5", lhs, rhs, tol, d, P.exponent)
    return refine(c, dict(zip(("sum |dsigma_i|", "||dW||_(k)", "k ||dW||_2"), links)))


_EVALUATORS: dict[str, Callable[[SpectralPair, int, float | None], Check]] = {
    "thm3.3": _thm33_as_stated,
    "thm3.3-wedin": _thm33_wedin,
    "thm3.3-rigorous": _thm33_rigorous,
    "corF.13": _corF13,
    "cor3.4-weyl": _cor34_weyl,
    "cor3.4-mirsky": _cor34_mirsky,
    "cor3.5": _cor35_kyfan,
}


def gate2_checks(
    pair: SpectralPair, k: int, *, delta_W: float | None = None, mu_W: float | None = None,
    ids: Iterable[str] = GATE2_IDS,
) -> dict[str, Check]:
    """Every Gate II check on an already decomposed pair (no new SVD of W0 or W1; call it for many k)."""
    ids = tuple(ids)
    bad = _validate_k(k, pair.r)
    if bad is None:
        try:
            kl = _kl_bound(delta_W, mu_W)
        except InputError as e:
            bad = str(e)
    if bad is not None:
        return {rid: assumption_failed(rid, bad) for rid in ids}
    out = {rid: _EVALUATORS[rid](pair, int(k), kl) for rid in ids}
    if not np.any(pair.dW_s):
        # W1 == W0 exactly: every left side is exactly 0 (same matrix, same subspaces, same singular values) and
        # every right side is 0 / (a positive gap) = 0 -- known exactly, so decided with tol 0 (0 <= 0 holds).
        for rid, c in out.items():
            if c.verdict in ("holds", "violated", "indeterminate"):
                kept = {key: v for key, v in c.details.items() if not key.endswith("_scaled") and key != "scale_exponent"}
                out[rid] = make_check(rid, 0.0, 0.0, details={**kept, "identical_inputs": True})
    return out


def gate2_all(
    W0: Any, W1: Any, k: int, *, delta_W: float | None = None, mu_W: float | None = None,
    svd0: SVD | None = None, device: Any = None,
) -> dict[str, Check]:
    """All Gate II checks ``{result_id: Check}`` from one SVD of W0, one of W1 and the singular values of dW.

    Bad inputs (NaN/Inf, shape mismatch, non-2-d, k out of range, a lone or invalid delta_W/mu_W) give every
    check an ``assumption_failed`` naming the problem; complex inputs are refused (``ComplexInputError``).
    """
    try:
        pair = spectral_pair(W0, W1, svd0=svd0, device=device)
    except ComplexInputError:
        raise
    except NonFiniteError as e:
        return {rid: assumption_failed(rid, f"W0 and W1 finite: {e}") for rid in GATE2_IDS}
    except ShapeMismatchError as e:
        return {rid: assumption_failed(rid, f"W0 and W1 of the same shape: {e}") for rid in GATE2_IDS}
    except InputError as e:
        return {rid: assumption_failed(rid, f"W0, W1 real 2-d matrices: {e}") for rid in GATE2_IDS}
    return gate2_checks(pair, k, delta_W=delta_W, mu_W=mu_W)


def _one(result_id: str) -> Callable[..., Check]:
    def check(W0: Any, W1: Any, k: int, *, delta_W: float | None = None, mu_W: float | None = None,
              device: Any = None) -> Check:
        try:
            pair = spectral_pair(W0, W1, device=device)
        except ComplexInputError:
            raise
        except NonFiniteError as e:
            return assumption_failed(result_id, f"W0 and W1 finite: {e}")
        except ShapeMismatchError as e:
            return assumption_failed(result_id, f"W0 and W1 of the same shape: {e}")
        except InputError as e:
            return assumption_failed(result_id, f"W0, W1 real 2-d matrices: {e}")
        return gate2_checks(pair, k, delta_W=delta_W, mu_W=mu_W, ids=(result_id,))[result_id]

    check.__name__ = check.__qualname__ = "check_" + result_id.replace(".", "").replace("-", "_")
    check.__doc__ = f"Evaluate ``{result_id}`` on (W0, W1, k); see the module docstring."
    return check


# ----------------------------------------------------------------------------------------------------------------
# Gate II on seeded synthetic pairs (``theory.synthetic``): one instance, a grid, the sweep table
# ----------------------------------------------------------------------------------------------------------------


def gate2_synthetic(seed: int, spectrum: str, perturbation: str, m: int, n: int, k: int, ratio: float, *,
                    device: Any = None, **spectrum_params) -> tuple[float, dict[str, Check]]:
    """Every Gate II check on one seeded synthetic pair (``theory.synthetic.synthetic_pair``; a ``kl_budget``
    pair also gets its KL-form bound); returns (||W1 - W0||_2 / gamma_k(W0) measured on the float64 matrices,
    the checks).
    """
    pair = synthetic_pair(seed, spectrum, perturbation, m, n, k, ratio, **spectrum_params)
    kl = {key: pair[key] for key in ("delta_W", "mu_W") if key in pair}
    checks = gate2_all(pair["W0"], pair["W1"], k, device=device, **kl)
    return float(checks["thm3.3"].details.get("dW_over_gap", np.nan)), checks


def gate2_grid(seed: int, ratios: Iterable[float], *, spectra: Iterable[str], perturbations: Iterable[str],
               shapes: Iterable[tuple[int, int]], k: int) -> Iterator[tuple[dict[str, Any], dict[str, Check]]]:
    """Yield ``(instance, checks)`` over spectra x perturbations x shapes x ratios (last varies fastest).

    ``instance`` = {"instance", "seed", "spectrum", "perturbation", "m", "n", "k", "target_ratio",
    "dW_over_gap"}; instance i is seeded by the i-th word of ``SeedSequence(seed)`` (the same grid and seed give
    the same bits).
    """
    grid = [(s, p, sh, float(r)) for s in spectra for p in perturbations for sh in shapes for r in ratios]
    child_seeds = np.random.SeedSequence(seed).generate_state(len(grid), dtype=np.uint32)
    for i, ((sfam, pfam, (m, n), target), cs) in enumerate(zip(grid, child_seeds)):
        dW_over_gap, checks = gate2_synthetic(int(cs), sfam, pfam, m, n, k, target)
        yield ({"instance": i, "seed": int(cs), "spectrum": sfam, "perturbation": pfam, "m": m, "n": n, "k": k,
                "target_ratio": target, "dW_over_gap": dW_over_gap}, checks)


def synthetic_sweep(
    seed: int = 0,
    ratios: Iterable[float] = tuple(np.logspace(-4, 0.5, 19)),
    *,
    spectra: Sequence[str] = SPECTRUM_FAMILIES,
    perturbations: Sequence[str] = PERTURBATION_FAMILIES,
    shapes: Sequence[tuple[int, int]] = ((12, 8), (8, 12)),
    k: int = 3,
) -> pd.DataFrame:
    """Evaluate every Gate II check over ||dW||_2 / gamma_k = ``ratios`` (by default 1e-4 to 10^0.5 ~ 3.16, four
    per decade) on every spectrum x perturbation family x shape; keep every row (7 checks per instance).

    Columns: ``instance`` (id), ``seed``, ``spectrum``, ``perturbation``, ``m``, ``n``, ``k``, ``target_ratio``,
    ``dW_over_gap`` (||W1 - W0||_2 / gamma_k(W0), both measured from the float64 matrices; it differs from
    ``target_ratio`` by the rounding of W0 + dW, visible when gamma_k is tiny), then ``Check.as_row()``:
    ``result_id``, ``lhs``, ``rhs``, ``ratio`` (= lhs / rhs), ``slack``, ``holds``, ``assumptions_hold``,
    ``failed_assumption`` ("" if none), ``verdict``, and the scalar details as ``d_*``. Each instance has its own
    seed derived from ``seed``. ``df.attrs["regime"] = "dW_over_gap"`` (the x axis of the figures).
    """
    rows = []
    with threadpool_limits(1):  # tiny matrices: a multi-threaded BLAS only oversubscribes the cores
        for inst, checks in gate2_grid(seed, ratios, spectra=spectra, perturbations=perturbations, shapes=shapes,
                                       k=k):
            for c in checks.values():
                row = {**inst, **c.as_row()}
                row["failed_assumption"] = row["failed_assumption"] or ""
                rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["regime"] = "dW_over_gap"
    return df


# ----------------------------------------------------------------------------------------------------------------
# Registration and campaigns
# ----------------------------------------------------------------------------------------------------------------

_COMMON = ("W0, W1 finite real matrices of the same shape", "1 <= k <= min(m, n)")

thm33_as_stated = register(
    "thm3.3",
    statement="max(||sin Theta(U_k)||_2, ||sin Theta(V_k)||_2) <= ||dW||_2 / gamma_k (as stated; first order)",
    gate="II", assumptions=(*_COMMON, "gamma_k > 0"), exact=False, paper_ref="Thm 3.3",
)(_one("thm3.3"))

thm33_wedin = register(
    "thm3.3-wedin",
    statement="max(||sin Theta(U_k)||_2, ||sin Theta(V_k)||_2) <= max(||dW V_k(W1)||_2, ||dW^T U_k(W1)||_2) / delta,"
              " delta = sigma_k(W1) - sigma_{k+1}(W0) (sigma_{r+1} := 0)",
    gate="II", assumptions=(*_COMMON, "delta > 0"), paper_ref="Thm 3.3 (Wedin 1972; Stewart & Sun Thm V.4.4)",
)(_one("thm3.3-wedin"))

thm33_rigorous = register(
    "thm3.3-rigorous",
    statement="max(||sin Theta(U_k)||_2, ||sin Theta(V_k)||_2) <= ||dW||_2 / (gamma_k - ||dW||_2)",
    gate="II", assumptions=(*_COMMON, "gamma_k > 0", "||dW||_2 < gamma_k"), paper_ref="Thm 3.3 (Wedin + Weyl)",
)(_one("thm3.3-rigorous"))

corF13 = register(
    "corF.13",
    statement="||U_kU_k^T(W0) - U_kU_k^T(W1)||_2 = ||sin Theta(U_k)||_2 (same for V) and <= ||dW||_2 / delta",
    gate="II", assumptions=(*_COMMON, "delta > 0 (for the bound)"), paper_ref="Cor F.13",
)(_one("corF.13"))

cor34_weyl = register(
    "cor3.4-weyl",
    statement="|sigma_i(W1) - sigma_i(W0)| <= ||dW||_2 for every i",
    gate="II", assumptions=_COMMON, paper_ref="Cor 3.4 (Weyl)",
)(_one("cor3.4-weyl"))

cor34_mirsky = register(
    "cor3.4-mirsky",
    statement="||sigma(W1) - sigma(W0)||_2 <= ||dW||_F",
    gate="II", assumptions=_COMMON, paper_ref="Cor 3.4 (Mirsky)",
)(_one("cor3.4-mirsky"))

cor35_kyfan = register(
    "cor3.5",
    statement="| ||W1||_(k) - ||W0||_(k) | <= sum_{i<=k} |dsigma_i| <= ||dW||_(k) <= k ||dW||_2",
    gate="II", assumptions=_COMMON, paper_ref="Cor 3.5 (Ky Fan)",
)(_one("cor3.5"))


def counterexample_as_stated() -> tuple[np.ndarray, np.ndarray, int]:
    """W0 = diag(1, 0), W1 = diag(0.4, 0.6), k = 1: the top singular pair swaps, sin Theta = 1 > 0.6 = ||dW||_2/gamma_1.

    Wedin holds with equality (residual 0.6, delta = 0.6 - 0 = 0.6); the rigorous bound is 0.6 / 0.4 = 1.5.
    """
    return np.diag([1.0, 0.0]), np.diag([0.4, 0.6]), 1


@functools.lru_cache(maxsize=8)
def _campaign_checks(seed: int) -> tuple[dict[str, Check], ...]:
    """Every Gate II check on a seeded family: 5 spectra x 5 perturbations x 2 shapes x 4 ratios, plus the
    structured counterexample to the as-stated form."""
    with threadpool_limits(1):  # tiny matrices: a multi-threaded BLAS only oversubscribes the cores
        return _campaign_instances(seed)


def _campaign_instances(seed: int) -> tuple[dict[str, Check], ...]:
    grid = gate2_grid(seed, (1e-3, 0.1, 0.7, 2.0), spectra=SPECTRUM_FAMILIES, perturbations=PERTURBATION_FAMILIES,
                      shapes=((10, 6), (6, 10)), k=2)
    return (gate2_all(*counterexample_as_stated()), *(checks for _, checks in grid))


def _attach_campaign(fn: Callable[..., Check], rid: str) -> None:
    def campaign(seed: int) -> list[Check]:
        return [checks[rid] for checks in _campaign_checks(int(seed))]

    campaign.__name__ = f"campaign_{rid}"
    fn.campaign(campaign)  # type: ignore[attr-defined]


for _fn in (thm33_as_stated, thm33_wedin, thm33_rigorous, corF13, cor34_weyl, cor34_mirsky, cor35_kyfan):
    _attach_campaign(_fn, _fn.result_id)  # type: ignore[attr-defined]


_GATE2_DOC = """Check {rid} on the pair (W0, W1 = W0 + dW) at k: {statement} ({paper_ref}).

Parameters
----------
W0, W1 : array_like, shape (m, n)
    The matrix before and after the update (numpy or torch, any float dtype, bf16 included; upcast to float64).
k : int
    Number of top singular values / vectors compared, 1 <= k <= min(m, n).
delta_W, mu_W : float, optional
    Lemma F.10's KL budget of the block and the smallest eigenvalue of its curvature: the KL-form right side
    sqrt(2 delta_W / mu_W) goes into ``details``.
device : str or torch.device, optional
    Where the SVDs run (torch, float64); None or "cpu" uses LAPACK.

Returns
-------
Check
    ``lhs``, ``rhs``, ``verdict`` and ``details``; bad inputs give an assumption failure naming the problem (see
    the module docstring for the tolerances).

Examples
--------
{example}
"""
_SMALL_PAIR = """>>> import numpy as np
>>> W0 = np.diag([3.0, 1.0])
>>> W1 = W0 + 0.1 * np.array([[0.0, 1.0], [1.0, 0.0]])  # ||dW||_2 = 0.1, gamma_1 = 2
"""
_GATE2_EXAMPLES = {
    thm33_as_stated: """The top singular pair swaps while ||dW||_2 / gamma_1 = 0.6 < 1 (``counterexample_as_stated``):

>>> W0, W1, k = counterexample_as_stated()
>>> c = thm33_as_stated(W0, W1, k)
>>> c.verdict, round(c.lhs, 9), round(c.rhs, 9)
('violated', 1.0, 0.6)""",
    thm33_wedin: _SMALL_PAIR + """>>> c = thm33_wedin(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.049814, 0.049876)""",
    thm33_rigorous: _SMALL_PAIR + """>>> c = thm33_rigorous(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.049814, 0.052632)
>>> thm33_rigorous(W0, W0 + np.array([[0.0, 2.5], [2.5, 0.0]]), 1).verdict  # ||dW||_2 >= gamma_1
'assumption-failed'""",
    corF13: _SMALL_PAIR + """>>> c = corF13(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.049814, 0.049876)""",
    cor34_weyl: _SMALL_PAIR + """>>> c = cor34_weyl(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.004988, 0.1)""",
    cor34_mirsky: _SMALL_PAIR + """>>> c = cor34_mirsky(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.007053, 0.141421)""",
    cor35_kyfan: _SMALL_PAIR + """>>> c = cor35_kyfan(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.004988, 0.1)""",
}
for _fn, _example in _GATE2_EXAMPLES.items():  # one numpydoc docstring per registered Gate II check
    _res = RESULTS[_fn.result_id]  # type: ignore[attr-defined]
    _fn.__doc__ = _GATE2_DOC.format(rid=_res.id, statement=_res.statement, paper_ref=_res.paper_ref,
                                    example=_example)
