"""Table 1, Sec. 2.3 and Cor. 3.6 at small scale: bf16 update sparsity of RL vs SFT, its learning-rate dependence,
and the exact rule that predicts which stored bf16 entries a step changes.

Verdicts follow the seed rule of ``sims.claims.base``. Claims judged here:

``sparsity_rl_gt_sft`` (Table 1)
    bf16 update sparsity of RL exceeds SFT's, compared **at a matched number of optimizer updates** (an RL step
    makes ``minibatches`` AdamW updates; SFT one per step) and the same learning rate. Effect per seed:
    sparsity_RL - sparsity_SFT, min effect ``MIN_SPARSITY_GAP``.
``sparsity_vanishes_at_high_lr`` (Sec. 2.3)
    raising the learning rate makes the bf16 sparsity largely disappear. Effect per seed: the vanished fraction
    1 - s(lr_max) / s(lr_min), min effect ``VANISH_FRACTION`` ("largely" = more than that fraction gone);
    inconclusive when s(lr_min) < ``MIN_BASE_SPARSITY`` (nothing there to vanish).
``mask_predictor`` (Cor. 3.6, exact form; Gate III)
    a step's fp32 master update predicts exactly which stored bf16 entries change. Exact counts, no noise: the
    exact rule (``theory.precision.predict_change_mask``, ``"fp32"`` semantics, w = the stored value, delta = the
    master's step) is reproduced iff it has no false positive and no false negative over all recorded steps.

Experiments (``threegate run sparsity`` / ``threegate run mask_predictor``; config sections ``[sparsity]`` and
``[mask_predictor]``, with ``preset = "fast"`` (seconds, for tests) or ``"default"`` (minutes)):

``sparsity``
    per seed: RL and SFT from the cached pretrained model with the same number of AdamW updates and learning rate,
    in ``bf16`` precision (stored bf16 copy of an fp32 master) and ``fp32`` precision (no rounding anywhere); an
    RL learning-rate sweep in bf16. Tables: ``sparsity`` (schema ``sparsity``: per run and matrix type, with the
    ``storage`` compared: ``bf16``, ``fp32`` bits, or the fp32 run's weights rounded to ``bf16``),
    ``layer_sparsity`` (per layer and matrix type), ``lr_sweep``, ``probe_errors`` (the Def 2.1 probe and the
    fixed absolute tolerance 1e-5 against bit equality of the stored values: false positives / negatives) and
    ``verdicts``.
``mask_predictor``
    RL (and SFT) in bf16 precision with every AdamW step recorded through torch's global optimizer hooks: the fp32
    master before and after, the stored bf16 copy before and after (read from the model, which computes with it).
    Predictors of "the stored value changes": the exact rule (both semantics), the rule of thumb |delta| > |w|/256
    and the paper's |delta| >= ULP(w)/2; each fed the step's master update (``form = "per_step"``) and the master's
    whole offset from the stored value after the step (``form = "accumulated"``, master_after - stored_before), over
    every entry (``scope = "all"``) and over entries whose master sat on the bf16 grid before the step
    (``scope = "master_on_grid"``). Table ``mask_predictor``: tp / fp / fn / tn, precision and recall.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sims.claims.base import (
    Claim,
    ClaimRun,
    Verdict,
    block_matrix_index,
    config_from_section,
    effect_verdict,
    only_rows,
    require_columns,
    run_rl,
    run_sft,
    start_model,
    verdicts_frame,
)
from sims.claims.runs import RLRecipe
from sims.tables import pooled_sparsity
from theory.errors import InputError
from theory.metrics import abs_tol_unchanged
from theory.naming import matrix_type
from theory.precision import half_ulp_mask, predict_change_mask, probe_unchanged, rule_of_thumb_mask

__all__ = [
    "MIN_SPARSITY_GAP", "VANISH_FRACTION", "MIN_BASE_SPARSITY", "ABS_TOL", "SPARSITY_RL_GT_SFT",
    "SPARSITY_VANISHES_AT_HIGH_LR", "MASK_PREDICTOR", "sparsity_rl_gt_sft", "sparsity_vanishes_at_high_lr",
    "mask_predictor", "SparsityConfig", "MaskPredictorConfig", "sparsity_experiment", "PREDICTORS", "StepRecorder",
    "mask_predictor_experiment",
]

#: Table 1: the smallest sparsity difference RL - SFT (absolute, in [0, 1]) that counts as "RL is sparser".
MIN_SPARSITY_GAP = 0.05
#: Sec. 2.3: "largely disappears" = more than this fraction of the low-lr sparsity is gone at the highest lr.
VANISH_FRACTION = 0.5
#: Sec. 2.3: below this sparsity at the smallest lr there is nothing to vanish (inconclusive).
MIN_BASE_SPARSITY = 0.05
#: App. E.1's fixed absolute tolerance, compared with bit equality in ``probe_errors``.
ABS_TOL = 1e-5

SPARSITY_RL_GT_SFT = Claim("sparsity_rl_gt_sft", "Table 1: bf16 update sparsity RL > SFT (matched optimizer updates)")
SPARSITY_VANISHES_AT_HIGH_LR = Claim("sparsity_vanishes_at_high_lr",
                                     "Sec. 2.3: bf16 update sparsity largely vanishes at high learning rate")
MASK_PREDICTOR = Claim("mask_predictor", "Cor 3.6 (exact rule): a step's fp32 master update predicts which stored "
                                         "bf16 entries change")


# ----------------------------------------------------------------------------------------------------------------
# Verdicts (pure)


def sparsity_rl_gt_sft(table: pd.DataFrame) -> Verdict:
    """Table 1: bf16 sparsity RL > SFT at matched optimizer-update counts (and learning rate, when given).

    Needs columns method ('RL' / 'SFT'), sparsity, seed, updates; uses rows with matrix_type 'all' and storage
    'bf16' when those columns exist. Per seed, the largest update count (and lr) both methods share is compared.
    """
    claim = SPARSITY_RL_GT_SFT
    require_columns(table, ("method", "sparsity", "seed", "updates"), claim)
    t = only_rows(table, matrix_type="all", storage="bf16")
    keys = ["seed", "updates"] + (["lr"] if "lr" in t.columns else [])
    per = t.groupby(keys + ["method"])["sparsity"].mean().unstack("method")
    if not {"RL", "SFT"} <= set(per.columns):
        return claim.verdict("inconclusive", "the table lacks RL or SFT rows", {})
    per = per.dropna(subset=["RL", "SFT"])
    if per.empty:
        return claim.verdict("inconclusive", "no RL and SFT runs share a seed and an optimizer-update count", {})
    per = per.reset_index().sort_values("updates").groupby("seed").tail(1)
    effects = {int(r["seed"]): float(r["RL"] - r["SFT"]) for _, r in per.iterrows()}
    v = effect_verdict(claim, effects, min_effect=MIN_SPARSITY_GAP, what="sparsity gap RL - SFT")
    nums = {**v.numbers, "updates": per["updates"].astype(int).tolist(), "rl": per["RL"].tolist(),
            "sft": per["SFT"].tolist()}
    return replace(v, reason=v.reason + f" (at {sorted(set(nums['updates']))} AdamW updates per run)", numbers=nums)


def sparsity_vanishes_at_high_lr(table: pd.DataFrame) -> Verdict:
    """Sec. 2.3: the bf16 sparsity largely disappears at the highest learning rate of the sweep.

    Needs columns lr, sparsity, seed; uses rows with matrix_type 'all', storage 'bf16' and method 'RL' when those
    columns exist. Per seed: vanished fraction 1 - s(lr_max) / s(lr_min).
    """
    claim = SPARSITY_VANISHES_AT_HIGH_LR
    require_columns(table, ("lr", "sparsity", "seed"), claim)
    t = only_rows(table, matrix_type="all", storage="bf16")
    if "method" in t.columns and (t["method"] == "RL").any():
        t = t[t["method"] == "RL"]
    per = t.groupby(["seed", "lr"])["sparsity"].mean().unstack("lr")
    if per.shape[1] < 2:
        return claim.verdict("inconclusive", "fewer than two learning rates in the sweep", {})
    lo, hi = min(per.columns), max(per.columns)
    per = per.dropna(subset=[lo, hi])
    s_lo, s_hi = per[lo], per[hi]
    nums = {"lr_min": float(lo), "lr_max": float(hi), "sparsity_lr_min": s_lo.tolist(),
            "sparsity_lr_max": s_hi.tolist()}
    if per.empty:
        return claim.verdict("inconclusive", "no seed has both the smallest and the largest learning rate", nums)
    if (s_lo < MIN_BASE_SPARSITY).any():
        return claim.verdict("inconclusive",
                             f"sparsity at the smallest lr {lo:g} is already below {MIN_BASE_SPARSITY:g} on some seed "
                             f"({np.round(s_lo.to_numpy(), 4).tolist()}): nothing to vanish", nums)
    effects = {int(s): float(1 - s_hi[s] / s_lo[s]) for s in per.index}
    v = effect_verdict(claim, effects, min_effect=VANISH_FRACTION,
                       what=f"vanished fraction 1 - s(lr={hi:g}) / s(lr={lo:g})")
    return replace(v, numbers={**v.numbers, **nums})


def _precision_recall(tp: int, fp: int, fn: int) -> tuple[float, float]:
    prec = tp / (tp + fp) if tp + fp else math.nan
    rec = tp / (tp + fn) if tp + fn else math.nan
    return prec, rec


def mask_predictor(table: pd.DataFrame) -> Verdict:
    """Cor. 3.6 (exact form): the exact rule on each step's fp32 master update predicts the stored bf16 change.

    Needs columns predictor, form, tp, fp, fn, tn; uses rows with matrix_type 'all', scope 'all' and (for the
    exact rule) semantics 'fp32' when those columns exist. Counts are summed over seeds and runs (exact, no noise).
    """
    claim = MASK_PREDICTOR
    require_columns(table, ("predictor", "form", "tp", "fp", "fn", "tn"), claim)
    t = only_rows(table, matrix_type="all", scope="all")

    def totals(predictor: str, form: str, semantics: str | None = None) -> tuple[int, int, int, int] | None:
        rows = t[(t["predictor"] == predictor) & (t["form"] == form)]
        if semantics is not None:
            rows = only_rows(rows, semantics=semantics)
        if rows.empty:
            return None
        return tuple(int(rows[c].sum()) for c in ("tp", "fp", "fn", "tn"))

    nums = {}
    for pred, sem in (("exact", "fp32"), ("exact", "exact"), ("rule_of_thumb", None), ("half_ulp", None)):
        for form in ("per_step", "accumulated"):
            c = totals(pred, form, sem)
            if c is not None:
                p, r = _precision_recall(c[0], c[1], c[2])
                key = pred + (f"[{sem}]" if sem else "") + f"/{form}"
                nums[key] = {"tp": c[0], "fp": c[1], "fn": c[2], "tn": c[3], "precision": p, "recall": r}
    main = nums.get("exact[fp32]/per_step")
    if main is None:
        return claim.verdict("inconclusive", "no rows for the exact rule (fp32 semantics) on per-step updates", nums)
    if main["tp"] + main["fn"] == 0:
        return claim.verdict("inconclusive", "no stored bf16 entry changed in the recorded steps", nums)
    if main["fp"] == 0 and main["fn"] == 0:
        return claim.verdict("reproduced",
                             f"precision = recall = 1 over {main['tp'] + main['tn']} entry-steps ({main['tp']} changes)",
                             nums)
    acc = nums.get("exact[fp32]/accumulated")
    why = ""
    if acc is not None and acc["fp"] == 0 and acc["fn"] == 0:
        why = ("; fed the master's whole offset from the stored value (master_after - stored_before) the same rule "
               "is exact (precision = recall = 1), so the misses come from the fp32 master's sub-ULP residual, "
               "which a single step's update does not see")
    if "scope" in table.columns:
        g = only_rows(table[(table["scope"] == "master_on_grid") & (table["predictor"] == "exact")
                        & (table["form"] == "per_step")], matrix_type="all", semantics="fp32")
        tp, fp, fn = (int(g[k].sum()) for k in ("tp", "fp", "fn"))
        nums["exact[fp32]/per_step/master_on_grid"] = {"tp": tp, "fp": fp, "fn": fn, "tn": int(g["tn"].sum())}
        if tp + fn and fp == 0 and fn == 0:
            why += (f"; on the entries whose master sat on the bf16 grid before the step the per-step rule is exact "
                    f"({tp} changes, no error)")
    return claim.verdict("not reproduced",
                         f"precision {main['precision']:.4f}, recall {main['recall']:.4f} ({main['fp']} false positives, "
                         f"{main['fn']} false negatives over {sum(main[k] for k in ('tp', 'fp', 'fn', 'tn'))} "
                         f"entry-steps){why}", nums)


# ----------------------------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class SparsityConfig(RLRecipe):
    """``[sparsity]``: RL vs SFT at matched AdamW-update counts (``rl_steps * minibatches`` each), an RL lr sweep
    (the RL recipe's fields first: ``RLRecipe``)."""

    sft_batch_size: int = 32
    lr: float = 1e-5  # RL and SFT of the matched comparison
    lrs: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3)  # RL sweep (bf16)
    fp32_runs: bool = True  # RL and SFT again in pure fp32 (storage comparison)
    n_eval_prompts: int = 16
    bf16_checkpoint: bool = True  # start from the base rounded to bf16 (the paper's checkpoints are bf16)

    @classmethod
    def fast(cls, **kw) -> "SparsityConfig":
        return replace(cls(seeds=(0, 1), rl_steps=2, prompts_per_step=4, group_size=4, sft_batch_size=8,
                           lrs=(1e-5, 1e-3), n_eval_prompts=4), **kw)


@dataclass(frozen=True)
class MaskPredictorConfig:
    """``[mask_predictor]``: bf16 runs with every AdamW step recorded."""

    seeds: tuple[int, ...] = (0, 1)
    task: str = "counting"
    methods: tuple[str, ...] = ("RL", "SFT")
    algorithm: str = "dapo"
    rl_steps: int = 10
    minibatches: int = 2
    prompts_per_step: int = 8
    group_size: int = 8
    sft_batch_size: int = 32
    lr: float = 1e-5
    n_eval_prompts: int = 8
    bf16_checkpoint: bool = True  # start from the base rounded to bf16: the fp32 master starts on the bf16 grid

    @classmethod
    def fast(cls, **kw) -> "MaskPredictorConfig":
        return replace(cls(seeds=(0,), methods=("RL",), rl_steps=2, prompts_per_step=4, group_size=4,
                           n_eval_prompts=4), **kw)

    @classmethod
    def default(cls, **kw) -> "MaskPredictorConfig":
        return replace(cls(), **kw)


# ----------------------------------------------------------------------------------------------------------------
# Experiment: sparsity (Table 1, Sec. 2.3, App. E.1)


def _changed(a: torch.Tensor, b: torch.Tensor) -> int:
    """Entries whose stored value differs (float comparison: +0 == -0; inputs are finite)."""
    return int(torch.count_nonzero(a.float() != b.float()))


def _sparsity_rows(res, *, method: str, lr: float, updates: int, storage: str) -> tuple[list[dict], list[dict]]:
    """Per matrix type ('all' pooled) and per (layer, matrix type) sparsity of run ``res``, final vs step 0."""
    base, final = res.snapshots[0], res.snapshots[max(res.snapshots)]
    if storage == "fp32 rounded to bf16":
        base = {n: v.to(torch.bfloat16) for n, v in base.items()}
        final = {n: v.to(torch.bfloat16) for n, v in final.items()}
    common = {"run": res.name, "method": method, "precision": res.config["precision"], "storage": storage,
              "lr": lr, "updates": updates, "seed": res.config["seed"], "steps": res.config["steps"],
              "model": "TinyGPT"}
    counts, layer_rows = [], []
    for name, (layer, mt) in block_matrix_index(base).items():
        ch, n = _changed(base[name], final[name]), base[name].numel()
        layer_rows.append({**common, "layer": layer, "matrix_type": mt, "sparsity": 1 - ch / n, "changed": ch,
                           "total": n})
        counts.append((mt, ch, n))
    return [{**common, **row} for row in pooled_sparsity(counts)], layer_rows


def _probe_error_rows(res, base_master: Mapping[str, torch.Tensor], *, method: str, lr: float) -> list[dict]:
    """Def 2.1 (eta = 1e-3) and |dw| <= ABS_TOL against bit equality of the stored bf16 values, block matrices."""
    base, final = res.snapshots[0], res.snapshots[max(res.snapshots)]
    acc: dict[tuple[str, str], np.ndarray] = {}
    for name in block_matrix_index(base):
        truth = (base[name].float() != final[name].float()).numpy()
        said = {
            ("def2.1 eta=1e-3", "stored bf16"): ~probe_unchanged(base[name], final[name], 1e-3),
            (f"abs tol {ABS_TOL:g}", "stored bf16"): ~abs_tol_unchanged(base[name], final[name], ABS_TOL),
            (f"abs tol {ABS_TOL:g}", "fp32 master"): ~abs_tol_unchanged(base_master[name], res.master[name], ABS_TOL),
        }
        for key, pred in said.items():
            c = np.array([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum(), truth.size])
            acc[key] = acc.get(key, 0) + c
    return [{"run": res.name, "method": method, "lr": lr, "seed": res.config["seed"], "probe": probe,
             "values": values, "changed_probe": int(tp + fp), "changed_true": int(tp + fn),
             "false_positive": int(fp), "false_negative": int(fn), "total": int(n)}
            for (probe, values), (tp, fp, fn, n) in acc.items()]


def sparsity_experiment(cfg: Mapping) -> ClaimRun:
    """Table 1 + Sec. 2.3 at our scale: RL vs SFT at matched updates, bf16 vs fp32 storage, an RL lr sweep, the
    Def 2.1 probe and a fixed 1e-5 tolerance against bit equality; verdicts on both sparsity claims."""
    c = config_from_section(SparsityConfig, cfg, "sparsity")
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    base_master = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()}
    results, sp, layer, sweep, probes = [], [], [], [], []

    def record(res, method: str, lr: float, storages: tuple[str, ...]) -> None:
        results.append(res)
        for storage in storages:
            rows, lrows = _sparsity_rows(res, method=method, lr=lr, updates=c.updates, storage=storage)
            sp.extend(rows)
            layer.extend(lrows)
        if res.config["precision"] == "bf16":
            probes.extend(_probe_error_rows(res, base_master, method=method, lr=lr))

    for seed in c.seeds:
        kw = dict(seed=seed, device=device)
        rl = run_rl(copy.deepcopy(model), c, lr=c.lr, precision="bf16", name=f"RL-bf16-s{seed}", **kw)
        record(rl, "RL", c.lr, ("bf16",))
        record(run_sft(copy.deepcopy(model), c, lr=c.lr, precision="bf16", name=f"SFT-bf16-s{seed}", **kw),
               "SFT", c.lr, ("bf16",))
        if c.fp32_runs:
            for method, train in (("RL", run_rl), ("SFT", run_sft)):
                res = train(copy.deepcopy(model), c, lr=c.lr, precision="fp32", name=f"{method}-fp32-s{seed}", **kw)
                record(res, method, c.lr, ("fp32", "fp32 rounded to bf16"))
        for lr in c.lrs:
            res = rl if lr == c.lr else run_rl(copy.deepcopy(model), c, lr=lr, precision="bf16",
                                                 name=f"RL-bf16-lr{lr:g}-s{seed}", **kw)
            if res is not rl:
                results.append(res)
            rows, _ = _sparsity_rows(res, method="RL", lr=lr, updates=c.updates, storage="bf16")
            acc = float(res.history["accuracy"].tail(max(1, c.rl_steps // 4)).mean())
            sweep.extend({**r, "final_accuracy": acc} for r in rows if r["matrix_type"] == "all")
    tables = {"sparsity": pd.DataFrame(sp), "layer_sparsity": pd.DataFrame(layer), "lr_sweep": pd.DataFrame(sweep),
              "probe_errors": pd.DataFrame(probes)}
    verdicts = [sparsity_rl_gt_sft(tables["sparsity"]), sparsity_vanishes_at_high_lr(tables["lr_sweep"])]
    tables["verdicts"] = verdicts_frame(verdicts)
    return ClaimRun(results, tables, verdicts, asdict(c))


# ----------------------------------------------------------------------------------------------------------------
# Experiment: mask_predictor (Cor. 3.6 on every real AdamW step)

#: (predictor, semantics) pairs evaluated on every recorded step; semantics '' = the predictor has none.
PREDICTORS = (("exact", "fp32"), ("exact", "exact"), ("rule_of_thumb", ""), ("half_ulp", ""))


def _predict(predictor: str, semantics: str, w: torch.Tensor, delta: np.ndarray) -> np.ndarray:
    if predictor == "exact":
        return predict_change_mask(w, delta, semantics)
    return rule_of_thumb_mask(w, delta) if predictor == "rule_of_thumb" else half_ulp_mask(w, delta)


class StepRecorder:
    """Counts, on every AdamW step of ``model``'s mixed-precision optimizer, how each predictor's "the stored bf16
    value changes" compares with the real change of the stored copy the model computes with.

    Installed as torch's global optimizer step hooks (``with recorder:``); only the first optimizer that steps on
    parameters of ``model``'s shapes is followed. The stored value *after* a step is read from the model at the next
    step's pre-hook (``MixedPrecisionAdamW`` syncs it after the torch step) and, for the last step, on exit.
    ``storage_mismatch`` counts entries where that stored value is not bf16(master) (0 unless storage is broken).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.types = {n: matrix_type(n) for n in self.names}
        self.counts: dict[tuple[str, str, str, str, str], np.ndarray] = {}
        self.optimizer = None
        self.steps = 0
        self.storage_mismatch = 0
        self.master_on_grid = 0
        self.entries = 0
        self._pending: dict | None = None
        self._handles: list = []

    def _stored(self) -> list[torch.Tensor]:
        return [p.detach().to("cpu", torch.bfloat16, copy=True) for p in self.model.parameters()]

    def _masters(self, optimizer) -> list[torch.Tensor]:
        return [p.detach().to("cpu", copy=True) for g in optimizer.param_groups for p in g["params"]]

    def _pre(self, optimizer, args, kwargs) -> None:
        if self.optimizer is None:
            ps = [p for g in optimizer.param_groups for p in g["params"]]
            if [tuple(p.shape) for p in ps] != [tuple(p.shape) for p in self.model.parameters()]:
                return
            self.optimizer = optimizer
        if optimizer is not self.optimizer:
            return
        stored = self._stored()
        self._finish(stored)
        self._pending = {"stored": stored, "master_before": self._masters(optimizer)}

    def _post(self, optimizer, args, kwargs) -> None:
        if optimizer is self.optimizer and self._pending is not None:
            self._pending["master_after"] = self._masters(optimizer)

    def _finish(self, stored_after: list[torch.Tensor]) -> None:
        p, self._pending = self._pending, None
        if p is None or "master_after" not in p:
            return
        self.steps += 1
        for name, w, s1, m0, m1 in zip(self.names, p["stored"], stored_after, p["master_before"], p["master_after"]):
            truth = (s1.float() != w.float()).numpy().ravel()
            self.storage_mismatch += int(torch.count_nonzero(m1.to(torch.bfloat16).float() != s1.float()))
            on_grid = (m0 == w.float()).numpy().ravel()
            self.master_on_grid += int(on_grid.sum())
            self.entries += truth.size
            deltas = {"per_step": (m1.double() - m0.double()).numpy(),
                      "accumulated": (m1.double() - w.double()).numpy()}
            for form, d in deltas.items():
                for pred, sem in PREDICTORS:
                    said = _predict(pred, sem, w, d).ravel()
                    for scope, sel in (("all", slice(None)), ("master_on_grid", on_grid)):
                        t, s = truth[sel], said[sel]
                        c = np.array([(s & t).sum(), (s & ~t).sum(), (~s & t).sum(), (~s & ~t).sum()], np.int64)
                        for mt in {self.types[name], "all"}:
                            key = (form, pred, sem, scope, mt)
                            self.counts[key] = self.counts.get(key, 0) + c

    def __enter__(self) -> "StepRecorder":
        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc[0] is None:
            self._finish(self._stored())

    def rows(self, **extra) -> list[dict]:
        out = []
        for (form, pred, sem, scope, mt), (tp, fp, fn, tn) in sorted(self.counts.items()):
            prec, rec = _precision_recall(int(tp), int(fp), int(fn))
            out.append({**extra, "form": form, "predictor": pred, "semantics": sem, "scope": scope,
                        "matrix_type": mt, "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
                        "precision": prec, "recall": rec, "optimizer_steps": self.steps,
                        "storage_mismatch": self.storage_mismatch,
                        "master_on_grid_fraction": self.master_on_grid / max(self.entries, 1)})
        return out


def mask_predictor_experiment(cfg: Mapping) -> ClaimRun:
    """Cor. 3.6 on real steps: predict from each AdamW step's fp32 master update which stored bf16 entries
    change (exact rule, rule of thumb, half ULP); precision / recall against the stored copy; a verdict."""
    c = config_from_section(MaskPredictorConfig, cfg, "mask_predictor")
    bad = sorted(set(c.methods) - {"RL", "SFT"})
    if bad or not c.methods:
        raise InputError(f"[mask_predictor] methods must be a non-empty subset of ['RL', 'SFT'], got {c.methods}")
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    results, rows = [], []
    for seed in c.seeds:
        for method in c.methods:
            m = copy.deepcopy(model)
            train = run_rl if method == "RL" else run_sft
            with StepRecorder(m) as rec:
                res = train(m, c, seed=seed, lr=c.lr, precision="bf16", device=device, name=f"{method}-s{seed}")
            if rec.steps == 0:
                raise InputError(f"mask_predictor: no optimizer step of run {res.name} was recorded")
            results.append(res)
            rows.extend(rec.rows(run=res.name, method=method, seed=seed, lr=c.lr))
    table = pd.DataFrame(rows)
    verdicts = [mask_predictor(table)]
    return ClaimRun(results, {"mask_predictor": table, "verdicts": verdicts_frame(verdicts)}, verdicts, asdict(c))
