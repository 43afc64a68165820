"""Seeded synthetic matrices with a prescribed spectrum, and perturbation families to go with them.

A synthetic weight is ``W0 = U diag(sigma) V^T`` with Haar-random orthonormal factors ``U (m, r)``, ``V (n, r)``,
``r = min(m, n)``, and a spectrum ``sigma`` chosen by family:

- ``power_law``       sigma_i = i^(-a)                       (the decay of a pretrained layer, a ~ 0.5..1)
- ``gapped``          a clear gap at k: gamma_k = gap        (the regime the bounds are made for)
- ``clustered``       clusters of k equal-ish values          (k sits on a cluster boundary)
- ``near_degenerate`` sigma_k - sigma_{k+1} = rel_gap * sigma_k, tiny   (the bounds blow up)
- ``rank_deficient``  sigma_i = 0 for i > rank               (rank >= k keeps gamma_k > 0)

Perturbation families for ``dW`` (each scaled to a target ``||dW||_2 / gamma_k``):

- ``gaussian``    i.i.d. normal entries
- ``aligned``     U_k M V_k^T, M (k, k) Gaussian              (moves the top-k block only)
- ``orthogonal``  (I - U_k U_k^T) G (I - V_k V_k^T)          (lives entirely off the principal subspaces)
- ``low_rank``    A B^T of rank p with Gaussian factors
- ``kl_budget``   1/2 vec(dW)^T S vec(dW) = delta for a given PSD curvature S on vec(dW) (row-major vec);
                  the sweep uses a K-FAC-shaped S = A kron B whose lambda_min is known exactly
- ``swap``        c (u_{k+1} v_{k+1}^T - u_k v_k^T): adversarial; for c > gamma_k / 2 it swaps sigma_k and
                  sigma_{k+1}, so sin Theta = 1 while ||dW||_2 / gamma_k < 1 (breaks the as-stated Thm 3.3)

``theory.spectral.synthetic_sweep`` evaluates every Gate II result on a grid of these spectra x perturbations x
shapes x ratios.

Every generator takes a ``numpy.random.Generator``; the same seed gives the same bits on the same machine.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from jaxtyping import Float

from theory.errors import InputError
from theory.linalg import spectral_gap

__all__ = [
    "SPECTRUM_FAMILIES",
    "PERTURBATION_FAMILIES",
    "Synthetic",
    "haar_orthonormal",
    "spectrum",
    "matrix_with_spectrum",
    "synthetic_matrix",
    "perturbation",
    "scale_to_ratio",
    "random_curvature",
    "kronecker_curvature",
    "kl_budgeted_perturbation",
    "kl_quadratic",
    "synthetic_pair",
]

SPECTRUM_FAMILIES = ("power_law", "gapped", "clustered", "near_degenerate", "rank_deficient")
PERTURBATION_FAMILIES = ("gaussian", "aligned", "orthogonal", "low_rank", "kl_budget", "swap")


class Synthetic(NamedTuple):
    """``W = U @ diag(S) @ Vh`` with the factors it was built from (``S`` descending, exact as prescribed)."""

    W: Float[np.ndarray, "m n"]
    U: Float[np.ndarray, "m r"]
    S: Float[np.ndarray, " r"]
    Vh: Float[np.ndarray, "r n"]

    def gap(self, k: int) -> float:
        """gamma_k = sigma_k - sigma_{k+1} of the prescribed spectrum (``theory.linalg.spectral_gap``)."""
        return spectral_gap(self.S, k)


def haar_orthonormal(rng: np.random.Generator, n: int, p: int | None = None) -> Float[np.ndarray, "n p"]:
    """First ``p`` columns of a Haar-distributed orthogonal n x n matrix (QR of a Gaussian, signs fixed by diag R).

    Without the sign fix QR is not Haar (Mezzadri 2007).
    """
    p = n if p is None else p
    if not 1 <= p <= n:
        raise InputError(f"haar_orthonormal: need 1 <= p <= n, got p={p}, n={n}")
    Q, R = np.linalg.qr(rng.standard_normal((n, p)))
    return Q * np.where(np.diag(R) < 0, -1.0, 1.0)


def spectrum(
    family: str,
    r: int,
    k: int,
    *,
    a: float = 1.0,
    gap: float = 0.5,
    rel_gap: float = 1e-6,
    rank: int | None = None,
    rng: np.random.Generator | None = None,
) -> Float[np.ndarray, " r"]:
    """Descending singular values of length ``r`` with sigma_1 = 1 and gamma_k > 0 (see the module docstring).

    ``a``: power-law exponent. ``gap``: gamma_k for ``gapped`` (and the gap between clusters). ``rel_gap``:
    gamma_k / sigma_k for ``near_degenerate``. ``rank``: number of nonzero values for ``rank_deficient``
    (default k + 1, at most r). ``rng`` adds a small seeded jitter inside clusters.
    """
    if not 1 <= k <= r:
        raise InputError(f"spectrum: k={k} outside 1..{r}")
    i = np.arange(1, r + 1, dtype=np.float64)
    if family == "power_law":
        s = i ** (-a)
    elif family == "gapped":
        if not 0 < gap < 1 / 1.1:
            raise InputError(f"spectrum: gapped needs 0 < gap < 1/1.1 so sigma_(k+1) stays positive, got {gap}")
        # top block in [1, 1 - 0.1*gap], bottom block starting gap below sigma_k
        top = 1.0 - 0.1 * gap * (i[:k] - 1) / max(k - 1, 1)
        bottom = (top[-1] - gap) * (i[k:] / (k + 1)) ** (-a)
        s = np.concatenate([top, bottom])
    elif family == "clustered":
        # clusters of size k at levels 1, 1 - gap, (1 - gap)^2 ... with a jitter much smaller than the gap
        level = (1.0 - gap) ** ((i - 1) // k)
        jitter = 0.0 if rng is None else rng.uniform(0.0, 1e-3 * gap, size=r)
        s = level * (1.0 - jitter)
    elif family == "near_degenerate":
        s = i ** (-a)
        s[k:] = s[k - 1] * (1.0 - rel_gap) * (i[k:] / (k + 1)) ** (-a)
    elif family == "rank_deficient":
        rank = min(k + 1, r) if rank is None else rank
        if not k <= rank <= r:
            raise InputError(f"spectrum: rank={rank} must lie in k..r = {k}..{r} to keep gamma_k > 0")
        s = np.where(i <= rank, i ** (-a), 0.0)
    else:
        raise InputError(f"spectrum: unknown family {family!r}; choose from {SPECTRUM_FAMILIES}")
    s = np.sort(np.maximum(s, 0.0))[::-1].copy()
    return s


def matrix_with_spectrum(sigma: Sequence[float], m: int, n: int, rng: np.random.Generator) -> Synthetic:
    """W = U diag(sigma) V^T with Haar U (m, r), V (n, r); ``sigma`` (length r = min(m, n)) is sorted descending."""
    s = np.sort(np.asarray(sigma, dtype=np.float64))[::-1].copy()
    r = min(m, n)
    if s.shape != (r,):
        raise InputError(f"matrix_with_spectrum: need {r} singular values for a {m}x{n} matrix, got {s.shape[0]}")
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise InputError("matrix_with_spectrum: singular values must be finite and >= 0")
    U = haar_orthonormal(rng, m, r)
    V = haar_orthonormal(rng, n, r)
    return Synthetic((U * s) @ V.T, U, s, V.T.copy())


def synthetic_matrix(family: str, m: int, n: int, k: int, rng: np.random.Generator, **params) -> Synthetic:
    """W0 of shape (m, n) whose spectrum comes from ``spectrum(family, min(m, n), k, **params)``."""
    return matrix_with_spectrum(spectrum(family, min(m, n), k, rng=rng, **params), m, n, rng)


def scale_to_ratio(dW: Float[np.ndarray, "m n"], ratio: float, gap: float) -> Float[np.ndarray, "m n"]:
    """Rescale ``dW`` so that ||dW||_2 = ratio * gap."""
    nrm = float(np.linalg.norm(dW, 2))
    if nrm == 0.0:
        raise InputError("scale_to_ratio: the perturbation direction is zero; it cannot be rescaled")
    return dW * (ratio * gap / nrm)


def random_curvature(
    d: int, rng: np.random.Generator, *, mu: float = 0.1, cond: float = 100.0
) -> Float[np.ndarray, "d d"]:
    """A seeded PSD curvature S (d, d) with eigenvalues spread log-uniformly in [mu, mu * cond] (so lambda_min = mu)."""
    if d < 1 or mu <= 0 or cond < 1:
        raise InputError(f"random_curvature: need d >= 1, mu > 0, cond >= 1 (got d={d}, mu={mu}, cond={cond})")
    lam = mu * cond ** np.linspace(0.0, 1.0, d)
    Q = haar_orthonormal(rng, d)
    S = (Q * lam) @ Q.T
    return (S + S.T) / 2


def kronecker_curvature(
    m: int, n: int, rng: np.random.Generator, *, mu: float = 0.1, cond: float = 100.0
) -> tuple[Float[np.ndarray, "d d"], float]:
    """A K-FAC-shaped curvature S = A kron B on row-major vec(dW) (d = m n), and its lambda_min.

    A (m, m) has eigenvalues log-spread in [1, sqrt(cond)], B (n, n) in [mu, mu sqrt(cond)], so
    lambda_min(S) = lambda_min(A) lambda_min(B) = mu exactly (eigenvalues of a Kronecker product are the products).
    With row-major vec, (A kron B) vec(X) = vec(A X B^T), so 1/2 vec^T S vec = 1/2 tr(X^T A X B).
    """
    A = random_curvature(m, rng, mu=1.0, cond=np.sqrt(cond))
    B = random_curvature(n, rng, mu=mu, cond=np.sqrt(cond))
    mu_exact = float(np.linalg.eigvalsh(A)[0] * np.linalg.eigvalsh(B)[0])
    return np.kron(A, B), mu_exact


def kl_quadratic(dW: Float[np.ndarray, "m n"], S: Float[np.ndarray, "d d"]) -> float:
    """The local KL 1/2 vec(dW)^T S vec(dW), vec row-major (``dW.reshape(-1)``)."""
    v = np.asarray(dW, dtype=np.float64).reshape(-1)
    if S.shape != (v.size, v.size):
        raise InputError(f"kl_quadratic: curvature has shape {S.shape}, expected ({v.size}, {v.size}) for vec(dW)")
    return 0.5 * float(v @ S @ v)


def kl_budgeted_perturbation(
    S: Float[np.ndarray, "d d"],
    delta: float,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    worst_case: bool = False,
) -> Float[np.ndarray, "m n"]:
    """dW of ``shape`` with 1/2 vec(dW)^T S vec(dW) = delta exactly (up to rounding).

    Random direction by default; ``worst_case`` takes the eigenvector of lambda_min(S) = mu, which attains
    ||dW||_F = sqrt(2 delta / mu) (Lemma F.10's bound with equality).
    """
    d = shape[0] * shape[1]
    S = np.asarray(S, dtype=np.float64)
    if S.shape != (d, d):
        raise InputError(f"kl_budgeted_perturbation: curvature has shape {S.shape}, expected ({d}, {d})")
    if not delta > 0:
        raise InputError(f"kl_budgeted_perturbation: budget delta must be > 0, got {delta}")
    if worst_case:
        lam, Q = np.linalg.eigh((S + S.T) / 2)
        z = Q[:, 0]
    else:
        z = rng.standard_normal(d)
    q = float(z @ S @ z)
    if not q > 0:
        raise InputError("kl_budgeted_perturbation: S is not positive definite along the chosen direction")
    return (z * np.sqrt(2.0 * delta / q)).reshape(shape)


def perturbation(
    family: str,
    base: Synthetic,
    k: int,
    rng: np.random.Generator,
    *,
    rank: int = 2,
    curvature: Float[np.ndarray, "d d"] | None = None,
) -> Float[np.ndarray, "m n"]:
    """An (unscaled) perturbation direction of ``family`` relative to the top-k subspaces of ``base``.

    For ``kl_budget`` the direction has 1/2 vec^T S vec = 1 for ``curvature`` S (a random one if None); rescaling by
    c multiplies the KL by c^2, so the budget that goes with a rescaled dW is (c^2) * 1.
    """
    m, n = base.W.shape
    Uk, Vk = base.U[:, :k], base.Vh[:k].T
    if family == "gaussian":
        return rng.standard_normal((m, n))
    if family == "aligned":
        return Uk @ rng.standard_normal((k, k)) @ Vk.T
    if family == "orthogonal":
        G = rng.standard_normal((m, n))
        G = G - Uk @ (Uk.T @ G)
        return G - (G @ Vk) @ Vk.T
    if family == "low_rank":
        return rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    if family == "swap":
        if k >= min(m, n):
            raise InputError(f"perturbation: 'swap' needs k < min(m, n) = {min(m, n)}, got k={k}")
        return np.outer(base.U[:, k], base.Vh[k]) - np.outer(base.U[:, k - 1], base.Vh[k - 1])
    if family == "kl_budget":
        S = kronecker_curvature(m, n, rng)[0] if curvature is None else curvature
        return kl_budgeted_perturbation(S, 1.0, (m, n), rng)
    raise InputError(f"perturbation: unknown family {family!r}; choose from {PERTURBATION_FAMILIES}")


def synthetic_pair(
    seed: int,
    spectrum_family: str,
    perturbation_family: str,
    m: int,
    n: int,
    k: int,
    ratio: float,
    **spectrum_params,
) -> dict:
    """One seeded instance: W0, W1 = W0 + dW with ||dW||_2 = ratio * gamma_k(W0), and for ``kl_budget`` the
    budget ``delta_W`` and ``mu_W = lambda_min(S)`` that go with it.
    """
    rng = np.random.default_rng(seed)
    base = synthetic_matrix(spectrum_family, m, n, k, rng, **spectrum_params)
    gap = base.gap(k)
    extra: dict = {}
    if perturbation_family == "kl_budget":
        S, mu = kronecker_curvature(m, n, rng)
        d = perturbation("kl_budget", base, k, rng, curvature=S)
        dW = scale_to_ratio(d, ratio, gap)
        extra = {"delta_W": kl_quadratic(dW, S), "mu_W": mu}
    else:
        dW = scale_to_ratio(perturbation(perturbation_family, base, k, rng), ratio, gap)
    return {"W0": base.W, "W1": base.W + dW, "k": k, "gap": gap, "base": base, **extra}
