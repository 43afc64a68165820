"""Cross-run consistency of RLVR update masks (paper Table 2, Figs. 2, 3, 12) at small scale, with verdicts.

From one bf16-rounded base model, RL runs that differ in exactly one factor:

* the **seed group**: ``seeds`` (R >= 5 in the default preset) with the same task and algorithm. ``RLConfig.seed``
  seeds the prompts drawn each step (``numpy.random.default_rng(seed)``: it *is* the data order; there is no
  separate data-order seed), the rollout sampling (``torch.Generator(seed)``) and the mini-batch shuffle
  (``seed + 1``), so these runs differ in data order and in sampling;
* the **task group**: ``seeds[0]`` and the algorithm fixed, one run per task in ``tasks``;
* the **algorithm group**: ``seeds[0]`` and the task fixed, one run per algorithm in ``algorithms`` (``dapo``:
  clip-only, beta = 0; ``grpo``: symmetric clip eps = 0.2 with a k3 KL penalty ``kl_beta``; ``reinforce_kl``: no
  clip, KL penalty ``kl_beta``). At one seed the algorithms share the prompt stream and the sampling generator, and
  their first update starts on-policy (ratio 1: the clip is inactive and the k3 KL term has zero gradient), so
  this group measures how far the algorithm alone moves the mask, with the data held fixed.

The run (seeds[0], task, algorithm) belongs to all three groups. Every pair of distinct runs is compared; the pair's
``group`` is the one factor in which the two runs differ (``seed``, ``task`` or ``algorithm``), or ``mixed``.

**Update mask** of a run: Def. 2.1 probe (``theory.metrics.update_mask``, eta = ``eta`` = 1e-3) between the run's
stored bf16 weights at its last step and at step 0 (the common base), for every transformer-block matrix.

Tables (``threegate run consistency``; config section ``[consistency]``, ``preset = "fast"`` or ``"default"``):

``jaccard`` (schema ``jaccard``, Fig. 12)
    every pair of runs, per matrix type (masks pooled over layers) and ``all``: J = |A and B| / |A or B|,
    ``baseline`` = pq / (p + q - pq) from the two densities (independent-Bernoulli), ``baseline_exponent`` = the
    same expectation with independence assumed only *within strata of equal (matrix, bf16 exponent of the base
    weight)*: sum_b n_b p_b q_b / sum_b n_b (p_b + q_b - p_b q_b). A stored bf16 value moves once its master has
    drifted half a ULP, and the ULP is set by the exponent (Gate III), so smaller weights change more often in
    every run; the stratified baseline is what that effect alone predicts, and J above it is agreement beyond
    magnitude. Also ``group``, ``density_a``, ``density_b``, ``intersection``, ``union``.
``consensus`` (schema ``consensus``, Fig. 2)
    C_ij = (1/R) sum_r M_ij over the seed group's R runs, every layer and every matrix type in
    ``consensus_types`` (all seven by default: 2 layers of a d_model = 64 model is ~9e4 rows).
``stripes`` (schema ``stripes``, Fig. 3)
    row ratios rho_i = mean_j M_ij and column ratios kappa_j = mean_i M_ij of every seed-group run, every layer and
    matrix type, at each probed step > 0 (``probes`` evenly spaced steps), the mask taken against step 0.
``consistency`` (summary)
    per group and matrix type: runs, pairs, mean J, mean baseline, their ratio, the smallest J - baseline, the
    stratified baseline and its ratio, mean density; and two stripe statistics of the group's final masks
    (averaged over runs and layers): ``row_top_share`` = the share of a matrix's changed entries lying in its
    top ceil(``STRIPE_TOP_FRACTION`` * m) rows (by rho_i) divided by the uniform share (1 = no concentration), and
    ``row_dispersion`` = var_i(rho_i) / (p (1 - p) / n) (the variance of the row ratios over the variance
    independent Bernoulli(p) entries give; 1 = no stripes); the same for columns.

Claims judged (pure functions of the tables; thresholds are the constants below):

``consistency_above_baseline(jaccard, group=..., baseline=...)`` (Table 2)
    over the pairs of one group (matrix type ``all``): per pair the excess e = J - baseline and the ratio
    J / baseline.

    * **inconclusive** with fewer than ``MIN_RUNS[group]`` runs, or when a run's mask density is above
      ``MAX_DENSITY`` or below ``MIN_DENSITY`` (a nearly full mask makes J ~ 1 for any pair, a nearly empty one
      makes J pure noise: Jaccard is uninformative there);
    * **reproduced** iff every pair has J >= ``REL_MARGIN`` * baseline and J - baseline >= ``ABS_MARGIN``;
    * **not reproduced** iff even the optimistic reading falls short: mean(e) + spread(e) < ``ABS_MARGIN`` or
      mean(J/b) + spread(J/b) < ``REL_MARGIN`` (spread = max - min over pairs; J ~ baseline lands here);
    * **inconclusive** otherwise (some pairs clear the margins, some do not).

    Judged for each group against ``baseline`` (the paper's claim) and against ``baseline_exponent`` (our
    sharper question: agreement beyond what the weight's bf16 exponent alone predicts).
``stripes_above_binomial(consistency)`` (Fig. 3)
    rows of Q/K/V and columns of O update in stripes: per seed-group run, effect = mean row dispersion of q, k, v
    and column dispersion of o, minus 1, judged by ``sims.claims.base.effect_verdict`` with min effect
    ``STRIPE_MIN_EXCESS`` over the runs (the runs are the seeds).

Margins. The paper's Table 2 (5 runs, DS-R1-Distill-Qwen-1.5B, block 13) has J / baseline from 1.28 (V) to 1.48
(O) and J - baseline from 0.13 to 0.18: ``REL_MARGIN`` = 1.2 sits below the weakest ratio it reports, and
``ABS_MARGIN`` = 0.02 is about twelve standard deviations of J for independent masks of our size (sd(J) = 1.7e-3
simulated for two Bernoulli(0.4) masks of 92160 entries, the default model's block matrices), so a pair passing
both is neither independent noise nor a rounding-level excess.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from sims.claims.base import (
    Claim,
    ClaimRun,
    SPREAD_FACTOR,
    Verdict,
    block_matrix_index,
    config_from_section,
    effect_verdict,
    require_columns,
    start_model,
    verdicts_frame,
)
from sims.claims.runs import recipe_rl_config
from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.rlvr import ALGORITHMS, train_rlvr
from sims.tinygpt.tasks import task_by_name
from theory.errors import InputError
from theory.metrics import bernoulli_jaccard_baseline, col_ratios, consensus, row_ratios, update_mask
from theory.naming import MATRIX_TYPES

__all__ = [
    "MIN_RUNS", "REL_MARGIN", "ABS_MARGIN", "MIN_DENSITY", "MAX_DENSITY", "STRIPE_TOP_FRACTION", "STRIPE_MIN_EXCESS",
    "GROUPS", "ConsistencyConfig", "RunSpec", "run_specs", "pair_group", "final_masks", "exponent_strata",
    "stratified_baseline", "jaccard_rows", "consensus_rows", "stripe_rows", "stripe_stats", "summary_table",
    "consistency_above_baseline", "stripes_above_binomial", "consistency_experiment",
]

#: Fewest runs per group for a verdict: >= 5 runs differing in seed (Table 2 compares five RL runs); only four tasks
#: and three algorithms exist, so those groups need all three or more of their variants (three pairs).
MIN_RUNS = {"seed": 5, "task": 3, "algorithm": 3}
#: Every pair must have J >= REL_MARGIN * baseline (the paper's weakest Table 2 ratio is 1.28).
REL_MARGIN = 1.2
#: ... and J - baseline >= ABS_MARGIN (about 12 sd of J for independent masks of ~9e4 entries).
ABS_MARGIN = 0.02
#: Mask densities outside [MIN_DENSITY, MAX_DENSITY] make Jaccard uninformative: inconclusive.
MIN_DENSITY = 0.001
MAX_DENSITY = 0.95
#: The stripe share statistic: the top ceil(STRIPE_TOP_FRACTION * m) rows (columns) by update ratio.
STRIPE_TOP_FRACTION = 0.05
#: Stripes: row (column) ratio variance at least (1 + STRIPE_MIN_EXCESS) times the independent-Bernoulli variance.
STRIPE_MIN_EXCESS = 1.0
GROUPS = ("seed", "task", "algorithm")
#: Which axis carries the paper's stripes for each matrix type (Fig. 3: rows in Q/K/V, columns in O).
STRIPE_AXIS = {"q": "row", "k": "row", "v": "row", "o": "col"}


# ----------------------------------------------------------------------------------------------------------------
# Configuration and the runs


@dataclass(frozen=True)
class ConsistencyConfig:
    """``[consistency]``: the seed group (``seeds``), the task group and the algorithm group (both at seeds[0])."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    task: str = "counting"
    algorithm: str = "dapo"
    tasks: tuple[str, ...] = ("counting", "addition", "modular", "sorting")
    algorithms: tuple[str, ...] = ("dapo", "grpo", "reinforce_kl")
    kl_beta: float = 0.04  # KL coefficient of grpo and reinforce_kl (dapo is clip-only, beta = 0)
    rl_steps: int = 30
    probes: int = 5  # probed steps (evenly spaced, > 0) for the stripes table
    minibatches: int = 2
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-5
    eta: float = 1e-3  # Def 2.1 probe
    n_eval_prompts: int = 4
    consensus_types: tuple[str, ...] = ("q", "k", "v", "o", "up", "gate", "down")
    bf16_checkpoint: bool = True  # the base rounded to bf16: every run starts from the same stored values

    def __post_init__(self) -> None:
        for name in ("tasks", "algorithms", "consensus_types"):  # TOML / JSON give lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for t in (self.task, *self.tasks):
            task_by_name(t)  # an unknown task raises InputError naming it
        bad = sorted(set((self.algorithm, *self.algorithms)) - set(ALGORITHMS))
        if bad:
            raise InputError(f"[consistency] unknown algorithm(s) {bad}; known: {list(ALGORITHMS)}")
        bad = sorted(set(self.consensus_types) - set(MATRIX_TYPES))
        if bad:
            raise InputError(f"[consistency] consensus_types: unknown matrix type(s) {bad}; known: {list(MATRIX_TYPES)}")
        if self.rl_steps < 1 or self.probes < 1:
            raise InputError(f"[consistency] rl_steps and probes must be >= 1, got {self.rl_steps}, {self.probes}")
        if not self.kl_beta > 0:
            raise InputError(f"[consistency] kl_beta must be > 0 (reinforce_kl needs a KL penalty), got {self.kl_beta}")

    @classmethod
    def fast(cls, **kw) -> "ConsistencyConfig":
        return replace(cls(seeds=(0, 1, 2, 3, 4), tasks=("counting", "addition", "modular"), rl_steps=3, probes=2,
                           prompts_per_step=4, group_size=4, n_eval_prompts=2), **kw)

    @classmethod
    def default(cls, **kw) -> "ConsistencyConfig":
        return replace(cls(), **kw)

    @property
    def probe_steps(self) -> tuple[int, ...]:
        """Step 0 and ``probes`` evenly spaced steps ending at ``rl_steps``."""
        s = np.linspace(0, self.rl_steps, self.probes + 1).round().astype(int)
        return tuple(sorted(set(s.tolist()) | {0, self.rl_steps}))


@dataclass(frozen=True)
class RunSpec:
    """One RL run of the experiment: the three factors that define the groups."""

    seed: int
    task: str
    algorithm: str

    @property
    def name(self) -> str:
        return f"{self.algorithm}-{self.task}-s{self.seed}"


def run_specs(c: ConsistencyConfig) -> list[RunSpec]:
    """The seed group, then the other tasks and the other algorithms at seeds[0] (no run twice)."""
    s0 = c.seeds[0]
    specs = [RunSpec(s, c.task, c.algorithm) for s in c.seeds]
    specs += [RunSpec(s0, t, c.algorithm) for t in c.tasks]
    specs += [RunSpec(s0, c.task, a) for a in c.algorithms]
    return list(dict.fromkeys(specs))


def pair_group(a: RunSpec, b: RunSpec) -> str:
    """The one factor in which two runs differ ('seed', 'task', 'algorithm'), or 'mixed'."""
    diff = [g for g in GROUPS if getattr(a, g) != getattr(b, g)]
    if not diff:
        raise InputError(f"runs {a.name} and {b.name} are the same configuration")
    return diff[0] if len(diff) == 1 else "mixed"


def group_members(specs: Sequence[RunSpec], c: ConsistencyConfig, group: str) -> list[RunSpec]:
    s0 = c.seeds[0]
    keep = {"seed": lambda s: s.task == c.task and s.algorithm == c.algorithm,
            "task": lambda s: s.seed == s0 and s.algorithm == c.algorithm,
            "algorithm": lambda s: s.seed == s0 and s.task == c.task}[group]
    return [s for s in specs if keep(s)]


def _train(model, c: ConsistencyConfig, spec: RunSpec, device: str):
    extra = {"dapo": {}, "grpo": {"beta": c.kl_beta, "eps_low": 0.2, "eps_high": 0.2},
             "reinforce_kl": {"beta": c.kl_beta}}[spec.algorithm]
    rc = recipe_rl_config(c, task=spec.task, algorithm=spec.algorithm, seed=spec.seed, device=device,
                          probe=ProbeConfig(steps=c.probe_steps, n_eval_prompts=c.n_eval_prompts,
                                            theory_checks=False), **extra)
    return train_rlvr(model, rc, run_name=spec.name)


# ----------------------------------------------------------------------------------------------------------------
# Masks and tables


def final_masks(res, step: int | None = None, eta: float = 1e-3) -> dict[str, np.ndarray]:
    """{block matrix name: update mask (bool, True = stored bf16 value changed)} of run ``res`` at ``step``
    (default its last probed step) against its step-0 snapshot (Def. 2.1 probe)."""
    snaps = res.snapshots
    if 0 not in snaps:
        raise InputError(f"run {res.name}: no step-0 snapshot to take the update mask against")
    step = max(snaps) if step is None else step
    if step not in snaps:
        raise InputError(f"run {res.name}: no snapshot at step {step}; probed steps {sorted(snaps)}")
    return {n: np.asarray(update_mask(snaps[0][n], snaps[step][n], eta).cpu().numpy())
            for n in block_matrix_index(snaps[0])}


def exponent_strata(base: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    """Flat stratum id per entry of the concatenated matrices ``names``: (matrix, bf16 exponent field of the base
    weight). Zeros and subnormals share exponent field 0 (one stratum per matrix)."""
    ids = []
    for i, n in enumerate(names):
        bits = base[n].to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype(np.int32).ravel()
        ids.append(i * 256 + ((bits >> 7) & 0xFF))
    return np.concatenate(ids)


def stratified_baseline(a: np.ndarray, b: np.ndarray, strata: np.ndarray) -> float:
    """E|A and B| / E|A or B| for masks independent *within* each stratum, at the strata's observed densities:
    sum_s n_s p_s q_s / sum_s n_s (p_s + q_s - p_s q_s), with p_s = |A in s| / n_s. One stratum gives
    ``bernoulli_jaccard_baseline``; 1.0 when both masks are empty (like Jaccard)."""
    if not (a.shape == b.shape == strata.shape):
        raise InputError(f"stratified_baseline: shapes differ: {a.shape}, {b.shape}, {strata.shape}")
    n = np.bincount(strata).astype(np.float64)
    ca = np.bincount(strata, weights=a.astype(np.float64), minlength=n.size)
    cb = np.bincount(strata, weights=b.astype(np.float64), minlength=n.size)
    ok = n > 0
    inter = float(np.sum(ca[ok] * cb[ok] / n[ok]))
    union = float(np.sum(ca + cb)) - inter
    return 1.0 if union == 0 else inter / union


def _pooled(masks: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([masks[n].ravel() for n in names])


def _type_names(base: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """{matrix type or 'all': block matrix names}, in state-dict order."""
    out: dict[str, list[str]] = {}
    for n, (_, mt) in block_matrix_index(base).items():
        out.setdefault(mt, []).append(n)
        out.setdefault("all", []).append(n)
    return out


def jaccard_rows(specs: Sequence[RunSpec], masks: Sequence[Mapping[str, np.ndarray]],
                 base: Mapping[str, torch.Tensor], steps: int) -> list[dict]:
    """Every pair of runs x (matrix type, 'all'): J, both baselines, densities and counts (exact integer counts)."""
    by_type = _type_names(base)
    strata = {mt: exponent_strata(base, names) for mt, names in by_type.items()}
    pooled = [{mt: _pooled(m, names) for mt, names in by_type.items()} for m in masks]
    rows = []
    for i, j in combinations(range(len(specs)), 2):
        group = pair_group(specs[i], specs[j])
        for mt in by_type:
            A, B = pooled[i][mt], pooled[j][mt]
            inter, union = int(np.count_nonzero(A & B)), int(np.count_nonzero(A | B))
            p, q = float(A.mean()), float(B.mean())
            rows.append({"run_a": specs[i].name, "run_b": specs[j].name, "group": group, "matrix_type": mt,
                         "jaccard": 1.0 if union == 0 else inter / union,
                         "baseline": bernoulli_jaccard_baseline(p, q),
                         "baseline_exponent": stratified_baseline(A, B, strata[mt]),
                         "density_a": p, "density_b": q, "intersection": inter, "union": union, "n": int(A.size),
                         "model": "TinyGPT", "steps": steps})
    return rows


def consensus_rows(masks: Sequence[Mapping[str, np.ndarray]], base: Mapping[str, torch.Tensor],
                   types: Sequence[str], steps: int) -> list[pd.DataFrame]:
    """C_ij = (1/R) sum_r M_ij over the runs (``theory.metrics.consensus``), one frame per matrix."""
    frames = []
    for n, (layer, mt) in block_matrix_index(base).items():
        if mt not in types:
            continue
        C = consensus([m[n] for m in masks])
        rr, cc = np.indices(C.shape)
        frames.append(pd.DataFrame({"layer": layer, "matrix_type": mt, "row": rr.ravel(), "col": cc.ravel(),
                                    "consensus": C.ravel(), "n_runs": len(masks), "model": "TinyGPT",
                                    "steps": steps}))
    return frames


def stripe_rows(res, spec: RunSpec, eta: float, steps: int) -> list[pd.DataFrame]:
    """Row / column update ratios of every block matrix of run ``res`` at each probed step > 0."""
    base = res.snapshots[0]
    frames = []
    for step in sorted(s for s in res.snapshots if s > 0):
        masks = final_masks(res, step, eta)
        for n, (layer, mt) in block_matrix_index(base).items():
            for axis, ratios in (("row", row_ratios(masks[n])), ("col", col_ratios(masks[n]))):
                frames.append(pd.DataFrame({"run": spec.name, "seed": spec.seed, "step": step, "layer": layer,
                                            "matrix_type": mt, "axis": axis, "index": np.arange(ratios.size),
                                            "update_ratio": ratios, "model": "TinyGPT", "steps": steps}))
    return frames


def stripe_stats(M: np.ndarray, axis: str) -> tuple[float, float]:
    """(top share ratio, dispersion) of a 2-d mask along ``axis`` ('row': rho_i = mean_j M_ij; 'col': kappa_j).

    top share ratio = (changed entries in the top ceil(STRIPE_TOP_FRACTION * m) lines) / (all changed entries),
    divided by the uniform share k / m. dispersion = var(ratios) / (p (1 - p) / n), n = entries per line: 1 for
    independent Bernoulli(p) entries. NaN for an empty or full mask (no stripes to measure)."""
    if M.ndim != 2:
        raise InputError(f"stripe_stats: expected a 2-d mask, got shape {M.shape}")
    A = M.astype(np.float64) if axis == "row" else M.astype(np.float64).T
    m, n = A.shape
    p = float(A.mean())
    if p in (0.0, 1.0):
        return math.nan, math.nan
    ratios = A.mean(axis=1)
    k = max(1, math.ceil(STRIPE_TOP_FRACTION * m))
    top = np.sort(ratios)[::-1][:k].sum() / ratios.sum()
    return float(top / (k / m)), float(ratios.var() / (p * (1 - p) / n))


def _run_stripe_stats(spec: RunSpec, masks: Mapping[str, np.ndarray], base: Mapping[str, torch.Tensor]) -> list[dict]:
    rows = []
    for n, (layer, mt) in block_matrix_index(base).items():
        r_top, r_disp = stripe_stats(masks[n], "row")
        c_top, c_disp = stripe_stats(masks[n], "col")
        rows.append({"run": spec.name, "seed": spec.seed, "layer": layer, "matrix_type": mt, "row_top_share": r_top,
                     "row_dispersion": r_disp, "col_top_share": c_top, "col_dispersion": c_disp})
    return rows


def summary_table(jaccard: pd.DataFrame, stripes: pd.DataFrame, members: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Per group and matrix type: mean J, baselines, ratios; stripe statistics of the group's runs (final masks).

    ``stripes`` is the per-run, per-matrix table of ``stripe_stats`` (columns run, seed, layer, matrix_type,
    row_top_share, row_dispersion, col_top_share, col_dispersion); ``members`` = {group: run names}."""
    rows = []
    stat_cols = ["row_top_share", "row_dispersion", "col_top_share", "col_dispersion"]
    for group, runs in members.items():
        g = jaccard[jaccard["group"] == group]
        st = stripes[stripes["run"].isin(runs)]
        for mt, t in g.groupby("matrix_type", sort=False):
            s = st if mt == "all" else st[st["matrix_type"] == mt]
            dens = pd.concat([t.set_index("run_a")["density_a"], t.set_index("run_b")["density_b"]])
            dens = dens[~dens.index.duplicated()]
            mj, mb, me = t["jaccard"].mean(), t["baseline"].mean(), t["baseline_exponent"].mean()
            rows.append({"group": group, "matrix_type": mt, "n_runs": len(dens), "n_pairs": len(t),
                         "mean_jaccard": mj, "mean_baseline": mb, "ratio": mj / mb if mb > 0 else math.nan,
                         "min_excess": float((t["jaccard"] - t["baseline"]).min()),
                         "mean_baseline_exponent": me, "ratio_exponent": mj / me if me > 0 else math.nan,
                         "min_excess_exponent": float((t["jaccard"] - t["baseline_exponent"]).min()),
                         "mean_density": float(dens.mean()),
                         **{c: float(s[c].mean()) if len(s) else math.nan for c in stat_cols}})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# Verdicts (pure)


def _run_densities(t: pd.DataFrame) -> dict[str, float]:
    d = {}
    for col_run, col_d in (("run_a", "density_a"), ("run_b", "density_b")):
        for r, p in zip(t[col_run], t[col_d]):
            d.setdefault(str(r), float(p))
    return d


def consistency_above_baseline(table: pd.DataFrame, group: str = "seed", baseline: str = "baseline",
                               matrix_type: str = "all") -> Verdict:
    """Table 2: every pair of runs of ``group`` has Jaccard above the ``baseline`` column by the module's margins.

    Needs columns run_a, run_b, group, matrix_type, jaccard, density_a, density_b and ``baseline``; uses the rows
    of ``group`` and ``matrix_type``. Rule: see the module docstring."""
    what = "magnitude-stratified Bernoulli baseline" if baseline == "baseline_exponent" else "Bernoulli baseline"
    short = (f"jaccard_above_{'magnitude' if baseline == 'baseline_exponent' else 'bernoulli'}_{group}"
             + ("" if matrix_type == "all" else f"_{re.sub(r'[^a-z0-9]+', '_', matrix_type.lower())}"))
    claim = Claim(short, f"Table 2: cross-run Jaccard of RL update masks exceeds the {what} ({group} group, "
                         f"matrix type {matrix_type})")
    require_columns(table, ("run_a", "run_b", "group", "matrix_type", "jaccard", "density_a", "density_b", baseline), claim)
    t = table[(table["group"] == group) & (table["matrix_type"] == matrix_type)]
    if t.empty:
        return claim.verdict("inconclusive", f"no pairs of the {group} group in the table", {})
    dens = _run_densities(t)
    J, b = t["jaccard"].to_numpy(np.float64), t[baseline].to_numpy(np.float64)
    nums = {"runs": sorted(dens), "densities": dens, "pairs": len(t), "jaccard": J.tolist(), "baseline": b.tolist(),
            "rel_margin": REL_MARGIN, "abs_margin": ABS_MARGIN}
    need = MIN_RUNS.get(group, max(MIN_RUNS.values()))
    if len(dens) < need:
        return claim.verdict("inconclusive", f"{len(dens)} run(s) < {need} needed for the {group} group", nums)
    off = {r: p for r, p in dens.items() if not MIN_DENSITY <= p <= MAX_DENSITY}
    if off:
        return claim.verdict("inconclusive",
                             f"mask density outside [{MIN_DENSITY:g}, {MAX_DENSITY:g}] for {off}: a nearly full or empty "
                             f"mask makes Jaccard uninformative", nums)
    if not (np.isfinite(J).all() and np.isfinite(b).all()) or (b <= 0).any():
        return claim.verdict("inconclusive", "non-finite Jaccard or non-positive baseline on some pair", nums)
    e, r = J - b, J / b
    nums.update(mean_excess=float(e.mean()), min_excess=float(e.min()), mean_ratio=float(r.mean()),
                min_ratio=float(r.min()))
    summary = (f"{len(t)} pairs of {len(dens)} runs: J {J.mean():.4f} vs baseline {b.mean():.4f} (mean), "
               f"J - b in [{e.min():+.4f}, {e.max():+.4f}], J / b in [{r.min():.3f}, {r.max():.3f}]")
    if ((J >= REL_MARGIN * b) & (e >= ABS_MARGIN)).all():
        return claim.verdict("reproduced",
                             f"{summary}: every pair has J >= {REL_MARGIN:g} x baseline and J - baseline >= "
                             f"{ABS_MARGIN:g}", nums)
    spread_e, spread_r = float(e.max() - e.min()), float(r.max() - r.min())
    hi_e, hi_r = float(e.mean() + SPREAD_FACTOR * spread_e), float(r.mean() + SPREAD_FACTOR * spread_r)
    short = ([f"mean + spread of J - b = {hi_e:+.4f} < {ABS_MARGIN:g}"] if hi_e < ABS_MARGIN else []) + \
            ([f"mean + spread of J / b = {hi_r:.3f} < {REL_MARGIN:g}"] if hi_r < REL_MARGIN else [])
    if short:
        return claim.verdict("not reproduced", f"{summary}: even the optimistic reading falls short: "
                             + "; ".join(short), nums)
    return claim.verdict("inconclusive",
                         f"{summary}: some pairs clear the margins (J / b >= {REL_MARGIN:g}, J - b >= {ABS_MARGIN:g}) "
                         f"and some do not", nums)


def stripes_above_binomial(stripes: pd.DataFrame) -> Verdict:
    """Fig. 3: rows of Q/K/V and columns of O update in stripes (line-ratio variance above the Bernoulli variance).

    Needs the per-run stripe statistics (columns run, seed, matrix_type, row_dispersion, col_dispersion); per run
    (seed), effect = mean over layers and q, k, v (rows) and o (columns) of the dispersion, minus 1."""
    claim = Claim("stripes_above_binomial", "Fig. 3: RL updates form row stripes in Q/K/V and column stripes in O")
    require_columns(stripes, ("run", "seed", "matrix_type", "row_dispersion", "col_dispersion"), claim)
    effects = {}
    for run, t in stripes.groupby("run", sort=False):
        vals = [d for mt, axis in STRIPE_AXIS.items()
                for d in t.loc[t["matrix_type"] == mt, f"{axis}_dispersion"].tolist()]
        vals = [v for v in vals if np.isfinite(v)]
        effects[str(run)] = float(np.mean(vals)) - 1.0 if vals else math.nan
    v = effect_verdict(claim, effects, min_effect=STRIPE_MIN_EXCESS,
                       what="stripe dispersion - 1 (q, k, v rows; o columns)")
    both = stripes.groupby("matrix_type")[["row_dispersion", "col_dispersion"]].mean()
    return replace(v, numbers={**v.numbers, "mean_dispersion": {str(mt): {"row": float(r["row_dispersion"]),
                                                                          "col": float(r["col_dispersion"])}
                                                                for mt, r in both.iterrows()}})


# ----------------------------------------------------------------------------------------------------------------
# The experiment


def consistency_experiment(cfg: Mapping) -> ClaimRun:
    """Cross-run consistency (Table 2, Figs. 2, 3, 12): Jaccard of RL update masks across seeds, tasks and
    algorithms against the Bernoulli and magnitude-stratified baselines, consensus, stripes; verdicts."""
    c = config_from_section(ConsistencyConfig, cfg, "consistency")
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    specs = run_specs(c)
    results, masks = [], []
    for spec in specs:
        res = _train(copy.deepcopy(model), c, spec, device)
        results.append(res)
        masks.append(final_masks(res, eta=c.eta))
    base = results[0].snapshots[0]
    for res in results[1:]:  # every run must start from the same stored values, or the masks are not comparable
        if any(not torch.equal(base[n], res.snapshots[0][n]) for n in block_matrix_index(base)):
            raise InputError(f"consistency: run {res.name} did not start from the same base weights")
    members = {g: group_members(specs, c, g) for g in GROUPS}
    seed_idx = [specs.index(s) for s in members["seed"]]
    jac = pd.DataFrame(jaccard_rows(specs, masks, base, c.rl_steps))
    stats = pd.DataFrame([r for s, m in zip(specs, masks) for r in _run_stripe_stats(s, m, base)])
    tables = {
        "jaccard": jac,
        "consensus": pd.concat(consensus_rows([masks[i] for i in seed_idx], base, c.consensus_types, c.rl_steps),
                               ignore_index=True),
        "stripes": pd.concat([f for i in seed_idx for f in stripe_rows(results[i], specs[i], c.eta, c.rl_steps)],
                             ignore_index=True),
        "stripe_stats": stats,
        "consistency": summary_table(jac, stats, {g: [s.name for s in m] for g, m in members.items()}),
    }
    verdicts = [consistency_above_baseline(jac, g, baseline=b) for g in GROUPS
                for b in ("baseline", "baseline_exponent")]
    verdicts.append(stripes_above_binomial(stats[stats["run"].isin([s.name for s in members["seed"]])]))
    tables["verdicts"] = verdicts_frame(verdicts)
    return ClaimRun(results, tables, verdicts, {**asdict(c), "runs": [s.name for s in specs]})

