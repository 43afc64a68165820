"""Every metric of one weight matrix against each tuned run, read off one decomposition per side.

``matrix_result`` takes what ``threegate.compare`` has prepared for one matrix: ``W0`` and each ``W+`` in float64,
their ``threegate.decompose.Decomposition`` (one per side), the spectrum of ``dW = W+ - W0`` and the bf16 update
masks (``theory.bf16_kernel``), and returns a ``MatrixResult``: one row per run (see ``threegate.compare``'s
docstring for the columns), the Gate II check rows, and the long tables (spectrum, angles, mask overlaps, Jaccard).

Exact routes (``"svd"``, ``"ritz"``): the Gate II checks run on a ``theory.spectral.SpectralPair`` built from these
decompositions (no new SVD). Fast route: NSS, ``iso_residual_share`` and the Weyl / Mirsky checks (every singular
value) are left out (NaN / ``"not-evaluated"``) and the row says so in ``skipped``; angles carry their certified
error ``angle_err_deg``, ``||dW||_2`` its enclosure width ``dW_2_err``.

Gate II on the fast route (``FAST_GATE2``: the checks that read only ``σ_1..σ_{k+1}``, the top-k bases, dW and
``||dW||_2``, and Cor 3.5 also dW's top k). Error model: when both sides' Ritz triplets are certified *top*
triplets (``Decomposition.top_certified``), they are the exact top k+1 singular triplets of ``W_i + E_i`` with
``||E_i||_2 <= sigma_err_i``; dW's values are within ``dW_err`` of the true ones (certified Ritz values, Weyl, or
the Gram enclosure). That is ``theory.spectral``'s model ("every matrix moves by at most eps_s") with
``eps_s' = max(eps_s, sigma_err_0, sigma_err_1, dW_err)``, so the same tolerance formulas hold with ``eps_s'``
(``_Pair.allowance_s``): larger allowances make verdicts indeterminate more often, never wrong. Where a side's
top-ness is not certified, every Gate II check is skipped there; Cor 3.5 also where dW's top k are not certified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from theory import metrics
from theory.errors import ZeroGapError
from theory.linalg import SVD, pow2_exponent, principal_angles, scale_pow2, topk_subspace_unresolved
from theory.naming import layer_index, matrix_type
from theory.spectral import GATE2_IDS, SpectralPair, gate2_checks
from theory.update_geometry import (
    energy_off_principal_subspace_of_bases,
    iso_residual_share_from_spectra,
    random_energy_off_principal_subspace,
)
from threegate.decompose import Decomposition

__all__ = ["MatrixResult", "matrix_result", "FAST_SKIPS", "FAST_GATE2"]

#: what the fast route does not compute, and why (printed by compare and written to the rows)
FAST_SKIPS = ("nss", "cor3.4-weyl", "cor3.4-mirsky", "iso_residual_share")
FAST_SKIP_REASON = "need every singular value of W0 and W+ (fast route computes the top k+1)"
#: Gate II checks the fast route evaluates from certified top-k+1 triplets (Cor 3.5 needs dW's top k as well)
FAST_GATE2 = ("thm3.3", "thm3.3-wedin", "thm3.3-rigorous", "corF.13", "cor3.5")


@dataclass
class MatrixResult:
    """Everything measured on one weight matrix against every tuned run."""

    name: str
    rows: list[dict[str, Any]]  # one per tuned run
    checks: list[dict[str, Any]]  # one per (run, result id)
    spectrum: list[dict[str, Any]] = field(default_factory=list)
    angles: list[dict[str, Any]] = field(default_factory=list)
    overlaps: list[dict[str, Any]] = field(default_factory=list)
    jaccard: list[dict[str, Any]] = field(default_factory=list)  # one per pair of runs (a < b)


class _ScaledOnRead:
    """A ``SpectralPair`` array field stored as given (unscaled) and scaled by ``2**-exponent`` when read: the Gate II
    checks read ``dW_s`` and the shape of ``W0_s`` only, so the pair need not hold scaled m x n copies of W0 and W+
    (each one a fresh allocation: 0.3 s for SmolLM2's embedding, measured). The value read is the same array
    ``scale_pow2`` gives, computed on each read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_unscaled_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        raw = obj.__dict__[self.slot]
        return scale_pow2(raw, obj.exponent) if obj.exponent else np.asarray(raw, dtype=np.float64)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


@dataclass(frozen=True)
class _Pair(SpectralPair):
    """``theory.spectral.SpectralPair`` whose ``||dW||_F`` is computed directly (``frobenius_s``, scaled units):
    ``sv_dW`` may hold only the top k+1 singular values of dW (``threegate.decompose.dW_spectrum``), which is all
    the other checks read. ``allowance_s``: the fast route's certified perturbation bound (module docstring); the
    allowance every tolerance is built on is the larger of it and the SVD backward-error allowance."""

    frobenius_s: float = math.nan
    allowance_s: float = 0.0
    W0_s = _ScaledOnRead()  # type: ignore[assignment]
    W1_s = _ScaledOnRead()  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, int]:
        return self.__dict__["_unscaled_W0_s"].shape

    @property
    def dWF_s(self) -> float:
        return self.frobenius_s

    @property
    def eps_s(self) -> float:
        return max(SpectralPair.eps_s.fget(self), self.allowance_s)  # type: ignore[attr-defined]


def _pair(A: np.ndarray, B: np.ndarray, dW: np.ndarray, dec0: Decomposition, dec1: Decomposition,
          sv_dW: np.ndarray, fro: float, allowance: float = 0.0) -> _Pair:
    """The pair in ``theory.spectral``'s scaled units (one power of two, exact) from compare's decompositions."""
    e = pow2_exponent(A, B)
    sc = (lambda x: scale_pow2(x, e)) if e else (lambda x: np.asarray(x, dtype=np.float64))
    return _Pair(A, B, sc(dW), SVD(dec0.svd.U, sc(dec0.svd.S), dec0.svd.Vh),  # A, B scaled on read
                 SVD(dec1.svd.U, sc(dec1.svd.S), dec1.svd.Vh), sc(sv_dW), e, frobenius_s=math.ldexp(fro, -e),
                 allowance_s=math.ldexp(allowance, -e))


def _fast_gate2_ids(dec0: Decomposition, dec1: Decomposition, sv_dW: np.ndarray, dW_err: float, k: int
                    ) -> tuple[str, ...]:
    """The ``FAST_GATE2`` checks this row's certificates allow (module docstring); empty when a side's top-ness
    is not certified or an error bound is not finite."""
    if not (dec0.top_certified and dec1.top_certified):
        return ()
    if not all(math.isfinite(x) for x in (dec0.sigma_err, dec1.sigma_err, dW_err)):
        return ()
    return FAST_GATE2 if sv_dW.size >= k else tuple(r for r in FAST_GATE2 if r != "cor3.5")


def _subspace_ok(d: Decomposition, k: int, shape: tuple[int, int]) -> bool:
    if d.complete:
        return not topk_subspace_unresolved(d.svd.S, k, shape)
    return d.angle_err < math.pi / 2 and d.gap_lower > 0


def matrix_result(
    name: str,
    A: np.ndarray,
    Bs: Sequence[np.ndarray],
    runs: Sequence[str],
    dec0: Decomposition,
    dec1s: Sequence[Decomposition],
    dWs: Sequence[tuple[np.ndarray, float]],
    masks: Sequence[np.ndarray],
    dtypes: Sequence[str],
    *,
    deltas: Sequence[np.ndarray] | None = None,
    W0_stored: Any = None,
    k: int,
    alpha: float,
    keep_spectra: bool = True,
) -> MatrixResult:
    """All metrics of ``W0 = A (m, n)`` against each ``W+ = Bs[r]`` (float64), from their decompositions.

    ``deltas[r] = Bs[r] - A`` when already formed; ``W0_stored``: W0 in its stored dtype (``M_low`` ranks ``|W0|``
    there: the same order, a quarter of the memory traffic of float64)."""
    m, n = A.shape
    layer = layer_index(name)
    meta = {"name": name, "layer": -1 if layer is None else layer, "matrix_type": matrix_type(name)}
    ok0 = _subspace_ok(dec0, k, A.shape)
    M_low = metrics.low_magnitude_mask(A if W0_stored is None else W0_stored, alpha)
    princ_ok = ok0
    if ok0:
        try:  # the one rule (ties judged up to the reconstruction's rounding) lives in theory.metrics
            M_princ = metrics.principal_mask_from_svd(dec0.svd, k, alpha,
                                                      gap=None if dec0.complete else dec0.gap_lower)
        except ZeroGapError:  # W0^(k), so M_princ, is not determined
            princ_ok = False
    if not princ_ok:
        M_princ = np.zeros(A.shape, dtype=bool)
    refs = {"princ": M_princ, "low": M_low, "princ_not_low": M_princ & ~M_low}
    res = MatrixResult(name, [], [])
    S0 = dec0.svd.S
    deltas = deltas if deltas is not None else [B - A for B in Bs]
    for run, B, dec1, (sv_dW, dW_err), mask, dtype, dW in zip(runs, Bs, dec1s, dWs, masks, dtypes, deltas):
        changed = int(np.count_nonzero(mask))
        S1 = dec1.svd.S
        exact = dec0.complete and dec1.complete
        row: dict[str, Any] = {
            "run": run, **meta, "m": m, "n": n, "numel": m * n, "dtype": dtype,
            "changed": changed, "sparsity": 1.0 - changed / (m * n),
            "dW_fro": float(np.linalg.norm(dW)), "dW_2": float(sv_dW[0]) if sv_dW.size else 0.0, "dW_2_err": dW_err,
            "k": k, "spectral_route": dec1.route if dec1.route != "svd" else dec0.route,
        }
        if exact:
            s0n = float(np.linalg.norm(S0))
            row["nss"] = float(np.linalg.norm(S1 - S0)) / s0n if s0n > 0 else math.nan
            row["gamma_k"] = float(S0[k - 1] - (S0[k] if k < S0.shape[0] else 0.0))
        else:
            row["nss"] = math.nan
            row["gamma_k"] = float(S0[k - 1] - S0[k]) if k < S0.shape[0] else math.nan
        row["dW_over_gap"] = row["dW_2"] / row["gamma_k"] if row["gamma_k"] > 0 else math.inf
        gap_ok = ok0 and _subspace_ok(dec1, k, A.shape)
        for side in ("U", "V"):
            B0 = dec0.svd.U[:, :k] if side == "U" else dec0.svd.Vh[:k].T
            B1 = dec1.svd.U[:, :k] if side == "U" else dec1.svd.Vh[:k].T
            ang = np.degrees(principal_angles(B0, B1)) if gap_ok else np.full(k, math.nan)
            row[f"angle_{side}_max_deg"] = float(ang.max())
            row[f"angle_{side}_mean_deg"] = float(ang.mean())
            if keep_spectra and gap_ok:
                res.angles += [{"run": run, **meta, "side": side, "i": i, "angle_deg": float(a), "k": k}
                               for i, a in enumerate(ang)]
        _update_geometry(row, dW, dec0, dec1, ok0, exact, k)
        row["angle_err_deg"] = math.degrees(dec0.angle_err + dec1.angle_err)
        row["angles_note"] = "" if gap_ok else f"sigma_{k} = sigma_{k + 1}: top-k subspace not unique"
        _mask_metrics(row, res, refs, mask, run, meta)
        if not princ_ok:
            row["overlap_princ"] = row["overlap_princ_not_low"] = math.nan
        if exact:
            checks, skipped = gate2_checks(_pair(A, B, dW, dec0, dec1, sv_dW, row["dW_fro"]), k), []
            if keep_spectra:
                res.spectrum += [{"run": run, **meta, "i": i, "sigma_base": float(a), "sigma_tuned": float(b)}
                                 for i, (a, b) in enumerate(zip(S0, S1))]
        else:
            ids = _fast_gate2_ids(dec0, dec1, sv_dW, dW_err, k)
            allowance = max(dec0.sigma_err, dec1.sigma_err, dW_err)
            checks = gate2_checks(_pair(A, B, dW, dec0, dec1, sv_dW, row["dW_fro"], allowance=allowance), k,
                                  ids=ids) if ids else {}
            skipped = list(FAST_SKIPS)
        for rid in GATE2_IDS:
            if rid in checks:
                row[f"check_{rid}"] = checks[rid].verdict
                res.checks.append({"run": run, **meta, **checks[rid].as_row()})
            else:
                row[f"check_{rid}"] = "not-evaluated"
                if rid not in skipped:
                    skipped.append(rid)
        row["skipped"] = " ".join(skipped)
        res.rows.append(row)
    if len(masks) >= 2:
        _cross_run(res, list(masks), runs)
    return res


def _update_geometry(row: dict, dW: np.ndarray, dec0: Decomposition, dec1: Decomposition, ok0: bool, exact: bool,
                     k: int) -> None:
    """Where dW lies against W0's singular structure (``theory.update_geometry``), named by operator:
    ``energy_off_principal_subspace`` (a subspace projection: share of ||dW||_F² outside the top-k left / right
    singular subspaces of W0; NaN when they are not determined or dW = 0) beside ``random_energy_off_principal_
    subspace`` = 1 - k²/(m n), a random direction's expectation; ``iso_residual_share`` (ISO:
    ||W+ - U+ Σ0 V+ᵀ||_F / ||dW||_F = ||σ(W+) - σ(W0)||_2 / ||dW||_F; exact routes only, it needs every singular
    value). The paper's coordinate mask M_princ is the ``overlap_princ`` column, a different operator."""
    m, n = dW.shape
    row["random_energy_off_principal_subspace"] = random_energy_off_principal_subspace(m, n, k)
    moved = row["dW_fro"] > 0
    row["energy_off_principal_subspace"] = (
        energy_off_principal_subspace_of_bases(dW, dec0.svd.U[:, :k], dec0.svd.Vh[:k].T) if ok0 and moved
        else math.nan)
    row["iso_residual_share"] = (iso_residual_share_from_spectra(dec0.svd.S, dec1.svd.S, row["dW_fro"])
                                 if exact and moved else math.nan)


def _mask_metrics(row: dict, res: MatrixResult, refs: dict, mask: np.ndarray, run: str, meta: dict) -> None:
    """Overlaps with the reference masks (and their random baselines) and row / column update ratios."""
    changed = row["changed"]
    for key, ref in refs.items():
        row[f"overlap_{key}"] = metrics.overlap(ref, mask) if changed else math.nan
        row[f"baseline_{key}"] = metrics.random_overlap_baseline(ref)
        row[f"inter_{key}"] = int(np.count_nonzero(ref & mask))  # pooled per layer / type by compare
        row[f"size_{key}"] = int(np.count_nonzero(ref))
        if changed:  # an empty update mask has no overlap (NaN in the row; no row in the figure table)
            res.overlaps.append({"run": run, **meta, "mask": key, "overlap": row[f"overlap_{key}"],
                                 "random_baseline": row[f"baseline_{key}"]})
    rho, kap = metrics.row_ratios(mask), metrics.col_ratios(mask)
    row.update(row_ratio_std=float(rho.std()), row_ratio_max=float(rho.max()),
               col_ratio_std=float(kap.std()), col_ratio_max=float(kap.max()),
               rows_touched=float(np.mean(rho > 0)), cols_touched=float(np.mean(kap > 0)))


def _cross_run(res: MatrixResult, masks: list[np.ndarray], runs: Sequence[str]) -> None:
    J = metrics.jaccard_matrix(masks)
    p = [float(M.mean()) for M in masks]
    base = [metrics.bernoulli_jaccard_baseline(p[a], p[b]) for a in range(len(masks)) for b in range(len(masks))
            if a != b]
    C = metrics.consensus(masks)
    touched = C > 0
    for row in res.rows:
        row["jaccard_mean"] = metrics.mean_offdiag(J)
        row["jaccard_baseline"] = float(np.mean(base))
        row["consensus_all"] = float(np.mean(C[touched] == 1.0)) if touched.any() else math.nan
        row["consensus_mean"] = float(C[touched].mean()) if touched.any() else math.nan
    meta = {key: res.rows[0][key] for key in ("name", "layer", "matrix_type")}
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            res.jaccard.append({
                **meta, "run_a": runs[a], "run_b": runs[b], "jaccard": float(J[a, b]),
                "baseline": metrics.bernoulli_jaccard_baseline(p[a], p[b]),
                "inter": int(np.count_nonzero(masks[a] & masks[b])),
                "union": int(np.count_nonzero(masks[a] | masks[b])),
                "size_a": int(masks[a].sum()), "size_b": int(masks[b].sum()), "numel": int(masks[a].size),
            })
