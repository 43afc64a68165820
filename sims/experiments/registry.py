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

Config files are TOML, JSON or YAML, checked before any work (``check_config``: every value's type, unknown keys
at every level, each section's own checks; one line naming the file, section and key otherwise)::

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

The tables are written into a temporary sibling of ``--out`` that is renamed to it only when the run succeeded (a
failed run leaves no folder). RL runs print one progress line per step on stderr (step, reward, KL; ``--quiet``
silences them) and warnings at the end of a run (``sims.tinygpt.progress``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import json
import platform
import shutil
import tempfile
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pandas as pd
import torch

from sims.claims import consistency, curvature, geometry, interventions, off_principal, peft, regimes, sparsity
from sims.claims.base import ClaimRun, print_verdicts, verdicts_frame, verdicts_json, write_claim_run
from sims.experiments.config import Section, experiment_hash, load_config, resolve_section, validate_config
from sims.experiments.pretrained import PRETRAIN, base_model
from sims.hf import backend as hf
from sims.hf.curvature import HFCurvatureConfig, hf_curvature_table
from sims.tables import concat_tables, summary_tables, write_tables
from sims.tinygpt.probe import ProbeConfig, RunResult
from sims.tinygpt.rlvr import RLConfig, train_rlvr
from sims.tinygpt.sft import SFTConfig, train_sft
from sims.tinygpt.progress import show_progress
from sims.tinygpt.storage import save_snapshot
from theory.errors import InputError

__all__ = ["Experiment", "EXPERIMENTS", "CLAIM_EXPERIMENTS", "CLAIM_CONFIGS", "SECTIONS", "ClipEpsConfig",
           "load_config", "experiment_hash", "check_config", "first_paragraph", "run_experiment", "run_claims",
           "add_arguments", "run"]


# ----------------------------------------------------------------------------------------------------------------
# Configuration of the TinyGPT runs


@dataclass(frozen=True)
class ClipEpsConfig:
    """``[clip_eps]``: the clip widths of the DAPO runs (eps_low; eps_high = high_over_low * eps_low)."""

    eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    high_over_low: float = 1.4  # DAPO clip-higher

    def __post_init__(self) -> None:
        if not self.eps or any(not 0 < e < 1 for e in self.eps) or self.high_over_low <= 1:
            raise InputError(f"need eps in (0, 1) and high_over_low > 1, got {list(self.eps)}, {self.high_over_low}")


#: The config sections of the TinyGPT experiments.
SECTIONS: dict[str, Section] = {
    "pretrain": PRETRAIN,
    "rlvr": Section(RLConfig, forced=("seed", "device")),
    "sft": Section(SFTConfig, forced=("seed", "device")),
    "clip_eps": Section(ClipEpsConfig),
}


def _with_endpoints(probe: ProbeConfig, steps: int) -> ProbeConfig:
    return replace(probe, steps=tuple(sorted(set(probe.steps) | {0, steps})))


def _rl_config(cfg: Mapping) -> RLConfig:
    rc = resolve_section(SECTIONS["rlvr"], cfg, "rlvr")[0]
    rc.probe = _with_endpoints(rc.probe, rc.steps)
    return rc


def _sft_config(cfg: Mapping) -> SFTConfig:
    sc = resolve_section(SECTIONS["sft"], cfg, "sft")[0]
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
    sweep = resolve_section(SECTIONS["clip_eps"], cfg, "clip_eps")[0]
    model, _ = base_model(cfg)
    out = []
    for eps in sweep.eps:
        rl = dict(cfg.get("rlvr", {}))
        rl.update(algorithm="dapo", beta=0.0, eps_low=eps, eps_high=min(sweep.high_over_low * eps, 0.99))
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
    """A ``threegate run`` name: its description (the first paragraph of its docstring), the function (returning
    the training runs, or a ``ClaimRun``: runs, tables, verdicts), and the config sections it reads
    (``{name: Section}``; the schema ``check_config`` validates a config against). A ``trainer`` experiment
    (``hf_rlvr``, ``hf_sft``: TRL) is called as ``fn(cfg, out_dir=..., trainer_callbacks=...)``: the callbacks
    write their own tables into the run folder."""

    name: str
    doc: str
    fn: Callable[..., list[RunResult] | ClaimRun]
    sections: Mapping[str, Section] = field(default_factory=dict)
    trainer: bool = False  # a transformers Trainer run: fn(cfg, out_dir=..., trainer_callbacks=...)


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring as one line (``run --list`` prints it whole)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


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
#: The config dataclass of each claim experiment's section ``[name]`` (its schema for ``threegate run`` / sweep).
CLAIM_CONFIGS: dict[str, type] = {
    "sparsity": sparsity.SparsityConfig,
    "mask_predictor": sparsity.MaskPredictorConfig,
    "consistency": consistency.ConsistencyConfig,
    "geometry": geometry.GeometryConfig,
    "interventions": interventions.InterventionsConfig,
    "kl_beta0": interventions.KLBeta0Config,
    "masked_runs": peft.MaskedRunsConfig,
    "lora_pissa": peft.LoraPissaConfig,
    "off_principal": off_principal.OffPrincipalConfig,
    "curvature": curvature.CurvatureConfig,
    "opd": regimes.OPDExperimentConfig,
    "sgd_vs_adamw": regimes.SGDConfig,
}

_TINY = {"pretrain": SECTIONS["pretrain"]}


def _experiment(name: str, fn: Callable, sections: Mapping[str, Section], trainer: bool = False) -> Experiment:
    return Experiment(name, first_paragraph(fn.__doc__) or name, fn, dict(sections), trainer)


#: Every experiment ``threegate run`` knows, in the order ``threegate run --list`` shows them.
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    _experiment("rlvr", exp_rlvr, {**_TINY, "rlvr": SECTIONS["rlvr"]}),
    _experiment("sft", exp_sft, {**_TINY, "sft": SECTIONS["sft"]}),
    _experiment("rl_vs_sft", exp_rl_vs_sft, {**_TINY, "rlvr": SECTIONS["rlvr"], "sft": SECTIONS["sft"]}),
    _experiment("clip_eps", exp_clip_eps, {**_TINY, "rlvr": SECTIONS["rlvr"], "clip_eps": SECTIONS["clip_eps"]}),
    *(_experiment(name, fn, {**_TINY, name: Section(CLAIM_CONFIGS[name], presets=("fast", "default"),
                                                     default="default")})
      for name, fn in CLAIM_EXPERIMENTS.items()),
    _experiment("hf_rlvr", hf.run_hf_rlvr, {"hf_rlvr": hf.SECTIONS["hf_rlvr"]}, trainer=True),
    _experiment("hf_sft", hf.run_hf_sft, {"hf_sft": hf.SECTIONS["hf_sft"]}, trainer=True),
    # a real-model claim run (minutes on CPU): threegate run only, not in verify's claim sweep
    _experiment("curvature_smollm2", exp_curvature_smollm2, {"curvature_smollm2": Section(HFCurvatureConfig)}),
)}


def check_config(name: str, cfg: Mapping, *, source: str = "config") -> None:
    """Validate ``cfg`` for experiment ``name`` before any work (types, unknown keys at every level, each section's
    own checks); a ``ConfigError`` / ``InputError`` starting with ``source`` otherwise."""
    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    validate_config(cfg, EXPERIMENTS[name].sections, source=source, experiment=name)


# ----------------------------------------------------------------------------------------------------------------
# Running and writing


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """A fresh sibling folder of ``out`` to write into; renamed to ``out`` when the block succeeds, removed (with the
    parent folders this made) when it raises, so a failed run leaves no empty or partial results folder. An
    existing ``out`` is replaced only when it is empty or an earlier run's folder (it has ``run.json``)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "run.json").is_file())):
        raise InputError(f"output folder {out} exists and is not an earlier run's results folder (no run.json); "
                         "choose another --out")
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # an earlier run of the same config: swap it out, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "run")
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def run_experiment(name: str, cfg: dict, out: str | Path | None = None, *, trainer_callbacks=None) -> Path:
    """Run experiment ``name`` with config ``cfg`` and write its tables into ``out``; returns the directory.

    The config is validated first (``check_config``); the tables are written into a temporary sibling folder that
    becomes ``out`` only when the run succeeded. A claim experiment's verdicts are printed, and its own tables and
    ``verdicts.json`` written next to the standard tables of its runs, then each run's own tables
    (``RunResult.tables``, concatenated over the runs); a name already written wins.

    ``trainer_callbacks(out_dir, run_config, run_name) -> [TrainerCallback, ...]`` goes to trainer experiments
    (``hf_rlvr``, ``hf_sft``; ``threegate run`` attaches ``ThreeGateCallback`` this way, see
    ``threegate.experiments``). Their empty tables are not written, so a table a live callback wrote into the
    folder (``sparsity``, ``checks``, ``angles``, ``spectrum``, the per-step ones) is never replaced by an empty one,
    and a non-empty table of the run whose name the callback already used is written as ``run_<name>`` (e.g. the
    Lemma F.9 rows of ``hf_rlvr``'s band probe as ``run_checks`` beside the callback's snapshot ``checks``)."""
    check_config(name, cfg)
    out = Path(out) if out is not None else Path("runs") / f"{name}-{experiment_hash(name, cfg)}"
    with _atomic_dir(out) as tmp:
        _run_into(name, cfg, tmp, trainer_callbacks)
    return out


def _run_into(name: str, cfg: dict, out: Path, trainer_callbacks=None) -> None:
    t0 = time.perf_counter()
    exp = EXPERIMENTS[name]
    produced = exp.fn(cfg, out_dir=out, trainer_callbacks=trainer_callbacks) if exp.trainer else exp.fn(cfg)
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
    if exp.trainer:  # a table the live callback wrote keeps its name; the run's own rows go beside it, renamed
        written = {p.name.split(".")[0] for p in out.glob("*.parquet")}
        for tname in [t for t, df in tables.items() if t in written and df is not None and not df.empty]:
            tables[f"run_{tname}"] = tables.pop(tname)
    write_tables(tables, out, skip_empty=exp.trainer)
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
    parser.add_argument("--quiet", action="store_true", help="no per-step progress lines (warnings still print)")


def _print_list() -> None:
    width = max(len(n) for n in EXPERIMENTS) + 2
    for e in EXPERIMENTS.values():
        print(textwrap.fill(e.doc, width=110, initial_indent=e.name.ljust(width), subsequent_indent=" " * width,
                            break_on_hyphens=False))


def run(args: argparse.Namespace, *, trainer_callbacks=None) -> int:
    """``threegate run``; ``trainer_callbacks`` as in ``run_experiment`` (``threegate.experiments`` passes them)."""
    if args.list or not args.name:
        _print_list()
        return 0 if args.list else 2
    if args.name not in EXPERIMENTS:
        close = difflib.get_close_matches(args.name, list(EXPERIMENTS), n=1)
        raise InputError(f"unknown experiment {args.name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + "; see threegate run --list")
    cfg = load_config(args.config)
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.device is not None:
        cfg["device"] = args.device
    check_config(args.name, cfg, source=f"config file {args.config}" if args.config else "command line")
    with show_progress(quiet=args.quiet):
        out = run_experiment(args.name, cfg, args.out, trainer_callbacks=trainer_callbacks)
    sp, chk = (pd.read_parquet(out / f"{t}.parquet") if (out / f"{t}.parquet").is_file() else pd.DataFrame()
               for t in ("sparsity", "checks"))
    print(f"threegate run {args.name}: wrote {out}")
    if len(sp):
        allrow = sp[sp["matrix_type"] == "all"]
        for _, r in allrow.iterrows():
            print(f"  {r['run']:6s} bf16 update sparsity (all block matrices): {r['sparsity']:.4f}")
    if len(chk) and {"assumptions_hold", "ratio", "holds"} <= set(chk.columns):  # the live callback's differ
        met = chk[chk["assumptions_hold"].astype(bool)]
        worst = met.groupby("result_id")["ratio"].max()
        viol = met[~met["holds"].astype(bool)].groupby("result_id").size()
        for rid, w in worst.items():
            print(f"  {rid:18s} worst lhs/rhs {w:.4g}  violations {int(viol.get(rid, 0))}")
    return 0
