"""Linear algebra in float64: SVD, top-k singular subspaces, principal angles, projectors, Ky Fan norms.

Every decomposition upcasts to float64 first (bf16/fp16/fp32 inputs, numpy or torch, any device). Subspaces are
compared through principal angles or projectors, never through raw singular vectors (which are defined only up to
sign, and up to rotation inside a repeated singular value).

Shapes: ``W: (m, n)``, ``U_k: (m, k)``, ``V_k: (n, k)``. ``svd64`` returns ``Vh`` (rows are right singular vectors),
as ``numpy.linalg.svd`` and ``torch.linalg.svd`` do.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Float

from theory.errors import (
    ComplexInputError,
    DecompositionError,
    InputError,
    NonFiniteError,
    NotOrthonormalError,
    ShapeMismatchError,
)

__all__ = [
    "to_f64",
    "reject_complex",
    "as_real_array",
    "as_real_scalar",
    "pow2_exponent",
    "subspace_resolution",
    "topk_subspace_unresolved",
    "scale_pow2",
    "orthonormality_defect",
    "ORTHONORMALITY_TOL",
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

#: Largest ``||A^T A - I||_2`` accepted for a basis said to have orthonormal columns. Bases from any float64
#: decomposition (SVD, QR, the Krylov path of ``theory.fast_spectral``) are orthonormal to ~p * eps (~1e-13 for
#: p ~ 1e3 rows); a defect d moves the computed principal angles by O(d), so 2^-33 (~1.2e-10) keeps them accurate
#: to ~1e-10 rad while rejecting a basis that is not orthonormal at all (unnormalised, or a raw matrix).
ORTHONORMALITY_TOL = 2.0**-33


def reject_complex(x: Any, name: str) -> None:
    """Raise ``ComplexInputError`` naming ``name`` if x is a complex numpy array/scalar, torch tensor or Python
    complex: complex input is refused, never silently cast to its real part."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ComplexInputError(f"{name}: a complex tensor ({x.dtype}); only real inputs are supported")
        return
    if isinstance(x, complex) or (isinstance(x, (np.ndarray, np.generic)) and np.iscomplexobj(x)):
        dt = getattr(x, "dtype", type(x).__name__)
        raise ComplexInputError(f"{name}: a complex value ({dt}); only real inputs are supported")


def as_real_array(x: Any, name: str) -> Array64:
    """``x`` (numpy, torch on any device, nested list, scalar) as a float64 numpy array of any shape, without the
    finiteness test; complex input raises ``ComplexInputError``, non-numeric ``InputError``, naming ``name``."""
    return to_f64(x, name, ndim=None, check_finite=False)


def as_real_scalar(x: Any, name: str) -> float:
    """A real number (Python, numpy or 0-d array/tensor, any float dtype) as a float; complex, non-numeric or
    non-scalar input raises an ``InputError`` subclass naming ``name``."""
    if isinstance(x, bool):
        raise InputError(f"{name} must be a number, got a bool")
    a = as_real_array(x, name)
    if a.size != 1 or a.ndim > 1:
        raise InputError(f"{name} must be a scalar, got shape {a.shape}")
    return float(a.reshape(-1)[0])


def to_f64(x: Any, name: str = "input", *, ndim: int | None = 2, check_finite: bool = True) -> Array64:
    """Upcast a numpy array / torch tensor / nested list of any float dtype (bf16 included) to float64 numpy.

    Raises ``InputError`` (wrong rank, non-numeric), ``ComplexInputError`` (complex dtype: refused, not cast) or
    ``NonFiniteError`` (NaN/Inf), naming ``name``.

    Examples
    --------
    >>> to_f64([[1, 2]], "W").dtype
    dtype('float64')
    >>> to_f64(np.array([[1 + 1j]]), "W")
    Traceback (most recent call last):
    ...
    theory.errors.ComplexInputError: W: a complex value (complex128); only real inputs are supported
    """
    reject_complex(x, name)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        arr = np.asarray(x)
        if arr.dtype.kind == "c":
            raise ComplexInputError(f"{name}: a complex value ({arr.dtype}); only real inputs are supported")
        if arr.dtype.kind not in "fiub" and arr.dtype.name != "bfloat16":
            raise TypeError(arr.dtype)
        arr = arr.astype(np.float64)
    except ComplexInputError:
        raise
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: cannot be read as a float array ({e})") from None
    if ndim is not None and arr.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-d array, got shape {arr.shape}")
    if check_finite and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise NonFiniteError(f"{name}: {bad} non-finite entries (NaN or Inf)")
    return arr


def pow2_exponent(*arrays: Array64) -> int:
    """The exponent e with ``max |entries| * 2**-e`` in [1/2, 1) over all ``arrays`` (0 when all are zero/empty).

    Scaling by ``2**-e`` is exact (unless entries fall below the normal range, where they are far below
    eps * max and cannot matter), so a computation on the scaled copies neither overflows (Gram matrices, norms,
    differences) nor underflows, and gives the same bits for inputs that differ by a power-of-two factor.
    """
    amax = 0.0
    for a in arrays:
        if np.size(a):
            a = np.asarray(a)
            if a.dtype.kind == "f":  # max |a| without an |a| temporary (a NaN propagates as through np.abs)
                top = float(np.maximum(a.max(), -a.min()))
            else:
                top = float(np.max(np.abs(a)))
            amax = max(amax, top)
    if amax == 0.0 or not np.isfinite(amax):
        return 0
    return int(np.frexp(amax)[1])


def scale_pow2(a: Array64, e: int) -> Array64:
    """``a * 2**-e`` (exact; ``np.ldexp``)."""
    return np.ldexp(np.asarray(a, dtype=np.float64), -int(e))


class SVD(NamedTuple):
    U: Float[np.ndarray, "m r"]
    S: Float[np.ndarray, " r"]
    Vh: Float[np.ndarray, "r n"]


def _on_cpu(device: Any) -> bool:
    return device is None or str(device) == "cpu"


def _torch_f64(A: Array64, device: Any) -> Any:
    import torch  # optional device path: torch only when a device other than the CPU is asked for

    return torch, torch.from_numpy(A).to(device=device, dtype=torch.float64)


def svd64(W: Any, name: str = "W", *, device: Any = None) -> SVD:
    """Thin SVD in float64: ``W = U @ diag(S) @ Vh`` with ``S`` descending, ``r = min(m, n)``.

    ``device``: where it runs (torch, float64); None or "cpu" uses LAPACK. A decomposition that fails is a
    ``DecompositionError`` naming ``name``.

    Examples
    --------
    >>> U, S, Vh = svd64([[3.0, 0.0], [0.0, -2.0]])
    >>> S.tolist(), bool(np.allclose((U * S) @ Vh, [[3, 0], [0, -2]]))
    ([3.0, 2.0], True)
    """
    A = to_f64(W, name)
    try:
        if _on_cpu(device):
            U, S, Vh = np.linalg.svd(A, full_matrices=False)
            return SVD(U, S, Vh)
        torch, T = _torch_f64(A, device)
        U, S, Vh = torch.linalg.svd(T, full_matrices=False)
        return SVD(U.cpu().numpy(), S.cpu().numpy(), Vh.cpu().numpy())
    except (np.linalg.LinAlgError, RuntimeError) as e:  # torch's LinAlgError is a RuntimeError
        raise DecompositionError(f"{name}: the float64 SVD failed ({type(e).__name__}: {e})") from None


def singular_values(W: Any, name: str = "W", *, device: Any = None) -> Float[np.ndarray, " r"]:
    """Singular values of ``W`` in float64, descending (``device`` and errors as ``svd64``)."""
    A = to_f64(W, name)
    try:
        if _on_cpu(device):
            return np.linalg.svd(A, compute_uv=False)
        torch, T = _torch_f64(A, device)
        return torch.linalg.svdvals(T).cpu().numpy()
    except (np.linalg.LinAlgError, RuntimeError) as e:
        raise DecompositionError(f"{name}: the float64 singular values failed ({type(e).__name__}: {e})") from None


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


def subspace_resolution(S: Float[np.ndarray, " r"], shape: tuple[int, int]) -> float:
    """The float64 resolution of singular values of an (m, n) matrix with singular values ``S``:
    ``8 max(m, n) eps64 sigma_1`` (a backward-stable SVD moves each by less, Weyl)."""
    return 8 * float(np.finfo(np.float64).eps) * max(shape) * S[0]


def topk_subspace_unresolved(S: Float[np.ndarray, " r"], k: int, shape: tuple[int, int]) -> bool:
    """Whether the top-k singular subspaces of an (m, n) matrix with singular values ``S`` are *not* determined to
    float64 resolution: ``sigma_k - sigma_{k+1} <= subspace_resolution`` for k < r = min(m, n); for k = r <
    max(m, n), ``sigma_r`` at that level (the complement's structural zeros make the gap ``sigma_r``); never for
    k = r = m = n (the whole space).

    Examples
    --------
    >>> S = np.array([2.0, 1.0, 1.0])
    >>> topk_subspace_unresolved(S, 1, (3, 3)), topk_subspace_unresolved(S, 2, (3, 3))
    (False, True)
    >>> rank_one = np.array([1.0, 0.0])
    >>> topk_subspace_unresolved(rank_one, 2, (3, 2)), topk_subspace_unresolved(rank_one, 2, (2, 2))
    (True, False)
    """
    m, n = shape
    if k < min(m, n):
        return bool(spectral_gap(S, k) <= subspace_resolution(S, shape))
    return bool(m != n and spectral_gap(S, k) <= subspace_resolution(S, shape))


def orthonormality_defect(A: Float[np.ndarray, "n k"]) -> float:
    """``||A^T A - I||_2``: how far the columns of A are from orthonormal."""
    A = np.asarray(A, dtype=np.float64)
    if A.shape[1] == 0:
        return 0.0
    return float(np.linalg.norm(A.T @ A - np.eye(A.shape[1]), 2))


def _basis(X: Any, name: str) -> Array64:
    """A basis argument as a finite 2-d float64 array with orthonormal columns, or a named error."""
    A = to_f64(X, name)
    if A.shape[1] > A.shape[0]:
        raise NotOrthonormalError(f"{name}: {A.shape[1]} columns cannot be orthonormal in {A.shape[0]} dimensions")
    d = orthonormality_defect(A)
    if not d <= ORTHONORMALITY_TOL:
        raise NotOrthonormalError(
            f"{name}: columns are not orthonormal (||{name}^T {name} - I||_2 = {d:.3e} > {ORTHONORMALITY_TOL:.3e}); "
            f"pass an orthonormal basis (e.g. the Q of a QR, or U / V^T rows of an SVD)")
    return A


def principal_angles(A: Float[np.ndarray, "n k"], B: Float[np.ndarray, "n l"]) -> Float[np.ndarray, " p"]:
    """Principal angles (radians, ascending) between span(A) and span(B); A, B with orthonormal columns.

    Small angles come from the sines (singular values of ``B - A A^T B``), large ones from the cosines
    (singular values of ``A^T B``), so both ends are accurate to float64 precision (Björck & Golub 1973).
    p = min(k, l). Raises ``NonFiniteError`` (NaN/Inf), ``NotOrthonormalError`` (``||A^T A - I||_2`` above
    ``ORTHONORMALITY_TOL``), ``ShapeMismatchError`` (different row counts), each naming A or B.

    Examples
    --------
    >>> e = np.eye(2)
    >>> float(np.degrees(principal_angles(e[:, :1], np.array([[1.0], [1.0]]) / np.sqrt(2))[0]))
    45.0
    """
    A = _basis(A, "A")
    B = _basis(B, "B")
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
