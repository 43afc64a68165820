"""The metrics of the paper (Sec. 2, 4, 5; App. E): bf16 update sparsity, masks, Jaccard, consensus, NSS, angles.

Conventions (shapes ``(m, n)`` unless noted; inputs are numpy arrays or torch tensors):

- **bf16 probe (Def. 2.1).** ``w`` and ``ŵ`` are stored bf16 values; an entry is *unchanged* iff
  ``|ŵ - w| <= eta * max(|w|, |ŵ|)``. Inputs of another float dtype are first rounded to bf16 the way torch stores
  them (``Tensor.to(torch.bfloat16)``: float64 goes through float32, i.e. two roundings, then round-to-nearest-even).
  Non-finite values (before or after that rounding) raise ``NonFiniteError`` with their count.
- **Zeros.** The formula is applied as written to every finite value, zeros included: ``+0`` and ``-0`` are the
  same value (``|0 - 0| <= 0``), so a sign flip of a zero is *unchanged*; a zero that becomes nonzero (or the
  reverse) is *changed* (``|ŵ| <= eta |ŵ|`` fails for ``eta < 1``). Subnormals follow the same formula.
- **Fast path (Prop. E.3, sharpened).** Distinct finite bf16 values differ by a relative amount of at least
  ``2**-8`` (attained across a binade boundary: ``2**e`` and its lower neighbour ``2**e - 2**(e-8)``); zeros differ
  from nonzeros by relative amount 1; subnormals are spaced ``2**-133`` below ``2**-126``, relative spacing
  ``>= 2**-7``. Hence for every ``eta < 2**-8`` (the paper states the sufficient ``eta < 2**-9``) the probe equals
  *bit equality of the int16 views, with +0 == -0*. ``bf16_unchanged`` uses that for ``eta < 2**-8`` and the exact
  formula (in float64, where bf16 values are exact) otherwise; ``bf16_unchanged_formula`` is the reference.
- **Masks** are boolean arrays with ``True`` = changed / selected. Set metrics (Jaccard, overlap) take the masks as
  sets of flat indices. Ranking masks (``principal_mask``, ``low_magnitude_mask``) select exactly
  ``round_half_up(alpha * n) = floor(alpha * n + 1/2)`` entries; ties in the score are broken by the flat
  (row-major) index, lower index first, so the result is deterministic. ``principal_mask`` scores a computed
  rank-k reconstruction, so its ties are judged up to that reconstruction's rounding (``reconstruction_tie_tol``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float

from theory import bf16_kernel
from theory.errors import ComplexInputError, InputError, NonFiniteError, ShapeMismatchError, ZeroGapError
from theory.linalg import (
    SVD, pow2_exponent, principal_angles, reject_complex, scale_pow2, subspace_resolution, svd64, to_f64,
    topk_subspace_unresolved,
)

__all__ = [
    "ETA_DEFAULT",
    "ETA_BIT_EQUALITY_LIMIT",
    "to_bf16",
    "bf16_unchanged",
    "bf16_unchanged_formula",
    "update_mask",
    "bf16_changed_count",
    "bf16_sparsity",
    "abs_tol_unchanged",
    "jaccard",
    "bernoulli_jaccard_baseline",
    "jaccard_matrix",
    "mean_offdiag",
    "consensus",
    "row_ratios",
    "col_ratios",
    "nss",
    "principal_angles_topk",
    "rank_k_reconstruction",
    "selection_count",
    "principal_mask",
    "principal_mask_from_svd",
    "reconstruction_tie_tol",
    "low_magnitude_mask",
    "overlap",
    "random_overlap_baseline",
]

EPS64 = float(np.finfo(np.float64).eps)
ETA_DEFAULT = 1e-3
#: The probe equals bit equality (+0 == -0) for every eta strictly below this (sharp: at 2**-8 it does not).
ETA_BIT_EQUALITY_LIMIT = 2.0**-8

_EXP_MASK = 0x7F80  # bf16 exponent bits; all ones = Inf/NaN
_ABS_MASK = 0x7FFF  # everything but the sign bit


# ----------------------------------------------------------------------------------------------------------------
# bf16 conversion
# ----------------------------------------------------------------------------------------------------------------


def to_bf16(x: Any, name: str = "input", *, check: bool = True) -> torch.Tensor:
    """``x`` as a torch bf16 tensor (kept on its device). Raises ``NonFiniteError`` naming the count of NaN/Inf.

    numpy ``ml_dtypes.bfloat16`` arrays are reinterpreted bit for bit; other dtypes are rounded as
    ``Tensor.to(torch.bfloat16)`` does (float64 via float32). Values that overflow to Inf are reported too
    (``check=False`` skips the bf16-level test, for callers that fuse it into their own pass).
    """
    reject_complex(x, name)
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # pragma: no cover - defensive
            raise InputError(f"{name}: cannot be read as an array ({e})") from None
        if arr.dtype.kind == "c":
            raise ComplexInputError(f"{name}: a complex array ({arr.dtype}); only real weights are supported")
        if arr.dtype.name == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
        elif arr.dtype.kind in "fiub":
            t = torch.from_numpy(np.ascontiguousarray(arr))
        else:
            raise InputError(f"{name}: cannot be read as a float array (dtype {arr.dtype})")
    if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                     torch.uint8, torch.bool)):
        raise InputError(f"{name}: unsupported dtype {t.dtype}")
    if t.dtype.is_floating_point and t.dtype != torch.bfloat16:
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise NonFiniteError(f"{name}: {bad} non-finite entries (NaN or Inf)")
    b = t.to(torch.bfloat16)
    if check:
        _raise_if_nonfinite_bits(b, name)
    return b


def _nonfinite_count(b: torch.Tensor) -> int:
    return int(((b.reshape(-1).view(torch.int16) & _EXP_MASK) == _EXP_MASK).sum())


def _has_nonfinite_bits(i16) -> bool:
    """Inf/NaN test by reductions only (fast): as int16, positive Inf/NaN lie in [0x7F80, 0x7FFF] (the top of the
    signed range), negative ones in [0xFF80, 0xFFFF] (the top of the unsigned range)."""
    if i16.shape[0] == 0:
        return False
    if isinstance(i16, np.ndarray):
        return bool(i16.max() >= 0x7F80 or i16.view(np.uint16).max() >= 0xFF80)
    return bool((i16.max() >= 0x7F80) | ((i16 < 0) & (i16 >= -128)).any())


def _raise_if_nonfinite_bits(b: torch.Tensor, name: str) -> None:
    flat = b.reshape(-1).view(torch.int16)
    if _has_nonfinite_bits(flat.numpy() if flat.device.type == "cpu" else flat):
        raise NonFiniteError(f"{name}: {_nonfinite_count(b)} non-finite entries (NaN or Inf) as bf16")


def _pair_bf16(w0: Any, w1: Any, check: bool = True) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both inputs as bf16 tensors on one device; the flag says whether to return torch (any input was torch)."""
    as_torch = isinstance(w0, torch.Tensor) or isinstance(w1, torch.Tensor)
    a, b = to_bf16(w0, "w0", check=check), to_bf16(w1, "w1", check=check)
    if a.shape != b.shape:
        raise ShapeMismatchError(f"w0 has shape {tuple(a.shape)} but w1 has shape {tuple(b.shape)}")
    if a.device != b.device:
        b = b.to(a.device)
    return a, b, as_torch


def _out(mask: torch.Tensor, as_torch: bool):
    return mask if as_torch else mask.cpu().numpy()


def _check_eta(eta: float) -> float:
    eta = float(eta)
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise InputError(f"eta must be a finite number >= 0, got {eta}")
    return eta


# ----------------------------------------------------------------------------------------------------------------
# Def 2.1 / 2.2: the bf16 probe and update sparsity
# ----------------------------------------------------------------------------------------------------------------


def _formula_unchanged(a: torch.Tensor, b: torch.Tensor, eta: float) -> torch.Tensor:
    # float64 holds every bf16 value exactly; |b - a| and eta * max(...) are each rounded once.
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return (b64 - a64).abs() <= eta * torch.maximum(a64.abs(), b64.abs())


def bf16_unchanged_formula(w0: Any, w1: Any, eta: float = ETA_DEFAULT):
    """Reference probe (Def. 2.1) by the formula ``|w1 - w0| <= eta * max(|w0|, |w1|)`` in float64, any ``eta``."""
    eta = _check_eta(eta)
    a, b, as_torch = _pair_bf16(w0, w1)
    return _out(_formula_unchanged(a, b, eta), as_torch)


def bf16_unchanged(w0: Any, w1: Any, eta: float = ETA_DEFAULT) -> Bool[Any, "*shape"]:
    """Def. 2.1: True where the stored bf16 value did not change.

    For ``eta < 2**-8`` (the paper's 1e-3 included) this is bit equality of the int16 views with ``+0 == -0``
    (Prop. E.3, sharpened); otherwise the formula. Returns a torch bool tensor (on the input's device) if either
    input is a torch tensor, else a numpy bool array.
    """
    eta = _check_eta(eta)
    if eta < ETA_BIT_EQUALITY_LIMIT:
        a, b, as_torch = _kernel_pair(w0, w1)
        return _out(~bf16_kernel.changed_mask(a, b), as_torch)
    a, b, as_torch = _pair_bf16(w0, w1)
    return _out(_formula_unchanged(a, b, eta), as_torch)


def update_mask(w0: Any, w1: Any, eta: float = ETA_DEFAULT) -> Bool[Any, "*shape"]:
    """Update mask ``M = 1[w1 ≉ w0]``: True where the stored bf16 value changed (``not bf16_unchanged``).

    For ``eta < 2**-8`` one fused pass (``theory.bf16_kernel.changed_mask``: compare, Inf/NaN test, ``±0``).
    """
    eta = _check_eta(eta)
    if eta < ETA_BIT_EQUALITY_LIMIT:
        a, b, as_torch = _kernel_pair(w0, w1)
        return _out(bf16_kernel.changed_mask(a, b), as_torch)
    return ~bf16_unchanged(w0, w1, eta)


CHUNK_CPU = bf16_kernel.BLOCK  # entries per block of the CPU pass (theory.bf16_kernel)


def _kernel_input(x: Any, name: str) -> torch.Tensor:
    """``x`` as the kernel takes it: bf16 and float32 tensors as they are (float32 is rounded inside the pass),
    numpy bf16 (ml_dtypes) reinterpreted bit for bit, anything else through ``to_bf16`` (which checks and rounds)."""
    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float32):
        return x.detach()
    if isinstance(x, np.ndarray) and x.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(x))
    return to_bf16(x, name, check=False)


def _kernel_pair(w0: Any, w1: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    as_torch = isinstance(w0, torch.Tensor) or isinstance(w1, torch.Tensor)
    a, b = _kernel_input(w0, "w0"), _kernel_input(w1, "w1")
    if a.shape != b.shape:
        raise ShapeMismatchError(f"w0 has shape {tuple(a.shape)} but w1 has shape {tuple(b.shape)}")
    return a, b.to(a.device), as_torch


def bf16_changed_count(w0: Any, w1: Any, eta: float = ETA_DEFAULT) -> int:
    """Number of entries whose stored bf16 value changed (one fused pass, ``theory.bf16_kernel``, for
    ``eta < 2**-8``; fp32 master weights are rounded to bf16 inside that pass)."""
    eta = _check_eta(eta)
    if eta < ETA_BIT_EQUALITY_LIMIT:
        return bf16_kernel.changed_count(*_kernel_pair(w0, w1)[:2])
    a, b, _ = _pair_bf16(w0, w1, check=False)
    _raise_if_nonfinite_bits(a, "w0")
    _raise_if_nonfinite_bits(b, "w1")
    same = _formula_unchanged(a, b, eta)
    return int(same.numel() - int(same.sum()))


def bf16_sparsity(w0: Any, w1: Any, eta: float = ETA_DEFAULT) -> float:
    """Def. 2.2: ``1 - (#changed) / n``. 1.0 = nothing changed. Raises ``InputError`` on empty tensors."""
    eta = _check_eta(eta)
    a, b, _ = _kernel_pair(w0, w1)
    n = a.numel()
    if n == 0:
        raise InputError("bf16_sparsity: empty tensors (n = 0), sparsity undefined")
    return 1.0 - bf16_changed_count(a, b, eta) / n


def abs_tol_unchanged(w0: Any, w1: Any, atol: float = 1e-5) -> Bool[np.ndarray, "*shape"]:
    """App. E.1's fixed-tolerance probe ``|w1 - w0| <= atol`` on the values as given (float64, no bf16 rounding).

    Kept for comparison only. On bf16 values one step is ``2**(e-7)`` for ``|w|`` in ``[2**e, 2**(e+1))``, which
    is ``<= 1e-5`` for ``|w| < 2**-9``: there a real stored change reads "unchanged". On fp32 values (master
    weights) a change below half a bf16 step at a large magnitude reads "changed" though the stored bf16 value
    stays the same.
    """
    a = to_f64(w0, "w0", ndim=None)
    b = to_f64(w1, "w1", ndim=None)
    if a.shape != b.shape:
        raise ShapeMismatchError(f"w0 has shape {a.shape} but w1 has shape {b.shape}")
    return np.abs(b - a) <= float(atol)


# ----------------------------------------------------------------------------------------------------------------
# Cross-run stability: Jaccard, Bernoulli baseline, consensus, row/column ratios
# ----------------------------------------------------------------------------------------------------------------


def _as_bool(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iub" or not np.all((arr == 0) | (arr == 1)):
            raise InputError(f"{name}: a mask must be boolean (or 0/1 integers), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def jaccard(a: Any, b: Any) -> float:
    """``J(A, B) = |A ∩ B| / |A ∪ B|`` of two boolean masks of equal shape; two empty masks give 1.0 (equal sets)."""
    A, B = _as_bool(a, "a"), _as_bool(b, "b")
    if A.shape != B.shape:
        raise ShapeMismatchError(f"mask a has shape {A.shape} but mask b has shape {B.shape}")
    union = int(np.count_nonzero(A | B))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(A & B)) / union


def bernoulli_jaccard_baseline(p: float, q: float) -> float:
    """``pq / (p + q - pq)`` for mask densities ``p, q`` in [0, 1] (p = q = 0 gives 1.0, like two empty masks).

    This is ``E|A ∩ B| / E|A ∪ B|`` for independent Bernoulli(p), Bernoulli(q) masks: the n → ∞ limit of
    ``E[J]``. At finite n ``E[J]`` differs by O(1/n) (the paper calls the formula the expectation).
    """
    p, q = float(p), float(q)
    for nm, v in (("p", p), ("q", q)):
        if not 0.0 <= v <= 1.0:
            raise InputError(f"{nm} must be a density in [0, 1], got {v}")
    den = p + q - p * q
    return 1.0 if den == 0.0 else p * q / den


def _stack_masks(masks: Any) -> np.ndarray:
    if isinstance(masks, (list, tuple)):
        if len(masks) == 0:
            raise InputError("masks: empty list")
        arrs = [_as_bool(m, f"masks[{i}]") for i, m in enumerate(masks)]
        for i, m in enumerate(arrs[1:], 1):
            if m.shape != arrs[0].shape:
                raise ShapeMismatchError(f"masks[0] has shape {arrs[0].shape} but masks[{i}] has shape {m.shape}")
        return np.stack(arrs)
    arr = _as_bool(masks, "masks")
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise InputError(f"masks: expected a stack (R, ...) with R >= 1, got shape {arr.shape}")
    return arr


def jaccard_matrix(masks: Sequence[Any] | Any) -> Float[np.ndarray, "R R"]:
    """Pairwise Jaccard matrix ``J[r, s]`` of R masks (a list, or an array stacked on axis 0); diagonal 1.

    Counts are exact (float64 matmul of 0/1 vectors is exact below 2**53 entries).
    """
    M = _stack_masks(masks)
    R = M.shape[0]
    X = M.reshape(R, -1).astype(np.float64)
    inter = X @ X.T
    size = np.diag(inter).copy()
    union = size[:, None] + size[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        J = np.where(union == 0, 1.0, inter / np.where(union == 0, 1.0, union))
    np.fill_diagonal(J, 1.0)
    return J


def mean_offdiag(J: Any) -> float:
    """Mean of the off-diagonal entries of a square (R, R) matrix, R >= 2."""
    A = to_f64(J, "J")
    if A.shape[0] != A.shape[1]:
        raise ShapeMismatchError(f"J must be square, got shape {A.shape}")
    R = A.shape[0]
    if R < 2:
        raise InputError(f"J: need at least 2 runs for off-diagonal pairs, got R = {R}")
    return float((A.sum() - np.trace(A)) / (R * (R - 1)))


def consensus(masks: Sequence[Any] | Any) -> Float[np.ndarray, "*shape"]:
    """Consensus ratio ``C = (1/R) Σ_r M^(r)``: the fraction of runs that changed each entry (float64)."""
    M = _stack_masks(masks)
    return M.mean(axis=0, dtype=np.float64)


def _mask2d(M: Any) -> np.ndarray:
    if isinstance(M, torch.Tensor):
        M = M.detach().cpu().numpy()
    A = np.asarray(M)
    if A.ndim != 2:
        raise InputError(f"M: expected a 2-d mask, got shape {A.shape}")
    if A.dtype.kind not in "biuf":
        raise InputError(f"M: expected a boolean or numeric mask, got dtype {A.dtype}")
    return A.astype(np.float64)


def row_ratios(M: Any) -> Float[np.ndarray, " m"]:
    """Row update ratios ``ρ_i = mean_j M_ij`` (stripes in Q/K/V show up here)."""
    return _mask2d(M).mean(axis=1)


def col_ratios(M: Any) -> Float[np.ndarray, " n"]:
    """Column update ratios ``κ_j = mean_i M_ij`` (stripes in O show up here)."""
    return _mask2d(M).mean(axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Spectral metrics
# ----------------------------------------------------------------------------------------------------------------


def _scaled_pair(W0: Any, W1: Any) -> tuple[np.ndarray, np.ndarray]:
    """W0, W1 as float64, both scaled by one power of two (exact) so the largest entry is in [1/2, 1): norms and
    SVDs then neither overflow (1e200 inputs) nor underflow (1e-200 inputs), and 2**j-scaled inputs give equal bits."""
    a = to_f64(W0, "W0")
    b = to_f64(W1, "W1")
    if a.shape != b.shape:
        raise ShapeMismatchError(f"W0 has shape {a.shape} but W1 has shape {b.shape}")
    e = pow2_exponent(a, b)
    return scale_pow2(a, e), scale_pow2(b, e)


def nss(W0: Any, W1: Any) -> float:
    """Normalised spectrum shift ``NSS = ||σ(W1) - σ(W0)||_2 / ||σ(W0)||_2`` (float64 SVD, on copies of W0 and W1
    scaled by one power of two: scale-free, defined at every magnitude; only an exactly zero W0 is refused).

    Examples
    --------
    >>> nss(np.diag([2.0, 1.0]), np.diag([2.0, 1.5]))  # doctest: +ELLIPSIS
    0.2236...
    """
    a, b = _scaled_pair(W0, W1)
    if not np.any(a):
        raise InputError("nss: W0 is the zero matrix, ||σ(W0)||_2 = 0 and NSS is undefined")
    s0, s1 = np.linalg.svd(a, compute_uv=False), np.linalg.svd(b, compute_uv=False)
    return float(np.linalg.norm(s1 - s0) / np.linalg.norm(s0))


def principal_angles_topk(W0: Any, W1: Any, k: int) -> tuple[Float[np.ndarray, " k"], Float[np.ndarray, " k"]]:
    """Principal angles (radians, ascending) between the top-k left and right singular subspaces of W0 and W1.

    ``cos θ_i = σ_i(U_{0,k}ᵀ U_{1,k})``. Raises ``ZeroGapError`` if ``σ_k = σ_{k+1}`` (to float64 resolution) in
    either matrix: the top-k subspace is then not determined and any angle would be an artefact of the solver.
    At ``k = min(m, n) < max(m, n)`` the complement still holds ``|m - n|`` zero singular values, so the top-k
    subspace on the longer side is unique only if ``σ_k > 0``: a rank-deficient tall or wide matrix raises
    ``ZeroGapError`` there too (for ``m = n`` both subspaces are the whole space). Both matrices are scaled by one
    power of two first (exact), so the gaps are resolved relative to ``σ_1`` at any magnitude.
    """
    a, b = _scaled_pair(W0, W1)
    m, n = a.shape
    r = min(m, n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= r:
        raise InputError(f"k={k!r} outside 1..{r}")
    k = int(k)
    bases = []
    for nm, A in (("W0", a), ("W1", b)):
        U, S, Vh = np.linalg.svd(A, full_matrices=False)
        resolution = subspace_resolution(S, (m, n))
        if k < r and topk_subspace_unresolved(S, k, (m, n)):
            raise ZeroGapError(
                f"{nm}: σ_{k} = {S[k - 1]:.17g} and σ_{k + 1} = {S[k]:.17g} coincide (gap <= {resolution:.3g} of the "
                f"{nm} scaled to max |entry| in [1/2, 1)); the top-{k} singular subspace is not unique")
        if k == r and topk_subspace_unresolved(S, k, (m, n)):
            side = "left" if m > n else "right"
            raise ZeroGapError(
                f"{nm}: rank-deficient at k = min(m, n) = {k} (σ_{k} = {S[k - 1]:.3g} <= {resolution:.3g}, relative "
                f"to the largest entry) in a {m}x{n} matrix: the top-{k} {side} singular subspace is not unique")
        bases.append((U[:, :k], Vh[:k].T))
    (U0, V0), (U1, V1) = bases
    return principal_angles(U0, U1), principal_angles(V0, V1)


# ----------------------------------------------------------------------------------------------------------------
# Masks from W0 and overlaps
# ----------------------------------------------------------------------------------------------------------------


def rank_k_reconstruction(W0: Any, k: int) -> Float[np.ndarray, "m n"]:
    """``W0^(k) = U_k diag(σ_1..σ_k) V_kᵀ`` in float64."""
    U, S, Vh = svd64(W0, "W0")
    if not 1 <= k <= S.shape[0]:
        raise InputError(f"W0: k={k} outside 1..{S.shape[0]}")
    return (U[:, :k] * S[:k]) @ Vh[:k, :]


def selection_count(alpha: float, n: int) -> int:
    """``floor(alpha * n + 1/2)``: the number of entries a top-α / bottom-α mask selects (round half up)."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be a fraction in [0, 1], got {alpha}")
    return int(math.floor(alpha * n + 0.5))


def _select_extreme(score: np.ndarray, count: int, *, largest: bool) -> np.ndarray:
    """The ``count`` largest (``largest``) or smallest scores, among equal scores the lower flat index first (= the
    first ``count`` of a stable argsort of ``-score`` / ``score``), in O(n) and without a negated copy: every score
    beyond the threshold ``t`` (the count-th largest / smallest, by ``np.partition``) and the lowest-index ties at
    ``t``."""
    flat = score.ravel()
    n = flat.shape[0]
    mask = np.zeros(n, dtype=bool)
    if count >= n:
        mask[:] = True
    elif count > 0:
        kth = n - count if largest else count - 1
        t = np.partition(flat, kth)[kth]
        (np.greater if largest else np.less)(flat, t, out=mask)
        ties = np.flatnonzero(flat == t)[: count - int(np.count_nonzero(mask))]
        mask[ties] = True
    return mask.reshape(score.shape)


def _select_top(score: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest scores (``_select_extreme``)."""
    return _select_extreme(score, count, largest=True)


def _select_bottom(score: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` smallest scores (``_select_extreme``)."""
    return _select_extreme(score, count, largest=False)


def reconstruction_tie_tol(S: Float[np.ndarray, " r"], k: int, shape: tuple[int, int],
                           gap: float | None = None) -> float:
    """Bound on the entrywise error of a computed ``|W0^(k)(i, j)|``: two scores within twice this count as tied.

    Error model: the float64 SVD is exact for W0 + E, ``||E||_2 <= eps_s = 8 max(m, n) eps σ_1``; the rank-k
    truncation then moves by ``||E|| + σ_1 ||sin Θ|| <= eps_s (1 + σ_1 / (γ_k - eps_s))`` (Wedin for the top-k
    left subspace, γ_k = σ_k - σ_{k+1}, every entry bounded by the spectral norm), and forming
    ``(U_k diag σ_k) V_kᵀ`` adds ``<= 2 k eps σ_1`` per entry. ``gap`` overrides γ_k when ``S`` holds only k values
    (a certified lower bound, e.g. ``theory.fast_spectral.TopK.gap_lower``); without either, the term is dropped.
    Raises ``ZeroGapError`` when γ_k <= 2 eps_s: the rank-k reconstruction is then not determined.
    """
    m, n = shape
    s1 = float(S[0]) if len(S) else 0.0
    eps_s = 8 * max(m, n) * EPS64 * s1
    g = gap if gap is not None else (float(S[k - 1] - S[k]) if k < len(S) else None)
    if k == min(m, n):
        g = None  # W0^(r) = W0: no truncation, no subspace to determine
    if g is not None and not g > 2 * eps_s:
        raise ZeroGapError(f"W0: σ_{k} - σ_{k + 1} = {g:.3g} <= {2 * eps_s:.3g} (rounding): the rank-{k} "
                           f"reconstruction, and so the principal mask, is not determined")
    return eps_s * (1 + (s1 / (g - eps_s) if g is not None else 0.0)) + 2 * k * EPS64 * s1


def _select_top_with_ties(score: np.ndarray, count: int, tie: float, cut: float | None = None) -> np.ndarray:
    """Top ``count`` entries of ``score``; entries within ``tie`` of the cut-off score count as tied with it and
    are taken in lower flat (row-major) index order. Every entry above the tied group is selected. ``cut``: the
    count-th largest score when the caller has it already."""
    flat = score.ravel()
    mask = np.zeros(flat.shape[0], dtype=bool)
    if count == 0:
        return mask.reshape(score.shape)
    if cut is None:  # the count-th largest score, O(n)
        cut = np.partition(flat, flat.shape[0] - count)[flat.shape[0] - count]
    np.greater(flat, cut + tie, out=mask)  # every entry above the tied group
    band = flat >= cut - tie
    band ^= mask  # the tied group (above ⊂ band): cut - tie <= score <= cut + tie
    tied = np.flatnonzero(band)  # ascending flat index
    mask[tied[: count - int(np.count_nonzero(mask))]] = True
    return mask.reshape(score.shape)


def principal_mask_from_svd(svd: SVD | tuple, k: int, alpha: float, *, gap: float | None = None) -> Bool[np.ndarray, "m n"]:
    """``principal_mask`` from a thin SVD ``(U, S, Vh)`` of W0 computed elsewhere (same rule, same bits as
    ``principal_mask`` when the SVD is ``svd64(W0)``); ``gap``: see ``reconstruction_tie_tol``."""
    U, S, Vh = (np.asarray(x, dtype=np.float64) for x in svd)
    if not 1 <= k <= len(S):
        raise InputError(f"W0: k={k} outside 1..{len(S)}")
    shape = (U.shape[0], Vh.shape[1])
    US, Vk = U[:, :k] * S[:k], Vh[:k, :]
    score = US @ Vk
    np.abs(score, out=score)  # in place: no second m x n temporary
    tie = 2 * reconstruction_tie_tol(S, k, shape, gap)
    count = selection_count(alpha, score.size)
    if not 0 < count < score.size:
        return _select_top_with_ties(score, count, tie)
    # the count-th largest score by partitioning the scores in place, then the same product again into the same
    # buffer (the same BLAS call on the same operands: the same bits), instead of a partitioned m x n copy
    flat = score.reshape(-1)
    flat.partition(flat.shape[0] - count)
    cut = flat[flat.shape[0] - count]
    np.matmul(US, Vk, out=score)
    np.abs(score, out=score)
    return _select_top_with_ties(score, count, tie, cut=cut)


def principal_mask(W0: Any, k: int, alpha: float) -> Bool[np.ndarray, "m n"]:
    """``M_princ``: the top-α fraction of entries by ``|W0^(k)(i, j)|`` (rank-k reconstruction), exactly
    ``floor(α n + 1/2)`` entries, ties broken by lower flat (row-major) index.

    Ties are judged on the exact reconstruction: the computed one carries rounding (``reconstruction_tie_tol``),
    so scores within twice that bound of the cut-off score count as tied with it, and exact ties are then taken
    by flat index as documented (a reconstruction's rounding noise never decides). Raises ``ZeroGapError`` when
    σ_k = σ_{k+1} to rounding (the rank-k reconstruction is not unique).

    Examples
    --------
    >>> principal_mask(np.ones((2, 3)), 1, 0.5)  # every score is 1 up to rounding: the first three flat indices
    array([[ True,  True,  True],
           [False, False, False]])
    """
    return principal_mask_from_svd(svd64(W0, "W0"), k, alpha)


def _magnitudes(W0: Any) -> np.ndarray:
    """``|W0|`` in a float dtype that holds every value exactly (abs is exact): float32 for bf16 / fp16 / fp32 inputs
    (a quarter of the float64 memory traffic), float64 otherwise. Raises on NaN/Inf like ``to_f64``."""
    t = W0.detach() if isinstance(W0, torch.Tensor) else None
    if t is not None and t.dtype in (torch.bfloat16, torch.float16, torch.float32):
        A = t.to(device="cpu", dtype=torch.float32)
        A = (A.abs() if A.data_ptr() == t.data_ptr() else A.abs_()).numpy()  # in place on a fresh copy only
        if A.size and not np.isfinite(A.max()):
            raise NonFiniteError(f"W0: {int(A.size - np.count_nonzero(np.isfinite(A)))} non-finite entries (NaN or Inf)")
        return A
    return np.abs(to_f64(W0, "W0", ndim=None))


def low_magnitude_mask(W0: Any, alpha: float) -> Bool[np.ndarray, "*shape"]:
    """``M_low``: the bottom-α fraction of entries by ``|W0|``, exactly ``floor(α n + 1/2)`` entries, ties broken
    by lower flat (row-major) index."""
    A = _magnitudes(W0)
    return _select_bottom(A, selection_count(alpha, A.size))


def overlap(M_ref: Any, M: Any) -> float:
    """``Overlap(M•, M) = |M• ∩ M| / |M|``: the fraction of M's entries that lie in the reference mask M•."""
    A, B = _as_bool(M_ref, "M_ref"), _as_bool(M, "M")
    if A.shape != B.shape:
        raise ShapeMismatchError(f"M_ref has shape {A.shape} but M has shape {B.shape}")
    size = int(np.count_nonzero(B))
    if size == 0:
        raise InputError("overlap: M is empty (no selected/changed entries), |M ∩ M_ref| / |M| is undefined")
    return int(np.count_nonzero(A & B)) / size


def random_overlap_baseline(M_ref: Any) -> float:
    """Expected overlap of a uniformly random mask with ``M_ref``: the density of ``M_ref``."""
    A = _as_bool(M_ref, "M_ref")
    if A.size == 0:
        raise InputError("random_overlap_baseline: M_ref is empty (size 0)")
    return int(np.count_nonzero(A)) / A.size
