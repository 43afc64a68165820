"""Two training regimes beside RL and SFT, from the follow-up papers: on-policy distillation, and RLVR with SGD.

Experiment ``opd`` (config section ``[opd]``). "On the Geometry of On-Policy Distillation" (arXiv 2606.07082) puts
OPD between SFT and RLVR: bf16 unchanged fraction SFT 8.1% < OPD 51.6% < RLVR 77.2%, subspace rotation
SFT > 10 deg > OPD ~1 deg > RLVR < 0.5 deg. Per seed, from the cached pretrained TinyGPT rounded to bf16: RL (DAPO),
SFT and OPD (``sims.tinygpt.opd``: the student samples, a larger pretrained TinyGPT teacher's log-probabilities are
the target, reverse KL per token), all with the same number of AdamW updates and learning rate. The teacher is
pretrained (and cached) on the same corpus with ``teacher_d_model`` / ``teacher_layers`` and the pretraining
preset ``teacher_pretrain``. Tables: ``sparsity`` (schema ``sparsity``; method RL / SFT / OPD), ``rotation`` (mean principal angle at
k = ``ROTATION_K`` and NSS per matrix, ``sims.claims.geometry.drift_rows``), ``teacher`` (teacher and base accuracy).

``opd_sparsity_between_sft_and_rl``
    effect per seed = min(s_OPD - s_SFT, s_RL - s_OPD) (bf16 sparsity pooled over the block matrices; positive iff
    OPD lies strictly between), min effect ``MIN_BETWEEN_GAP``. The rotation order (SFT > OPD > RL in mean angle)
    is reported in the numbers, not judged.

Experiment ``sgd_vs_adamw`` (config section ``[sgd_vs_adamw]``). "Do We Need Adam?" (arXiv 2602.07729): RLVR with
SGD matches AdamW and updates < 0.02% of the parameters. Per seed: one AdamW RL run at ``adamw_lr`` and SGD RL runs
at each of ``sgd_lrs`` (``RLConfig.optimizer = "sgd"``), probed every step. The **reward gain** of a run is its
final eval accuracy minus the base's (``GAIN_METRIC``: temperature-1 samples on the same ``n_eval_prompts``
prompts); the SGD run whose gain is closest to AdamW's is the matched one. Tables: ``sparsity`` (per run), ``realized_updates`` (per run and step: the
stored bf16 entries that changed at that step; their sum is the run's realized-update count), ``reward_match``.

``sgd_sparser_than_adamw``
    effect per seed = s_SGD(matched) - s_AdamW (final vs base, pooled), min effect
    ``sims.claims.sparsity.MIN_SPARSITY_GAP``; inconclusive when some seed's matched gains differ by more than
    ``GAIN_MATCH_TOL`` or AdamW's gain is not above ``GAIN_MATCH_TOL`` (nothing learned, or the reward fell: a
    "matched gain" would compare nothing).
    The realized-update counts of both are in the numbers.

Constants (chosen before measuring): ``MIN_BETWEEN_GAP = 0.01``, ``ROTATION_K = 16``, ``GAIN_MATCH_TOL = 0.05``.
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
    run_rl,
    run_sft,
    start_model,
    verdicts_frame,
)
from sims.claims.geometry import drift_rows
from sims.claims.runs import RLRecipe, recipe_rl_config
from sims.claims.sparsity import MIN_SPARSITY_GAP, _sparsity_rows
from sims.tinygpt.model import GPTConfig
from sims.tinygpt.opd import OPDConfig, train_opd
from sims.tinygpt.pretrain import PretrainConfig, evaluate_accuracy, pretrain
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.rlvr import train_rlvr
from sims.tinygpt.tasks import Tokenizer, task_by_name
from theory.errors import InputError

__all__ = ["MIN_BETWEEN_GAP", "ROTATION_K", "GAIN_MATCH_TOL", "OPDExperimentConfig", "SGDConfig",
           "opd_sparsity_between_sft_and_rl", "sgd_sparser_than_adamw", "opd_experiment", "sgd_experiment",
           "realized_update_rows"]

MIN_BETWEEN_GAP = 0.01
ROTATION_K = 16
GAIN_MATCH_TOL = 0.05

OPD_CLAIM = Claim("opd_sparsity_between_sft_and_rl",
                  "Follow-up (OPD papers): on-policy distillation's bf16 update sparsity lies between SFT's and RL's")
SGD_CLAIM = Claim("sgd_sparser_than_adamw",
                  "Follow-up (Do We Need Adam?): RLVR with SGD leaves more bf16 weights unchanged than AdamW at "
                  "matched reward gain")


# ----------------------------------------------------------------------------------------------------------------
# Verdicts (pure)


def _pooled(table: pd.DataFrame) -> pd.DataFrame:
    """Per (seed, method): the bf16 sparsity over all block matrices (rows with matrix_type 'all')."""
    t = table[table["matrix_type"] == "all"] if "matrix_type" in table.columns else table
    return t.groupby(["seed", "method"])["sparsity"].mean().unstack("method")


def opd_sparsity_between_sft_and_rl(sparsity: pd.DataFrame, rotation: pd.DataFrame | None = None) -> Verdict:
    """OPD strictly between SFT and RL in bf16 sparsity, per seed (module docstring). Needs columns seed, method
    (RL / SFT / OPD), sparsity (matrix_type 'all' rows when the column exists); ``rotation`` (columns seed, method,
    mean_angle_deg) only adds numbers."""
    require_columns(sparsity, ("seed", "method", "sparsity"), OPD_CLAIM)
    per = _pooled(sparsity)
    if not {"RL", "SFT", "OPD"} <= set(per.columns):
        return OPD_CLAIM.verdict("inconclusive", "the table lacks RL, SFT or OPD runs", {})
    per = per.dropna(subset=["RL", "SFT", "OPD"])
    if per.empty:
        return OPD_CLAIM.verdict("inconclusive", "no seed has all three runs", {})
    effects = {int(s): float(min(r["OPD"] - r["SFT"], r["RL"] - r["OPD"])) for s, r in per.iterrows()}
    v = effect_verdict(OPD_CLAIM, effects, min_effect=MIN_BETWEEN_GAP,
                       what="min(s_OPD - s_SFT, s_RL - s_OPD) of bf16 sparsity")
    nums: dict[str, Any] = {**v.numbers, **{f"sparsity_{m.lower()}": per[m].tolist() for m in ("SFT", "OPD", "RL")}}
    tail = (f" (sparsity SFT {per['SFT'].mean():.4f}, OPD {per['OPD'].mean():.4f}, RL {per['RL'].mean():.4f}, "
            f"mean of seeds)")
    if rotation is not None and not rotation.empty:
        require_columns(rotation, ("seed", "method", "mean_angle_deg"), OPD_CLAIM)
        ang = rotation.groupby(["seed", "method"])["mean_angle_deg"].mean().unstack("method")
        if {"RL", "SFT", "OPD"} <= set(ang.columns):
            nums.update({f"angle_deg_{m.lower()}": ang[m].tolist() for m in ("SFT", "OPD", "RL")})
            order = ((ang["SFT"] > ang["OPD"]) & (ang["OPD"] > ang["RL"]))
            nums["rotation_order_sft_opd_rl"] = order.tolist()
            tail += (f"; mean principal angle SFT {ang['SFT'].mean():.4g}, OPD {ang['OPD'].mean():.4g}, RL "
                     f"{ang['RL'].mean():.4g} deg (order SFT > OPD > RL on {int(order.sum())} of {len(order)} seeds)")
    return replace(v, numbers=nums, reason=v.reason + tail)


def sgd_sparser_than_adamw(sparsity: pd.DataFrame, match: pd.DataFrame,
                           realized: pd.DataFrame | None = None) -> Verdict:
    """SGD (reward-matched) vs AdamW bf16 sparsity, per seed (module docstring). ``sparsity``: columns run, seed,
    sparsity (matrix_type 'all' rows when the column exists); ``match``: one row per seed with adamw_run, sgd_run,
    adamw_gain, sgd_gain; ``realized`` (run, changed) only adds numbers."""
    require_columns(sparsity, ("run", "seed", "sparsity"), SGD_CLAIM)
    require_columns(match, ("seed", "adamw_run", "sgd_run", "adamw_gain", "sgd_gain"), SGD_CLAIM)
    if match.empty:
        return SGD_CLAIM.verdict("inconclusive", "no seed has an AdamW and an SGD run", {})
    t = sparsity[sparsity["matrix_type"] == "all"] if "matrix_type" in sparsity.columns else sparsity
    s = t.groupby("run")["sparsity"].mean()
    nums: dict[str, Any] = {"seeds_matched": match["seed"].astype(int).tolist(),
                            "adamw_gain": match["adamw_gain"].tolist(), "sgd_gain": match["sgd_gain"].tolist(),
                            "sgd_lr": match["sgd_lr"].tolist() if "sgd_lr" in match.columns else None,
                            "sparsity_adamw": [float(s.get(r, np.nan)) for r in match["adamw_run"]],
                            "sparsity_sgd": [float(s.get(r, np.nan)) for r in match["sgd_run"]]}
    if realized is not None and not realized.empty:
        require_columns(realized, ("run", "changed"), SGD_CLAIM)
        tot = realized.groupby("run")["changed"].sum()
        nums["realized_updates_adamw"] = [int(tot.get(r, 0)) for r in match["adamw_run"]]
        nums["realized_updates_sgd"] = [int(tot.get(r, 0)) for r in match["sgd_run"]]
    gap = (match["sgd_gain"] - match["adamw_gain"]).abs()
    far = match.loc[~(gap <= GAIN_MATCH_TOL), "seed"].astype(int).tolist()
    if far:
        return SGD_CLAIM.verdict("inconclusive", f"no SGD run matches AdamW's reward gain within {GAIN_MATCH_TOL:g} "
                                                 f"on seed(s) {far} (gaps {np.round(gap, 4).tolist()})", nums)
    flat = match.loc[~(match["adamw_gain"] > GAIN_MATCH_TOL), "seed"].astype(int).tolist()
    if flat:
        return SGD_CLAIM.verdict("inconclusive", f"AdamW's reward gain is not above {GAIN_MATCH_TOL:g} on seed(s) {flat} "
                                                 f"({np.round(match['adamw_gain'], 4).tolist()}): nothing was learned "
                                                 f"(or the reward fell), so a 'matched gain' compares nothing", nums)
    effects = {int(r["seed"]): float(s[r["sgd_run"]] - s[r["adamw_run"]]) for _, r in match.iterrows()}
    v = effect_verdict(SGD_CLAIM, effects, min_effect=MIN_SPARSITY_GAP, what="bf16 sparsity SGD - AdamW")
    return replace(v, numbers={**v.numbers, **nums})


# ----------------------------------------------------------------------------------------------------------------
# OPD experiment


@dataclass(frozen=True)
class OPDExperimentConfig(RLRecipe):
    """``[opd]``: per seed RL, SFT and OPD with the same AdamW updates and learning rate (the RL recipe's fields
    first: ``RLRecipe``; OPD uses its steps, prompts, group size and mini-batches too)."""

    sft_batch_size: int = 32
    lr: float = 1e-5
    n_eval_prompts: int = 16
    teacher_d_model: int = 128
    teacher_layers: int = 3
    teacher_pretrain: str = "default"  # the PretrainConfig preset of the teacher ("fast" | "default")
    bf16_checkpoint: bool = True

    @classmethod
    def fast(cls, **kw) -> "OPDExperimentConfig":
        return replace(cls(seeds=(0, 1), rl_steps=2, prompts_per_step=4, group_size=4, sft_batch_size=8,
                           n_eval_prompts=4, teacher_pretrain="fast"), **kw)



def teacher_model(cfg: Mapping, c: OPDExperimentConfig) -> tuple[torch.nn.Module, dict]:
    """The OPD teacher: a larger TinyGPT pretrained on the base's corpus (cached by config hash like the base)."""
    if c.teacher_pretrain not in ("fast", "default"):
        raise InputError(f"[opd] teacher_pretrain must be 'fast' or 'default', got {c.teacher_pretrain!r}")
    preset = getattr(PretrainConfig, c.teacher_pretrain)
    model_cfg = GPTConfig(vocab_size=Tokenizer().vocab_size, max_seq_len=preset().model.max_seq_len,
                          d_model=c.teacher_d_model, n_layer=c.teacher_layers, n_head=4, n_kv_head=2)
    pcfg = preset(model=model_cfg)
    cache = cfg.get("pretrain", {}).get("cache_dir", ".cache/threegate")
    teacher, info = pretrain(pcfg, cache_dir=cache, device=cfg.get("device", "cpu"))
    return teacher.eval(), info


def _opd_run(model, teacher, c: OPDExperimentConfig, seed: int, device: str):
    oc = OPDConfig(task=c.task, steps=c.rl_steps, prompts_per_step=c.prompts_per_step, group_size=c.group_size,
                   minibatches=c.minibatches, lr=c.lr, precision="bf16", seed=seed, device=device,
                   probe=ProbeConfig(steps=(0, c.rl_steps), n_eval_prompts=c.n_eval_prompts, theory_checks=False))
    return train_opd(model, teacher, oc, run_name=f"OPD-s{seed}")


def opd_experiment(cfg: Mapping) -> ClaimRun:
    """Follow-up (OPD): RL, SFT and on-policy distillation from a larger pretrained teacher at matched AdamW updates;
    bf16 sparsity and subspace rotation of each; the 'OPD between SFT and RL' verdict."""
    c = config_from_section(OPDExperimentConfig, cfg, "opd")
    if min(c.teacher_d_model, c.teacher_layers) < 1:
        raise InputError(f"[opd] teacher_d_model and teacher_layers must be positive, got {c.teacher_d_model}, "
                         f"{c.teacher_layers}")
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    teacher, info = teacher_model(cfg, c)
    task = task_by_name(c.task)
    with deterministic():  # greedy accuracy of teacher and (bf16) student base on the same 64 prompts
        acc_teacher = evaluate_accuracy(teacher, [task], n=64, seed=12345)[task.name]
        acc_base = evaluate_accuracy(model, [task], n=64, seed=12345)[task.name]
    results, sp, rot = [], [], []
    for seed in c.seeds:
        kw = dict(seed=seed, lr=c.lr, precision="bf16", device=device)
        runs = (("RL", run_rl(copy.deepcopy(model), c, name=f"RL-s{seed}", **kw)),
                ("SFT", run_sft(copy.deepcopy(model), c, name=f"SFT-s{seed}", **kw)),
                ("OPD", _opd_run(copy.deepcopy(model), teacher, c, seed, device)))
        for method, res in runs:
            results.append(res)
            rows, _ = _sparsity_rows(res, method=method, lr=c.lr, updates=c.updates, storage="bf16")
            sp += rows
            with deterministic():
                d, _, _ = drift_rows(res.snapshots[0], res.snapshots[max(res.snapshots)], (ROTATION_K,),
                                     angle_k=ROTATION_K, run=res.name, method=method, seed=seed, model="TinyGPT")
            rot += d
    tables = {"sparsity": pd.DataFrame(sp), "rotation": pd.DataFrame(rot),
              "teacher": pd.DataFrame([{"task": c.task, "teacher_accuracy": acc_teacher, "base_accuracy": acc_base,
                                        "teacher_d_model": c.teacher_d_model, "teacher_layers": c.teacher_layers,
                                        "teacher_pretrain": c.teacher_pretrain,
                                        "teacher_from_cache": bool(info.get("from_cache"))}])}
    verdicts = [opd_sparsity_between_sft_and_rl(tables["sparsity"], tables["rotation"])]
    tables["verdicts"] = verdicts_frame(verdicts)
    return ClaimRun(results, tables, verdicts, asdict(c))


# ----------------------------------------------------------------------------------------------------------------
# SGD vs AdamW experiment


@dataclass(frozen=True)
class SGDConfig(RLRecipe):
    """``[sgd_vs_adamw]``: per seed an AdamW RL run and SGD RL runs over a learning-rate grid, probed every step
    (the RL recipe's fields first: ``RLRecipe``)."""

    adamw_lr: float = 3e-4
    sgd_lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    n_eval_prompts: int = 64
    bf16_checkpoint: bool = True

    @classmethod
    def fast(cls, **kw) -> "SGDConfig":
        return replace(cls(seeds=(0, 1), rl_steps=2, prompts_per_step=4, group_size=4, sgd_lrs=(0.1, 1.0),
                           n_eval_prompts=4), **kw)



def realized_update_rows(res) -> list[dict]:
    """Per step t >= 1 of ``res`` (probed every step): the stored bf16 block-matrix entries that changed from
    step t - 1 to t (``changed``) and the total entries."""
    steps = sorted(res.snapshots)
    if steps != list(range(steps[-1] + 1)):
        raise InputError(f"run {res.name}: realized updates need a snapshot at every step, got {steps[:5]}...")
    rows = []
    for t in steps[1:]:
        a, b = res.snapshots[t - 1], res.snapshots[t]
        idx = block_matrix_index(a)
        ch = sum(int(torch.count_nonzero(a[n].float() != b[n].float())) for n in idx)
        rows.append({"run": res.name, "step": t, "changed": ch, "total": sum(a[n].numel() for n in idx)})
    return rows


#: The probe metric whose change from step 0 is a run's reward gain: the accuracy of temperature-1 samples on the
#: fixed eval prompts (the expected reward RL optimizes; greedy accuracy of the default base is already high).
GAIN_METRIC = "accuracy_sampled"


def _eval_accuracy(res, step: int) -> float:
    m = res.metrics
    row = m[(m["metric"] == GAIN_METRIC) & (m["step"] == step)]
    if row.empty:
        raise InputError(f"run {res.name}: no {GAIN_METRIC} probed at step {step}")
    return float(row["value"].iloc[0])


def sgd_experiment(cfg: Mapping) -> ClaimRun:
    """Follow-up (Do We Need Adam?): RLVR with AdamW vs SGD over a learning-rate grid, the SGD run matched on reward
    gain; bf16 sparsity and realized-update counts; the 'SGD sparser than AdamW' verdict."""
    c = config_from_section(SGDConfig, cfg, "sgd_vs_adamw")
    if not c.sgd_lrs or not all(lr > 0 for lr in c.sgd_lrs) or not c.adamw_lr > 0:
        raise InputError(f"[sgd_vs_adamw] learning rates must be positive, got adamw_lr={c.adamw_lr}, "
                         f"sgd_lrs={c.sgd_lrs}")
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    probe = ProbeConfig(steps=tuple(range(c.rl_steps + 1)), n_eval_prompts=c.n_eval_prompts, theory_checks=False)
    results, sp, realized, match = [], [], [], []
    for seed in c.seeds:
        runs = []
        for opt, lr in [("adamw", c.adamw_lr)] + [("sgd", lr) for lr in c.sgd_lrs]:
            rc = recipe_rl_config(c, seed=seed, device=device, probe=probe, lr=lr, optimizer=opt)
            res = train_rlvr(copy.deepcopy(model), rc, run_name=f"{opt}-lr{lr:g}-s{seed}")
            results.append(res)
            rows, _ = _sparsity_rows(res, method="RL", lr=lr, updates=c.updates, storage="bf16")
            sp += [{**r, "optimizer": opt} for r in rows]
            realized += [{**r, "optimizer": opt, "lr": lr, "seed": seed} for r in realized_update_rows(res)]
            gain = _eval_accuracy(res, c.rl_steps) - _eval_accuracy(res, 0)
            runs.append((opt, lr, res.name, gain))
        (_, _, a_run, a_gain), sgd = runs[0], runs[1:]
        _, s_lr, s_run, s_gain = min(sgd, key=lambda r: (round(abs(r[3] - a_gain), 12), r[1]))
        match.append({"seed": seed, "adamw_run": a_run, "adamw_lr": c.adamw_lr, "adamw_gain": a_gain,
                      "sgd_run": s_run, "sgd_lr": s_lr, "sgd_gain": s_gain, "gain_gap": abs(s_gain - a_gain),
                      "sgd_gains": {str(lr): g for _, lr, _, g in sgd}})
    tables = {"sparsity": pd.DataFrame(sp), "realized_updates": pd.DataFrame(realized),
              "reward_match": pd.DataFrame(match).assign(sgd_gains=lambda d: d["sgd_gains"].astype(str))}
    verdicts = [sgd_sparser_than_adamw(tables["sparsity"], tables["reward_match"], tables["realized_updates"])]
    tables["verdicts"] = verdicts_frame(verdicts)
    return ClaimRun(results, tables, verdicts, asdict(c))
