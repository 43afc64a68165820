"""Paper Fig. 4 (spectral drift and principal-subspace rotation) and Fig. 5 (update-mask overlaps), RL vs SFT.

Experiment ``geometry`` (``threegate run geometry``; config section ``[geometry]`` with ``preset = "fast"`` or
``"default"``). From the cached pretrained TinyGPT rounded to bf16 (the paper's checkpoints are bf16), per seed:

* an **RL** run (DAPO by default) of ``rl_steps`` steps, ``minibatches`` AdamW updates each (U = their product);
* one **SFT** run at the same learning rate, probed every ``sft_probe_every`` steps (and at U) up to
  ``sft_max_factor * U`` AdamW updates. Two of its checkpoints are compared with the RL run's final weights:
  ``match = "steps"``: the checkpoint after U updates (the same number of AdamW updates as RL);
  ``match = "accuracy"``: the trained checkpoint (step >= 1) whose greedy eval accuracy is closest to RL's final
  greedy accuracy (ties: the earliest step). Both accuracies are measured by the probe on the same eval prompts;
  ``|acc_SFT - acc_RL|`` is recorded as ``accuracy_gap``.

Every comparison uses the **stored** weights (bf16) of the checkpoint against the stored base, upcast to float64.

Measurements, per checkpoint, layer and block matrix (q, k, v, o, up, gate, down):

* ``spectrum``: sigma_i(W0) and sigma_i(W+) (schema ``spectrum``, Fig. 4 a, c; this and ``angles`` hold the
  first seed's checkpoints only, so that the figure shows three runs; ``drift`` holds every seed);
* ``angles``: the principal angles between the top-k left (U) and right (V) singular subspaces of W0 and W+ at
  ``k = VERDICT_K`` (schema ``angles``, Fig. 4 b, d); NaN where sigma_k = sigma_{k+1} makes the subspace undefined;
* ``drift``: per k of the sweep ``ks`` (k <= min(m, n) / 2): NSS = ||sigma(W+) - sigma(W0)||_2 / ||sigma(W0)||_2,
  the max and mean principal angle over both sides (degrees), and the base's relative gap
  (sigma_k - sigma_{k+1}) / sigma_1 (a small gap makes the top-k subspace turn under any perturbation);
* ``overlap_sweep``: the overlap |M_s and M| / |M| of the checkpoint's bf16 update mask M (Def. 2.1 probe) with each
  structural mask M_s of the base, and its random baseline = the density of M_s: ``princ`` (top-alpha by the rank-k
  reconstruction, ``theory.metrics.principal_mask``), ``low`` (bottom-alpha by |W0|, ``low_magnitude_mask``; k = 0
  on its rows: it has no k) and ``princ_not_low`` (M_princ and not M_low, same alpha), for k in ``ks`` and alpha in
  ``alphas``; column ``structural_mask`` (not ``mask``, so the figure code does not average this sweep as if it
  were one Fig. 5);
  each row also has ``binade_baseline``: the overlap expected if every entry changed with the probability measured
  in its bf16 binade (the exponent of w0, which fixes its ULP) -- what magnitude alone predicts (Gate III);
* ``mask_overlap`` (schema ``mask_overlap``, Fig. 5): the RL rows of the sweep at the paper's setting
  (``k = PAPER_K``, ``alpha = PAPER_ALPHA``).

Verdicts (pure functions of the tables; the seed rule of ``sims.claims.base.effect_verdict``):

``rl_drift_below_sft_matched_steps`` / ``rl_drift_below_sft_matched_accuracy`` (Fig. 4)
    RL drifts the spectrum less and rotates the top-k subspaces less than SFT. Per seed, drift = the mean over
    layers and matrix types of NSS, and of the mean principal angle at ``k = VERDICT_K``. The effect is
    **relative**, 1 - drift_RL / drift_SFT (the fraction by which RL's drift is smaller; absolute differences
    SFT - RL are kept in the numbers): our drifts are of order 1e-4 (NSS) and 0.1 degree, so any fixed absolute
    threshold would judge the scale of the learning rate, not the contrast. Minimum effect ``MIN_DRIFT_REDUCTION``
    (RL drifts at most 3/4 as much). Each metric gets its own seed-rule verdict; the claim is **reproduced** iff
    both are, **not reproduced** iff either is not, else inconclusive. The accuracy-matched verdict is inconclusive
    when some seed's best SFT checkpoint misses RL's accuracy by more than ``ACC_MATCH_TOL``, and when RL's final
    accuracy is within ``ACC_MATCH_TOL`` of the base's on some seed (RL did not move the accuracy: the "matching"
    SFT checkpoint would be chosen by eval noise).
``rl_overlap_princ_below_random`` (Fig. 5)
    Per seed, pooled over the block matrices: overlap = sum |M_princ and M| / sum |M| and the baseline a random mask
    with the same per-matrix sizes would get, sum density_m |M_m| / sum |M_m|; effect = baseline - overlap at
    ``k = PAPER_K``, ``alpha = PAPER_ALPHA``, min effect ``MIN_OVERLAP_GAP``. The same numbers for
    ``princ_not_low`` (the paper: further below) and for the SFT checkpoints are reported beside.
``rl_overlap_low_above_random`` (Fig. 5)
    The same with M_low at ``alpha = PAPER_ALPHA``; effect = overlap - baseline.
``rl_overlap_princ_below_binade`` (ours: Fig. 5 beyond magnitude)
    The princ claim against the magnitude-only baseline (``binade_baseline``, pooled the same way): effect =
    binade baseline - overlap, min effect ``MIN_OVERLAP_GAP``. The paper reads Fig. 5 as RL avoiding the principal
    weights; since M_princ holds mostly large |w| (large ULP, hard to change in bf16), a below-random overlap is
    also what precision alone predicts. This verdict separates the two readings.

Constants (documented choices; the paper gives neither its k nor Fig. 5's alpha):

* ``VERDICT_K = 16``: a quarter of d_model = 64, half the smallest matrix dimension (k and v are 32 x 64);
* ``PAPER_K = 16``, ``PAPER_ALPHA = 0.5``: the masking study's alpha (Sec. 4, Fig. 9) with the same k;
* ``MIN_DRIFT_REDUCTION = 0.25``, ``MIN_OVERLAP_GAP = 0.02`` (two percentage points of overlap);
* ``ACC_MATCH_TOL = 0.05``: the largest |acc_SFT - acc_RL| that counts as matched (about 3 of 64 eval prompts).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from sims.claims.base import (
    Claim,
    ClaimRun,
    Verdict,
    block_matrix_index,
    config_from_section,
    effect_verdict,
    require_columns,
    start_model,
    verdicts_frame,
)
from sims.claims.runs import RLRecipe, recipe_rl_config
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.rlvr import train_rlvr
from sims.tinygpt.sft import SFTConfig, train_sft
from theory.errors import InputError, ZeroGapError
from theory.metrics import low_magnitude_mask, nss, principal_angles_topk, principal_mask, update_mask

__all__ = [
    "VERDICT_K", "PAPER_K", "PAPER_ALPHA", "MIN_DRIFT_REDUCTION", "MIN_OVERLAP_GAP", "ACC_MATCH_TOL",
    "STRUCTURAL_MASKS", "GeometryConfig", "drift_rows", "overlap_rows", "pick_accuracy_match",
    "rl_drift_below_sft", "rl_overlap_vs_random", "geometry_experiment",
]

VERDICT_K = 16
PAPER_K = 16
PAPER_ALPHA = 0.5
MIN_DRIFT_REDUCTION = 0.25
MIN_OVERLAP_GAP = 0.02
ACC_MATCH_TOL = 0.05
STRUCTURAL_MASKS = ("princ", "low", "princ_not_low")
ACCURACY_METRIC = "accuracy_greedy"


@dataclass(frozen=True)
class GeometryConfig(RLRecipe):
    """``[geometry]``: per seed an RL run and one SFT run (same lr) probed on a grid of steps (the RL recipe's
    fields first: ``RLRecipe``)."""

    rl_steps: int = 30
    sft_batch_size: int = 32
    lr: float = 1e-5
    sft_max_factor: int = 3  # SFT runs to this multiple of RL's AdamW updates, to find an accuracy match
    sft_probe_every: int = 10
    n_eval_prompts: int = 64
    ks: tuple[int, ...] = (1, 4, 16, 32)
    alphas: tuple[float, ...] = (0.05, 0.2, 0.5)
    bf16_checkpoint: bool = True

    @classmethod
    def fast(cls, **kw) -> "GeometryConfig":
        return replace(cls(seeds=(0,), rl_steps=2, prompts_per_step=4, group_size=4, sft_batch_size=8,
                           sft_max_factor=2, sft_probe_every=2, n_eval_prompts=4), **kw)

    def sft_probe_steps(self) -> tuple[int, ...]:
        top = self.sft_max_factor * self.updates
        return tuple(sorted({0, self.updates, top, *range(self.sft_probe_every, top + 1, self.sft_probe_every)}))


def _checked(c: GeometryConfig) -> GeometryConfig:
    c = replace(c, ks=tuple(int(k) for k in c.ks), alphas=tuple(float(a) for a in c.alphas))
    if not c.ks or min(c.ks) < 1:
        raise InputError(f"[geometry] ks must be positive integers, got {c.ks}")
    if not c.alphas or not all(0 < a <= 1 for a in c.alphas):
        raise InputError(f"[geometry] alphas must be fractions in (0, 1], got {c.alphas}")
    if c.sft_max_factor < 1 or c.sft_probe_every < 1:
        raise InputError(f"[geometry] sft_max_factor and sft_probe_every must be >= 1, got "
                         f"{c.sft_max_factor}, {c.sft_probe_every}")
    return c


# ----------------------------------------------------------------------------------------------------------------
# Measurements (one checkpoint against the base)


def _ks_for(shape: tuple[int, ...], ks: tuple[int, ...]) -> list[int]:
    """The k of the sweep that fit the matrix: k <= min(m, n) / 2 (a top-k subspace, not most of the space)."""
    return [k for k in ks if k <= min(shape) // 2]


def _angles_deg(W0: np.ndarray, W1: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Principal angles (degrees) of the top-k U and V subspaces; NaN and the reason when sigma_k = sigma_{k+1}."""
    try:
        u, v = principal_angles_topk(W0, W1, k)
    except ZeroGapError as e:
        nan = np.full(k, np.nan)
        return nan, nan, f"zero spectral gap at k={k}: {e}"
    return np.degrees(u), np.degrees(v), ""


def drift_rows(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], ks: tuple[int, ...], *,
               angle_k: int = VERDICT_K, **common) -> tuple[list[dict], list[dict], list[dict]]:
    """(drift, spectrum, angles) rows of one checkpoint ``tuned`` against ``base``, block matrices only.

    drift: one row per (layer, matrix_type, k) with ``nss``, ``max_angle_deg`` / ``mean_angle_deg`` over the 2k
    angles of both sides and ``gap_rel`` = (sigma_k - sigma_{k+1}) / sigma_1 of the base; spectrum: every
    singular value of both; angles: each angle at ``k = angle_k`` (when it fits the matrix). Float64 throughout.
    """
    drift, spectrum, angles = [], [], []
    for name, (layer, mt) in block_matrix_index(base).items():
        W0, W1 = base[name].double().cpu().numpy(), tuned[name].double().cpu().numpy()
        s0, s1 = np.linalg.svd(W0, compute_uv=False), np.linalg.svd(W1, compute_uv=False)
        where = {**common, "layer": layer, "matrix_type": mt}
        spectrum.extend({**where, "i": i, "sigma_base": float(a), "sigma_tuned": float(b)}
                        for i, (a, b) in enumerate(zip(s0, s1)))
        n = nss(W0, W1)
        for k in _ks_for(W0.shape, ks):
            u, v, why = _angles_deg(W0, W1, k)
            both = np.concatenate([u, v])
            drift.append({**where, "k": k, "nss": n, "max_angle_deg": float(np.max(both)),
                          "mean_angle_deg": float(np.mean(both)), "gap_rel": float((s0[k - 1] - s0[k]) / s0[0]),
                          "failed_assumption": why})
            if k == angle_k:
                angles.extend({**where, "side": side, "i": i, "angle_deg": float(a), "k": k}
                              for side, vals in (("U", u), ("V", v)) for i, a in enumerate(vals))
    return drift, spectrum, angles


class StructuralMasks:
    """M_princ(k, alpha), M_low(alpha) and M_princ and not M_low of every base matrix, computed once (they depend
    on the base only)."""

    def __init__(self, base: Mapping[str, torch.Tensor], ks: tuple[int, ...], alphas: tuple[float, ...]) -> None:
        self.masks: dict[str, list[tuple[str, int, float, np.ndarray]]] = {}
        for name in block_matrix_index(base):
            W0 = base[name].double().cpu().numpy()
            out = []
            for a in alphas:
                low = low_magnitude_mask(W0, a)
                out.append(("low", 0, a, low))
                for k in _ks_for(W0.shape, ks):
                    princ = principal_mask(W0, k, a)
                    out += [("princ", k, a, princ), ("princ_not_low", k, a, princ & ~low)]
            self.masks[name] = out


def overlap_rows(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], masks: StructuralMasks,
                 **common) -> list[dict]:
    """One row per (layer, matrix_type, structural mask, k, alpha): overlap |M_s and M| / |M| of the checkpoint's
    bf16 update mask M (NaN when M is empty), random baseline = density of M_s, and the counts behind them.

    ``binade_baseline`` = E|M_s and M'| / |M| for a mask M' that changes each entry with the probability measured
    in its binade (the bf16 exponent of w0, which fixes its ULP): sum_b P(change | b) |M_s and b| / |M|. It is the
    overlap that magnitude alone (Gate III: a small |w| has a small ULP) predicts; ``binade_expected`` is the
    numerator, for pooling."""
    rows = []
    for name, (layer, mt) in block_matrix_index(base).items():
        M = update_mask(base[name], tuned[name]).cpu().numpy()
        changed = int(M.sum())
        binade = _binade(base[name])
        n_b = np.bincount(binade, minlength=256)
        p_change = np.bincount(binade, weights=M.ravel(), minlength=256) / np.maximum(n_b, 1)
        for kind, k, a, S in masks.masks[name]:
            inter, size = int((S & M).sum()), int(S.sum())
            expected = float(np.bincount(binade, weights=S.ravel(), minlength=256) @ p_change)
            rows.append({**common, "layer": layer, "matrix_type": mt, "structural_mask": kind, "k": k, "alpha": a,
                         "overlap": inter / changed if changed else float("nan"),
                         "random_baseline": size / S.size, "intersection": inter, "changed": changed,
                         "mask_size": size, "total": int(S.size), "binade_expected": expected,
                         "binade_baseline": expected / changed if changed else float("nan")})
    return rows


def _binade(w: torch.Tensor) -> np.ndarray:
    """The bf16 exponent field (0..255) of every stored base value, flat: entries in one binade share one ULP."""
    bits = w.to(torch.bfloat16).contiguous().reshape(-1).view(torch.int16).cpu().numpy().astype(np.int32)
    return (bits >> 7) & 0xFF


def pick_accuracy_match(acc_rl: float, sft_acc: Mapping[int, float]) -> tuple[int, float]:
    """The SFT step (>= 1) whose accuracy is closest to ``acc_rl`` (ties: the earliest) and |acc_SFT - acc_RL|."""
    cands = sorted(s for s in sft_acc if s >= 1)
    if not cands:
        raise InputError("accuracy match: the SFT run has no probed step >= 1")
    # accuracies are fractions c / n: round the gaps so that equal distances tie exactly (0.64 and 0.56 from 0.6)
    best = min(cands, key=lambda s: (round(abs(sft_acc[s] - acc_rl), 12), s))
    return best, abs(sft_acc[best] - acc_rl)


# ----------------------------------------------------------------------------------------------------------------
# Verdicts (pure)

_MATCH_CLAIM = {
    "steps": Claim("rl_drift_below_sft_matched_steps", "Fig 4: RL drifts the spectrum and rotates the top-k "
                   "subspaces less than SFT (matched AdamW updates)"),
    "accuracy": Claim("rl_drift_below_sft_matched_accuracy", "Fig 4: RL drifts the spectrum and rotates the top-k "
                      "subspaces less than SFT (matched accuracy)"),
}


def rl_drift_below_sft(drift: pd.DataFrame, match: str, *, k: int = VERDICT_K) -> Verdict:
    """Fig. 4 at ``match`` ('steps' or 'accuracy'): per seed 1 - drift_RL / drift_SFT for NSS and for the mean
    principal angle at ``k`` (means over layers and matrix types); reproduced iff both metrics are.

    Needs columns method ('RL' / 'SFT'), match, seed, k, nss, mean_angle_deg; for 'accuracy' also accuracy_gap.
    """
    if match not in _MATCH_CLAIM:
        raise InputError(f"match must be one of {sorted(_MATCH_CLAIM)}, got {match!r}")
    claim = _MATCH_CLAIM[match]
    require_columns(drift, ("method", "match", "seed", "k", "nss", "mean_angle_deg"), claim)
    t = drift[drift["k"] == k]
    rl = t[t["method"] == "RL"].groupby("seed")[["nss", "mean_angle_deg"]].mean()
    sft_rows = t[(t["method"] == "SFT") & (t["match"] == match)]
    sft = sft_rows.groupby("seed")[["nss", "mean_angle_deg"]].mean()
    seeds = sorted(set(rl.index) & set(sft.index))
    if not seeds:
        return claim.verdict("inconclusive", f"no seed has both an RL and an SFT ({match}-matched) row at k={k}", {})
    nums: dict[str, Any] = {"k": k, "seeds": [int(s) for s in seeds]}
    for col in ("nss", "mean_angle_deg"):
        nums[f"rl_{col}"] = [float(rl.loc[s, col]) for s in seeds]
        nums[f"sft_{col}"] = [float(sft.loc[s, col]) for s in seeds]
        nums[f"sft_minus_rl_{col}"] = [float(sft.loc[s, col] - rl.loc[s, col]) for s in seeds]
    if match == "accuracy":
        require_columns(drift, ("accuracy_gap",), claim)
        gaps = sft_rows.groupby("seed")["accuracy_gap"].max()
        nums["accuracy_gap"] = [float(gaps[s]) for s in seeds]
        far = [int(s) for s in seeds if not gaps[s] <= ACC_MATCH_TOL]
        if far:
            return claim.verdict("inconclusive",
                                 f"no SFT checkpoint matches RL's final accuracy within {ACC_MATCH_TOL:g} on seed(s) {far} "
                                 f"(gaps {[round(float(gaps[s]), 4) for s in far]})", nums)
        if "accuracy" in drift.columns and "base_accuracy" in drift.columns:
            acc = t[t["method"] == "RL"].groupby("seed")[["accuracy", "base_accuracy"]].first()
            moved = {int(s): float(acc.loc[s, "accuracy"] - acc.loc[s, "base_accuracy"]) for s in seeds}
            nums["rl_accuracy_change"] = [moved[int(s)] for s in seeds]
            still = [s for s, m in moved.items() if not abs(m) > ACC_MATCH_TOL]
            if still:
                return claim.verdict("inconclusive",
                                     f"RL's final accuracy is within {ACC_MATCH_TOL:g} of the base's on seed(s) {still} "
                                     f"(changes {[round(moved[s], 4) for s in still]}): RL did not move the accuracy, so "
                                     f"'the SFT checkpoint of the same accuracy' is picked by eval noise", nums)
    subs = {}
    for col, what in (("nss", "NSS"), ("mean_angle_deg", f"mean principal angle (k={k})")):
        effects = {int(s): (1 - rl.loc[s, col] / sft.loc[s, col]) if sft.loc[s, col] > 0 else float("nan")
                   for s in seeds}
        subs[col] = effect_verdict(claim, effects, min_effect=MIN_DRIFT_REDUCTION, what=f"{what} reduction 1 - RL/SFT")
        nums[f"verdict_{col}"] = subs[col].verdict
        nums[f"effects_{col}"] = subs[col].numbers.get("effects", [])
    kinds = {v.verdict for v in subs.values()}
    verdict = ("reproduced" if kinds == {"reproduced"} else
               "not reproduced" if "not reproduced" in kinds else "inconclusive")
    reason = "; ".join(f"{'NSS' if c == 'nss' else 'angle'}: [{v.verdict}] {v.reason}" for c, v in subs.items())
    return claim.verdict(verdict, reason, nums)


_OVERLAP_CLAIM = {
    "princ": Claim("rl_overlap_princ_below_random",
                   "Fig 5: the RL update mask overlaps M_princ less than a random mask"),
    "low": Claim("rl_overlap_low_above_random", "Fig 5: the RL update mask overlaps M_low more than a random mask"),
}


_BINADE_CLAIM = {
    "princ": Claim("rl_overlap_princ_below_binade", "Fig 5 beyond magnitude: the RL update mask overlaps M_princ "
                   "less than bf16 precision and magnitude alone predict"),
    "low": Claim("rl_overlap_low_above_binade", "Fig 5 beyond magnitude: the RL update mask overlaps M_low more "
                 "than bf16 precision and magnitude alone predict"),
}


def _pooled_overlap(t: pd.DataFrame) -> pd.DataFrame:
    """Per seed: overlap = sum intersection / sum changed; baseline = sum density * changed / sum changed."""
    t = t.assign(expected=t["random_baseline"] * t["changed"])
    if "binade_expected" not in t.columns:
        t = t.assign(binade_expected=np.nan)
    g = t.groupby("seed")[["intersection", "changed", "expected", "binade_expected"]].sum(min_count=1)
    g = g[g["changed"] > 0]
    return pd.DataFrame({"overlap": g["intersection"] / g["changed"], "baseline": g["expected"] / g["changed"],
                         "binade_baseline": g["binade_expected"] / g["changed"]})


def rl_overlap_vs_random(table: pd.DataFrame, mask: str, *, k: int = PAPER_K, alpha: float = PAPER_ALPHA,
                         baseline: str = "random") -> Verdict:
    """Fig. 5 for ``mask`` 'princ' (effect = baseline - overlap) or 'low' (effect = overlap - baseline), RL rows
    at (k, alpha), pooled over matrices per seed. SFT rows and 'princ_not_low' go into the numbers.
    ``baseline='binade'`` judges against the magnitude-only prediction instead of the random mask (needs column
    ``binade_expected``): does RL avoid M_princ beyond what bf16 precision and magnitude explain?

    Needs columns method, seed, structural_mask, k, alpha, intersection, changed, random_baseline (match: SFT
    rows by match).
    """
    if mask not in _OVERLAP_CLAIM:
        raise InputError(f"mask must be 'princ' or 'low', got {mask!r}")
    if baseline not in ("random", "binade"):
        raise InputError(f"baseline must be 'random' or 'binade', got {baseline!r}")
    claim = _OVERLAP_CLAIM[mask] if baseline == "random" else _BINADE_CLAIM[mask]
    require_columns(table, ("method", "seed", "structural_mask", "k", "alpha", "intersection", "changed",
                     "random_baseline") + (("binade_expected",) if baseline == "binade" else ()), claim)
    sign = -1.0 if mask == "princ" else 1.0
    at = table[np.isclose(table["alpha"].astype(float), alpha)]

    def rows(kind: str, method: str, match: str | None = None) -> pd.DataFrame:
        t = at[(at["structural_mask"] == kind) & (at["method"] == method)]
        if kind != "low":
            t = t[t["k"] == k]
        if match is not None and "match" in t.columns:
            t = t[t["match"] == match]
        return _pooled_overlap(t)

    rl = rows(mask, "RL")
    nums: dict[str, Any] = {"k": k if mask != "low" else None, "alpha": alpha, "seeds": [int(s) for s in rl.index],
                            "rl_overlap": rl["overlap"].tolist(), "rl_baseline": rl["baseline"].tolist(),
                            "rl_binade_baseline": rl["binade_baseline"].tolist()}
    for method, match in (("SFT", "steps"), ("SFT", "accuracy")):
        s = rows(mask, method, match)
        nums[f"sft_{match}_overlap"], nums[f"sft_{match}_baseline"] = s["overlap"].tolist(), s["baseline"].tolist()
        nums[f"sft_{match}_binade_baseline"] = s["binade_baseline"].tolist()
    if mask == "princ":
        pnl = rows("princ_not_low", "RL")
        nums["rl_princ_not_low_overlap"] = pnl["overlap"].tolist()
        nums["rl_princ_not_low_baseline"] = pnl["baseline"].tolist()
        nums["rl_princ_not_low_binade_baseline"] = pnl["binade_baseline"].tolist()
    if rl.empty:
        return claim.verdict("inconclusive", f"no RL rows with a nonempty update mask at k={k}, alpha={alpha:g}",
                             nums)
    col = "baseline" if baseline == "random" else "binade_baseline"
    effects = {int(s): sign * float(r["overlap"] - r[col]) for s, r in rl.iterrows()}
    name = "random baseline" if baseline == "random" else "binade (magnitude-only) baseline"
    what = f"{name} - overlap" if mask == "princ" else f"overlap - {name}"
    v = effect_verdict(claim, effects, min_effect=MIN_OVERLAP_GAP, what=what)
    where = f"alpha={alpha:g}" + (f", k={k}" if mask != "low" else "")
    return replace(v, reason=f"{v.reason} ({where})", numbers={**v.numbers, **nums})


# ----------------------------------------------------------------------------------------------------------------
# The experiment


def _accuracy(res, step: int) -> float:
    m = res.metrics
    row = m[(m["metric"] == ACCURACY_METRIC) & (m["step"] == step)]
    if row.empty:
        raise InputError(f"run {res.name}: no {ACCURACY_METRIC} probed at step {step}")
    return float(row["value"].iloc[0])


def _train_pair(model, c: GeometryConfig, seed: int, device: str):
    rc = recipe_rl_config(c, seed=seed, device=device, probe=ProbeConfig(steps=(0, c.rl_steps),
                                                                       n_eval_prompts=c.n_eval_prompts,
                                                                       theory_checks=False))
    rl = train_rlvr(copy.deepcopy(model), rc, run_name=f"RL-s{seed}")
    steps = c.sft_probe_steps()
    sc = SFTConfig(task=c.task, steps=max(steps), batch_size=c.sft_batch_size, lr=c.lr, precision="bf16", seed=seed,
                   device=device, probe=ProbeConfig(steps=steps, n_eval_prompts=c.n_eval_prompts, theory_checks=False))
    sft = train_sft(copy.deepcopy(model), sc, run_name=f"SFT-s{seed}")
    return rl, sft


def geometry_experiment(cfg: Mapping) -> ClaimRun:
    """Fig. 4 + Fig. 5 at our scale: per seed RL and SFT (matched on AdamW updates and on accuracy) from the same
    bf16 base; spectrum / angles / drift / overlap tables and five verdicts (see the module docstring)."""
    c = _checked(config_from_section(GeometryConfig, cfg, "geometry"))
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    with deterministic():  # one BLAS thread: the small float64 SVDs are ~50x slower multithreaded on a busy machine
        return _geometry(cfg, c, model, device)


def _geometry(cfg: Mapping, c: GeometryConfig, model, device: str) -> ClaimRun:
    results, drift, spectrum, angles, overlaps, matches = [], [], [], [], [], []
    masks = None
    for seed in c.seeds:
        rl, sft = _train_pair(model, c, seed, device)
        results += [rl, sft]
        base = rl.snapshots[0]
        if masks is None:
            masks = StructuralMasks(base, c.ks, c.alphas)
        acc_rl = _accuracy(rl, c.rl_steps)
        sft_acc = {s: _accuracy(sft, s) for s in sft.snapshots}
        acc_step, gap = pick_accuracy_match(acc_rl, sft_acc)
        matches.append({"seed": seed, "rl_accuracy": acc_rl, "base_accuracy": _accuracy(rl, 0),
                        "sft_step": acc_step, "sft_accuracy": sft_acc[acc_step], "accuracy_gap": gap,
                        "matched": gap <= ACC_MATCH_TOL, "sft_steps_accuracy": sft_acc[c.updates]})
        checkpoints = (("RL", "reference", rl, c.rl_steps, c.updates, acc_rl, 0.0),
                       ("SFT", "steps", sft, c.updates, c.updates, sft_acc[c.updates],
                        abs(sft_acc[c.updates] - acc_rl)),
                       ("SFT", "accuracy", sft, acc_step, acc_step, sft_acc[acc_step], gap))
        for method, match, res, step, updates, acc, acc_gap in checkpoints:
            label = f"{method}-s{seed}" if method == "RL" else f"SFT-{match}-s{seed}"
            common = {"run": label, "method": method, "match": match, "seed": seed, "steps": step,
                      "updates": updates, "model": "TinyGPT"}
            d, s, a = drift_rows(base, res.snapshots[step], c.ks, **common)
            drift += [{**r, "accuracy": acc, "accuracy_gap": acc_gap, "base_accuracy": matches[-1]["base_accuracy"]}
                      for r in d]
            if seed == c.seeds[0]:  # the figure tables: one seed (nine curves per panel are unreadable)
                spectrum += s
                angles += a
            overlaps += overlap_rows(base, res.snapshots[step], masks, **common)
    sweep = pd.DataFrame(overlaps)
    fig5 = sweep[(sweep["method"] == "RL") & np.isclose(sweep["alpha"], PAPER_ALPHA)
                 & ((sweep["k"] == PAPER_K) | (sweep["structural_mask"] == "low"))]
    fig5 = fig5.rename(columns={"structural_mask": "mask"}).reset_index(drop=True)
    tables = {"drift": pd.DataFrame(drift), "spectrum": pd.DataFrame(spectrum), "angles": pd.DataFrame(angles),
              "overlap_sweep": sweep, "mask_overlap": fig5, "accuracy_match": pd.DataFrame(matches)}
    verdicts = [rl_drift_below_sft(tables["drift"], "steps"), rl_drift_below_sft(tables["drift"], "accuracy"),
                rl_overlap_vs_random(sweep, "princ"), rl_overlap_vs_random(sweep, "low"),
                rl_overlap_vs_random(sweep, "princ", baseline="binade")]
    tables["verdicts"] = verdicts_frame(verdicts)
    return ClaimRun(results, tables, verdicts, asdict(c))

