"""``threegate compare BASE TUNED [TUNED2 ...]``: what fine-tuning did to every weight matrix of a checkpoint.

Per 2-D weight matrix ``W0`` (base) and each tuned ``W+`` (``ΔW = W+ - W0``, all decompositions in float64):

* bf16 update sparsity ``1 - #changed / n`` and the update mask ``M = 1[W+ ≉ W0]`` (Def. 2.1/2.2, ``eta``; a
  non-bf16 checkpoint is rounded to bf16 first, see ``theory.metrics``);
* ``‖ΔW‖_F``, ``‖ΔW‖_2``, ``NSS = ‖σ(W+) - σ(W0)‖_2 / ‖σ(W0)‖_2``;
* principal angles between the top-k left (U) and right (V) singular subspaces, max and mean (degrees);
  NaN where ``σ_k = σ_{k+1}`` in either matrix (the subspace is then not determined);
* ``Overlap(M•, M) = |M• ∩ M| / |M|`` for ``M_princ`` (top-α of ``|W0^(k)|``), ``M_low`` (bottom-α of ``|W0|``)
  and ``M_princ ∩ M_low^c``, each with its random baseline (the density of ``M•``);
* row / column update ratios ``ρ_i = mean_j M_ij``, ``κ_j = mean_i M_ij`` (std and max: stripes show as a large
  spread);
* the Gate II checks of ``theory.spectral`` on the pair (Thm 3.3 as stated / Wedin / rigorous with the measured
  gap ``γ_k``, Cor F.13, Cor 3.4 Weyl and Mirsky, Cor 3.5), flagged ``assumption-failed`` where a hypothesis fails
  (e.g. ``‖ΔW‖_2 >= γ_k`` for the rigorous form).

With several tuned checkpoints: per matrix, the Jaccard matrix of the runs' update masks against the independent
Bernoulli baseline ``pq / (p + q - pq)``, and the consensus ``C = mean_r M^(r)``.

Aggregates per layer and per matrix type pool the counts (sparsity ``1 - Σ changed / Σ n``, overlaps
``Σ |M• ∩ M| / Σ |M|``) rather than averaging ratios.

Tensors stream one matrix at a time (``threegate.checkpoints.iter_matched``). If a tensor fails, every row computed
before it is written first, then the error is raised (the CLI prints it as one line and exits 1).

Cost: per matrix one full float64 SVD of W0, one of each W+ and the singular values of ΔW (``--device cuda``
runs them on a GPU). ``--fast`` replaces them by ``theory.fast_spectral`` (certified randomized top-k and
``‖ΔW‖_2``) and leaves out NSS and the Gate II checks, which need whole spectra; it pays off only for large
matrices (on SmolLM2's 576-1536 wide matrices it was slower than the full path). On a machine shared by several
processes, ``OPENBLAS_NUM_THREADS=1`` made each SVD ~9x faster (thread oversubscription).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from paper_figs.report import render_all
from theory.naming import layer_index, matrix_type
from threegate.checkpoints import Checkpoint, iter_matched, open_checkpoint, select_names
from theory import metrics
from theory.errors import InputError, ThreegateError, ZeroGapError
from theory.fast_spectral import spectral_norm_fast, topk_svd
from theory.linalg import SVD, principal_angles, svd64
from theory.spectral import GATE2_IDS, gate2_checks, spectral_pair

__all__ = [
    "add_arguments",
    "run",
    "compare_checkpoints",
    "compare_tables",
    "iter_compare",
    "compare_matrix",
    "principal_mask_from_svd",
    "MatrixResult",
    "CompareTables",
    "write_tables",
]

EPS64 = float(np.finfo(np.float64).eps)
TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "other")


# ----------------------------------------------------------------------------------------------- one matrix


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


def _as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _zero_gap(S: np.ndarray, k: int) -> bool:
    """σ_k = σ_{k+1} to float64 resolution (same rule as ``theory.metrics.principal_angles_topk``)."""
    if k >= S.shape[0]:
        return False
    resolution = 8 * EPS64 * max(S.shape[0], 1) * S[0]
    return bool(S[k - 1] - S[k] <= resolution)


def _svd_on(A: np.ndarray, name: str, device: str | torch.device) -> SVD:
    """Thin float64 SVD: LAPACK via ``theory.linalg.svd64`` on the CPU, torch on another device."""
    if torch.device(device).type == "cpu":
        return svd64(A, name)
    U, S, Vh = torch.linalg.svd(torch.from_numpy(A).to(device=device, dtype=torch.float64), full_matrices=False)
    return SVD(U.cpu().numpy(), S.cpu().numpy(), Vh.cpu().numpy())


def principal_mask_from_svd(svd0: SVD, k: int, alpha: float, gap: float | None = None) -> np.ndarray:
    """``theory.metrics.principal_mask`` from an SVD already computed (saves one SVD of W0 per matrix): the one
    rule lives in ``theory.metrics.principal_mask_from_svd`` (``gap``: a certified σ_k - σ_{k+1} when ``svd0``
    holds only k triplets, as from the fast path)."""
    return metrics.principal_mask_from_svd(svd0, k, alpha, gap=gap)


def _overlap_or_nan(ref: np.ndarray, mask: np.ndarray) -> float:
    return metrics.overlap(ref, mask) if mask.any() else math.nan


def compare_matrix(
    name: str,
    W0: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    runs: Sequence[str],
    *,
    k: int = 16,
    alpha: float = 0.5,
    eta: float = metrics.ETA_DEFAULT,
    device: str | torch.device = "cpu",
    keep_spectra: bool = True,
    fast: bool = False,
) -> MatrixResult:
    """All per-matrix metrics and Gate II checks of ``W0 (m, n)`` against each ``tuned[r] (m, n)``.

    ``k`` is clamped to ``min(m, n)`` (the row records the k used). ``fast=True`` uses ``theory.fast_spectral``
    (certified randomized top-k and ``‖ΔW‖_2``) instead of full SVDs: NSS, ``γ_k`` and the Gate II checks need
    full spectra and are then left out (NaN / "not-evaluated"); the certified error bounds are in the row.
    Raises ``InputError`` (and subclasses) naming the tensor.
    """
    try:
        if fast:
            return _compare_matrix_fast(name, W0, tuned, runs, k=k, alpha=alpha, eta=eta, device=device,
                                        keep_spectra=keep_spectra)
        return _compare_matrix(name, W0, tuned, runs, k=k, alpha=alpha, eta=eta, device=device,
                               keep_spectra=keep_spectra)
    except ThreegateError as e:
        if name in str(e):
            raise
        raise type(e)(f"tensor {name!r}: {e}") from None
    except (np.linalg.LinAlgError, RuntimeError) as e:  # e.g. SVD did not converge
        raise InputError(f"tensor {name!r}: linear algebra failed ({type(e).__name__}: {e})") from None


def _compare_matrix(name, W0, tuned, runs, *, k, alpha, eta, device, keep_spectra) -> MatrixResult:
    if W0.ndim != 2:
        raise InputError(f"tensor {name!r}: expected a 2-d matrix, got shape {tuple(W0.shape)}")
    m, n = W0.shape
    r = min(m, n)
    kk = max(1, min(int(k), r))
    layer, mtype = layer_index(name), matrix_type(name)
    meta = {"name": name, "layer": -1 if layer is None else layer, "matrix_type": mtype}
    A = _as_f64(W0)
    # W0's SVD and reference masks depend on W0 only: computed once, shared by every run.
    svd0 = _svd_on(A, name, device)
    try:
        M_princ = principal_mask_from_svd(svd0, kk, alpha)
        princ_ok = True
    except ZeroGapError:  # sigma_k = sigma_k+1 to rounding: W0^(k), so M_princ, is not determined (as in the fast path)
        M_princ, princ_ok = np.zeros(A.shape, dtype=bool), False
    M_low = metrics.low_magnitude_mask(A, alpha)
    refs = {"princ": M_princ, "low": M_low, "princ_not_low": M_princ & ~M_low}
    W0_dev = W0.to(device)
    res = MatrixResult(name, [], [])
    masks: list[np.ndarray] = []
    for run, W1 in zip(runs, tuned):
        mask_t = metrics.update_mask(W0_dev, W1.to(device), eta)
        mask = mask_t.cpu().numpy()
        masks.append(mask)
        changed = int(mask.sum())
        pair = spectral_pair(A, _as_f64(W1), svd0=svd0, device=device)
        S0, S1 = pair.svd0.S, pair.svd1.S
        s0n = float(np.linalg.norm(S0))
        row: dict[str, Any] = {
            "run": run, **meta, "m": m, "n": n, "numel": m * n, "dtype": str(W1.dtype).replace("torch.", ""),
            "changed": changed, "sparsity": 1.0 - changed / (m * n),
            "dW_fro": pair.dW_F, "dW_2": pair.dW_2,
            "nss": float(np.linalg.norm(S1 - S0)) / s0n if s0n > 0 else math.nan,
            "k": kk, "gamma_k": pair.gap(kk),
        }
        row["dW_over_gap"] = row["dW_2"] / row["gamma_k"] if row["gamma_k"] > 0 else math.inf
        gap_ok = not (_zero_gap(S0, kk) or _zero_gap(S1, kk))
        for side, (B0, B1) in {"U": (pair.U0(kk), pair.U1(kk)), "V": (pair.V0(kk), pair.V1(kk))}.items():
            ang = np.degrees(principal_angles(B0, B1)) if gap_ok else np.full(kk, math.nan)
            row[f"angle_{side}_max_deg"] = float(ang.max())
            row[f"angle_{side}_mean_deg"] = float(ang.mean())
            if keep_spectra and gap_ok:
                res.angles += [{"run": run, **meta, "side": side, "i": i, "angle_deg": float(a), "k": kk}
                               for i, a in enumerate(ang)]
        row["angles_note"] = "" if gap_ok else f"sigma_{kk} = sigma_{kk + 1}: top-k subspace not unique"
        _mask_metrics(row, res, refs, mask, run, meta)
        if not princ_ok:
            row["overlap_princ"] = row["overlap_princ_not_low"] = math.nan
        for rid, chk in gate2_checks(pair, kk).items():
            row[f"check_{rid}"] = chk.verdict
            res.checks.append({"run": run, **meta, **chk.as_row()})
        if keep_spectra:
            res.spectrum += [{"run": run, **meta, "i": i, "sigma_base": float(a), "sigma_tuned": float(b)}
                             for i, (a, b) in enumerate(zip(S0, S1))]
        res.rows.append(row)
    if len(masks) >= 2:
        _cross_run(res, masks, runs)
    return res


def _mask_metrics(row: dict, res: MatrixResult, refs: dict, mask: np.ndarray, run: str, meta: dict) -> None:
    """Overlaps with the reference masks (and their random baselines) and row / column update ratios."""
    changed = row["changed"]
    for key, ref in refs.items():
        row[f"overlap_{key}"] = _overlap_or_nan(ref, mask)
        row[f"baseline_{key}"] = metrics.random_overlap_baseline(ref)
        row[f"inter_{key}"] = int(np.count_nonzero(ref & mask))
        row[f"size_{key}"] = int(np.count_nonzero(ref))
        if changed:  # an empty update mask has no overlap (NaN in the row; no row in the figure table)
            res.overlaps.append({"run": run, **meta, "mask": key, "overlap": row[f"overlap_{key}"],
                                 "random_baseline": row[f"baseline_{key}"]})
    rho, kap = metrics.row_ratios(mask), metrics.col_ratios(mask)
    row.update(row_ratio_std=float(rho.std()), row_ratio_max=float(rho.max()),
               col_ratio_std=float(kap.std()), col_ratio_max=float(kap.max()),
               rows_touched=float(np.mean(rho > 0)), cols_touched=float(np.mean(kap > 0)))


def _compare_matrix_fast(name, W0, tuned, runs, *, k, alpha, eta, device, keep_spectra) -> MatrixResult:
    """``compare_matrix`` without full SVDs: ``topk_svd`` / ``spectral_norm_fast`` with certified error bounds."""
    if W0.ndim != 2:
        raise InputError(f"tensor {name!r}: expected a 2-d matrix, got shape {tuple(W0.shape)}")
    m, n = W0.shape
    kk = max(1, min(int(k), min(m, n)))
    layer, mtype = layer_index(name), matrix_type(name)
    meta = {"name": name, "layer": -1 if layer is None else layer, "matrix_type": mtype}
    A = _as_f64(W0)
    try:
        top0 = topk_svd(A, kk, device=device, seed=0)
    except ZeroGapError as e:
        top0, gap_note = None, str(e)
    else:
        gap_note = ""
    if top0 is not None:
        M_princ = principal_mask_from_svd(SVD(top0.U, top0.S, top0.V.T), kk, alpha, top0.gap_lower)
    else:  # no top-k subspace: M_princ undefined, so is its overlap
        M_princ = np.zeros(A.shape, dtype=bool)
    M_low = metrics.low_magnitude_mask(A, alpha)
    refs = {"princ": M_princ, "low": M_low, "princ_not_low": M_princ & ~M_low}
    W0_dev = W0.to(device)
    res = MatrixResult(name, [], [])
    masks: list[np.ndarray] = []
    for run, W1 in zip(runs, tuned):
        mask = metrics.update_mask(W0_dev, W1.to(device), eta).cpu().numpy()
        masks.append(mask)
        changed = int(mask.sum())
        B = _as_f64(W1)
        dW = B - A
        norm = spectral_norm_fast(dW, device=device, seed=0)
        row: dict[str, Any] = {
            "run": run, **meta, "m": m, "n": n, "numel": m * n, "dtype": str(W1.dtype).replace("torch.", ""),
            "changed": changed, "sparsity": 1.0 - changed / (m * n),
            "dW_fro": float(np.linalg.norm(dW)), "dW_2": norm.value, "dW_2_err": norm.err_bound,
            "nss": math.nan, "k": kk, "gamma_k": math.nan, "dW_over_gap": math.nan,
            "spectral_method": f"fast ({norm.method_used})",
        }
        top1 = None
        if top0 is not None:
            try:
                top1 = topk_svd(B, kk, device=device, seed=0)
            except ZeroGapError as e:
                gap_note = str(e)
        for side in ("U", "V"):
            if top1 is None:
                ang = np.full(kk, math.nan)
            else:
                ang = np.degrees(principal_angles(getattr(top0, side), getattr(top1, side)))
                if keep_spectra:
                    res.angles += [{"run": run, **meta, "side": side, "i": i, "angle_deg": float(a), "k": kk}
                                   for i, a in enumerate(ang)]
            row[f"angle_{side}_max_deg"] = float(ang.max())
            row[f"angle_{side}_mean_deg"] = float(ang.mean())
        row["angle_err_deg"] = (math.degrees(top0.angle_err_bound + top1.angle_err_bound)
                                if top1 is not None else math.nan)
        row["angles_note"] = gap_note[:120]
        _mask_metrics(row, res, refs, mask, run, meta)
        if top0 is None:
            row["overlap_princ"] = row["overlap_princ_not_low"] = math.nan
        for rid in GATE2_IDS:
            row[f"check_{rid}"] = "not-evaluated"
        res.rows.append(row)
    if len(masks) >= 2:
        _cross_run(res, masks, runs)
    return res


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


# ----------------------------------------------------------------------------------------------- many matrices


def _open(x: str | Path | Checkpoint) -> Checkpoint:
    return x if isinstance(x, Checkpoint) else open_checkpoint(x)


def run_labels(paths: Sequence[str | Path | Checkpoint]) -> list[str]:
    """Short unique labels for tuned checkpoints: the file stem (or folder name), de-duplicated with ``#i``."""
    labels: list[str] = []
    for p in paths:
        path = Path(p.path if isinstance(p, Checkpoint) else p)
        label = path.stem if path.suffix else path.name
        if label in labels:
            label = f"{label}#{len(labels)}"
        labels.append(label)
    return labels


def iter_compare(
    base: str | Path | Checkpoint,
    tuned_list: Sequence[str | Path | Checkpoint],
    *,
    k: int = 16,
    alpha: float = 0.5,
    eta: float = metrics.ETA_DEFAULT,
    device: str | torch.device = "cpu",
    only: str | None = None,
    max_matrices: int | None = None,
    runs: Sequence[str] | None = None,
    keep_spectra: bool = True,
    progress: bool = False,
    fast: bool = False,
) -> Iterator[MatrixResult]:
    """Yield one ``MatrixResult`` per 2-D tensor, streaming (one matrix per checkpoint in memory at a time)."""
    if not tuned_list:
        raise InputError("compare needs at least one tuned checkpoint")
    _validate_options(k, alpha, eta, device)
    cks = [_open(base)] + [_open(t) for t in tuned_list]
    runs = list(runs) if runs is not None else run_labels(tuned_list)
    if len(runs) != len(tuned_list):
        raise InputError(f"{len(runs)} run labels for {len(tuned_list)} tuned checkpoints")
    names = select_names(cks, only=only, max_matrices=max_matrices)
    if not names:
        raise InputError(f"{cks[0].path}: no 2-d weight matrix matches" + (f" --only {only!r}" if only else ""))
    from tqdm.auto import tqdm

    stream = iter_matched(cks, names=names)  # one matrix per checkpoint in memory at a time
    for name, tensors in tqdm(stream, total=len(names), desc="compare", unit="matrix", disable=not progress,
                              file=sys.stderr):
        try:
            yield compare_matrix(name, tensors[0], tensors[1:], runs, k=k, alpha=alpha, eta=eta, device=device,
                                 keep_spectra=keep_spectra, fast=fast)
        except ThreegateError as e:  # name the files too (w0 / W0 = the base, w1 / W1 = the tuned one)
            files = " vs ".join(str(ck.file_of(name)) for ck in cks)
            raise type(e)(f"{files}: {e}") from None


def _validate_options(k: int, alpha: float, eta: float, device: str | torch.device) -> None:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InputError(f"--k must be a positive integer, got {k!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise InputError(f"--alpha must be a fraction in (0, 1), got {alpha}")
    if not (math.isfinite(eta) and eta >= 0):
        raise InputError(f"--eta must be a finite number >= 0, got {eta}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"--device {device!r}: not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")


@dataclass
class CompareTables:
    """All output tables of a comparison (pandas DataFrames; empty where not applicable)."""

    matrices: pd.DataFrame
    checks: pd.DataFrame
    by_layer: pd.DataFrame
    by_type: pd.DataFrame
    spectrum: pd.DataFrame
    angles: pd.DataFrame
    mask_overlap: pd.DataFrame
    jaccard_pairs: pd.DataFrame
    jaccard: pd.DataFrame
    sparsity: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    error: str | None = None


class _Collector:
    def __init__(self) -> None:
        self.results: list[MatrixResult] = []

    def add(self, r: MatrixResult) -> None:
        self.results.append(r)

    def tables(self, *, method: str = "tuned", notes: Sequence[str] = (), error: str | None = None) -> CompareTables:
        def cat(attr: str) -> pd.DataFrame:
            return pd.DataFrame([row for r in self.results for row in getattr(r, attr)])

        matrices = cat("rows")
        jp = cat("jaccard")
        return CompareTables(
            matrices=matrices, checks=cat("checks"),
            by_layer=aggregate(matrices, "layer"), by_type=aggregate(matrices, "matrix_type"),
            spectrum=cat("spectrum"), angles=cat("angles"), mask_overlap=cat("overlaps"),
            jaccard_pairs=jp, jaccard=_pool_jaccard(jp),
            sparsity=_sparsity_table(matrices, method), notes=list(notes), error=error,
        )


def aggregate(matrices: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per-run aggregates over ``by`` ("layer" or "matrix_type"), pooling counts (not averaging ratios)."""
    if matrices.empty:
        return pd.DataFrame()
    out = []
    for (run, key), g in matrices.groupby(["run", by], sort=True):
        row: dict[str, Any] = {"run": run, by: key, "matrices": len(g), "numel": int(g["numel"].sum()),
                               "changed": int(g["changed"].sum())}
        row["sparsity"] = 1.0 - row["changed"] / row["numel"]
        row["dW_fro"] = float(np.sqrt((g["dW_fro"] ** 2).sum()))
        row["dW_2_max"] = float(g["dW_2"].max())
        row["nss_mean"] = float(g["nss"].mean())
        for side in ("U", "V"):
            row[f"angle_{side}_max_deg"] = float(g[f"angle_{side}_max_deg"].max())
            row[f"angle_{side}_mean_deg"] = float(g[f"angle_{side}_mean_deg"].mean())
        for key_ in ("princ", "low", "princ_not_low"):
            row[f"overlap_{key_}"] = float(g[f"inter_{key_}"].sum() / row["changed"]) if row["changed"] else math.nan
            row[f"baseline_{key_}"] = float(g[f"size_{key_}"].sum() / row["numel"])
        if "jaccard_mean" in g:
            row["jaccard_mean"] = float(g["jaccard_mean"].mean())
            row["jaccard_baseline"] = float(g["jaccard_baseline"].mean())
        for rid in GATE2_IDS:
            col = g[f"check_{rid}"]
            row[f"{rid}:violated"] = int((col == "violated").sum())
            row[f"{rid}:assumption-failed"] = int((col == "assumption-failed").sum())
        out.append(row)
    df = pd.DataFrame(out)
    if by == "matrix_type":
        df["_o"] = df["matrix_type"].map({t: i for i, t in enumerate(TYPE_ORDER)}).fillna(len(TYPE_ORDER))
        df = df.sort_values(["run", "_o"]).drop(columns="_o").reset_index(drop=True)
    return df


def _pool_jaccard(jp: pd.DataFrame) -> pd.DataFrame:
    """Pairwise Jaccard per matrix type pooled over matrices: ``Σ|A∩B| / Σ|A∪B|``, baseline from pooled densities."""
    if jp.empty:
        return pd.DataFrame()
    out = []
    for (mt, a, b), g in jp.groupby(["matrix_type", "run_a", "run_b"], sort=True):
        union = int(g["union"].sum())
        p, q = g["size_a"].sum() / g["numel"].sum(), g["size_b"].sum() / g["numel"].sum()
        out.append({"matrix_type": mt, "run_a": a, "run_b": b,
                    "jaccard": float(g["inter"].sum() / union) if union else 1.0,
                    "baseline": metrics.bernoulli_jaccard_baseline(float(p), float(q)), "matrices": len(g)})
    return pd.DataFrame(out)


def _sparsity_table(matrices: pd.DataFrame, method: str) -> pd.DataFrame:
    if matrices.empty:
        return pd.DataFrame()
    g = matrices.groupby(["run", "matrix_type"])[["changed", "numel"]].sum().reset_index()
    g["sparsity"] = 1.0 - g["changed"] / g["numel"]
    g["method"] = method
    return g[["run", "method", "matrix_type", "sparsity", "changed", "numel"]]


def compare_tables(
    base: str | Path | Checkpoint,
    tuned_list: Sequence[str | Path | Checkpoint],
    *,
    k: int = 16,
    alpha: float = 0.5,
    eta: float = metrics.ETA_DEFAULT,
    device: str | torch.device = "cpu",
    only: str | None = None,
    max_matrices: int | None = None,
    method: str = "tuned",
    keep_spectra: bool = True,
    progress: bool = False,
    fast: bool = False,
) -> CompareTables:
    """Every table of a comparison (see ``CompareTables``). Errors propagate (nothing is written here)."""
    col = _Collector()
    cks_notes = _notes([base, *tuned_list])
    for r in iter_compare(base, tuned_list, k=k, alpha=alpha, eta=eta, device=device, only=only,
                          max_matrices=max_matrices, keep_spectra=keep_spectra, progress=progress, fast=fast):
        col.add(r)
    return col.tables(method=method, notes=cks_notes)


def compare_checkpoints(
    base: str | Path | Checkpoint,
    tuned_list: Sequence[str | Path | Checkpoint],
    *,
    k: int = 16,
    alpha: float = 0.5,
    device: str | torch.device = "cpu",
    eta: float = metrics.ETA_DEFAULT,
    only: str | None = None,
    max_matrices: int | None = None,
    fast: bool = False,
) -> pd.DataFrame:
    """One row per (2-D weight matrix, tuned run): sparsity, norms, NSS, angles, overlaps, ratios, check verdicts.

    ``base`` / ``tuned_list`` are paths (file or HF folder) or open ``Checkpoint`` objects. See the module
    docstring for the columns; ``compare_tables`` returns the aggregated and long-form tables too.
    """
    return compare_tables(base, tuned_list, k=k, alpha=alpha, device=device, eta=eta, only=only,
                          max_matrices=max_matrices, keep_spectra=False, fast=fast).matrices


def _notes(items: Sequence[str | Path | Checkpoint]) -> list[str]:
    return [f"{c.path.name}: {c.note}" for c in items if isinstance(c, Checkpoint) and c.note]


# ----------------------------------------------------------------------------------------------- output


def write_tables(t: CompareTables, out: str | Path, *, model: str = "") -> list[Path]:
    """Write every non-empty table as CSV and Parquet under ``out`` (names match ``paper_figs.schemas``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tables = {
        "matrices": t.matrices, "checks": t.checks, "by_layer": t.by_layer, "by_type": t.by_type,
        "spectrum": t.spectrum, "angles": t.angles, "mask_overlap": t.mask_overlap,
        "jaccard_pairs": t.jaccard_pairs, "jaccard": t.jaccard, "sparsity": t.sparsity,
    }
    meta = {"model": model, "description": "; ".join(t.notes)}
    if t.error:
        meta["error"] = t.error
    for name, df in tables.items():
        if df is None or df.empty:
            continue
        if model and name in ("sparsity", "spectrum", "angles", "mask_overlap", "jaccard"):
            df = df.assign(model=model)
        for ext in ("csv", "parquet"):
            p = out / f"{name}.{ext}"
            df.to_csv(p, index=False) if ext == "csv" else df.to_parquet(p, index=False)
            (out / f"{name}.{ext}.meta.json").write_text(json.dumps(meta))
            written.append(p)
    return written


def _render_figures(out: Path) -> Path | None:
    """Figures and the report page through ``paper_figs.report.render_all`` into ``out/report`` (None when
    rendering failed). The report reads ``out`` itself (so it names the real results folder and finds the
    per-matrix table for its summary); of each CSV + Parquet twin it draws one."""
    try:
        return render_all(out, out / "report").page
    except Exception as e:  # figures are extras: a figure problem must not lose the tables
        print(f"threegate compare: figures skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return None


SCREEN_COLUMNS = {
    "run": "run", "matrix_type": "type", "matrices": "#", "sparsity": "sparsity", "dW_fro": "|dW|_F",
    "dW_2_max": "max|dW|_2", "nss_mean": "NSS", "angle_U_max_deg": "maxθU°", "angle_V_max_deg": "maxθV°",
    "overlap_princ": "ov_princ", "baseline_princ": "rand", "overlap_low": "ov_low", "baseline_low": "rand ",
}


def format_summary(t: CompareTables) -> str:
    """The on-screen table: per matrix type, then check verdict counts."""
    lines: list[str] = []
    if t.by_type.empty:
        return "no matrices compared"
    cols = [c for c in SCREEN_COLUMNS if c in t.by_type.columns]
    view = t.by_type[cols].rename(columns=SCREEN_COLUMNS)
    # sparsity near 1 is the interesting regime: 6 decimals so that 40 changes in 884,736 entries do not read "1"
    fmt = {"sparsity": lambda x: f"{x:.6f}"}
    lines.append(view.to_string(index=False, formatters=fmt, float_format=lambda x: f"{x:.4g}"))
    ck = t.checks
    if not ck.empty:
        counts = ck.groupby(["result_id", "verdict"]).size().unstack(fill_value=0)
        counts = counts.reindex([r for r in GATE2_IDS if r in counts.index])
        lines += ["", "Gate II checks (matrices x runs):", counts.to_string()]
        failed = ck[ck["verdict"] == "assumption-failed"]
        if not failed.empty:
            top = failed["failed_assumption"].astype(str).str.slice(0, 90).value_counts().head(3)
            lines += [f"  assumption failed: {msg} ({n}x)" for msg, n in top.items()]
        bad = ck[ck["verdict"] == "violated"]
        if not bad.empty:
            worst = bad.sort_values("ratio", ascending=False).head(3)
            lines += [f"  violated: {r.result_id} on {r.name} (lhs/rhs = {r.ratio:.4g})" for r in worst.itertuples()]
    if not t.jaccard.empty:
        lines += ["", "Cross-run Jaccard of update masks (pooled per type) vs Bernoulli baseline:",
                  t.jaccard[["matrix_type", "run_a", "run_b", "jaccard", "baseline"]].to_string(
                      index=False, float_format=lambda x: f"{x:.4f}")]
    lines += [f"note: {n}" for n in t.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="base checkpoint: .safetensors, HF model folder, .gguf, zip .bin/.pt")
    parser.add_argument("tuned", metavar="TUNED", nargs="+", help="one or more tuned checkpoints (same tensor names)")
    parser.add_argument("--k", type=int, default=16, help="top-k singular subspace size (default 16)")
    parser.add_argument("--alpha", type=float, default=0.5, help="fraction selected by M_princ and M_low (default 0.5)")
    parser.add_argument("--eta", type=float, default=metrics.ETA_DEFAULT, help="bf16 probe tolerance (default 1e-3)")
    parser.add_argument("--device", default="cpu", help="where the linear algebra runs: cpu (default) or cuda")
    parser.add_argument("--out", default=None, help="directory for CSV + Parquet tables (and figures)")
    parser.add_argument("--only", default=None, metavar="REGEX", help="compare only tensors whose name matches")
    parser.add_argument("--max-matrices", type=int, default=None, metavar="N", help="stop after N matrices")
    parser.add_argument("--method", default="tuned", help="label for the sparsity table, e.g. RL or SFT")
    parser.add_argument("--fast", action="store_true",
                        help="large models: certified randomized top-k and ||dW||_2 (theory.fast_spectral) instead of "
                             "full SVDs; NSS and the Gate II checks (which need full spectra) are skipped")
    parser.add_argument("--no-figures", action="store_true", help="do not render figures into OUT/report")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    base = open_checkpoint(args.base)
    tuned = [open_checkpoint(p) for p in args.tuned]
    runs = run_labels(args.tuned)
    notes = _notes([base, *tuned])
    col = _Collector()
    try:
        for r in iter_compare(base, tuned, k=args.k, alpha=args.alpha, eta=args.eta, device=args.device,
                              only=args.only, max_matrices=args.max_matrices, runs=runs,
                              keep_spectra=args.out is not None, progress=not args.no_progress,
                              fast=args.fast):
            col.add(r)
    except (ThreegateError, KeyboardInterrupt) as e:
        if col.results:  # keep what was computed before the failure
            t = col.tables(method=args.method, notes=notes, error=str(e))
            print(format_summary(t))
            if args.out:
                write_tables(t, args.out, model=Path(args.base).name)
                print(f"threegate compare: wrote {len(col.results)} matrices before the error to {args.out}",
                      file=sys.stderr)
        raise
    t = col.tables(method=args.method, notes=notes)
    print(format_summary(t))
    if args.out:
        write_tables(t, args.out, model=Path(args.base).name)
        page = None if args.no_figures else _render_figures(Path(args.out))
        print(f"tables written to {args.out}" + (f"; figures: {page}" if page else ""))
    print(f"compared {len(col.results)} matrices x {len(tuned)} run(s) in {time.perf_counter() - t0:.1f} s")
    return 0
