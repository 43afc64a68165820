"""Seeded instance builders shared by the metamorphic and the mpmath-oracle tests (plain numpy: no project code).

Every builder takes a seed and a few choices that a hypothesis strategy draws, so a failing example is pinned with
``@example`` by its arguments alone.
"""

from __future__ import annotations

import math

import numpy as np

#: Spectral situations for Gate II: a generic spectrum, clusters, a clear gap exactly at k, an exactly repeated
#: singular value at k (gamma_k = 0), a rank-deficient matrix, W1 == W0, and the swap that breaks Thm 3.3 as stated.
GATE2_KINDS = ("generic", "clustered", "gap_at_k", "repeated_at_k", "rank_deficient", "identical", "swap")


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Haar orthogonal n x n (QR of a Gaussian with the signs fixed by diag R)."""
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.where(np.diag(R) < 0, -1.0, 1.0)


def spectrum(kind: str, r: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Descending singular values of length r for a Gate II kind (exact floats: sums of a few powers of two where
    ties matter)."""
    if kind == "clustered":
        base = np.repeat([4.0, 2.0, 1.0], r)[:r]
        return np.sort(base + rng.uniform(0, 1e-3, r))[::-1]
    if kind == "gap_at_k":
        s = np.concatenate([2.0 + rng.uniform(0, 0.5, k), rng.uniform(0.1, 0.5, r - k)])
        return np.sort(s)[::-1]
    if kind == "repeated_at_k":
        s = np.sort(rng.uniform(0.5, 3.0, r))[::-1]
        if k < r:
            s[k] = s[k - 1]  # sigma_k = sigma_{k+1} exactly
        else:
            s[k - 1] = 0.0  # k = r: sigma_r = 0 = the complement's zeros
        return np.sort(s)[::-1]
    if kind == "rank_deficient":
        s = np.sort(rng.uniform(0.5, 3.0, r))[::-1]
        s[max(1, r - 1):] = 0.0
        return s
    return np.sort(rng.uniform(0.05, 3.0, r))[::-1]


def gate2_pair(seed: int, m: int, n: int, k: int, kind: str, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(W0, W1) of shape (m, n) for a Gate II kind; ||dW||_2 / gamma_k = ratio where gamma_k > 0 (else / sigma_1)."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    s = spectrum(kind, r, k, rng)
    U, V = orthogonal(rng, m)[:, :r], orthogonal(rng, n)[:, :r]
    W0 = (U * s) @ V.T
    if kind == "identical":
        return W0, W0.copy()
    gap = s[k - 1] - (s[k] if k < r else 0.0)
    scale = ratio * (gap if gap > 0 else s[0])
    if kind == "swap" and k < r:
        dW = scale * (np.outer(U[:, k], V[:, k]) - np.outer(U[:, k - 1], V[:, k - 1]))
    else:
        G = rng.standard_normal((m, n))
        dW = scale * G / np.linalg.norm(G, 2)
    return W0, W0 + dW


def exact_pow2_range(*arrays: np.ndarray, limit: int = 1000) -> tuple[int, int]:
    """The j in [-limit, limit] for which every nonzero entry of the arrays times 2**j stays a finite normal float64
    (so scaling by 2**j and back is exact)."""
    nz = np.concatenate([np.abs(a[a != 0]).ravel() for a in arrays]) if arrays else np.zeros(0)
    if nz.size == 0:
        return -limit, limit
    e_lo, e_hi = int(np.frexp(nz.min())[1]), int(np.frexp(nz.max())[1])
    return max(-limit, -1021 - e_lo), min(limit, 1023 - e_hi)


def clamp(j: int, lo_hi: tuple[int, int]) -> int:
    lo, hi = lo_hi
    return int(min(max(j, lo), hi))


def tabular_instance(seed: int, n_outputs: int, n_contexts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(theta, R, direction) for a TabularSoftmax(n_outputs, n_contexts); direction has unit norm."""
    g = np.random.default_rng(seed)
    d = n_outputs * n_contexts
    v = g.standard_normal(d)
    return g.standard_normal(d), g.uniform(-1, 1, (n_contexts, n_outputs)), v / np.linalg.norm(v)


def loglinear_instance(seed: int, n_contexts: int, n_outputs: int, dim: int):
    """(Phi, theta, R, direction) for a LogLinear(Phi) policy; direction has unit norm."""
    g = np.random.default_rng(seed)
    Phi = g.standard_normal((n_contexts, n_outputs, dim))
    v = g.standard_normal(dim)
    return Phi, g.standard_normal(dim), g.uniform(-1, 1, (n_contexts, n_outputs)), v / np.linalg.norm(v)


def margin_slack(c) -> float:
    """|rhs - lhs| - tol of a decided check (>= 0 when decided)."""
    return abs(c.rhs - c.lhs) - c.tol


def same_verdict_up_to_rounding(c1, c2) -> bool:
    """Two evaluations of the same instance whose inputs differ only by rounding (a transpose, rotation or
    permutation computed in float64) may disagree only at an edge of the error band or of a rounding-resolution
    assumption -- never "holds" against "violated"."""
    v1, v2 = c1.verdict, c2.verdict
    if v1 == v2:
        return True
    if {v1, v2} == {"holds", "violated"}:
        return False
    if {v1, v2} <= {"holds", "violated", "indeterminate"}:
        decided = c1 if v1 != "indeterminate" else c2
        drift = abs((c1.rhs - c1.lhs) - (c2.rhs - c2.lhs)) + abs(c1.tol - c2.tol)
        return margin_slack(decided) <= drift
    return any("rounding" in (c.failed_assumption or "") or "determined" in (c.failed_assumption or "")
               for c in (c1, c2))


def ldexp_or_inf(x: float, e: int) -> float:
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)
