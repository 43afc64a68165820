"""Linear algebra in float64: SVD, top-k singular subspaces, principal angles, projectors, Ky Fan norms.

Every decomposition upcasts to float64 first (bf16/fp16/fp32 inputs, numpy or torch, any device). Subspaces are
compared through principal angles or projectors, never through raw singular vectors (which are defined only up to
sign, and up to rotation inside a repeated singular value).

Shapes: ``W: (m, n)``, ``U_k: (m, k)``, ``V_k: (n, k)``. ``svd64`` returns ``Vh`` (rows are right singular vectors),
as ``numpy.linalg.svd`` and ``torch.linalg.svd`` do.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Float

from theory.errors import InputError, NonFiniteError, ShapeMismatchError

__all__ = [
    "to_f64",
    "SVD",
    "svd64",
    "singular_values",
    "top_k_subspaces",
    "principal_angles",
    "sin_theta",
    "projector",
    "projector_distance",
    "spectral_norm",
    "ky_fan",
    "spectral_gap",
]

Array64 = np.ndarray


def to_f64(x: Any, name: str = "input", *, ndim: int | None = 2, check_finite: bool = True) -> Array64:
    """Upcast a numpy array / torch tensor / nested list of any float dtype (bf16 included) to float64 numpy.

    Raises ``InputError`` (wrong rank, non-numeric) or ``NonFiniteError`` (NaN/Inf), naming ``name``.
    """
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub" and arr.dtype.name != "bfloat16":
            raise TypeError(arr.dtype)
        arr = arr.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: cannot be read as a float array ({e})") from None
    if ndim is not None and arr.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-d array, got shape {arr.shape}")
    if check_finite and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise NonFiniteError(f"{name}: {bad} non-finite entries (NaN or Inf)")
    return arr


class SVD(NamedTuple):
    U: Float[np.ndarray, "m r"]
    S: Float[np.ndarray, " r"]
    Vh: Float[np.ndarray, "r n"]


def svd64(W: Any, name: str = "W") -> SVD:
    """Thin SVD in float64: ``W = U @ diag(S) @ Vh`` with ``S`` descending, ``r = min(m, n)``."""
    A = to_f64(W, name)
    U, S, Vh = np.linalg.svd(A, full_matrices=False)
    return SVD(U, S, Vh)


def singular_values(W: Any, name: str = "W") -> Float[np.ndarray, " r"]:
    """Singular values of ``W`` in float64, descending."""
    return np.linalg.svd(to_f64(W, name), compute_uv=False)


def top_k_subspaces(W: Any, k: int, name: str = "W") -> tuple[Float[np.ndarray, "m k"], Float[np.ndarray, "n k"], Float[np.ndarray, " r"]]:
    """Orthonormal bases ``U_k (m, k)``, ``V_k (n, k)`` of the top-k singular subspaces, and all singular values."""
    U, S, Vh = svd64(W, name)
    r = S.shape[0]
    if not 1 <= k <= r:
        raise InputError(f"{name}: k={k} outside 1..{r}")
    return U[:, :k], Vh[:k, :].T, S


def spectral_gap(S: Float[np.ndarray, " r"], k: int) -> float:
    """gamma_k = sigma_k - sigma_{k+1} (sigma_{r+1} := 0 for a k equal to the rank dimension r)."""
    nxt = S[k] if k < S.shape[0] else 0.0
    return float(S[k - 1] - nxt)


def principal_angles(A: Float[np.ndarray, "n k"], B: Float[np.ndarray, "n l"]) -> Float[np.ndarray, " p"]:
    """Principal angles (radians, ascending) between span(A) and span(B); A, B with orthonormal columns.

    Small angles come from the sines (singular values of ``B - A A^T B``), large ones from the cosines
    (singular values of ``A^T B``), so both ends are accurate to float64 precision (Björck & Golub 1973).
    p = min(k, l).
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.shape[0] != B.shape[0]:
        raise ShapeMismatchError(f"bases live in different spaces: {A.shape[0]} vs {B.shape[0]} rows")
    if A.shape[1] < B.shape[1]:
        A, B = B, A
    M = A.T @ B
    cos = np.clip(np.linalg.svd(M, compute_uv=False), 0.0, 1.0)[::-1]  # ascending cosines -> descending angles
    sin = np.clip(np.linalg.svd(B - A @ M, compute_uv=False), 0.0, 1.0)  # descending sines
    p = B.shape[1]
    cos = np.sort(cos)[::-1][:p]  # descending cos  = ascending angles
    sin = np.sort(sin)[:p]  # ascending sines = ascending angles
    angles = np.where(sin < np.sqrt(0.5), np.arcsin(sin), np.arccos(cos))
    return np.sort(angles)


def sin_theta(A: Float[np.ndarray, "n k"], B: Float[np.ndarray, "n k"]) -> float:
    """||sin Theta(A, B)||_2 = largest principal-angle sine, computed as ||(I - A A^T) B||_2 (equal k)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.shape != B.shape:
        raise ShapeMismatchError(f"subspace bases differ in shape: {A.shape} vs {B.shape}")
    return float(np.linalg.norm(B - A @ (A.T @ B), 2))


def projector(A: Float[np.ndarray, "n k"]) -> Float[np.ndarray, "n n"]:
    """Orthogonal projector ``A A^T`` onto span(A) (A orthonormal)."""
    A = np.asarray(A, dtype=np.float64)
    return A @ A.T


def projector_distance(A: Float[np.ndarray, "n k"], B: Float[np.ndarray, "n k"]) -> float:
    """||A A^T - B B^T||_2 (equals ||sin Theta(A, B)||_2 for equal dimensions)."""
    return float(np.linalg.norm(projector(A) - projector(B), 2))


def spectral_norm(M: Any, name: str = "M") -> float:
    """||M||_2, the largest singular value, in float64."""
    A = to_f64(M, name)
    if A.size == 0:
        return 0.0
    return float(np.linalg.norm(A, 2))


def ky_fan(M: Any, k: int, name: str = "M") -> float:
    """Ky Fan k-norm ||M||_(k) = sum of the k largest singular values."""
    S = singular_values(M, name)
    return float(np.sum(S[:k]))
