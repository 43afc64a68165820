"""Named experiments on the small transformer and ``threegate run NAME --config FILE [--out DIR]``.

An experiment pretrains (or loads from the cache) the base model, runs RLVR and/or SFT from it with probes, and
writes into ``--out`` (default ``runs/NAME-<config hash>``):

* ``checks.{csv,parquet}`` — theory checks on the real steps (schema ``checks`` of ``paper_figs.schemas``; one row
  per (run, step, matrix, reference, result_id); ``fisher_estimator`` names the Fisher used by Prop 3.2 / Eq 7);
* ``metrics.{csv,parquet}`` — tidy probe metrics (run, kind, step, matrix, metric, value);
* ``history.{csv,parquet}`` — per-step training statistics;
* ``sparsity.{csv,parquet}`` — Table 1 at our scale: bf16 update sparsity of the final stored weights against the
  base, per run and matrix type (``all`` pools every block matrix);
* ``spectrum`` / ``angles`` — Fig. 4 at our scale (singular values and top-k principal angles, final vs base);
* ``kl_beta0`` — Fig. 15: token-wise KL to the base over the probed steps of clip-only (beta = 0) RL runs;
* ``clip_eps`` — Lemma F.9 per RL step: clip width eps, fraction of token ratios outside [1 - eps, 1 + eps]
  after the step, the batch KL estimates (k1, k3, the second-order ``small_step``) and the bound
  E[T] max(-log(1-eps), log(1+eps)) (experiment ``clip_eps`` sweeps eps from one checkpoint);
* ``config.json`` (the resolved configuration, seed included), ``run.json`` (seed, wall times, versions) and the
  stored-weight snapshots (safetensors) under ``snapshots/``.

Every experiment ``threegate run`` knows is in ``EXPERIMENTS`` (this module is the only place that lists them):
the TinyGPT runs above, the claim experiments of ``sims.claims`` (``CLAIM_EXPERIMENTS``: each also writes its own
tables and ``verdicts.json``) and ``hf_rlvr`` / ``hf_sft`` on a real Hugging Face model (``sims.hf.backend``).

Config files are TOML or JSON::

    seed = 0                       # optional: overrides the seed of every run
    device = "cpu"                 # optional: overrides every run's device
    [pretrain]
    preset = "default"             # "fast" | "default"; other keys override PretrainConfig fields
    [rlvr]                         # RLConfig fields
    task = "counting"
    steps = 30
    [rlvr.probe]                   # ProbeConfig fields
    steps = [0, 10, 20, 30]
    [sft]                          # SFTConfig fields
    [clip_eps]                     # experiment clip_eps only
    eps = [0.05, 0.1, 0.2, 0.4]    # eps_low of each DAPO run; eps_high = high_over_low * eps_low
    high_over_low = 1.4

The probed steps always include 0 and the last step (the sparsity / spectrum tables compare those two).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import torch

from sims.claims import consistency, curvature, geometry, interventions, off_principal, peft, regimes, sparsity
from sims.claims.base import ClaimRun, print_verdicts, verdicts_frame, verdicts_json, write_claim_run
from sims.experiments.config import experiment_hash, load_config, section_config
from sims.experiments.pretrained import base_model
from sims.hf.backend import run_hf_rlvr, run_hf_sft
from sims.hf.curvature import hf_curvature_table
from sims.tables import concat_tables, summary_tables, write_tables
from sims.tinygpt.probe import ProbeConfig, RunResult
from sims.tinygpt.rlvr import RLConfig, train_rlvr
from sims.tinygpt.sft import SFTConfig, train_sft
from sims.tinygpt.storage import save_snapshot
from theory.errors import InputError

__all__ = ["Experiment", "EXPERIMENTS", "CLAIM_EXPERIMENTS", "load_config", "experiment_hash", "section_config",
           "run_experiment", "run_claims", "add_arguments", "run"]


# ----------------------------------------------------------------------------------------------------------------
# Configuration of the TinyGPT runs


def _with_endpoints(probe: ProbeConfig, steps: int) -> ProbeConfig:
    return replace(probe, steps=tuple(sorted(set(probe.steps) | {0, steps})))


def _rl_config(cfg: Mapping) -> RLConfig:
    rc = section_config(RLConfig, cfg.get("rlvr"), where="rlvr", seed=cfg.get("seed"), device=cfg.get("device"))
    rc.probe = _with_endpoints(rc.probe, rc.steps)
    return rc


def _sft_config(cfg: Mapping) -> SFTConfig:
    sc = section_config(SFTConfig, cfg.get("sft"), where="sft", seed=cfg.get("seed"), device=cfg.get("device"))
    sc.probe = _with_endpoints(sc.probe, sc.steps)
    return sc


# ----------------------------------------------------------------------------------------------------------------
# The experiments


def exp_rlvr(cfg: dict) -> list[RunResult]:
    """RLVR (GRPO / DAPO / REINFORCE+KL) from the pretrained model, with probes and theory checks on real steps."""
    model, _ = base_model(cfg)
    return [train_rlvr(model, _rl_config(cfg), run_name="rlvr")]


def exp_sft(cfg: dict) -> list[RunResult]:
    """SFT on correct demonstrations from the pretrained model, with probes and theory checks on real steps."""
    model, _ = base_model(cfg)
    return [train_sft(model, _sft_config(cfg), run_name="sft")]


def exp_rl_vs_sft(cfg: dict) -> list[RunResult]:
    """RLVR and SFT on the same task from the same pretrained checkpoint (Table 1 / Fig. 4 at our scale)."""
    model, _ = base_model(cfg)
    rl_cfg, sft_cfg = _rl_config(cfg), _sft_config(cfg)
    if "task" not in cfg.get("sft", {}):
        sft_cfg.task = rl_cfg.task  # the same task unless the config says otherwise
    return [train_rlvr(copy.deepcopy(model), rl_cfg, run_name="rlvr"),
            train_sft(copy.deepcopy(model), sft_cfg, run_name="sft")]


def exp_clip_eps(cfg: dict) -> list[RunResult]:
    """Lemma F.9 on real clip-only (DAPO) runs over a sweep of clip widths eps: band violations and KL vs eps."""
    sweep = dict(cfg.get("clip_eps", {}))
    eps_list = [float(e) for e in sweep.pop("eps", [0.05, 0.1, 0.2, 0.4])]
    ratio_high = float(sweep.pop("high_over_low", 1.4))  # DAPO clip-higher: eps_high = ratio * eps_low
    if sweep:
        raise InputError(f"[clip_eps] unknown keys {sorted(sweep)}; known: ['eps', 'high_over_low']")
    if not eps_list or any(not 0 < e < 1 for e in eps_list) or ratio_high <= 1:
        raise InputError(f"[clip_eps] need eps in (0, 1) and high_over_low > 1, got {eps_list}, {ratio_high}")
    model, _ = base_model(cfg)
    out = []
    for eps in eps_list:
        rl = dict(cfg.get("rlvr", {}))
        rl.update(algorithm="dapo", beta=0.0, eps_low=eps, eps_high=min(ratio_high * eps, 0.99))
        probe = dict(rl.pop("probe", {}))
        steps = int(rl.get("steps", 10))
        probe.update(steps=list(range(0, steps + 1)), checks=["lemF.9"])
        rl["probe"] = probe
        rc = _rl_config({**cfg, "rlvr": rl})
        out.append(train_rlvr(copy.deepcopy(model), rc, run_name=f"dapo_eps{eps:g}"))
    return out


def exp_curvature_smollm2(cfg: dict) -> ClaimRun:
    """Gate II mechanism on SmolLM2-135M: Hessian-vector-product Fisher curvature along principal vs complement
    rank-one directions of a few matrices (``sims.hf.curvature``; minutes on CPU), judged by
    ``sims.claims.curvature.smollm2_curvature_verdict``."""
    table = hf_curvature_table(cfg)
    verdicts = [curvature.smollm2_curvature_verdict(table)]
    return ClaimRun([], {"curvature_smollm2": table, "verdicts": verdicts_frame(verdicts)}, verdicts,
                    dict(cfg.get("curvature_smollm2", {})))


# ----------------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Experiment:
    """A ``threegate run`` name: ``fn(cfg)`` returns the training runs, or a ``ClaimRun`` (runs, tables, verdicts)."""

    name: str
    doc: str
    fn: Callable[[dict], list[RunResult] | ClaimRun]


#: The claim experiments (``fn(cfg) -> ClaimRun``, config section ``[name]``, ``preset = "fast"`` in seconds).
CLAIM_EXPERIMENTS: dict[str, Callable[[Mapping], ClaimRun]] = {
    "sparsity": sparsity.sparsity_experiment,
    "mask_predictor": sparsity.mask_predictor_experiment,
    "consistency": consistency.consistency_experiment,
    "geometry": geometry.geometry_experiment,
    "interventions": interventions.interventions_experiment,
    "kl_beta0": interventions.kl_beta0_experiment,
    "masked_runs": peft.masked_runs_experiment,
    "lora_pissa": peft.lora_pissa_experiment,
    # the follow-up papers (issue 17)
    "off_principal": off_principal.off_principal_experiment,
    "curvature": curvature.curvature_experiment,
    "opd": regimes.opd_experiment,
    "sgd_vs_adamw": regimes.sgd_experiment,
}


def _experiment(name: str, fn: Callable) -> Experiment:
    return Experiment(name, (fn.__doc__ or name).strip().splitlines()[0], fn)


#: Every experiment ``threegate run`` knows, in the order ``threegate run --list`` shows them.
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    _experiment("rlvr", exp_rlvr),
    _experiment("sft", exp_sft),
    _experiment("rl_vs_sft", exp_rl_vs_sft),
    _experiment("clip_eps", exp_clip_eps),
    *(_experiment(name, fn) for name, fn in CLAIM_EXPERIMENTS.items()),
    _experiment("hf_rlvr", run_hf_rlvr),
    _experiment("hf_sft", run_hf_sft),
    # a real-model claim run (minutes on CPU): threegate run only, not in verify's claim sweep
    _experiment("curvature_smollm2", exp_curvature_smollm2),
)}


# ----------------------------------------------------------------------------------------------------------------
# Running and writing


def run_experiment(name: str, cfg: dict, out: str | Path | None = None) -> Path:
    """Run experiment ``name`` with config ``cfg`` and write its tables into ``out``; returns the directory.

    A claim experiment's verdicts are printed, and its own tables and ``verdicts.json`` written next to the
    standard tables of its runs, then each run's own tables (``RunResult.tables``, concatenated over the runs); a
    name already written wins."""
    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    out = Path(out) if out is not None else Path("runs") / f"{name}-{experiment_hash(name, cfg)}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    produced = EXPERIMENTS[name].fn(cfg)
    run = produced if isinstance(produced, ClaimRun) else ClaimRun(list(produced))
    print_verdicts(run.verdicts)
    results = run.results
    tables = {
        "checks": concat_tables(r.checks for r in results),
        "metrics": concat_tables(r.metrics for r in results),
        "history": concat_tables(r.history for r in results),
        **summary_tables(results),
    }
    tables.update({tname: df for tname, df in run.tables.items() if tname not in tables})
    for tname in dict.fromkeys(t for r in results for t in r.tables):  # each run's own tables, over its runs
        tables.setdefault(tname, concat_tables(r.tables.get(tname) for r in results))
    write_tables(tables, out)
    if run.verdicts:
        (out / "verdicts.json").write_text(verdicts_json(run.verdicts))
    for r in results:
        for t, sd in r.snapshots.items():
            save_snapshot(sd, out / "snapshots" / f"{r.name}_step{t:05d}.safetensors", {"run": r.name, "step": t})
    resolved = {"experiment": name, "input": cfg, "runs": {r.name: r.config for r in results}}
    (out / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    info = {
        "experiment": name, "seed": cfg.get("seed", {r.name: r.config.get("seed") for r in results}),
        "config_hash": experiment_hash(name, cfg), "wall_seconds": time.perf_counter() - t0,
        "run_wall_seconds": {r.name: r.wall_seconds for r in results},
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    (out / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return out


def run_claims(name: str, cfg: Mapping, out: str | Path | None = None) -> tuple[ClaimRun, Path]:
    """Run claim experiment ``name`` and write it with ``write_claim_run`` (default ``runs/NAME-<hash>``); prints
    the verdicts."""
    if name not in CLAIM_EXPERIMENTS:
        raise InputError(f"unknown claim experiment {name!r}; known: {sorted(CLAIM_EXPERIMENTS)}")
    run = CLAIM_EXPERIMENTS[name](cfg)
    out = Path(out) if out is not None else Path("runs") / f"{name}-{experiment_hash(name, cfg)}"
    path = write_claim_run(run, out)
    print(f"{name}: verdicts (tables in {path})")
    print_verdicts(run.verdicts)
    return run, path


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help=f"experiment name ({', '.join(sorted(EXPERIMENTS))})")
    parser.add_argument("--config", type=Path, default=None, help="TOML or JSON config file (default: all defaults)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/NAME-<hash>)")
    parser.add_argument("--seed", type=int, default=None, help="override the seed of every run")
    parser.add_argument("--device", default=None, help="override the device of every run (cpu, cuda)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")


def run(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for e in EXPERIMENTS.values():
            print(f"{e.name:12s} {e.doc}")
        return 0 if args.list else 2
    cfg = load_config(args.config)
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.device is not None:
        cfg["device"] = args.device
    out = run_experiment(args.name, cfg, args.out)
    sp = pd.read_parquet(out / "sparsity.parquet")
    chk = pd.read_parquet(out / "checks.parquet")
    print(f"threegate run {args.name}: wrote {out}")
    if len(sp):
        allrow = sp[sp["matrix_type"] == "all"]
        for _, r in allrow.iterrows():
            print(f"  {r['run']:6s} bf16 update sparsity (all block matrices): {r['sparsity']:.4f}")
    if len(chk):
        met = chk[chk["assumptions_hold"].astype(bool)]
        worst = met.groupby("result_id")["ratio"].max()
        viol = met[~met["holds"].astype(bool)].groupby("result_id").size()
        for rid, w in worst.items():
            print(f"  {rid:18s} worst lhs/rhs {w:.4g}  violations {int(viol.get(rid, 0))}")
    return 0
