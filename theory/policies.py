"""Policies with exact KL and exact Fisher, for Gate I (KL anchor) of Zhu et al. (arXiv 2511.08567).

Three classes, one interface. A policy maps parameters ``theta: (d,)`` to conditional distributions
``pi_theta(y | x)`` over ``Y`` outputs for each of ``X`` contexts, with a fixed context distribution ``rho: (X,)``:

- ``TabularSoftmax``:  pi(.|x) = softmax(theta_x),            theta = (theta_1, ..., theta_X), d = X * Y
- ``LogLinear``:       pi(.|x) = softmax(Phi_x theta),         Phi_x: (Y, d) fixed features
- ``MLPPolicy``:       pi(.|x) = softmax(W2 act(W1 e_x + b1) + b2), a 2-layer tanh/GELU net (nonlinear in theta)

Everything is float64 and exact up to rounding (no sampling): with logits z(theta): (X, Y), Jacobian
J_x = dz_x/dtheta: (Y, d), and the per-context covariance C_x = diag(pi_x) - pi_x pi_x^T,

    score       grad log pi(y|x)        = J_x[y] - pi_x^T J_x
    Fisher      F(theta)                 = sum_x rho(x) J_x^T C_x J_x          (= E_rho E_pi[score score^T])
    Hessian     hess log pi(y|x)         = hess z_y(x) - sum_k pi_k(x) hess z_k(x) - J_x^T C_x J_x
    KL          kl(a, b)                 = sum_x rho(x) KL(pi_a(.|x) || pi_b(.|x))

For the two linear-in-theta classes hess z = 0, so hess log pi(y|x) = -F_x for every y (the fact behind the trivial
case of Lemma F.6). Heavy work (Jacobians, Hessians, L-BFGS) runs in torch on ``device``; results come back as
float64 numpy arrays.

``tilt(q, R, beta)`` is the Gibbs tilt q~ ∝ q exp(R / beta) of Lemma F.2 and ``m_project(policy, theta, q~)`` the
M-projection argmin_theta' KL(q~ || pi_theta') of Lemma F.3 / Prop 3.1: closed form (tabular), damped Newton on a
convex objective (log-linear), L-BFGS then Newton polish in float64 warm-started at theta (MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from theory.errors import InputError, NonFiniteError, ShapeMismatchError
from theory.linalg import as_real_array, reject_complex

__all__ = [
    "Policy",
    "TabularSoftmax",
    "LogLinear",
    "MLPPolicy",
    "MProjection",
    "tilt",
    "m_project",
    "kl_rows",
    "as_distribution",
    "campaign_policies",
]

EPS = float(np.finfo(np.float64).eps)
_MAX_HESSIAN_ENTRIES = 60_000_000  # (X * Y * d * d) float64 entries: ~0.5 GB


def _phi_kl(d: np.ndarray) -> np.ndarray:
    """phi(d) = e^d d - e^d + 1 >= 0, accurate for small |d| (Taylor series) and large |d| (closed form).

    KL(a || b) = sum_y pi_b(y) phi(log pi_a(y) - log pi_b(y)); every term is >= 0, so tiny KLs keep full relative
    precision instead of cancelling (sum_y pi_a d_y cancels when d is small).
    """
    d = np.asarray(d, dtype=np.float64)
    out = np.empty_like(d)
    small = np.abs(d) < 0.5
    ds = d[small]
    # sum_{n>=2} (n-1)/n! d^n, truncated at n = 25 (next term < 1e-27 * d^2 for |d| < 0.5); the closed form
    # e^d (d - 1) + 1 cancels for small |d| and is used only for |d| >= 0.5 (relative error a few eps there)
    coef = [(n - 1) / math.factorial(n) for n in range(2, 26)]
    acc = np.zeros_like(ds)
    for c in reversed(coef):
        acc = acc * ds + c
    out[small] = acc * ds * ds
    dl = d[~small]
    with np.errstate(over="ignore", invalid="ignore"):
        out[~small] = np.exp(dl) * (dl - 1.0) + 1.0
    return out


def kl_rows(log_p: Float[np.ndarray, "X Y"], log_q: Float[np.ndarray, "X Y"]) -> Float[np.ndarray, " X"]:
    """KL(p(.|x) || q(.|x)) per context from log-probabilities (p = 0 entries contribute 0; q = 0 under p > 0: inf)."""
    log_p = as_real_array(log_p, "log_p")
    log_q = as_real_array(log_q, "log_q")
    if log_p.shape != log_q.shape:
        raise ShapeMismatchError(f"log_p has shape {log_p.shape} but log_q has shape {log_q.shape}")
    q = np.exp(log_q)
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        d = log_p - log_q
    d = np.where(np.isfinite(d), d, 0.0)
    # q phi(d) = p (d - 1) + q: the series form where |d| is small, the closed form (no 0 * inf when q underflows
    # while p does not) elsewhere
    small = np.abs(d) < 0.5
    terms = np.where(small, q * _phi_kl(np.where(small, d, 0.0)), p * (d - 1.0) + q)
    terms = np.where(np.isneginf(log_p), q, terms)
    terms = np.where(np.isneginf(log_q) & ~np.isneginf(log_p), np.inf, terms)
    return terms.sum(axis=-1)


def as_distribution(q: Any, shape: tuple[int, int], name: str = "q") -> Float[np.ndarray, "X Y"]:
    """Validate a conditional distribution table (X, Y) (a (Y,) vector is accepted for X = 1)."""
    arr = as_real_array(q, name)
    if arr.ndim == 1 and shape[0] == 1:
        arr = arr[None, :]
    if arr.shape != shape:
        raise ShapeMismatchError(f"{name} has shape {arr.shape}, the policy's outputs have shape {shape}")
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(f"{name}: non-finite probabilities")
    if np.any(arr < 0):
        raise InputError(f"{name}: negative probabilities")
    sums = arr.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > 64 * EPS * arr.shape[1]):
        raise InputError(f"{name}: rows must sum to 1 (got row sums in [{sums.min():.17g}, {sums.max():.17g}])")
    return arr


def tilt(q: Any, R: Any, beta: float) -> Float[np.ndarray, "X Y"]:
    """Gibbs tilt of Lemma F.2: q~_beta(y|x) = q(y|x) exp(R(x,y)/beta) / Z_x, computed in log space.

    ``q``: (X, Y) or (Y,) probabilities (rows sum to 1); ``R``: same shape, finite; ``beta > 0``. Entries with
    q = 0 stay 0. Stable for any beta: log q~ = log q + R/beta - logsumexp(log q + R/beta).
    """
    q = as_real_array(q, "q")
    R = as_real_array(R, "R")
    if q.shape != R.shape:
        raise ShapeMismatchError(f"q has shape {q.shape} but the reward R has shape {R.shape}")
    if not np.all(np.isfinite(R)):
        raise NonFiniteError("R: non-finite rewards")
    if not (isinstance(beta, (int, float, np.floating)) and math.isfinite(beta) and beta > 0):
        raise InputError(f"beta must be a finite number > 0 (Lemma F.2), got {beta!r}")
    squeeze = q.ndim == 1
    q2 = as_distribution(q[None, :] if squeeze else q, (1, q.shape[0]) if squeeze else q.shape, "q")
    R2 = R[None, :] if squeeze else R
    with np.errstate(divide="ignore"):
        a = np.log(q2) + R2 / beta
    a_max = np.max(a, axis=1, keepdims=True)
    e = np.exp(a - a_max)  # the largest entry is exactly 1: no overflow, and rows normalise to ~eps
    out = e / e.sum(axis=1, keepdims=True)
    return out[0] if squeeze else out


@dataclass(frozen=True)
class MProjection:
    """Result of ``m_project``: theta_plus, the gradient norm of KL(q~ || pi_theta') there, and iteration count."""

    theta_plus: Float[np.ndarray, " d"]
    residual: float
    iterations: int
    converged: bool
    method: str


class Policy:
    """Common interface. Subclasses implement ``_logits(theta: Tensor (d,)) -> Tensor (X, Y)`` in torch float64."""

    n_contexts: int
    n_outputs: int
    n_params: int
    linear_in_theta: bool = False  # True: logits = Phi theta (exponential family, hess z = 0)

    def __init__(self, rho: Any = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        X = self.n_contexts
        if rho is None:
            rho = np.full(X, 1.0 / X)
        self.rho = as_distribution(as_real_array(rho, "rho").reshape(1, -1), (1, X), "rho")[0]
        self._rho_t = torch.as_tensor(self.rho, dtype=torch.float64, device=self.device)
        self.blocks: dict[str, slice] = {"theta": slice(0, self.n_params)}
        self.block_shapes: dict[str, tuple[int, ...]] = {"theta": (self.n_params,)}

    # ---- conversions -------------------------------------------------------------------------------------------
    def _t(self, theta: Any, name: str = "theta") -> torch.Tensor:
        reject_complex(theta, name)
        if isinstance(theta, torch.Tensor):
            t = theta.detach().to(device=self.device, dtype=torch.float64)
        else:
            arr = np.asarray(theta, dtype=np.float64)
            t = torch.as_tensor(arr, dtype=torch.float64, device=self.device)
        if t.shape != (self.n_params,):
            raise ShapeMismatchError(f"{name} has shape {tuple(t.shape)}, the policy has {self.n_params} parameters")
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name}: {int((~torch.isfinite(t)).sum())} non-finite parameters")
        return t

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_contexts, self.n_outputs)

    def _logits(self, theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- distributions -----------------------------------------------------------------------------------------
    def logits(self, theta: Any) -> Float[np.ndarray, "X Y"]:
        return self._np(self._logits(self._t(theta)))

    def log_probs(self, theta: Any) -> Float[np.ndarray, "X Y"]:
        """log pi_theta(y|x) (log-softmax of the logits)."""
        return self._np(torch.log_softmax(self._logits(self._t(theta)), dim=-1))

    def probs(self, theta: Any) -> Float[np.ndarray, "X Y"]:
        return np.exp(self.log_probs(theta))

    def kl(self, theta_a: Any, theta_b: Any) -> float:
        """E_rho KL(pi_a(.|x) || pi_b(.|x)), every term nonnegative (no cancellation for tiny KL)."""
        return float(self.rho @ kl_rows(self.log_probs(theta_a), self.log_probs(theta_b)))

    def kl_from(self, q: Any, theta: Any) -> float:
        """E_rho KL(q(.|x) || pi_theta(.|x)) for a target table q: (X, Y)."""
        q = as_distribution(q, self.shape)
        with np.errstate(divide="ignore"):
            lq = np.log(q)
        return float(self.rho @ kl_rows(lq, self.log_probs(theta)))

    def tv(self, q: Any, theta: Any) -> float:
        """E_rho TV(q(.|x), pi_theta(.|x)) = E_rho 1/2 sum_y |q - pi|."""
        q = as_distribution(q, self.shape)
        return float(self.rho @ (0.5 * np.abs(q - self.probs(theta)).sum(axis=1)))

    # ---- derivatives -------------------------------------------------------------------------------------------
    def _jacobian_t(self, t: torch.Tensor) -> torch.Tensor:
        return torch.func.jacrev(self._logits)(t)  # (X, Y, d)

    def logit_jacobian(self, theta: Any) -> Float[np.ndarray, "X Y d"]:
        """J[x, y, :] = d z_y(x) / d theta."""
        return self._np(self._jacobian_t(self._t(theta)))

    def score(self, theta: Any) -> Float[np.ndarray, "X Y d"]:
        """grad_theta log pi(y|x) = J_x[y] - pi_x^T J_x."""
        t = self._t(theta)
        J = self._jacobian_t(t)
        p = torch.softmax(self._logits(t), dim=-1)
        return self._np(J - torch.einsum("xy,xyd->xd", p, J)[:, None, :])

    def _fisher_t(self, t: torch.Tensor) -> torch.Tensor:
        J = self._jacobian_t(t)
        return self._fisher_from(J, torch.softmax(self._logits(t), dim=-1))

    def _fisher_from(self, J: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # F = A^T A - B^T B with A[(x,y)] = sqrt(rho_x pi_xy) J_xy and B[x] = sqrt(rho_x) E_pi[J_x]: two GEMMs
        d = J.shape[-1]
        A = (torch.sqrt(self._rho_t[:, None] * p)[..., None] * J).reshape(-1, d)
        B = torch.sqrt(self._rho_t)[:, None] * torch.einsum("xy,xyd->xd", p, J)
        F = A.T @ A - B.T @ B
        return 0.5 * (F + F.T)

    def fisher(self, theta: Any) -> Float[np.ndarray, "d d"]:
        """Exact Fisher F(theta) = sum_x rho(x) J_x^T (diag pi_x - pi_x pi_x^T) J_x (symmetrised)."""
        return self._np(self._fisher_t(self._t(theta)))

    def fisher_with_error(self, theta: Any) -> tuple[Float[np.ndarray, "d d"], float]:
        """``(F(theta), e_F)`` with e_F a bound on ||F_computed - F_exact||_2.

        Error model: F = A^T A - B^T B (``_fisher_from``) cancels when pi is concentrated; each product of sums over
        Y outputs and the softmax / Jacobian inputs carry relative ~(Y + d) eps, so the entrywise error is
        <= c (Y + d) eps (|A|^T |A| + |B|^T |B|) and e_F its spectral norm (c = 8)."""
        t = self._t(theta)
        J = self._jacobian_t(t)
        p = torch.softmax(self._logits(t), dim=-1)
        d = J.shape[-1]
        A = (torch.sqrt(self._rho_t[:, None] * p)[..., None] * J).reshape(-1, d).abs()
        B = (torch.sqrt(self._rho_t)[:, None] * torch.einsum("xy,xyd->xd", p, J)).abs()
        M = self._np(A.T @ A + B.T @ B)
        err = 8 * (self.n_outputs + d) * EPS * float(np.linalg.norm(M, 2))
        return self._np(self._fisher_from(J, p)), err

    def fisher_per_context(self, theta: Any) -> Float[np.ndarray, "X d d"]:
        """F_x = J_x^T (diag pi_x - pi_x pi_x^T) J_x (unweighted by rho)."""
        t = self._t(theta)
        J = self._jacobian_t(t)
        p = torch.softmax(self._logits(t), dim=-1)
        Jp = torch.einsum("xy,xyd->xd", p, J)
        Fx = torch.einsum("xy,xyd,xye->xde", p, J, J) - torch.einsum("xd,xe->xde", Jp, Jp)
        return self._np(0.5 * (Fx + Fx.transpose(1, 2)))

    def logit_hessians(self, theta: Any) -> Float[np.ndarray, "X Y d d"]:
        """hess_theta z_y(x) for every (x, y); zero for classes linear in theta."""
        X, Y, d = self.n_contexts, self.n_outputs, self.n_params
        if X * Y * d * d > _MAX_HESSIAN_ENTRIES:
            raise InputError(
                f"per-(x, y) Hessians would need {X * Y * d * d:,} float64 entries (X={X}, Y={Y}, d={d}); "
                "use weighted_hessian_logp for contractions, or a smaller policy"
            )
        if self.linear_in_theta:
            return np.zeros((X, Y, d, d))
        t = self._t(theta)
        return self._np(torch.func.jacfwd(torch.func.jacrev(self._logits))(t))

    def hessian_logp(self, theta: Any) -> Float[np.ndarray, "X Y d d"]:
        """hess_theta log pi(y|x) = hess z_y - sum_k pi_k hess z_k - F_x, for every (x, y) (Lemma F.6)."""
        Hz = self.logit_hessians(theta)
        p = self.probs(theta)
        Fx = self.fisher_per_context(theta)
        mean_Hz = np.einsum("xy,xyde->xde", p, Hz)
        return Hz - mean_Hz[:, None] - Fx[:, None]

    def weighted_hessian_logp(self, theta: Any, w: Any) -> Float[np.ndarray, "d d"]:
        """sum_{x,y} w(x,y) hess log pi(y|x) as one d x d matrix (cheap: one Hessian of a scalar)."""
        t = self._t(theta)
        w_t = torch.as_tensor(as_real_array(w, "w"), dtype=torch.float64, device=self.device)
        if tuple(w_t.shape) != self.shape:
            raise ShapeMismatchError(f"weights have shape {tuple(w_t.shape)}, the policy's outputs {self.shape}")

        def f(th: torch.Tensor) -> torch.Tensor:
            return (w_t * torch.log_softmax(self._logits(th), dim=-1)).sum()

        H = torch.func.hessian(f)(t)
        return self._np(0.5 * (H + H.T))

    def max_hessian_logp_norm(self, theta: Any) -> float:
        """L = max_{x,y} ||hess log pi(y|x)||_op at theta (exact eigenvalues; for linear classes max_x ||F_x||)."""
        if self.linear_in_theta:
            Fx = self.fisher_per_context(theta)
            return float(max(np.max(np.abs(np.linalg.eigvalsh(F))) for F in Fx))
        H = self.hessian_logp(theta)
        ev = np.linalg.eigvalsh(0.5 * (H + np.swapaxes(H, -1, -2)))
        return float(np.max(np.abs(ev)))

    # ---- M-projection ------------------------------------------------------------------------------------------
    def cross_entropy_grad(self, q: Any, theta: Any) -> Float[np.ndarray, " d"]:
        """grad_theta' KL(q || pi_theta') = sum_x rho(x) J_x^T (pi_x - q_x)."""
        q = as_distribution(q, self.shape)
        t = self._t(theta)
        q_t = torch.as_tensor(q, dtype=torch.float64, device=self.device)

        def f(th: torch.Tensor) -> torch.Tensor:
            return -(self._rho_t[:, None] * q_t * torch.log_softmax(self._logits(th), dim=-1)).sum()

        return self._np(torch.func.grad(f)(t))

    def m_project(self, theta: Any, q: Any, **kw: Any) -> MProjection:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_theta(self, seed: int, scale: float = 1.0) -> Float[np.ndarray, " d"]:
        """A seeded parameter vector (standard normal times ``scale``)."""
        return scale * np.random.default_rng(seed).standard_normal(self.n_params)


def _require_full_support(q: np.ndarray, who: str) -> None:
    if np.any(q <= 0):
        raise InputError(
            f"{who}: the target q~ has {int(np.sum(q <= 0))} zero-probability outputs; KL(q~ || pi_theta') has no "
            "minimiser in a softmax class then (the infimum needs infinite logits)"
        )


class TabularSoftmax(Policy):
    """pi(.|x) = softmax(theta_x), theta = concatenation of X logit vectors of length Y (d = X * Y).

    Shifting all logits of one context by c changes nothing, so F(theta) 1_x = 0: F is singular with null space
    spanned by the per-context all-ones vectors (the counterexample behind the corrected Prop 3.2).
    """

    linear_in_theta = True

    def __init__(self, n_outputs: int, n_contexts: int = 1, rho: Any = None, device: str | torch.device = "cpu"):
        if n_outputs < 2 or n_contexts < 1:
            raise InputError(f"need n_outputs >= 2 and n_contexts >= 1, got {n_outputs}, {n_contexts}")
        self.n_contexts, self.n_outputs = int(n_contexts), int(n_outputs)
        self.n_params = self.n_contexts * self.n_outputs
        super().__init__(rho, device)

    def _logits(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.reshape(self.n_contexts, self.n_outputs)

    def _jacobian_t(self, t: torch.Tensor) -> torch.Tensor:
        X, Y = self.shape
        return torch.eye(X * Y, dtype=torch.float64, device=self.device).reshape(X, Y, X * Y)

    def m_project(self, theta: Any, q: Any, **kw: Any) -> MProjection:
        """Closed form: pi_theta+ = q~ exactly; theta+ - theta is chosen mean-zero per context (orthogonal to
        null(F)), i.e. the minimum-norm update reaching q~."""
        q = as_distribution(q, self.shape, "q_tilde")
        _require_full_support(q, "m_project (tabular)")
        t = self._np(self._t(theta)).reshape(self.shape)
        lp = self.log_probs(theta)
        step = np.log(q) - lp
        step = step - step.mean(axis=1, keepdims=True)
        theta_plus = (t + step).reshape(-1)
        res = float(np.linalg.norm(self.cross_entropy_grad(q, theta_plus)))
        return MProjection(theta_plus, res, 0, True, "closed-form")


class LogLinear(Policy):
    """pi(.|x) ∝ exp(Phi_x theta) with fixed features ``Phi``: (Y, d) shared by all contexts, or (X, Y, d)."""

    linear_in_theta = True

    def __init__(self, features: Any, rho: Any = None, device: str | torch.device = "cpu"):
        Phi = as_real_array(features, "features")
        if Phi.ndim == 2:
            Phi = Phi[None]
        if Phi.ndim != 3 or Phi.shape[1] < 2:
            raise InputError(f"features must be (Y, d) or (X, Y, d) with Y >= 2, got shape {np.shape(features)}")
        if not np.all(np.isfinite(Phi)):
            raise NonFiniteError("features: non-finite entries")
        self.n_contexts, self.n_outputs, self.n_params = Phi.shape
        self.Phi = Phi
        super().__init__(rho, device)
        self._Phi_t = torch.as_tensor(Phi, dtype=torch.float64, device=self.device)

    def _logits(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.einsum("xyd,d->xy", self._Phi_t, theta)

    def _jacobian_t(self, t: torch.Tensor) -> torch.Tensor:
        return self._Phi_t

    def m_project(self, theta: Any, q: Any, *, tol: float | None = None, max_iter: int = 100, **kw: Any) -> MProjection:
        """Damped Newton on the convex G(theta') = KL(q~ || pi_theta'); the minimiser matches moments
        E_rho E_q~[Phi] = E_rho E_pi+[Phi]. Newton steps are minimum-norm least-squares solutions (F may be singular,
        e.g. when the features contain a constant column), so theta+ - theta stays in range(F)."""
        q = as_distribution(q, self.shape, "q_tilde")
        _require_full_support(q, "m_project (log-linear)")
        if tol is None:  # the gradient's rounding floor: sum of d * Y terms of size eps * |Phi|
            tol = 64 * EPS * (1.0 + float(np.abs(self.Phi).max())) * math.sqrt(self.n_params)
        th = self._np(self._t(theta)).copy()
        G = self.kl_from(q, th)
        g = self.cross_entropy_grad(q, th)
        it = 0
        for it in range(1, max_iter + 1):
            F = self.fisher(th)
            step = -np.linalg.lstsq(F, g, rcond=None)[0]
            s, improved = 1.0, False
            for _ in range(30):
                cand = th + s * step
                Gc = self.kl_from(q, cand)
                gc = self.cross_entropy_grad(q, cand)
                # Armijo on G; at rounding level (G no longer resolves the decrease) accept a smaller gradient
                if Gc <= G + 1e-4 * s * float(g @ step) or (Gc <= G * (1 + 1e-9) and np.linalg.norm(gc) < np.linalg.norm(g)):
                    improved = True
                    break
                s *= 0.5
            if not improved:
                break
            th, G, g = cand, Gc, gc
            if np.linalg.norm(g) <= tol:
                break
        res = float(np.linalg.norm(g))
        return MProjection(th, res, it, res <= tol, "newton")


class MLPPolicy(Policy):
    """A 2-layer MLP policy: z(x) = W2 act(W1 e_x + b1) + b2, pi(.|x) = softmax(z(x)).

    Inputs ``e_x`` are one-hot (default, n_in = X) or given embeddings ``inputs: (X, n_in)``. Parameters are one
    flat vector theta = [vec W1 (hidden, n_in), b1, vec W2 (Y, hidden), b2] (row-major); ``blocks[name]`` is the
    slice of a block and ``block_shapes[name]`` its matrix shape.

    With X contexts and ``hidden`` units the logit table (X, Y) has rank <= hidden + 1, so the class is a curved
    proper subset of all policies when hidden + 1 < X; when hidden + 1 >= X (e.g. 3 contexts, hidden 8) the net can
    reach every nearby policy and Prop 3.1 becomes the tabular equality. Choose hidden + 1 < X to see the o(1).
    """

    def __init__(
        self,
        n_contexts: int = 6,
        hidden: int = 3,
        n_outputs: int = 200,
        *,
        activation: str = "tanh",
        inputs: Any = None,
        rho: Any = None,
        device: str | torch.device = "cpu",
    ):
        if activation not in ("tanh", "gelu"):
            raise InputError(f"activation must be 'tanh' or 'gelu', got {activation!r}")
        self.n_contexts, self.hidden, self.n_outputs = int(n_contexts), int(hidden), int(n_outputs)
        if self.n_outputs < 2 or self.hidden < 1 or self.n_contexts < 1:
            raise InputError("need n_outputs >= 2, hidden >= 1, n_contexts >= 1")
        E = np.eye(self.n_contexts) if inputs is None else as_real_array(inputs, "inputs")
        if E.ndim != 2 or E.shape[0] != self.n_contexts:
            raise ShapeMismatchError(f"inputs must be ({self.n_contexts}, n_in), got {E.shape}")
        if not np.all(np.isfinite(E)):
            raise NonFiniteError("inputs: non-finite entries")
        self.n_in = E.shape[1]
        self.activation = activation
        h, n_in, Y = self.hidden, self.n_in, self.n_outputs
        shapes = {"W1": (h, n_in), "b1": (h,), "W2": (Y, h), "b2": (Y,)}
        self.n_params = sum(int(np.prod(s)) for s in shapes.values())
        super().__init__(rho, device)
        self.block_shapes = dict(shapes)
        self.blocks = {}
        off = 0
        for name, s in shapes.items():
            n = int(np.prod(s))
            self.blocks[name] = slice(off, off + n)
            off += n
        self._E_t = torch.as_tensor(E, dtype=torch.float64, device=self.device)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: theta[sl].reshape(self.block_shapes[k]) for k, sl in self.blocks.items()}

    def _logits(self, theta: torch.Tensor) -> torch.Tensor:
        p = self.unflatten(theta)
        pre = self._E_t @ p["W1"].T + p["b1"]
        hid = torch.tanh(pre) if self.activation == "tanh" else torch.nn.functional.gelu(pre)
        return hid @ p["W2"].T + p["b2"]

    def init_theta(self, seed: int, scale: float = 1.0) -> Float[np.ndarray, " d"]:
        """Seeded init: W1 ~ N(0, 1/n_in), W2 ~ N(0, 1/hidden), biases ~ N(0, 0.1^2), all times ``scale``."""
        g = np.random.default_rng(seed)
        parts = {
            "W1": g.standard_normal(self.block_shapes["W1"]) / math.sqrt(self.n_in),
            "b1": 0.1 * g.standard_normal(self.hidden),
            "W2": g.standard_normal(self.block_shapes["W2"]) / math.sqrt(self.hidden),
            "b2": 0.1 * g.standard_normal(self.n_outputs),
        }
        return scale * np.concatenate([parts[k].reshape(-1) for k in self.blocks])

    # ---- analytic derivatives (cross-checked against torch autograd in the tests) ----------------------------
    def _act(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """act, act', act'' at the pre-activations."""
        if self.activation == "tanh":
            a = torch.tanh(pre)
            d1 = 1.0 - a * a
            return a, d1, -2.0 * a * d1
        phi = torch.exp(-0.5 * pre * pre) / math.sqrt(2.0 * math.pi)
        Phi = 0.5 * (1.0 + torch.erf(pre / math.sqrt(2.0)))
        return pre * Phi, Phi + pre * phi, phi * (2.0 - pre * pre)

    def _index_maps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat indices: first layer P (hidden, n_in + 1) = [W1 | b1], W2 (Y, hidden), b2 (Y,)."""
        h, n_in, Y = self.hidden, self.n_in, self.n_outputs
        ar = lambda name: torch.arange(self.blocks[name].start, self.blocks[name].stop, device=self.device)  # noqa: E731
        P = torch.cat([ar("W1").reshape(h, n_in), ar("b1").reshape(h, 1)], dim=1)
        return P, ar("W2").reshape(Y, h), ar("b2")

    def _forward_parts(self, t: torch.Tensor):
        p = self.unflatten(t)
        E1 = torch.cat([self._E_t, torch.ones(self.n_contexts, 1, dtype=torch.float64, device=self.device)], dim=1)
        pre = self._E_t @ p["W1"].T + p["b1"]  # (X, h)
        a, d1, d2 = self._act(pre)
        return p, E1, a, d1, d2

    def _jacobian_t(self, t: torch.Tensor) -> torch.Tensor:
        """J[x, y] = dz_y(x)/dtheta: W2[y, j] -> a_j(x); b2[y] -> 1; (W1|b1)[j, i] -> W2[y, j] a'_j(x) e~_i(x)."""
        p, E1, a, d1, _ = self._forward_parts(t)
        X, Y, h = self.n_contexts, self.n_outputs, self.hidden
        iP, iW2, ib2 = self._index_maps()
        J = torch.zeros(X, Y, self.n_params, dtype=torch.float64, device=self.device)
        J[:, :, iP.reshape(-1)] = torch.einsum("yj,xj,xi->xyji", p["W2"], d1, E1).reshape(X, Y, -1)
        eyeY = torch.eye(Y, dtype=torch.float64, device=self.device)
        J[:, :, iW2.reshape(-1)] = torch.einsum("yk,xj->xykj", eyeY, a).reshape(X, Y, -1)
        J[:, :, ib2] = eyeY.expand(X, Y, Y)
        return J

    def _curvature_t(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """sum_{x,y} c[x, y] hess z_y(x) (d, d): nonzero in the (W1|b1) x (W1|b1) and W2 x (W1|b1) blocks."""
        p, E1, a, d1, d2 = self._forward_parts(t)
        iP, iW2, _ = self._index_maps()
        C = torch.zeros(self.n_params, self.n_params, dtype=torch.float64, device=self.device)
        v = c @ p["W2"]  # (X, h): sum_y c_xy W2[y, j]
        PP = torch.einsum("xj,xi,xk->jik", v * d2, E1, E1)  # block-diagonal over hidden unit j
        for j in range(self.hidden):
            C[iP[j][:, None], iP[j][None, :]] = PP[j]
        WP = torch.einsum("xk,xj,xi->kji", c, d1, E1)  # (Y, h, n_in + 1)
        rows = iW2[:, :, None].expand_as(WP)
        cols = iP[None, :, :].expand_as(WP)
        C[rows.reshape(-1), cols.reshape(-1)] = WP.reshape(-1)
        C[cols.reshape(-1), rows.reshape(-1)] = WP.reshape(-1)
        return C

    def curvature(self, theta: Any, c: Any) -> Float[np.ndarray, "d d"]:
        """sum_{x,y} c(x,y) hess_theta z_y(x), analytic (the term by which H_q~ differs from F in Lemma F.6)."""
        c_t = torch.as_tensor(as_real_array(c, "c"), dtype=torch.float64, device=self.device)
        if tuple(c_t.shape) != self.shape:
            raise ShapeMismatchError(f"weights have shape {tuple(c_t.shape)}, the policy's outputs {self.shape}")
        return self._np(self._curvature_t(self._t(theta), c_t))

    def m_project(
        self, theta: Any, q: Any, *, tol: float = 1e-12, max_iter: int = 200, **kw: Any
    ) -> MProjection:
        """Numerical M-projection in float64, warm-started at theta: modified Newton with the exact Hessian
        H = F(theta') + sum_x rho(x) sum_y (pi - q~)(y|x) hess z_y(x) of G(theta') = KL(q~ || pi_theta').

        Directions with |eigenvalue| <= d * eps * ||H|| are dropped (minimum-norm step: G is flat along null(F)),
        negative curvature is flipped (|lambda|), and an Armijo backtracking line search keeps G decreasing; a step
        that cannot lower G but lowers ||grad G|| is accepted at rounding level. Non-convex: this is the local
        minimiser reached from theta, the one Prop 3.1 means for a small step. ``residual`` = ||grad G||.
        """
        q = as_distribution(q, self.shape, "q_tilde")
        _require_full_support(q, "m_project (MLP)")
        q_t = torch.as_tensor(q, dtype=torch.float64, device=self.device)
        log_q = torch.log(q_t)
        rho = self._rho_t[:, None]

        def value(th: torch.Tensor) -> float:
            lp = torch.log_softmax(self._logits(th), dim=-1)
            return float(self.rho @ kl_rows(self._np(log_q), self._np(lp)))

        def grad_and_parts(th: torch.Tensor):
            J = self._jacobian_t(th)
            pi = torch.softmax(self._logits(th), dim=-1)
            return torch.einsum("xy,xyd->d", rho * (pi - q_t), J), J, pi

        th = self._t(theta).clone()
        G = value(th)
        g, J, pi = grad_and_parts(th)
        it = 0
        for it in range(1, max_iter + 1):
            if float(g.norm()) <= tol:
                it -= 1
                break
            H = self._fisher_from(J, pi) + self._curvature_t(th, rho * (pi - q_t))
            lam, U = torch.linalg.eigh(0.5 * (H + H.T))
            keep = lam.abs() > self.n_params * EPS * lam.abs().max()
            coef = (U[:, keep].T @ g) / lam[keep].abs()
            step = -(U[:, keep] @ coef)
            slope = float(g @ step)
            s, accepted = 1.0, False
            for _ in range(30):
                cand = th + s * step
                Gc = value(cand)
                gc, Jc, pic = grad_and_parts(cand)
                if Gc <= G + 1e-4 * s * slope or (Gc <= G * (1 + 1e-9) and gc.norm() < g.norm()):
                    accepted = True
                    break
                s *= 0.5
                if float(gc.norm()) < 1e3 * EPS:  # already at the rounding floor: stop shrinking
                    break
            if not accepted:
                break
            th, G, g, J, pi = cand, Gc, gc, Jc, pic
        res = float(g.norm())
        return MProjection(self._np(th), res, it, res <= max(tol, 1e4 * EPS), "modified-newton")


def m_project(policy: Policy, theta: Any, q_tilde: Any, **kw: Any) -> MProjection:
    """M-projection theta+ = argmin_theta' E_rho KL(q~(.|x) || pi_theta'(.|x)) (Lemma F.3), warm-started at theta.

    Returns ``MProjection(theta_plus, residual, iterations, converged, method)``; ``residual`` is the gradient norm
    of the objective at theta_plus, so callers can see how well it converged.
    """
    return policy.m_project(theta, q_tilde, **kw)


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
