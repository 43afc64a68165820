"""Where an update ``dW = W1 - W0`` lies relative to the base's singular structure: subspace projections, coordinate
masks, and ISO's fixed-spectrum decomposition.

Two different operators carry the word "principal" in this literature; the names here say which is which:

* a **subspace projection** ``P_U dW P_V`` with ``P_U = U_k U_kᵀ``, ``P_V = V_k V_kᵀ`` the projectors onto the
  top-k left / right singular subspaces of ``W0`` (rlvr-geometry's "principal subspace"; the OPD papers'
  "principal-projection energy"): ``energy_off_principal_subspace`` is the share of ``||dW||_F²`` it leaves out,
  ``||dW - P_U dW P_V||_F² / ||dW||_F²``;
* a **coordinate mask** ``M ⊙ dW`` (the paper's ``M_princ``: the top-α entries of the rank-k reconstruction, see
  ``theory.metrics.principal_mask``): ``energy_outside_coordinate_mask`` is ``||(1 - M) ⊙ dW||_F² / ||dW||_F²``.

For a direction ``dW`` drawn uniformly from the unit sphere of R^{m x n} (a Gaussian matrix scaled to any fixed
norm: "a random direction of the same norm"), ``E[||P_U dW P_V||²/||dW||²] = k²/(m n)`` exactly, so
``random_energy_off_principal_subspace(m, n, k) = 1 - k²/(m n)``: the projector ``P_U ⊗ P_V`` has trace k² and the
uniform distribution is invariant under the orthogonal group, so every one of the m n coordinates (in any orthonormal
basis) carries 1/(m n) of the energy on average. The same identity makes the average share over *any* orthonormal
basis of R^{m x n} (e.g. the unit matrices E_ij) exactly ``k²/(m n)``, which the tests use as a deterministic oracle.

**ISO** (Zhu et al., "An RLVR-Native Optimization Stack", arXiv 2607.19331; ``iso_merger.py`` of zhuhanqing/ISO):
with thin SVDs ``W0 = U0 Σ0 V0ᵀ`` and ``W1 = U1 Σ1 V1ᵀ``, the *fixed-spectrum* reconstruction puts the base
spectrum into the tuned frames, ``U1 Σ0 V1ᵀ``, after ISO's sign alignment of each singular pair against the base
(``s_k = sign(<u0_k, u1_k>)`` with ``sign(0) := +1``; ``u1_k, v1_k <- s_k u1_k, s_k v1_k``). The **residual** is
``W1 - U1 Σ0 V1ᵀ = U1 (Σ1 - Σ0) V1ᵀ`` and ``iso_residual_share = ||W1 - U1 Σ0 V1ᵀ||_F / ||W1 - W0||_F`` (the
norm ratio; ``squared=True`` gives the energy ratio). ISO's README reports "spectral residual ≈ 3% of the full
checkpoint displacement" but ``iso_merger.py`` does not compute it; we use the unsquared ratio of Frobenius norms
and say so. Two facts the tests pin: the joint sign flip of a singular pair leaves ``u σ vᵀ`` unchanged, so the
reconstruction and the residual do not depend on the alignment (it matters only for ISO's frame displacements
``U1 - U0``); and ``||U1 (Σ1 - Σ0) V1ᵀ||_F = ||σ(W1) - σ(W0)||_2``, which Mirsky's inequality bounds by
``||W1 - W0||_F``: the share lies in [0, 1], 1 when the update only rescales the base's singular pairs in place, 0
when it only turns the frames (e.g. ``W1 = Q W0`` with Q orthogonal).

Numerics. Everything is float64 (``theory.linalg.to_f64``). Each input is first scaled by a power of two (exact) so
that its largest magnitude lies in [1/2, 1): the shares are invariant under scaling ``dW`` (and ``W0``, ``W1``
jointly; ``theory.linalg.pow2_exponent``), and an input scaled by ``2**j`` gives bit-identical results. Error model: the
projection and the norms carry a relative error of a few ``eps64 * (m + n)``; ``energy_off_principal_subspace`` reads
the share off ``||dW||² - ||U_kᵀ dW V_k||²`` where ``energy_off_identity_error`` bounds that route's absolute error by
at most ``2**-20`` of the share, and forms the residual otherwise; the top-k subspaces carry the SVD's
error ``eps64 * ||W0||_2 / gap_k`` (``ZeroGapError`` when ``sigma_k = sigma_{k+1}`` to float64 resolution,
``theory.linalg.topk_subspace_unresolved``: the subspace is then not determined); the ISO residual carries an absolute error of order ``eps64 * r * ||W1||_2``,
i.e. a relative error ``eps64 * r * ||W1||_2 / ||W1 - W0||_F`` of the share (about 1e-11 for a bf16-sized update of
a unit-norm matrix).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from jaxtyping import Float

from theory.errors import InputError, NonFiniteError, ShapeMismatchError, ZeroGapError
from theory.linalg import pow2_exponent, scale_pow2, svd64, to_f64, topk_subspace_unresolved

EPS64 = float(np.finfo(np.float64).eps)

__all__ = [
    "principal_subspace_projection",
    "energy_off_principal_subspace",
    "energy_off_principal_subspace_of_bases",
    "energy_off_identity_error",
    "IDENTITY_RELATIVE_ERROR",
    "random_energy_off_principal_subspace",
    "energy_outside_coordinate_mask",
    "align_singular_signs",
    "fixed_spectrum_reconstruction",
    "iso_residual_share",
    "iso_residual_share_from_spectra",
    "rank_one_directions",
]

def _pow2_normalised(A: np.ndarray) -> np.ndarray:
    """``A`` scaled by a power of two (exact; ``theory.linalg.pow2_exponent``): max |A| in [1/2, 1)."""
    return scale_pow2(A, pow2_exponent(A))


def _top_k_bases(W0: np.ndarray, k: int, name: str = "W0") -> tuple[np.ndarray, np.ndarray]:
    """U_k (m, k), V_k (n, k) of ``W0``; InputError for k outside 1..r, ZeroGapError when the top-k subspaces are
    not determined to float64 resolution (``theory.linalg.topk_subspace_unresolved``, the project's one rule)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"{name}: k must be an integer, got {k!r}")
    U, S, Vh = svd64(_pow2_normalised(W0), name)
    r = S.shape[0]
    if not 1 <= k <= r:
        raise InputError(f"{name}: k={k} outside 1..{r}")
    if topk_subspace_unresolved(S, k, W0.shape):
        raise ZeroGapError(f"{name}: sigma_{k} and sigma_{k + 1} coincide to float64 resolution; the top-{k} "
                           f"singular subspace is not determined")
    return U[:, :k], Vh[:k, :].T


def principal_subspace_projection(dW: Any, U_k: Any, V_k: Any) -> Float[np.ndarray, "m n"]:
    """``P_U dW P_V = U_k (U_kᵀ dW V_k) V_kᵀ``: the part of ``dW`` in the top-k singular subspaces (a subspace
    projection, not a coordinate mask). ``U_k (m, k)`` and ``V_k (n, k)`` have orthonormal columns.

    Examples
    --------
    >>> import numpy as np
    >>> dW = np.arange(6.0).reshape(2, 3)
    >>> principal_subspace_projection(dW, np.eye(2)[:, :1], np.eye(3)[:, 1:2])  # keeps entry (0, 1) only
    array([[0., 1., 0.],
           [0., 0., 0.]])
    """
    D = to_f64(dW, "dW")
    U = to_f64(U_k, "U_k")
    V = to_f64(V_k, "V_k")
    if U.shape[0] != D.shape[0] or V.shape[0] != D.shape[1] or U.shape[1] != V.shape[1]:
        raise ShapeMismatchError(f"dW {D.shape} does not fit U_k {U.shape} and V_k {V.shape} (need (m, k), (n, k))")
    return U @ (U.T @ D @ V) @ V.T


#: the identity route of ``energy_off_principal_subspace_of_bases`` is taken when its absolute error bound is at most
#: this fraction of the share it returns (a relative error <= 2**-20 ~ 1e-6); else the explicit residual is formed
IDENTITY_RELATIVE_ERROR = 2.0**-20


def _gamma(count: int) -> float:
    """Higham's ``γ_N = N eps / (1 - N eps)``: the relative error bound of a float64 sum of N terms in any order."""
    u = count * EPS64
    return u / (1.0 - u) if u < 1.0 else math.inf


def energy_off_identity_error(m: int, n: int, k: int, defect: float) -> float:
    """Absolute error bound of the identity route's share ``1 - ||U_kᵀ D V_k||_F² / ||D||_F²`` (``D`` m x n,
    bases with ``||U_kᵀU_k - I||_F + ||V_kᵀV_k - I||_F <= defect``) against the explicit residual share
    ``||D - U_k U_kᵀ D V_k V_kᵀ||_F² / ||D||_F²`` in exact arithmetic on the same inputs.

    Error model (T = ||D||², C = U_kᵀ D V_k, I = ||C||², d = defect, γ as ``_gamma``):

    * bases: with ``U_kᵀU_k = I + F_U``, ``V_kᵀV_k = I + F_V``, ``||D - U C Vᵀ||² = T - 2 I + tr((I + F_U) C
      (I + F_V) Cᵀ)``, which differs from ``T - I`` by at most ``(d + d²) I``; ``I <= (1 + d)² T``;
    * ``fl(T) = T (1 + θ)``, ``|θ| <= γ_{mn}`` (a sum of mn squares);
    * ``fl(C) = C + ΔC`` with ``||ΔC||_F <= γ_{m+n} || |U_k|ᵀ |D| |V_k| ||_F <= γ_{m+n} ||U_k||_F ||D||_F ||V_k||_F
      <= a sqrt(T)``, ``a = γ_{m+n} k (1 + d)``; so ``|fl(I) - I| <= ((2 (1 + d) a + a²)(1 + γ_{k²}) + γ_{k²} (1 +
      d)²) T``;
    * the quotient: ``|I/T - fl(I)/fl(T)| <= (|fl(I) - I| / T + (1 + d)² γ_{mn}) / (1 - γ_{mn})``, and the final
      subtraction and division add ``(2 eps + eps²)`` of the computed share (at most ``1 + (1 + d)² (1 + γ_{mn}) /
      (1 - γ_{mn})``), covered by ``5 (1 + d)² eps``.

    Each term is a product of counts and ``eps``: for SmolLM2's 49152 x 576 embedding at k = 16 the bound is about
    6.6e-9, for a 1536 x 576 matrix 2.1e-10.

    Examples
    --------
    >>> 1e-11 < energy_off_identity_error(1536, 576, 16, 0.0) < 1e-9
    True
    """
    d = float(defect)
    g_mn, g_k2 = _gamma(m * n), _gamma(k * k)
    a = _gamma(m + n) * k * (1 + d)
    dI = (2 * (1 + d) * a + a * a) * (1 + g_k2) + g_k2 * (1 + d) ** 2
    quotient = (dI + (1 + d) ** 2 * g_mn) / (1 - g_mn) if g_mn < 1 else math.inf
    return (d + d * d) * (1 + d) ** 2 + quotient + 5 * (1 + d) ** 2 * EPS64


def energy_off_principal_subspace_of_bases(dW: Any, U_k: Any, V_k: Any) -> float:
    """``||dW - P_U dW P_V||_F² / ||dW||_F²`` for given orthonormal bases (see ``energy_off_principal_subspace``).

    Two routes. For orthonormal bases ``||D - P_U D P_V||_F² = ||D||_F² - ||U_kᵀ D V_k||_F²`` exactly; in floating
    point the subtraction carries an absolute error ``energy_off_identity_error`` (a few ``k (m + n) eps`` and
    ``mn eps`` of the share, plus the bases' orthonormality defect), so this identity (one ``k x n`` product and one
    sum of squares: no m x n temporaries) is returned only when that bound is at most ``IDENTITY_RELATIVE_ERROR``
    of the share. Otherwise (a share near 0, e.g. an update inside the subspaces, or tiny matrices) the explicit
    residual ``D - U_k (U_kᵀ D V_k) V_kᵀ`` is formed, the same arithmetic as before the identity route (same bits).

    Examples
    --------
    >>> import numpy as np
    >>> dW = np.array([[3.0, 0.0], [0.0, 4.0]])
    >>> energy_off_principal_subspace_of_bases(dW, np.eye(2)[:, :1], np.eye(2)[:, :1])  # 16 of 25 outside
    0.64
    """
    D = dW if isinstance(dW, np.ndarray) and dW.dtype == np.float64 else to_f64(dW, "dW", check_finite=False)
    if D.ndim != 2:
        raise InputError(f"dW: expected a 2-d array, got shape {D.shape}")
    e = pow2_exponent(D)
    D = scale_pow2(D, e) if e else D  # one scaled copy at most; none when max |dW| is already in [1/2, 1)
    flat = D.reshape(-1)
    total = float(np.dot(flat, flat))
    if not math.isfinite(total):  # max |D| < 1 after scaling, so only a NaN / Inf entry gets here
        bad = int(D.size - np.count_nonzero(np.isfinite(D)))
        raise NonFiniteError(f"dW: {bad} non-finite entries (NaN or Inf)")
    if total == 0.0:
        raise InputError("dW is the zero matrix: the share of its energy outside a subspace is undefined")
    U, V = to_f64(U_k, "U_k"), to_f64(V_k, "V_k")
    if U.shape[0] != D.shape[0] or V.shape[0] != D.shape[1] or U.shape[1] != V.shape[1]:
        raise ShapeMismatchError(f"dW {D.shape} does not fit U_k {U.shape} and V_k {V.shape} (need (m, k), (n, k))")
    C = U.T @ D @ V
    share, err = _identity_share(total, C, U, V, D.shape)
    if err <= IDENTITY_RELATIVE_ERROR * share:
        return share
    R = D - U @ C @ V.T  # = D - principal_subspace_projection(D, U, V), C reused
    return float(np.sum(R * R)) / float(np.sum(D * D))


def _identity_share(total: float, C: np.ndarray, U: np.ndarray, V: np.ndarray, shape: tuple[int, int]
                    ) -> tuple[float, float]:
    """``(1 - ||C||_F² / total, its error bound)`` with ``C = fl(U_kᵀ D V_k)``, ``total = fl(||D||_F²)``."""
    eye = np.eye(U.shape[1])
    defect = float(np.linalg.norm(U.T @ U - eye) + np.linalg.norm(V.T @ V - eye))
    return (total - float(np.vdot(C, C))) / total, energy_off_identity_error(*shape, U.shape[1], defect)


def energy_off_principal_subspace(dW: Any, W0: Any, k: int) -> float:
    """Share of the update's energy outside the top-k principal subspaces of ``W0`` (a subspace projection):
    ``||dW - P_U dW P_V||_F² / ||dW||_F²`` with ``P_U``, ``P_V`` the projectors onto the top-k left / right singular
    subspaces of ``W0``. In [0, 1]; ``random_energy_off_principal_subspace(m, n, k)`` for a random direction.

    Raises ``ShapeMismatchError`` when the shapes differ, ``InputError`` for ``dW = 0`` or k outside 1..min(m, n),
    ``ZeroGapError`` when ``sigma_k(W0) = sigma_{k+1}(W0)`` (the subspaces are then not determined).

    Examples
    --------
    >>> import numpy as np
    >>> W0 = np.diag([3.0, 2.0, 1.0])
    >>> dW = np.zeros((3, 3)); dW[0, 0], dW[2, 1] = 1.0, 1.0  # one entry in the top-1 block, one outside
    >>> round(energy_off_principal_subspace(dW, W0, 1), 12)
    0.5
    """
    D = to_f64(dW, "dW")
    A = to_f64(W0, "W0")
    if D.shape != A.shape:
        raise ShapeMismatchError(f"dW has shape {D.shape} but W0 has shape {A.shape}")
    U, V = _top_k_bases(A, k)
    return energy_off_principal_subspace_of_bases(D, U, V)


def random_energy_off_principal_subspace(m: int, n: int, k: int) -> float:
    """``1 - k²/(m n)``: the expected share outside the top-k subspaces of a direction drawn uniformly from the unit
    sphere of R^{m x n} (equivalently a Gaussian matrix scaled to the update's norm), for any k-dimensional
    subspaces (module docstring).

    Examples
    --------
    >>> random_energy_off_principal_subspace(64, 64, 16)
    0.9375
    """
    for nm, v in (("m", m), ("n", n), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"{nm} must be a positive integer, got {v!r}")
    if k > min(m, n):
        raise InputError(f"k={k} exceeds min(m, n) = {min(m, n)}")
    return 1.0 - (k * k) / (m * n)


def energy_outside_coordinate_mask(dW: Any, mask: Any) -> float:
    """``||(1 - M) ⊙ dW||_F² / ||dW||_F²``: the share of the update's energy on entries the boolean coordinate mask
    ``M`` does not select (e.g. ``M = theory.metrics.principal_mask(W0, k, alpha)``, the paper's M_princ). A
    coordinate mask, not a subspace projection. A random mask of density ρ leaves out 1 - ρ on average.

    Examples
    --------
    >>> import numpy as np
    >>> energy_outside_coordinate_mask(np.array([[3.0, 4.0]]), np.array([[True, False]]))  # 16 of 25
    0.64
    """
    D = _pow2_normalised(to_f64(dW, "dW"))
    M = np.asarray(mask)
    if M.dtype != bool:
        raise InputError(f"mask must be a boolean array, got dtype {M.dtype}")
    if M.shape != D.shape:
        raise ShapeMismatchError(f"dW has shape {D.shape} but the mask has shape {M.shape}")
    total = float(np.sum(D * D))
    if total == 0.0:
        raise InputError("dW is the zero matrix: the share of its energy outside a mask is undefined")
    out = np.where(M, 0.0, D)
    return float(np.sum(out * out)) / total


def align_singular_signs(U0: Any, U1: Any, Vh1: Any) -> tuple[Float[np.ndarray, "m r"], Float[np.ndarray, "r n"]]:
    """ISO's sign canonicalisation: flip each singular pair (u1_k, v1_k) of the tuned matrix jointly so that
    ``<u0_k, u1_k> >= 0`` (``sign(0) := +1``). ``U0``, ``U1`` are (m, r), ``Vh1`` is (r, n) (rows = v1_kᵀ).
    The product ``U1 diag(s) Vh1`` is unchanged for every diagonal s.

    Examples
    --------
    >>> import numpy as np
    >>> U, Vh = align_singular_signs(np.eye(2), np.diag([-1.0, 1.0]), np.eye(2))  # pair 0 points away: flip it
    >>> np.diag(U), np.diag(Vh)
    (array([1., 1.]), array([-1.,  1.]))
    """
    A, B, C = to_f64(U0, "U0"), to_f64(U1, "U1"), to_f64(Vh1, "Vh1")
    if A.shape != B.shape or C.shape[0] != B.shape[1]:
        raise ShapeMismatchError(f"U0 {A.shape}, U1 {B.shape} and Vh1 {C.shape} do not fit (need (m, r), (m, r), (r, n))")
    signs = np.where(np.sum(A * B, axis=0) >= 0, 1.0, -1.0)
    return B * signs, C * signs[:, None]


def fixed_spectrum_reconstruction(W0: Any, W1: Any) -> Float[np.ndarray, "m n"]:
    """``U1 Σ0 V1ᵀ``: the base spectrum in the tuned singular frames (ISO), the frames sign-aligned against the
    base's (``align_singular_signs``). Float64, in the scale of the inputs.

    Examples
    --------
    >>> import numpy as np
    >>> W0, W1 = np.diag([2.0, 1.0]), np.diag([5.0, 1.0])  # same frames, new spectrum: back to W0
    >>> fixed_spectrum_reconstruction(W0, W1)
    array([[2., 0.],
           [0., 1.]])
    """
    A, B = to_f64(W0, "W0"), to_f64(W1, "W1")
    if A.shape != B.shape:
        raise ShapeMismatchError(f"W0 has shape {A.shape} but W1 has shape {B.shape}")
    U0, S0, _ = svd64(A, "W0")
    U1, _, Vh1 = svd64(B, "W1")
    U1, Vh1 = align_singular_signs(U0, U1, Vh1)
    return (U1 * S0) @ Vh1


def iso_residual_share(W0: Any, W1: Any, *, squared: bool = False) -> float:
    """ISO's spectral residual as a share of the displacement: ``||W1 - U1 Σ0 V1ᵀ||_F / ||W1 - W0||_F`` (module
    docstring); with ``squared=True`` the share of the energy, the square of that. In [0, 1] (Mirsky).

    Both matrices are scaled by the same power of two first (exact; the share is scale-invariant). Raises
    ``ShapeMismatchError`` when the shapes differ and ``InputError`` when ``W1 = W0`` (no displacement).

    Examples
    --------
    >>> import numpy as np
    >>> W0 = np.diag([2.0, 1.0])
    >>> iso_residual_share(W0, np.diag([3.0, 1.0]))  # only the spectrum moved: all of it is residual
    1.0
    >>> c, s = np.cos(0.3), np.sin(0.3)
    >>> iso_residual_share(W0, np.array([[c, -s], [s, c]]) @ W0) < 1e-14  # only the frames turned
    True
    """
    A, B = to_f64(W0, "W0"), to_f64(W1, "W1")
    if A.shape != B.shape:
        raise ShapeMismatchError(f"W0 has shape {A.shape} but W1 has shape {B.shape}")
    e = pow2_exponent(A, B)
    A, B = scale_pow2(A, e), scale_pow2(B, e)
    D = B - A
    disp = float(np.sum(D * D))
    if disp == 0.0:
        raise InputError("W1 equals W0: there is no displacement to take a share of")
    R = B - fixed_spectrum_reconstruction(A, B)
    share2 = float(np.sum(R * R)) / disp
    return share2 if squared else math.sqrt(share2)


def iso_residual_share_from_spectra(sigma0: Any, sigma1: Any, displacement_fro: float, *,
                                    squared: bool = False) -> float:
    """``iso_residual_share`` from the singular values alone: ``||W1 - U1 Σ0 V1ᵀ||_F = ||σ(W1) - σ(W0)||_2``
    (unitary invariance of the Frobenius norm), divided by ``||W1 - W0||_F`` (given). For callers that already hold
    every singular value of both matrices (``threegate.compare``'s exact routes); the tests check it against the
    reconstruction.

    Examples
    --------
    >>> iso_residual_share_from_spectra([2.0, 1.0], [3.0, 1.0], 1.0)
    1.0
    """
    s0, s1 = to_f64(sigma0, "sigma0", ndim=1), to_f64(sigma1, "sigma1", ndim=1)
    if s0.shape != s1.shape:
        raise ShapeMismatchError(f"sigma0 has {s0.shape[0]} values but sigma1 has {s1.shape[0]}")
    d = float(displacement_fro)
    if not (math.isfinite(d) and d > 0):
        raise InputError(f"the displacement ||W1 - W0||_F must be finite and > 0, got {displacement_fro}")
    share = float(np.linalg.norm(s1 - s0)) / d
    return share * share if squared else share


def rank_one_directions(W0: Any, k: int, n_complement: int | None) -> list[tuple[str, int, float, np.ndarray]]:
    """``(kind, i, sigma_i, u_i v_iᵀ)``: the rank-one directions of the top-k singular pairs of ``W0`` (kind
    ``"principal"``, i < k) and of ``n_complement`` pairs spread evenly over k..r-1 (``"complement"``; all of them
    when None). Each has unit Frobenius norm; a complement direction lies outside the top-k principal subspaces
    (``P_U D P_V = 0``). Needs 1 <= k < r. (Which ``u``/``v`` signs the SVD returns does not matter: a joint flip
    leaves ``u vᵀ`` unchanged.)

    Examples
    --------
    >>> import numpy as np
    >>> [(kind, i, s) for kind, i, s, _ in rank_one_directions(np.diag([4.0, 3.0, 2.0, 1.0]), 1, 2)]
    [('principal', 0, 4.0), ('complement', 1, 3.0), ('complement', 3, 1.0)]
    """
    U, S, Vh = svd64(W0, "W0")
    r = S.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < r:
        raise InputError(f"W0: k={k!r} must be an integer in 1..{r - 1} (r = {r}) to leave a complement")
    if n_complement is not None and (isinstance(n_complement, bool) or not isinstance(n_complement, (int, np.integer))
                                     or n_complement < 1):
        raise InputError(f"n_complement must be a positive integer or None, got {n_complement!r}")
    comp = list(range(k, r))
    if n_complement is not None and n_complement < len(comp):
        comp = sorted({comp[int(round(x))] for x in np.linspace(0, len(comp) - 1, n_complement)})
    return ([("principal", i, float(S[i]), np.outer(U[:, i], Vh[i])) for i in range(k)]
            + [("complement", j, float(S[j]), np.outer(U[:, j], Vh[j])) for j in comp])
