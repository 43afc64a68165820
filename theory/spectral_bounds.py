"""The Gate II bounds evaluated on one decomposed pair: ``spectral_pair`` (one SVD of W0, one of W1, the singular
values of dW, at a power-of-two scale), Wedin's gap, the low-rank projector distance, and the seven evaluators behind
``gate2_checks`` / ``gate2_all`` with their derived tolerances.

The statements, Wedin's hypotheses and the error model are in the module docstring of ``theory.spectral``, which
registers the seven results (``theory.RESULTS``) and runs them on the synthetic campaigns and grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
from jaxtyping import Float

from theory.check import Check, assumption_failed, decide, ldexp_sat, make_check, refine
from theory.errors import ComplexInputError, InputError, NonFiniteError, ShapeMismatchError
from theory.linalg import SVD, pow2_exponent, scale_pow2, sin_theta, singular_values, spectral_gap, svd64, to_f64

__all__ = [
    "GATE2_IDS",
    "SpectralPair",
    "spectral_pair",
    "wedin_gap",
    "projector_distance_lowrank",
    "gate2_all",
    "gate2_checks",
]


EPS64 = float(np.finfo(np.float64).eps)
GATE2_IDS = ("thm3.3", "thm3.3-wedin", "thm3.3-rigorous", "corF.13", "cor3.4-weyl", "cor3.4-mirsky", "cor3.5")


# ----------------------------------------------------------------------------------------------------------------
# Shared internals: one SVD of W0, one of W1, the singular values of dW
# ----------------------------------------------------------------------------------------------------------------


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
        return ldexp_sat(float(x), self.exponent)

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


def _wedin_gap_unresolved(rid: str, delta: float, P: SpectralPair, d: dict) -> Check | None:
    """The failed-assumption check when Wedin's delta (scaled units) is not > 0 or not resolved above rounding."""
    if delta > RESOLVED * 2 * P.eps_s:
        return None
    if not delta > 0:
        return assumption_failed(
            rid, f"Wedin gap delta = sigma_k(W1) - sigma_(k+1)(W0) > 0 (delta = {P.unscale(delta):.3e})", details=d)
    return _unresolved(rid, "Wedin gap delta = sigma_k(W1) - sigma_(k+1)(W0)", delta, 2 * P.eps_s, P, d)


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
    bad = _wedin_gap_unresolved(rid, delta, P, d)
    if bad:
        return bad
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
    bad = _wedin_gap_unresolved(rid, delta, P, d)
    if bad:
        return bad
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
