"""Paper Fig. 9 / Tables 4-5 (sparse fine-tuning with structural masks) and Fig. 10 (LoRA vs PiSSA), at our scale.

Both experiments start from the cached pretrained TinyGPT rounded to bf16 and train it by RLVR (``sims.tinygpt.rlvr``, DAPO
by default, bf16 precision) with the machinery of ``sims.tinygpt.peft``. "Reward" is the probe's eval reward: mean +/-1
reward of temperature-1 samples on a fixed set of eval prompts (the same prompts and sampling seed for every run, so
runs are compared on common random numbers); ``reward_greedy`` and the rollout reward ``train_reward`` (mean over the
steps since the previous probe) are kept as extra columns. "KL" is the probe's exact token-wise KL(pi_t || pi_0) to
the run's own start on fixed demonstrations (0 at step 0). A run's **final** value is the mean over its probed
steps t >= ``FINAL_FRACTION`` * steps (a single probe is too noisy at this scale).

Experiment ``masked_runs`` (``threegate run masked_runs``, section ``[masked_runs]``)
    per seed, RL with only the entries of one mask trainable (``sims.tinygpt.peft.train_rlvr_masked``; masks from the start
    weights W0 of every block matrix, ``sims.tinygpt.peft.structural_masks``): ``dense`` (all entries), ``princ`` (M_princ,
    top-alpha of |W0^(k)|), ``princ_c`` (its complement), ``low`` (M_low, bottom-alpha of |W0|), ``safe``
    (M_princ^c or M_low, the paper's safe mask) and ``random`` (uniform, matched to ``safe``'s count in every
    matrix, drawn from the run's seed). Same seed, data order and eval prompts across masks. Non-block parameters
    (embeddings, norms, lm_head) are frozen in every run, dense included (``freeze_other``), so the runs differ only
    in the block-matrix mask. Tables ``masked_runs`` (schema ``masked_runs``: per run and probed step) and
    ``masked_runs_final`` (per run: density, final reward, final KL).
Experiment ``lora_pissa`` (``threegate run lora_pissa``, section ``[lora_pissa]``)
    per seed, LoRA and PiSSA adapters (``sims.tinygpt.peft.add_adapters``, every block matrix, alpha = rank so s = 1, base
    frozen) over ``ranks`` x ``lrs``. Tables ``lora_pissa`` (schema ``lora_pissa``: per run and probed step) and
    ``lora_pissa_final`` (per run: initial and final reward, final KL, ``collapsed``, ``nonfinite``). A run whose
    gradient went non-finite (``NonFiniteError``) has no curve; it counts as collapsed with final reward -1 (the
    reward floor: a diverged policy).

Thresholds (rewards are on the +/-1 scale, so 0.1 reward = 5 accuracy points):

``TRACK_DELTA = 0.1``
    "tracks": the safe mask's final reward is within this of dense's.
``KL_TRACK_RATIO = 0.5``
    "its KL curve tracks dense": |KL_safe - KL_dense| <= this * KL_dense at the final window.
``COLLAPSE_MARGIN = 0.25``
    a run has **collapsed** if its final reward is below its own initial (step 0) reward by more than this, or its
    gradient went non-finite.
``NO_GAIN_MARGIN = 0.05``
    "PiSSA gives no gain over LoRA" allows PiSSA to be better by at most this much on average.
``MIN_COLLAPSE_GAP = 0.5``
    "PiSSA collapses at the high lr (LoRA does not)": PiSSA's collapse rate there exceeds LoRA's by more than this
    (most PiSSA runs collapse, most LoRA runs do not).

Verdicts (pure functions of the tables, the seed rule of ``sims.claims.base.effect_verdict``, min effect 0 unless said):

``safe_mask_tracks_dense`` (Fig. 9, Tables 4-5)
    per seed e = min(TRACK_DELTA - |R_safe - R_dense|, R_safe - R_princ): positive iff the safe mask's final
    reward is within TRACK_DELTA of dense **and** above the principal-only mask's.
``safe_mask_kl_tracks_dense`` (Fig. 9 left)
    per seed e = KL_TRACK_RATIO - |KL_safe - KL_dense| / KL_dense.
``princ_mask_worst`` (Table 4: updating only M_princ is worst)
    per seed e = min over the other masks m of (R_m - R_princ).
``safe_mask_beats_random`` (Table 5: a random mask of the same density is below the safe mask)
    per seed e = R_safe - R_random.
``pissa_no_better_than_lora`` (Fig. 10)
    per seed e = mean over the (rank, lr) cells of (R_LoRA - R_PiSSA) + NO_GAIN_MARGIN: positive iff PiSSA's gain
    over LoRA is below NO_GAIN_MARGIN. Judged on the learning rates **below the highest** (all of them when there
    is one): at the highest lr a PiSSA collapse would make "no gain" true for a reason the next verdict judges on
    its own; the per-cell gaps of every lr are in the numbers.
``pissa_collapses_at_high_lr`` (Fig. 10: PiSSA collapses early at the higher learning rates)
    per seed e = (fraction of PiSSA runs at the highest lr that collapsed) - (the same for LoRA), min effect
    MIN_COLLAPSE_GAP.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from sims.claims.base import (
    Claim,
    ClaimRun,
    Verdict,
    config_from_section,
    effect_verdict,
    require_columns,
    start_model,
    verdicts_frame,
)
from sims.claims.runs import recipe_rl_config
from sims.tinygpt.peft import (
    ADAPTER_METHODS,
    MASK_NAMES,
    adapter_parameter_count,
    add_adapters,
    mask_density,
    structural_masks,
    train_rlvr_masked,
)
from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.rlvr import train_rlvr
from theory.errors import InputError, NonFiniteError

__all__ = [
    "FINAL_FRACTION", "TRACK_DELTA", "KL_TRACK_RATIO", "COLLAPSE_MARGIN", "NO_GAIN_MARGIN", "MIN_COLLAPSE_GAP",
    "MaskedRunsConfig", "LoraPissaConfig", "final_values", "summarize_adapter_runs",
    "safe_mask_tracks_dense", "safe_mask_kl_tracks_dense", "princ_mask_worst", "safe_mask_beats_random",
    "pissa_no_better_than_lora", "pissa_collapses_at_high_lr",
    "masked_runs_experiment", "lora_pissa_experiment",
]

#: A run's final value is the mean over its probed steps t >= FINAL_FRACTION * (its last step).
FINAL_FRACTION = 0.75
#: "Tracks": the safe mask's final reward within this of dense's (+/-1 reward scale).
TRACK_DELTA = 0.1
#: "The KL curve tracks dense": |KL_safe - KL_dense| <= KL_TRACK_RATIO * KL_dense at the final window.
KL_TRACK_RATIO = 0.5
#: Collapse: the final reward falls below the run's initial reward by more than this (or the loss goes non-finite).
COLLAPSE_MARGIN = 0.25
#: "No gain": PiSSA's mean final reward may exceed LoRA's by at most this.
NO_GAIN_MARGIN = 0.05
#: "PiSSA collapses at the high lr": its collapse rate there exceeds LoRA's by more than this.
MIN_COLLAPSE_GAP = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class MaskedRunsConfig:
    """``[masked_runs]``: RL restricted to each structural mask (Fig. 9)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    masks: tuple[str, ...] = ("dense", "princ", "princ_c", "low", "safe", "random")
    task: str = "counting"
    algorithm: str = "dapo"
    rl_steps: int = 40
    minibatches: int = 2
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 3e-4
    k: int = 8  # rank of the reconstruction that scores M_princ (the paper gives none; min(m, n) = 64 here)
    alpha: float = 0.5  # the paper's masking study: alpha = 50%
    freeze_other: bool = True  # embeddings, norms and lm_head frozen in every run (dense included)
    probe_every: int = 5
    n_eval_prompts: int = 128
    precision: str = "bf16"
    bf16_checkpoint: bool = True

    @classmethod
    def fast(cls, **kw) -> "MaskedRunsConfig":
        return replace(cls(seeds=(0,), rl_steps=3, prompts_per_step=4, group_size=4, probe_every=1,
                           n_eval_prompts=8), **kw)

    @classmethod
    def default(cls, **kw) -> "MaskedRunsConfig":
        return replace(cls(), **kw)


@dataclass(frozen=True)
class LoraPissaConfig:
    """``[lora_pissa]``: LoRA vs PiSSA adapters over ranks x learning rates (Fig. 10)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("LoRA", "PiSSA")
    ranks: tuple[int, ...] = (1, 4, 16)
    lrs: tuple[float, ...] = (1e-3, 1e-2)  # a normal and a high adapter learning rate
    alpha: float | None = None  # None: alpha = rank (scale s = 1) for every rank
    task: str = "counting"
    algorithm: str = "dapo"
    rl_steps: int = 16
    minibatches: int = 2
    prompts_per_step: int = 8
    group_size: int = 8
    probe_every: int = 4
    n_eval_prompts: int = 128
    precision: str = "bf16"
    bf16_checkpoint: bool = True

    @classmethod
    def fast(cls, **kw) -> "LoraPissaConfig":
        return replace(cls(seeds=(0,), ranks=(1, 4), rl_steps=2, prompts_per_step=4, group_size=4, probe_every=1,
                           n_eval_prompts=8), **kw)

    @classmethod
    def default(cls, **kw) -> "LoraPissaConfig":
        return replace(cls(), **kw)


# ----------------------------------------------------------------------------------------------------------------
# Runs and their curves


def _rl_config(c, *, seed: int, lr: float, device: str):
    steps = tuple(sorted(set(range(0, c.rl_steps + 1, max(1, c.probe_every))) | {0, c.rl_steps}))
    return recipe_rl_config(c, lr=lr, precision=c.precision, seed=seed, device=device,
                            probe=ProbeConfig(steps=steps, n_eval_prompts=c.n_eval_prompts, theory_checks=False))


def _curve(res) -> pd.DataFrame:
    """Per probed step: reward (sampled eval), reward_greedy, accuracy, kl (0 at step 0), train_reward."""
    m = res.metrics[res.metrics["matrix"] == ""].pivot_table(index="step", columns="metric", values="value")
    out = pd.DataFrame({"step": m.index.astype(int), "reward": m["reward_sampled"].to_numpy(),
                        "reward_greedy": m["reward_greedy"].to_numpy(),
                        "accuracy": m["accuracy_sampled"].to_numpy()})
    kl = m["kl_tok_base"] if "kl_tok_base" in m.columns else pd.Series(np.nan, index=m.index)
    out["kl"] = np.where(out["step"] == 0, 0.0, kl.to_numpy())  # KL of the start to itself is exactly 0
    h = res.history
    prev, train = 0, []
    for s in out["step"]:
        win = h[(h["step"] > prev) & (h["step"] <= s)]["reward_mean"]
        train.append(float(win.mean()) if len(win) else math.nan)
        prev = s
    out["train_reward"] = train
    return out


def final_values(curves: pd.DataFrame, keys: list[str], cols: tuple[str, ...] = ("reward", "kl")) -> pd.DataFrame:
    """Per group of ``keys``: the mean of ``cols`` over probed steps >= FINAL_FRACTION * the group's last step,
    and the value of ``reward`` at step 0 (``initial_reward``)."""
    require_columns(curves, tuple(keys) + ("step",) + tuple(cols), "final_values")
    rows = []
    for key, g in curves.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        last = int(g["step"].max())
        win = g[g["step"] >= FINAL_FRACTION * last]
        row = dict(zip(keys, key))
        row.update({f"final_{c}": float(win[c].mean()) for c in cols})
        first = g[g["step"] == g["step"].min()]
        if "reward" in g.columns:
            row["initial_reward"] = float(first["reward"].mean())
        row["final_steps"] = ",".join(str(int(s)) for s in sorted(win["step"].unique()))
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# Verdicts: masked runs (pure)


def _per_seed_masks(table: pd.DataFrame, claim: str, need: tuple[str, ...], col: str = "final_reward"):
    """{seed: {mask: value}} from a final table (columns seed, mask, ``col``), seeds that have every mask in ``need``."""
    require_columns(table, ("seed", "mask", col), claim)
    per = table.groupby(["seed", "mask"])[col].mean().unstack("mask")
    missing = [m for m in need if m not in per.columns]
    if missing:
        return None, f"the table has no {missing} runs"
    per = per.dropna(subset=list(need))
    if per.empty:
        return None, f"no seed has all of {list(need)}"
    return per, ""


def _masked_final(table: pd.DataFrame) -> pd.DataFrame:
    """Accept either the per-step ``masked_runs`` table or the ``masked_runs_final`` table."""
    if "final_reward" in table.columns:
        return table
    return final_values(table, ["seed", "mask"])


def safe_mask_tracks_dense(table: pd.DataFrame) -> Verdict:
    """Fig. 9 / Tables 4-5: the safe mask's final reward is within TRACK_DELTA of dense and above M_princ's."""
    claim = Claim("safe_mask_tracks_dense",
                  "Fig. 9: RL on the safe mask (M_princ^c or M_low) tracks dense RL and beats the principal-only mask")
    t = _masked_final(table)
    per, why = _per_seed_masks(t, claim, ("safe", "dense", "princ"))
    if per is None:
        return claim.verdict("inconclusive", why, {})
    effects = {int(s): float(min(TRACK_DELTA - abs(r["safe"] - r["dense"]), r["safe"] - r["princ"]))
               for s, r in per.iterrows()}
    v = effect_verdict(claim, effects, min_effect=0.0,
                       what=f"tracking margin min({TRACK_DELTA:g} - |R_safe - R_dense|, R_safe - R_princ)")
    nums = {**v.numbers, **{f"final_reward_{m}": per[m].tolist() for m in per.columns}, "track_delta": TRACK_DELTA}
    return replace(v, numbers=nums)


def safe_mask_kl_tracks_dense(table: pd.DataFrame) -> Verdict:
    """Fig. 9 (left): the safe mask's final KL to the base is within KL_TRACK_RATIO * KL_dense of dense's."""
    claim = Claim("safe_mask_kl_tracks_dense", "Fig. 9: the KL-to-base curve of the safe-mask run tracks dense")
    t = _masked_final(table)
    per, why = _per_seed_masks(t, claim, ("safe", "dense"), col="final_kl")
    if per is None:
        return claim.verdict("inconclusive", why, {})
    if (per["dense"] <= 0).any():
        return claim.verdict("inconclusive", "dense run has no KL to the base on some seed", {})
    effects = {int(s): float(KL_TRACK_RATIO - abs(r["safe"] - r["dense"]) / r["dense"]) for s, r in per.iterrows()}
    v = effect_verdict(claim, effects, min_effect=0.0,
                       what=f"KL margin {KL_TRACK_RATIO:g} - |KL_safe - KL_dense| / KL_dense")
    return replace(v, numbers={**v.numbers, "final_kl_safe": per["safe"].tolist(),
                               "final_kl_dense": per["dense"].tolist()})


def princ_mask_worst(table: pd.DataFrame) -> Verdict:
    """Table 4: RL restricted to M_princ ends with the lowest reward of all masks (dense included)."""
    claim = Claim("princ_mask_worst", "Table 4: updating only the principal mask M_princ is worst")
    t = _masked_final(table)
    per, why = _per_seed_masks(t, claim, ("princ",))
    if per is None:
        return claim.verdict("inconclusive", why, {})
    others = [m for m in per.columns if m != "princ"]
    if not others:
        return claim.verdict("inconclusive", "no mask to compare M_princ with", {})
    effects = {int(s): float(np.nanmin([r[m] - r["princ"] for m in others])) for s, r in per.iterrows()
               if r[others].notna().any()}
    v = effect_verdict(claim, effects, min_effect=0.0, what="reward gap min_m R_m - R_princ")
    return replace(v, numbers={**v.numbers, **{f"final_reward_{m}": per[m].tolist() for m in per.columns}})


def safe_mask_beats_random(table: pd.DataFrame) -> Verdict:
    """Table 5: a random mask of the safe mask's density ends below the safe mask."""
    claim = Claim("safe_mask_beats_random", "Table 5: a random mask of the same density is below the safe mask")
    t = _masked_final(table)
    per, why = _per_seed_masks(t, claim, ("safe", "random"))
    if per is None:
        return claim.verdict("inconclusive", why, {})
    effects = {int(s): float(r["safe"] - r["random"]) for s, r in per.iterrows()}
    v = effect_verdict(claim, effects, min_effect=0.0, what="reward gap R_safe - R_random")
    return replace(v, numbers={**v.numbers, "final_reward_safe": per["safe"].tolist(),
                               "final_reward_random": per["random"].tolist()})


# ----------------------------------------------------------------------------------------------------------------
# Verdicts: LoRA vs PiSSA (pure)


def summarize_adapter_runs(curves: pd.DataFrame, nonfinite: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (method, rank, lr, seed): initial / final reward, final KL and ``collapsed`` (final reward below the
    initial by more than COLLAPSE_MARGIN); ``nonfinite`` runs (columns method, rank, lr, seed) are added as
    collapsed with final reward -1."""
    keys = ["method", "rank", "lr", "seed"]
    fin = final_values(curves, keys) if len(curves) else pd.DataFrame(columns=keys)
    if len(fin):
        fin["nonfinite"] = False
        fin["collapsed"] = fin["final_reward"] < fin["initial_reward"] - COLLAPSE_MARGIN
    if nonfinite is not None and len(nonfinite):
        nf = nonfinite[keys].copy()
        nf["final_reward"], nf["final_kl"], nf["initial_reward"] = -1.0, math.nan, math.nan
        nf["nonfinite"], nf["collapsed"] = True, True
        fin = pd.concat([fin, nf], ignore_index=True) if len(fin) else nf
    return fin


def _adapter_final(table: pd.DataFrame) -> pd.DataFrame:
    return table if "collapsed" in table.columns else summarize_adapter_runs(table)


def pissa_no_better_than_lora(table: pd.DataFrame) -> Verdict:
    """Fig. 10: PiSSA gives no gain over LoRA: per seed, mean over the grid of R_LoRA - R_PiSSA > -NO_GAIN_MARGIN."""
    claim = Claim("pissa_no_better_than_lora",
                  "Fig. 10: PiSSA (principal-initialised adapters) gives no gain over LoRA")
    t = _adapter_final(table)
    require_columns(t, ("method", "rank", "lr", "seed", "final_reward"), claim)
    all_cells = t.groupby(["rank", "lr", "method"])["final_reward"].mean().unstack("method")
    if t["lr"].nunique() > 1:
        t = t[t["lr"] < t["lr"].max()]
    per = t.groupby(["seed", "rank", "lr", "method"])["final_reward"].mean().unstack("method")
    if not {"LoRA", "PiSSA"} <= set(per.columns):
        return claim.verdict("inconclusive", "the table lacks LoRA or PiSSA runs", {})
    per = per.dropna(subset=["LoRA", "PiSSA"])
    if per.empty:
        return claim.verdict("inconclusive", "no (seed, rank, lr) cell has both a LoRA and a PiSSA run", {})
    gap = (per["LoRA"] - per["PiSSA"]).groupby(level="seed").mean()
    effects = {int(s): float(g + NO_GAIN_MARGIN) for s, g in gap.items()}
    v = effect_verdict(claim, effects, min_effect=0.0,
                       what=f"mean grid gap R_LoRA - R_PiSSA + {NO_GAIN_MARGIN:g}")
    cells = {}
    if {"LoRA", "PiSSA"} <= set(all_cells.columns):
        cells = {f"rank={r},lr={lr:g}": float(row["LoRA"] - row["PiSSA"]) for (r, lr), row in all_cells.iterrows()}
    judged = sorted(float(x) for x in t["lr"].unique())
    return replace(v, reason=v.reason + f" (judged at lr {judged})",
                   numbers={**v.numbers, "mean_gap_lora_minus_pissa": gap.tolist(), "lrs_judged": judged,
                            "per_cell_gap_seed_mean": cells})


def pissa_collapses_at_high_lr(table: pd.DataFrame) -> Verdict:
    """Fig. 10: at the highest learning rate PiSSA runs collapse more often than LoRA runs (per seed)."""
    claim = Claim("pissa_collapses_at_high_lr", "Fig. 10: PiSSA collapses at the high learning rate (LoRA does not)")
    t = _adapter_final(table)
    require_columns(t, ("method", "lr", "seed", "collapsed"), claim)
    if t.empty:
        return claim.verdict("inconclusive", "empty table", {})
    hi = float(t["lr"].max())
    h = t[t["lr"] == hi]
    per = h.groupby(["seed", "method"])["collapsed"].mean().unstack("method")
    if not {"LoRA", "PiSSA"} <= set(per.columns):
        return claim.verdict("inconclusive", f"no LoRA and PiSSA runs at the highest lr {hi:g}", {})
    per = per.dropna(subset=["LoRA", "PiSSA"])
    effects = {int(s): float(r["PiSSA"] - r["LoRA"]) for s, r in per.iterrows()}
    v = effect_verdict(claim, effects, min_effect=MIN_COLLAPSE_GAP,
                       what=f"collapse-rate gap PiSSA - LoRA at lr {hi:g}")
    by_lr = t.groupby(["method", "lr"])["collapsed"].mean()
    nums = {**v.numbers, "lr_high": hi, "collapse_rate_pissa": per["PiSSA"].tolist(),
            "collapse_rate_lora": per["LoRA"].tolist(),
            "collapse_rate_by_method_lr": {f"{m}@{lr:g}": float(x) for (m, lr), x in by_lr.items()},
            "collapse_margin": COLLAPSE_MARGIN}
    return replace(v, numbers=nums)


# ----------------------------------------------------------------------------------------------------------------
# Experiments


def masked_runs_experiment(cfg: Mapping) -> ClaimRun:
    """Fig. 9 / Tables 4-5: RL restricted to M_princ, M_princ^c, M_low, the safe mask and a random mask of its
    density, against dense RL; reward and KL-to-base trajectories; verdicts."""
    c = config_from_section(MaskedRunsConfig, cfg, "masked_runs")
    bad = sorted(set(c.masks) - set(MASK_NAMES))
    if bad or not c.masks:
        raise InputError(f"[masked_runs] masks must be a non-empty subset of {list(MASK_NAMES)}, got {c.masks}")
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    results, curves = [], []
    for seed in c.seeds:
        masks = structural_masks(model, k=c.k, alpha=c.alpha, seed=seed, names=tuple(c.masks))
        for name in c.masks:
            mk = dict(masks[name])
            if not c.freeze_other:
                mk.update({n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()
                           if n not in mk})
            run = f"masked-{name}-s{seed}"
            res = train_rlvr_masked(copy.deepcopy(model), _rl_config(c, seed=seed, lr=c.lr, device=device), mk,
                                    run_name=run)
            results.append(res)
            cur = _curve(res)
            common = {"mask": name, "run": run, "seed": seed, "steps": c.rl_steps, "model": "TinyGPT", "lr": c.lr,
                      "density": mask_density(masks[name])}
            curves.extend({**common, **r} for r in cur.to_dict("records"))
    table = pd.DataFrame(curves)
    final = final_values(table, ["seed", "mask"])
    final = final.merge(table.groupby(["seed", "mask"])["density"].first().reset_index(), on=["seed", "mask"])
    verdicts = [safe_mask_tracks_dense(final), safe_mask_kl_tracks_dense(final), princ_mask_worst(final),
                safe_mask_beats_random(final)]
    tables = {"masked_runs": table, "masked_runs_final": final, "verdicts": verdicts_frame(verdicts)}
    return ClaimRun(results, tables, verdicts, asdict(c))


def lora_pissa_experiment(cfg: Mapping) -> ClaimRun:
    """Fig. 10: LoRA vs PiSSA adapters under RL over ranks x learning rates; reward curves, collapse; verdicts."""
    c = config_from_section(LoraPissaConfig, cfg, "lora_pissa")
    bad = sorted(set(c.methods) - set(ADAPTER_METHODS))
    if bad or not c.methods or not c.ranks or not c.lrs:
        raise InputError(f"[lora_pissa] needs methods within {list(ADAPTER_METHODS)} and non-empty ranks and lrs; "
                         f"got {c.methods}, {c.ranks}, {c.lrs}")
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    results, curves, nonfinite = [], [], []
    for seed in c.seeds:
        for lr in c.lrs:
            for rank in c.ranks:
                for method in c.methods:
                    run = f"{method}-r{rank}-lr{lr:g}-s{seed}"
                    m = add_adapters(copy.deepcopy(model), method, int(rank), alpha=c.alpha, seed=seed)
                    common = {"method": method, "rank": int(rank), "lr": lr, "seed": seed}
                    try:
                        res = train_rlvr(m, _rl_config(c, seed=seed, lr=lr, device=device), run_name=run)
                    except NonFiniteError:
                        nonfinite.append(common)
                        continue
                    results.append(res)
                    extra = {"run": run, "steps": c.rl_steps, "model": "TinyGPT",
                             "trainable_params": adapter_parameter_count(m)}
                    curves.extend({**common, **extra, **r} for r in _curve(res).to_dict("records"))
    table = pd.DataFrame(curves)
    final = summarize_adapter_runs(table, pd.DataFrame(nonfinite, columns=["method", "rank", "lr", "seed"]))
    verdicts = [pissa_no_better_than_lora(final), pissa_collapses_at_high_lr(final)]
    tables = {"lora_pissa": table, "lora_pissa_final": final, "verdicts": verdicts_frame(verdicts)}
    return ClaimRun(results, tables, verdicts, asdict(c))

