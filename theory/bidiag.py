"""All singular values and the top-j right singular vectors of a float64 matrix from one bidiagonalisation.

``torch.linalg.svdvals`` (LAPACK ``gesdd`` without vectors) reduces a tall ``A (c, r)`` to an upper bidiagonal
``B = Qᵀ A P`` by Householder reflections (after a QR when ``c >= 11 r / 6``, LAPACK's crossover) and reads every
singular value off ``B``. The top-j *vectors* are then cheap: the top-j eigenvectors of the Golub-Kahan
tridiagonal ``TGK(B)`` (inverse iteration at the known values, ``O(r j)``) give ``B``'s right singular vectors
``v``, and ``V = P v`` applies the stored reflections to j columns only (``O(r² j)``). Forming them by a second
decomposition (a full SVD, or the Gram matrix ``AᵀA`` and its eigensolver) costs 0.4-1 of the values again.

Error model. ``dgebrd`` is backward stable and ``dlasq1`` accurate to high relative accuracy for the bidiagonal:
the values are those of ``A + E`` with ``||E||_2 = O(r eps ||A||_2)``, exactly the class of ``svdvals``'s. The
vectors come from inverse iteration and carry no such guarantee on their own (clustered values can mix them):
callers certify them by their residuals (``threegate.decompose``) and fall back to a full SVD when the certificate
fails. Measured here on matrices of SmolLM2-135M's shapes (576², 1536 x 576, 49152 x 576): values within
4.5e-16 ``||A||`` of ``svdvals``, top-16 subspace angles against a full SVD ≤ 1.3e-14 rad.

LAPACK access. ``scipy.linalg.lapack`` wraps neither ``dgebrd``, ``dlasq1`` nor ``dormbr``; scipy exports every
LAPACK routine to Cython as a C function pointer (``scipy.linalg.cython_lapack.__pyx_capi__``, the documented
Cython C API; its character arguments are plain ``char *``, with Fortran's hidden lengths handled inside scipy).
This module binds those three through ``ctypes`` once, at first use (cached); ctypes releases the GIL during
the call, so a reader thread keeps running.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> A = rng.standard_normal((300, 120))
>>> S, V = values_and_top_right(A, 3)
>>> bool(np.allclose(S, np.linalg.svd(A, compute_uv=False), rtol=0, atol=1e-12))
True
>>> Vh = np.linalg.svd(A)[2]
>>> bool(np.allclose(np.abs(V.T @ Vh[:3].T), np.eye(3), atol=1e-10))
True
"""

from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
import scipy.linalg
import scipy.linalg.cython_lapack
import scipy.linalg.lapack
import torch

from theory.errors import DecompositionError, InputError

__all__ = ["values_and_top_right", "QR_CROSSOVER", "EXTREME_EXPONENT"]

#: LAPACK ``gesdd``'s crossover: a QR first when ``rows >= 11/6 cols`` (``MNTHR``); the same one here.
QR_CROSSOVER = 11 / 6

#: beyond σ_1 = 2^±EXTREME_EXPONENT the matrix is decomposed again scaled by an exact power of two (squares of the
#: values, formed inside dqds and inverse iteration, then stay far from overflow and underflow)
EXTREME_EXPONENT = 400

_P = ctypes.POINTER
_INT, _DBL, _CHR = _P(ctypes.c_int), _P(ctypes.c_double), ctypes.c_char_p


@functools.cache
def _routine(name: str):
    """The ``scipy.linalg.cython_lapack`` routine ``name`` as a ctypes function (module docstring)."""
    signatures = {
        "dgebrd": (_INT, _INT, _DBL, _INT, _DBL, _DBL, _DBL, _DBL, _DBL, _INT, _INT),
        "dlasq1": (_INT, _DBL, _DBL, _DBL, _INT),
        "dormbr": (_CHR, _CHR, _CHR, _INT, _INT, _INT, _DBL, _INT, _DBL, _DBL, _INT, _DBL, _INT, _INT),
    }
    capsule = scipy.linalg.cython_lapack.__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    return ctypes.CFUNCTYPE(None, *signatures[name])(pointer)


def _i(x: int):
    return ctypes.byref(ctypes.c_int(int(x)))


def _d(a: np.ndarray):
    return a.ctypes.data_as(_DBL)


def _call(name: str, *args) -> None:
    info = ctypes.c_int(0)
    _routine(name)(*args, ctypes.byref(info))
    if info.value != 0:
        raise DecompositionError(f"LAPACK {name} failed (info = {info.value})")


def _gebrd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bidiagonalise Fortran-ordered ``a (c, r)``, ``c >= r``, in place: ``(d, e, taup)``."""
    c, r = a.shape
    d, e, tauq, taup = np.empty(r), np.empty(max(r - 1, 1)), np.empty(r), np.empty(r)
    query = np.empty(1)
    _call("dgebrd", _i(c), _i(r), _d(a), _i(c), _d(d), _d(e), _d(tauq), _d(taup), _d(query), _i(-1))
    work = np.empty(max(int(query[0]), 1))
    _call("dgebrd", _i(c), _i(r), _d(a), _i(c), _d(d), _d(e), _d(tauq), _d(taup), _d(work), _i(work.size))
    return d, e[: r - 1], taup


def _bidiagonal_values(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Every singular value of the upper bidiagonal ``(d, e)``, descending: ``dlasq1`` (dqds, the values-only
    solver ``gesdd`` uses; high relative accuracy; 4.5 ms -> 0.5 ms against ``dbdsqr`` at r = 576, measured)."""
    r = d.size
    s, off = d.copy(), np.zeros(max(r, 1))
    off[: r - 1] = e
    _call("dlasq1", _i(r), _d(s), _d(off), _d(np.empty(4 * r)))
    return s


def _bidiagonal_top_right(d: np.ndarray, e: np.ndarray, values: np.ndarray, j: int) -> np.ndarray:
    """Top-j right singular vectors ``(r, j)`` of the upper bidiagonal ``(d, e)`` with singular values ``values``
    (descending), from the Golub-Kahan tridiagonal (zero diagonal, off-diagonal ``d1, e1, d2, ..., dr``; the
    eigenvector of ``+σ`` is ``(v1, u1, v2, u2, ...) / √2``) by inverse iteration at the known values (``dstein``,
    which reorthogonalises clustered ones). A tridiagonal that splits (an off-diagonal entry below the underflow
    threshold) goes through ``eigh_tridiagonal``'s bisection, which finds the blocks."""
    r = d.size
    off = np.empty(2 * r - 1)
    off[0::2], off[1::2] = d, e
    if not np.isfinite(off).all():
        raise DecompositionError("the bidiagonal has non-finite entries")
    if np.all(np.abs(off) > np.sqrt(np.finfo(np.float64).tiny)):
        z, info = scipy.linalg.lapack.dstein(np.zeros(2 * r), off, values[:j][::-1].copy(),
                                             np.ones(2 * r, np.int32), np.full(2 * r, 2 * r, np.int32))
        if info != 0:
            raise DecompositionError(f"LAPACK dstein: {info} of {j} inverse iterations did not converge")
    else:
        _, z = scipy.linalg.eigh_tridiagonal(np.zeros(2 * r), off, select="i", select_range=(2 * r - j, 2 * r - 1),
                                             check_finite=False)
    v = z[0::2, ::-1]  # ||v|| = 1 / √2 in exact arithmetic: normalised here
    return v / np.linalg.norm(v, axis=0)


def _apply_p(a: np.ndarray, taup: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``P v`` for ``dgebrd``'s stored right reflections in ``a (c, r)`` and ``v (r, j)``."""
    c, r = a.shape
    out = np.asfortranarray(v)
    j = out.shape[1]
    query = np.empty(1)
    _call("dormbr", b"P", b"L", b"N", _i(r), _i(j), _i(c), _d(a), _i(c), _d(taup), _d(out), _i(r), _d(query), _i(-1))
    work = np.empty(max(int(query[0]), 1))
    _call("dormbr", b"P", b"L", b"N", _i(r), _i(j), _i(c), _d(a), _i(c), _d(taup), _d(out), _i(r), _d(work),
          _i(work.size))
    return out


def values_and_top_right(A: np.ndarray | torch.Tensor, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Every singular value (descending, ``(r,)``) and the top-``j`` right singular vectors ``(r, j)`` of a tall
    float64 matrix ``A (c, r)``, ``c >= r``, from one bidiagonalisation (module docstring; vectors uncertified).

    The QR step (``c >= QR_CROSSOVER r``) runs through ``torch.linalg.qr(mode="r")``: on the 49152 x 576 embedding
    of SmolLM2-135M it took 1.2 s against 4.9 s for scipy's ``dgeqrf`` (one thread, measured 2026-12-05).
    ``A`` is not modified. When the result is not finite or ``σ_1`` lies beyond ``2^±EXTREME_EXPONENT``, ``A`` is
    scaled by an exact power of two and decomposed again (so the values still scale bit for bit with ``A``); a
    non-finite entry is an ``InputError``.

    Examples
    --------
    >>> A = np.diag([3.0, 2.0, 1.0])[:, [2, 0, 1]]
    >>> S, V = values_and_top_right(A, 1)
    >>> S.tolist(), np.abs(V[:, 0]).round(12).tolist()
    ([3.0, 2.0, 1.0], [0.0, 1.0, 0.0])
    """
    T = torch.as_tensor(A)
    if T.dtype != torch.float64 or T.ndim != 2 or T.device.type != "cpu":
        raise InputError(f"values_and_top_right needs a 2-D float64 matrix on the CPU, got {T.dtype} of shape "
                         f"{tuple(T.shape)} on {T.device}")
    c, r = T.shape
    if c < r or not 1 <= j <= r:
        raise InputError(f"values_and_top_right needs rows >= cols and 1 <= j <= cols, got {(c, r)} and j = {j}")
    try:
        S, V = _unscaled(T, j)
        if np.isfinite(V).all() and np.isfinite(S).all() and S[0] < 2.0**EXTREME_EXPONENT and (
                S[0] == 0 or S[0] > 2.0**-EXTREME_EXPONENT):
            return S, V
    except DecompositionError:  # e.g. dqds on a NaN: the input check below names the cause
        pass
    amax = float(torch.maximum(T.max(), -T.min()))  # only now: a pass over A cost 3 % of compare (measured)
    if not math.isfinite(amax):
        raise InputError("values_and_top_right: the matrix has non-finite entries")
    e = math.frexp(amax)[1]  # scale exactly by 2^-e: inverse iteration and dqds square the values
    S, V = _unscaled(torch.ldexp(T, torch.tensor(-e, dtype=torch.float64)), j)
    return np.ldexp(S, e), V


def _unscaled(T: torch.Tensor, j: int) -> tuple[np.ndarray, np.ndarray]:
    c, r = T.shape
    if c >= QR_CROSSOVER * r:
        a = np.asfortranarray(torch.linalg.qr(T, mode="r")[1].numpy())
    else:  # a Fortran-ordered copy: gebrd overwrites it
        a = np.array(T.numpy(), order="F")
    d, e, taup = _gebrd(a)
    values = _bidiagonal_values(d, e)
    return values, _apply_p(a, taup, _bidiagonal_top_right(d, e, values, j))
