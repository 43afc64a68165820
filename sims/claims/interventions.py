"""Function-preserving interventions (App. D, Fig. 6) and the KL to the base at beta = 0 (Fig. 15, Lemma F.9),
each ending in a verdict computed from its measurements (the rules of ``sims.claims.base``).

Experiment ``interventions`` (``threegate run interventions``, section ``[interventions]``)
-------------------------------------------------------------------------------------------------
From the bf16-rounded base, the edits ``edits = ((layer, kind), ...)`` (default: the middle layer
``n_layer // 2`` with ``"rotate+permute"``) are applied with ``sims.tinygpt.model.rotate_vo`` (orthogonal R in the value /
output head space, seeded) and ``sims.tinygpt.model.permute_kv_heads`` (the cyclic shift j -> j + 1 of the kv heads, a
derangement; the query heads follow their kv head). ``"rotate+permute"`` permutes first, then rotates.

**Function preservation** (table ``function_preservation``). On a batch of task prompts with their answers the
logits of the edited model are compared with the base's: max |logit difference| over every real position against

    tol = PRESERVE_SAFETY * eps(float32) * sqrt(n) * n_layer * max|logits|,   n = max(d_ff, d_model).

Why this form: in exact arithmetic the edit preserves the function, so the difference is rounding only. Writing
the edited weights in float32 perturbs each entry by at most u = eps/2 relative; a length-n dot product with such
weights moves by at most u * sum_i |w_i x_i|, and the forward pass's own rounding (different values, different
summation order for the two weight sets) is a length-n dot product error, at most n u sum |w_i x_i| in the worst
case and ~sqrt(n) u sum |w_i x_i| in the probabilistic model of rounding (Higham & Mary 2019). Each of the n_layer
blocks adds such a relative perturbation to the residual stream, which reaches the logits on their own scale
max|logits|; PRESERVE_SAFETY = 16 covers the constants and the amplification through softmax and RMSNorm.
Rows with ``storage = "bf16"`` compare what a bf16 run computes with: the edited weights rounded to bf16. Rotated
weights leave the bf16 grid, so rounding them moves every entry by up to 2^-9 relative -- 2^15 times float32's
u -- and breaks exact preservation (measured: ``preserved`` False, the ratio to tol in the table); permuted
weights are bf16 values moved, not changed, so Permute stays preserved in bf16 storage.

**Runs.** Per seed s, the same RL recipe (``sims.claims.base.run_rl``, bf16 precision, stored-weight snapshots) on
  the untouched base with seed s (``reference``), on the edited base with seed s (``intervened``: the same prompts
  and the same sampling seed as the reference), and on the untouched base with seed s + ``rerun_seed_offset``
  (``rerun``: an independent rerun -- with seed s it would be bit-identical to the reference on this machine).
The paper's Fig. 6 compares an intervened run with an "independent rerun", so ``rotate_overlap`` uses the rerun;
the same-seed comparison (intervened vs reference) and the control (reference vs rerun) are in ``overlap_pairs``.

**What is compared.** The update mask M = 1[stored bf16 value at the last step != at step 0] of every block matrix.
The intervened run's masks of permuted matrices (q, k, v, o of a permuted layer) are mapped back to the original
coordinates (``to_original_coordinates``: the permutation undone), so a Permute that the training follows
equivariantly keeps the overlap. A rotated matrix (v, o of a rotated layer) has no original-coordinate counterpart:
its mask, permutation undone, lives in rotated coordinates and is compared entry by entry with the rerun's mask
in original coordinates -- these are the ``scrambled`` matrices (``SCRAMBLED``), where the paper expects the overlap
to fall to the random level. ``overlap_pairs`` also has ``coordinates = "as stored"`` rows (no mapping: the
paper's literal position-wise comparison, in which a Permute scrambles q, k, v, o as well).
``overlap = |M_rerun & M_int| / |M_int|`` (``theory.metrics.overlap``), ``random_baseline = density(M_rerun)`` (the
overlap any mask independent of M_rerun has in expectation), ``ratio = overlap / random_baseline``.

Verdict ``intervention_collapses_overlap_where_applied`` (pure, on the ``rotate_overlap`` table): per seed,
effect = mean ratio over the untouched layers' matrices (``intervention == "none"``) - mean ratio over the edited
layers' scrambled matrices, judged by ``sims.claims.base.effect_verdict`` with min effect ``MIN_RATIO_DROP``; it needs
the untouched layers to stay well above the baseline (mean ratio >= ``MIN_UNTOUCHED_RATIO``, else inconclusive:
the masks are not reproducible across reruns, so there is nothing to collapse) and "collapse" means to the random
level: a reproduced drop whose scrambled ratio stays above 1 + ``RANDOM_LEVEL_SLACK`` is inconclusive.

Experiment ``kl_beta0`` (``threegate run kl_beta0``, section ``[kl_beta0]``)
---------------------------------------------------------------------------------
Clip-only DAPO runs (beta = 0, clip band [1 - eps_low, 1 + eps_high]) over seeds, probed after every step
(``sims.tinygpt.probe``): the exact full-vocabulary token-wise KL(pi_t || pi_0) on held-out prompts with their answers
(metric ``kl_tok_base``; step 0 is the base itself, KL 0 exactly), and for each RL step the token ratios
pi_t / pi_{t-1} of that step's own sampled tokens: the fraction outside the run's band
(``token_ratio_out_of_band_frac``) and Lemma F.9's check (``theory.kl_leash.lemF9``, symmetric eps = max(eps_low,
eps_high)). Tables: ``kl_beta0`` (schema ``kl_beta0``), ``band_violations`` (per run and step) and ``verdicts``;
the kl and band tables are built by ``sims.experiments.registry.summary_tables`` (the ``clip_eps`` machinery), not copied.

Verdict ``bounded_kl_at_beta0`` (pure, on the ``kl_beta0`` table). "Bounded" is made concrete as:
  1. budget: KL_T <= ``KL_BUDGET_MULTIPLE`` * T * c, c = max(-log(1 - eps_low), log(1 + eps_high)), the per-token,
     per-step bound of Lemma F.9 for the run's band accumulated over the T steps, on every seed (any seed over
     it: not reproduced);
  2. flattening: per seed, effect = (slope of KL over the first third of the steps - slope over the last third)
     divided by the mean slope KL_T / T (least-squares slopes; > 0 means the growth slows), judged by
     ``effect_verdict`` with min effect ``MIN_FLATTENING``. Fewer than ``MIN_KL_POINTS`` probed steps (step 0
     included) per run: inconclusive.
Verdict ``lemma_f9_band_hypothesis`` (exact counts, no noise): Lemma F.9 assumes every token ratio of a step lies
in the band; reproduced iff no recorded step has a ratio outside [1 - eps_low, 1 + eps_high], not reproduced
otherwise (clipping stops gradients, it does not confine ratios).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Sequence

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
    run_rl,
    start_model,
    verdicts_frame,
)
from sims.claims.runs import RLRecipe, recipe_rl_config
from sims.tables import summary_tables
from sims.tinygpt.model import permute_kv_heads, random_orthogonal, rotate_vo
from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.rlvr import train_rlvr
from sims.tinygpt.tasks import Tokenizer, encode_demonstrations, task_by_name
from theory.errors import InputError, ShapeMismatchError
from theory.metrics import update_mask

__all__ = [
    "INTERVENTIONS", "SCRAMBLED", "PERMUTED", "PRESERVE_SAFETY", "MIN_UNTOUCHED_RATIO", "MIN_RATIO_DROP",
    "RANDOM_LEVEL_SLACK", "KL_BUDGET_MULTIPLE", "MIN_FLATTENING", "MIN_KL_POINTS",
    "InterventionsConfig", "KLBeta0Config", "logit_tolerance", "default_permutation", "apply_edits",
    "permutation_index", "to_original_coordinates", "function_preservation", "intervention_collapses_overlap",
    "bounded_kl_at_beta0", "lemma_f9_band_hypothesis", "per_step_kl_bound", "interventions_experiment",
    "kl_beta0_experiment",
]

INTERVENTIONS = ("rotate", "permute", "rotate+permute")
#: Matrix types whose coordinates an intervention changes with no original-coordinate counterpart (after the
#: permutation is undone): where the paper expects the overlap to collapse.
SCRAMBLED = {"none": (), "rotate": ("v", "o"), "permute": (), "rotate+permute": ("v", "o")}
#: Matrix types whose entries an intervention permutes (mapped back by ``to_original_coordinates``).
PERMUTED = {"none": (), "rotate": (), "permute": ("q", "k", "v", "o"), "rotate+permute": ("q", "k", "v", "o")}
#: Constant of the function-preservation tolerance (module docstring).
PRESERVE_SAFETY = 16.0
#: The untouched layers' mean overlap / baseline must reach this for the collapse to be testable.
MIN_UNTOUCHED_RATIO = 1.2
#: Smallest drop of overlap / baseline (untouched - scrambled) that counts as a collapse.
MIN_RATIO_DROP = 0.2
#: "At the random level": the scrambled matrices' mean overlap / baseline is at most 1 + this.
RANDOM_LEVEL_SLACK = 0.1
#: KL_T must stay below this multiple of T times Lemma F.9's per-step per-token bound.
KL_BUDGET_MULTIPLE = 1.0
#: Smallest normalised slope decrease (first third - last third) / mean slope that counts as flattening.
MIN_FLATTENING = 0.0
#: Fewest probed steps per run (step 0 included) for the slopes of the thirds (two points each at least).
MIN_KL_POINTS = 6


# ----------------------------------------------------------------------------------------------------------------
# Configurations


def _edits_tuple(edits) -> tuple[tuple[int, str], ...] | None:
    if edits is None:
        return None
    out = []
    for e in edits:
        if isinstance(e, str) or len(e) != 2:
            raise InputError(f"[interventions] each edit must be a pair (layer, kind), got {e!r}")
        layer, kind = int(e[0]), str(e[1])
        if kind not in INTERVENTIONS:
            raise InputError(f"[interventions] unknown intervention {kind!r}; known: {list(INTERVENTIONS)}")
        out.append((layer, kind))
    if not out:
        raise InputError("[interventions] edits is empty: nothing to intervene on")
    layers = [lay for lay, _ in out]
    if len(set(layers)) != len(layers):
        raise InputError(f"[interventions] a layer is edited twice: {layers}")
    return tuple(out)


@dataclass(frozen=True)
class InterventionsConfig(RLRecipe):
    """``[interventions]``: Rotate / Permute on chosen layers, then the same RL recipe on base, edit and rerun
    (the RL recipe's fields first: ``RLRecipe``)."""

    lr: float = 1e-5
    n_eval_prompts: int = 8
    edits: tuple[tuple[int, str], ...] | None = None  # None: ((n_layer // 2, "rotate+permute"),)
    rotation_seed: int = 1234
    rerun_seed_offset: int = 1000
    n_check_prompts: int = 32
    bf16_checkpoint: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", _edits_tuple(self.edits))
        if self.rerun_seed_offset == 0:
            raise InputError("[interventions] rerun_seed_offset must be nonzero: the rerun would be the reference")

    @classmethod
    def fast(cls, **kw) -> "InterventionsConfig":
        return replace(cls(seeds=(0,), rl_steps=2, prompts_per_step=4, group_size=4, n_eval_prompts=4,
                           n_check_prompts=8), **kw)


@dataclass(frozen=True)
class KLBeta0Config:
    """``[kl_beta0]``: clip-only DAPO runs probed after every ``probe_every`` steps."""

    seeds: tuple[int, ...] = (0, 1, 2)
    task: str = "counting"
    rl_steps: int = 60
    minibatches: int = 2
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-4  # RLConfig default; at 1e-5 (seed 0, 30 steps) KL_T was 6e-4 nats and no ratio left the band
    eps_low: float = 0.2
    eps_high: float = 0.28
    probe_every: int = 1
    n_eval_prompts: int = 8
    bf16_checkpoint: bool = True

    def __post_init__(self) -> None:
        if self.probe_every < 1:
            raise InputError(f"[kl_beta0] probe_every must be >= 1, got {self.probe_every}")
        if not (0 < self.eps_low < 1 and self.eps_high > self.eps_low):
            raise InputError(f"[kl_beta0] need 0 < eps_low < 1 and eps_high > eps_low (clip-higher), got "
                             f"{self.eps_low}, {self.eps_high}")

    @classmethod
    def fast(cls, **kw) -> "KLBeta0Config":
        return replace(cls(seeds=(0,), rl_steps=6, prompts_per_step=4, group_size=4, n_eval_prompts=4), **kw)

    @classmethod
    def default(cls, **kw) -> "KLBeta0Config":
        return replace(cls(), **kw)


# ----------------------------------------------------------------------------------------------------------------
# Interventions: application, coordinates, function preservation


def default_permutation(n_kv_head: int) -> list[int]:
    """The cyclic shift ``perm[j] = (j + 1) % n_kv_head``: moves every kv head (a derangement for n >= 2, and not
    its own inverse for n >= 3, so a mix-up of perm and its inverse shows)."""
    if n_kv_head < 2:
        raise InputError(f"permute needs at least 2 kv heads, the model has {n_kv_head}")
    return [(j + 1) % n_kv_head for j in range(n_kv_head)]


def _rotation(model, layer: int, seed: int) -> torch.Tensor:
    return random_orthogonal(model.cfg.head_dim, torch.Generator().manual_seed(seed + 7919 * layer))


def apply_edits(model, edits: Sequence[tuple[int, str]], *, rotation_seed: int) -> dict[int, dict]:
    """Apply each ``(layer, kind)`` to ``model`` in place (permute first, then rotate, for ``rotate+permute``).

    Returns ``{layer: {"kind": kind, "perm": perm or None}}``, the record ``to_original_coordinates`` needs."""
    done = {}
    for layer, kind in _edits_tuple(edits):
        if kind not in INTERVENTIONS:
            raise InputError(f"unknown intervention {kind!r}; known: {list(INTERVENTIONS)}")
        perm = None
        if "permute" in kind:
            perm = default_permutation(model.cfg.n_kv_head)
            permute_kv_heads(model, layer, perm)
        if "rotate" in kind:
            rotate_vo(model, layer, _rotation(model, layer, rotation_seed))
        done[layer] = {"kind": kind, "perm": perm}
    return done


def permutation_index(cfg, perm: Sequence[int], matrix_type: str) -> tuple[int, np.ndarray]:
    """(axis, idx) of ``permute_kv_heads``: the edited matrix's index r along ``axis`` holds the original index
    ``idx[r]`` (rows of q, k, v; columns of o). Other matrix types are not permuted (InputError)."""
    D, r = cfg.head_dim, cfg.n_rep
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(cfg.n_kv_head)):
        raise InputError(f"{perm} is not a permutation of range({cfg.n_kv_head})")
    kv = np.array([p * D + i for p in perm for i in range(D)])
    q = np.array([(p * r + j) * D + i for p in perm for j in range(r) for i in range(D)])
    if matrix_type in ("k", "v"):
        return 0, kv
    if matrix_type == "q":
        return 0, q
    if matrix_type == "o":
        return 1, q
    raise InputError(f"matrix type {matrix_type!r} is not permuted by permute_kv_heads (only q, k, v, o)")


def to_original_coordinates(x, cfg, perm: Sequence[int], matrix_type: str) -> np.ndarray:
    """Undo ``permute_kv_heads(perm)`` on a (mask or weight) array of a q / k / v / o matrix: ``out[idx[r]] = x[r]``
    along the permuted axis. Applied to the permuted weights it returns the original weights exactly."""
    a = np.asarray(x)
    axis, idx = permutation_index(cfg, perm, matrix_type)
    if a.ndim != 2 or a.shape[axis] != idx.size:
        raise ShapeMismatchError(f"{matrix_type}: array of shape {a.shape} does not have {idx.size} entries along "
                                 f"axis {axis}")
    out = np.empty_like(a)
    if axis == 0:
        out[idx] = a
    else:
        out[:, idx] = a
    return out


def logit_tolerance(cfg, logits_scale: float, dtype: torch.dtype = torch.float32) -> float:
    """PRESERVE_SAFETY * eps(dtype) * sqrt(max(d_ff, d_model)) * n_layer * logits_scale (module docstring)."""
    return PRESERVE_SAFETY * torch.finfo(dtype).eps * math.sqrt(max(cfg.d_ff, cfg.d_model)) * cfg.n_layer * logits_scale


def _check_batch(task_name: str, n: int, device):
    task = task_by_name(task_name)
    ids, attn, _ = encode_demonstrations(Tokenizer(), task.sample(np.random.default_rng([4242, n]), n), device)
    return ids, attn


def _stored_bf16(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


@torch.no_grad()
def function_preservation(base, edited, ids: torch.Tensor, attn: torch.Tensor, *, intervention: str, layer: int,
                          device: str = "cpu") -> list[dict]:
    """Rows (intervention, layer, storage, max_abs_logit_diff, tol, preserved, ratio_to_tol, logits_scale) of the
    edited model against the base on the batch, float32 compute, with the edited weights as float32 and as bf16."""
    base = copy.deepcopy(base).to(device).float().eval()
    ids, attn = ids.to(device), attn.to(device)
    ref = base(ids, attn)[attn]
    scale = float(ref.abs().max())
    tol = logit_tolerance(base.cfg, scale)
    rows = []
    for storage, m in (("float32", edited), ("bf16", _stored_bf16(edited))):
        m = copy.deepcopy(m).to(device).float().eval()
        diff = float((m(ids, attn)[attn] - ref).abs().max())
        rows.append({"intervention": intervention, "layer": layer, "storage": storage, "max_abs_logit_diff": diff,
                     "tol": tol, "preserved": bool(diff <= tol), "ratio_to_tol": diff / tol, "logits_scale": scale})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Verdict logic (pure)


def intervention_collapses_overlap(table: pd.DataFrame) -> Verdict:
    """Fig. 6: the overlap with an independent rerun falls to the random level in the edited layers only.

    Needs columns seed, layer, matrix_type, intervention, overlap, random_baseline (``rotate_overlap``). Rows with a
    zero baseline (the rerun changed nothing: ratio undefined) are left out. See the module docstring for the rule.
    """
    claim = Claim("intervention_collapses_overlap",
                  "Fig. 6: Rotate/Permute make the update overlap with a rerun collapse to random where applied")
    require_columns(table, ("seed", "layer", "matrix_type", "intervention", "overlap", "random_baseline"), claim)
    t = table[table["random_baseline"] > 0].copy()
    unknown = sorted(set(t["intervention"]) - set(SCRAMBLED))
    if unknown:
        raise InputError(f"{claim}: unknown intervention(s) {unknown}; known: {sorted(SCRAMBLED)}")
    t["ratio"] = t["overlap"] / t["random_baseline"]
    t["scrambled"] = [mt in SCRAMBLED[kind] for mt, kind in zip(t["matrix_type"], t["intervention"])]
    untouched, scrambled = t[t["intervention"] == "none"], t[t["scrambled"]]
    if untouched.empty or scrambled.empty:
        what = "no untouched layer" if untouched.empty else "no scrambled (rotated) matrix"
        return claim.verdict("inconclusive", f"the table has {what}: nothing to compare", {})
    r_un = untouched.groupby("seed")["ratio"].mean()
    r_sc = scrambled.groupby("seed")["ratio"].mean()
    seeds = sorted(set(r_un.index) & set(r_sc.index))
    if not seeds:
        return claim.verdict("inconclusive", "no seed has both untouched and scrambled rows", {})
    nums = {"untouched_ratio": {str(s): float(r_un[s]) for s in seeds},
            "scrambled_ratio": {str(s): float(r_sc[s]) for s in seeds},
            "min_untouched_ratio": MIN_UNTOUCHED_RATIO, "random_level_slack": RANDOM_LEVEL_SLACK}
    mean_un, mean_sc = float(np.mean([r_un[s] for s in seeds])), float(np.mean([r_sc[s] for s in seeds]))
    if mean_un < MIN_UNTOUCHED_RATIO:
        return claim.verdict("inconclusive",
                             f"the untouched layers' overlap with the rerun is only {mean_un:.3f} x the random baseline "
                             f"(< {MIN_UNTOUCHED_RATIO:g}): the masks are not reproducible across reruns, so there is no "
                             f"above-random overlap to collapse", nums)
    v = effect_verdict(claim, {s: float(r_un[s] - r_sc[s]) for s in seeds}, min_effect=MIN_RATIO_DROP,
                       what="drop of overlap/baseline (untouched layers - scrambled matrices)")
    nums = {**v.numbers, **nums}
    tail = f" (overlap/baseline: untouched {mean_un:.3f}, scrambled {mean_sc:.3f})"
    if v.verdict == "reproduced" and mean_sc > 1 + RANDOM_LEVEL_SLACK:
        return claim.verdict("inconclusive",
                             f"the overlap drops where applied, but the scrambled matrices stay at {mean_sc:.3f} x the "
                             f"random baseline (> 1 + {RANDOM_LEVEL_SLACK:g}): not down to the random level", nums)
    if v.verdict == "reproduced" and (min(r_un[s] for s in seeds) < MIN_UNTOUCHED_RATIO):
        return claim.verdict("inconclusive",
                             f"the drop is clear on average but some seed's untouched layers are below "
                             f"{MIN_UNTOUCHED_RATIO:g} x the baseline" + tail, nums)
    return replace(v, reason=v.reason + tail, numbers=nums)


def per_step_kl_bound(eps_low: float, eps_high: float) -> float:
    """Lemma F.9's per-token bound for the band [1 - eps_low, 1 + eps_high]: max(-log(1 - eps_low), log(1 + eps_high))
    (|log r| on the band)."""
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise InputError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    return max(-math.log1p(-eps_low), math.log1p(eps_high))


def _slope(steps: np.ndarray, kl: np.ndarray) -> float:
    return float(np.polyfit(steps.astype(np.float64), kl.astype(np.float64), 1)[0])


def bounded_kl_at_beta0(table: pd.DataFrame) -> Verdict:
    """Fig. 15: with beta = 0 the token-wise KL to the base grows slowly and boundedly (module docstring).

    Needs columns run, seed, step, kl, eps_low, eps_high (the ``kl_beta0`` table of ``kl_beta0_experiment``)."""
    claim = Claim("bounded_kl_at_beta0",
                  "Fig. 15: with beta = 0 (clip only) the token-wise KL to the base stays bounded and its growth "
                  "flattens")
    require_columns(table, ("run", "seed", "step", "kl", "eps_low", "eps_high"), claim)
    effects, nums = {}, {"kl_budget_multiple": KL_BUDGET_MULTIPLE, "per_run": {}}
    over = []
    for run, g in table.groupby("run", sort=True):
        g = g.groupby("step", as_index=False).agg(kl=("kl", "mean"), seed=("seed", "first"),
                                                  eps_low=("eps_low", "first"), eps_high=("eps_high", "first"))
        g = g.sort_values("step")
        if len(g) < MIN_KL_POINTS:
            return claim.verdict("inconclusive", f"run {run} has {len(g)} probed steps < MIN_KL_POINTS="
                                                 f"{MIN_KL_POINTS}: too few for the slopes of the thirds", nums)
        s, kl = g["step"].to_numpy(), g["kl"].to_numpy(dtype=np.float64)
        if not np.isfinite(kl).all():
            return claim.verdict("inconclusive", f"run {run} has a non-finite KL", nums)
        T, klT = int(s.max()), float(kl[-1])
        budget = KL_BUDGET_MULTIPLE * T * per_step_kl_bound(float(g["eps_low"].iloc[0]), float(g["eps_high"].iloc[0]))
        first, last = s <= s.min() + (T - s.min()) / 3, s >= s.min() + 2 * (T - s.min()) / 3
        if first.sum() < 2 or last.sum() < 2:
            return claim.verdict("inconclusive", f"run {run}: fewer than two probed steps in a third", nums)
        sf, sl = _slope(s[first], kl[first]), _slope(s[last], kl[last])
        nums["per_run"][str(run)] = {"seed": int(g["seed"].iloc[0]), "steps": T, "kl_final": klT, "budget": budget,
                                     "slope_first_third": sf, "slope_last_third": sl}
        if klT > budget:
            over.append(f"{run}: KL_T {klT:.4g} > {budget:.4g}")
        mean_slope = klT / T if T else 0.0
        if mean_slope <= 0:
            return claim.verdict("inconclusive", f"run {run}: the KL did not grow (KL_T = {klT:.3g})", nums)
        seed = int(g["seed"].iloc[0])
        if seed in effects:
            raise InputError(f"{claim}: two runs share seed {seed}; the seed rule needs one run per seed")
        effects[seed] = (sf - sl) / mean_slope
    if not effects:
        return claim.verdict("inconclusive", "the table has no runs", nums)
    if over:
        return claim.verdict("not reproduced", "the KL leaves the Lemma F.9 budget KL_BUDGET_MULTIPLE * T * c(eps): "
                                               + "; ".join(over), nums)
    v = effect_verdict(claim, effects, min_effect=MIN_FLATTENING,
                       what="flattening (first-third slope - last-third slope) / mean slope")
    finals = [r["kl_final"] for r in nums["per_run"].values()]
    budgets = [r["budget"] for r in nums["per_run"].values()]
    tail = (f"; every run stays within its budget (KL_T {min(finals):.3g}..{max(finals):.3g} nats vs "
            f"T * c(eps) = {min(budgets):.3g})")
    return replace(v, reason=v.reason + tail, numbers={**v.numbers, **nums})


def lemma_f9_band_hypothesis(table: pd.DataFrame) -> Verdict:
    """Lemma F.9's hypothesis on real clip-only steps: every token ratio pi_t / pi_{t-1} of the step's sampled
    tokens lies in [1 - eps_low, 1 + eps_high]. Needs columns run, step, out_of_band_frac (``band_violations``)."""
    claim = Claim("lemma_f9_band_hypothesis",
                  "Lemma F.9 hypothesis: after each clip-only update every token ratio lies in the clip band")
    require_columns(table, ("run", "step", "out_of_band_frac"), claim)
    t = table.dropna(subset=["out_of_band_frac"])
    if t.empty:
        return claim.verdict("inconclusive", "no step has recorded token ratios", {})
    bad = t[t["out_of_band_frac"] > 0]
    nums = {"steps": int(len(t)), "steps_with_violations": int(len(bad)),
            "mean_out_of_band_frac": float(t["out_of_band_frac"].mean()),
            "max_out_of_band_frac": float(t["out_of_band_frac"].max())}
    if bad.empty:
        return claim.verdict("reproduced", f"no token ratio left the band in {len(t)} recorded steps", nums)
    return claim.verdict("not reproduced",
                         f"{len(bad)} of {len(t)} steps have token ratios outside the band (largest fraction "
                         f"{nums['max_out_of_band_frac']:.4f}, mean {nums['mean_out_of_band_frac']:.4f}): clipping stops "
                         f"the gradient of out-of-band tokens, it does not keep the ratios in the band", nums)


# ----------------------------------------------------------------------------------------------------------------
# Experiment: interventions (App. D, Fig. 6)


def _masks(res) -> dict[str, np.ndarray]:
    """{block matrix name: update mask (stored bf16 at the last probed step != at step 0)} of run ``res``."""
    base, final = res.snapshots[0], res.snapshots[max(res.snapshots)]
    return {n: np.asarray(update_mask(base[n], final[n]).cpu().numpy(), dtype=bool) for n in block_matrix_index(base)}


def _overlap_rows(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, layer_edit: Mapping[int, str],
                  **common) -> list[dict]:
    """Per block matrix: overlap(M_b, M_a) = |M_b & M_a| / |M_a|, baseline density(M_b); empty M_a is skipped."""
    rows = []
    for name, (layer, mt) in block_matrix_index(a).items():
        ma, mb = a[name], b[name]
        na, nb = int(ma.sum()), int(mb.sum())
        if na == 0:
            continue  # overlap undefined: the compared run changed nothing in this matrix
        ov, base = int((ma & mb).sum()) / na, nb / mb.size
        rows.append({**common, "layer": layer, "matrix_type": mt, "intervention": layer_edit.get(layer, "none"),
                     "overlap": ov, "random_baseline": base, "ratio": ov / base if base > 0 else math.nan,
                     "density_a": na / ma.size, "density_b": base})
    return rows


def _map_back(masks: Mapping[str, np.ndarray], record: Mapping[int, dict], cfg) -> dict[str, np.ndarray]:
    """The intervened run's masks with every permutation undone (original coordinates where they exist)."""
    out = dict(masks)
    for name, (layer, mt) in block_matrix_index(masks).items():
        rec = record.get(layer)
        if rec is not None and rec["perm"] is not None and mt in PERMUTED[rec["kind"]]:
            out[name] = to_original_coordinates(masks[name], cfg, rec["perm"], mt)
    return out


def interventions_experiment(cfg: Mapping) -> ClaimRun:
    """App. D / Fig. 6: Rotate / Permute on chosen layers (function preserved?), the same RL recipe on the edited
    model, an untouched reference and an independent rerun; per-layer update-mask overlap and a verdict."""
    c = config_from_section(InterventionsConfig, cfg, "interventions")
    device = cfg.get("device", "cpu")
    base = start_model(cfg, c.bf16_checkpoint)
    mcfg = base.cfg
    edits = c.edits or ((mcfg.n_layer // 2, "rotate+permute"),)
    for layer, _ in edits:
        if not 0 <= layer < mcfg.n_layer:
            raise InputError(f"[interventions] layer {layer} out of range: the model has {mcfg.n_layer} layers")
    layer_edit = dict(edits)
    edited = copy.deepcopy(base)
    record = apply_edits(edited, edits, rotation_seed=c.rotation_seed)

    ids, attn = _check_batch(c.task, c.n_check_prompts, device)
    pres = []
    for layer, kind in edits:
        alone = copy.deepcopy(base)
        apply_edits(alone, [(layer, kind)], rotation_seed=c.rotation_seed)
        pres.extend(function_preservation(base, alone, ids, attn, intervention=kind, layer=layer, device=device))
    if len(edits) > 1:
        pres.extend(function_preservation(base, edited, ids, attn, intervention="all edits", layer=-1, device=device))

    results, pairs = [], []
    for seed in c.seeds:
        kw = dict(lr=c.lr, precision="bf16", device=device)
        ref = run_rl(copy.deepcopy(base), c, seed=seed, name=f"reference-s{seed}", **kw)
        inter = run_rl(copy.deepcopy(edited), c, seed=seed, name=f"intervened-s{seed}", **kw)
        rerun_seed = seed + c.rerun_seed_offset
        rerun = run_rl(copy.deepcopy(base), c, seed=rerun_seed, name=f"rerun-s{rerun_seed}", **kw)
        results += [ref, inter, rerun]
        m_ref, m_re, m_raw = _masks(ref), _masks(rerun), _masks(inter)
        m_int = _map_back(m_raw, record, mcfg)
        common = {"seed": seed, "steps": c.rl_steps, "model": "TinyGPT"}
        for pair, coords, a, b in (("intervened vs rerun", "original", m_int, m_re),
                                   ("intervened vs rerun", "as stored", m_raw, m_re),
                                   ("intervened vs reference", "original", m_int, m_ref),
                                   ("reference vs rerun", "original", m_ref, m_re)):
            pairs.extend(_overlap_rows(a, b, layer_edit=layer_edit, pair=pair, coordinates=coords, **common))
    pairs_df = pd.DataFrame(pairs)
    main = pairs_df[(pairs_df["pair"] == "intervened vs rerun") & (pairs_df["coordinates"] == "original")]
    main = main.drop(columns=["pair"]).reset_index(drop=True)
    main["scrambled"] = [mt in SCRAMBLED[k] for mt, k in zip(main["matrix_type"], main["intervention"])]
    verdicts = [intervention_collapses_overlap(main)]
    tables = {"rotate_overlap": main, "overlap_pairs": pairs_df, "function_preservation": pd.DataFrame(pres),
              "verdicts": verdicts_frame(verdicts)}
    return ClaimRun(results, tables, verdicts, {**asdict(c), "edits": [list(e) for e in edits]})


# ----------------------------------------------------------------------------------------------------------------
# Experiment: kl_beta0 (Fig. 15, Lemma F.9)


def kl_beta0_experiment(cfg: Mapping) -> ClaimRun:
    """Fig. 15 / Lemma F.9: clip-only (DAPO, beta = 0) RL over seeds; token-wise KL to the base after every probed
    step, the fraction of token ratios outside the clip band per update, and verdicts."""
    c = config_from_section(KLBeta0Config, cfg, "kl_beta0")
    device = cfg.get("device", "cpu")
    base = start_model(cfg, c.bf16_checkpoint)
    probe_steps = tuple(sorted(set(range(0, c.rl_steps + 1, c.probe_every)) | {c.rl_steps}))
    results = []
    for seed in c.seeds:
        rc = recipe_rl_config(c, algorithm="dapo", eps_low=c.eps_low, eps_high=c.eps_high, beta=0.0, seed=seed,
                              device=device, probe=ProbeConfig(steps=probe_steps, n_eval_prompts=c.n_eval_prompts,
                                                               theory_checks=True, checks=("lemF.9",)))
        results.append(train_rlvr(copy.deepcopy(base), rc, run_name=f"dapo-s{seed}"))
    summ = summary_tables(results)
    kl = summ["kl_beta0"]
    start = pd.DataFrame([{"run": r.name, "step": 0, "kl": 0.0, "beta": 0.0, "seed": r.config["seed"],
                           "steps": c.rl_steps, "model": "TinyGPT"} for r in results])  # KL(pi_0 || pi_0) = 0
    kl = pd.concat([start, kl], ignore_index=True).sort_values(["run", "step"]).reset_index(drop=True)
    kl["eps_low"], kl["eps_high"], kl["lr"] = c.eps_low, c.eps_high, c.lr

    band = summ["clip_eps"].rename(columns={"eps": "eps_lemma", "violation_fraction": "violation_fraction_lemma"})
    extra = []
    for r in results:
        m = r.metrics
        for metric, col in (("token_ratio_out_of_band_frac", "out_of_band_frac"), ("kl_tok_prev", "kl_tok_prev"),
                            ("kl_tok_base", "kl_tok_base"), ("token_ratio_max_abs_log", "max_abs_log_ratio")):
            for _, row in m[m["metric"] == metric].iterrows():
                extra.append({"run": r.name, "step": int(row["step"]), "col": col, "value": float(row["value"])})
    wide = pd.DataFrame(extra).pivot_table(index=["run", "step"], columns="col", values="value").reset_index()
    band = band.merge(wide, on=["run", "step"], how="outer").sort_values(["run", "step"]).reset_index(drop=True)
    band["per_step_bound"] = per_step_kl_bound(c.eps_low, c.eps_high)
    clip = pd.concat([r.history[["run", "step", "clip_frac", "accuracy"]] for r in results], ignore_index=True)
    band = band.merge(clip, on=["run", "step"], how="left")

    verdicts = [bounded_kl_at_beta0(kl), lemma_f9_band_hypothesis(band)]
    tables = {"kl_beta0": kl, "band_violations": band, "verdicts": verdicts_frame(verdicts)}
    return ClaimRun(results, tables, verdicts, asdict(c))

