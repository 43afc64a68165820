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
import hashlib
import json
import platform
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch

from sims.tinygpt.probe import ProbeConfig, RunResult
from theory.errors import InputError

__all__ = ["EXPERIMENTS", "Experiment", "experiment", "load_config", "config_hash", "section_config", "run_experiment",
           "summary_tables", "add_arguments", "run"]


@dataclass(frozen=True)
class Experiment:
    """``fn(cfg) -> runs``; a ``trainer`` experiment (a transformers Trainer run: ``hf_rlvr``, ``hf_sft``) is called
    as ``fn(cfg, out_dir=..., trainer_callbacks=...)`` and its live callbacks may write tables into the run folder."""

    name: str
    doc: str
    fn: Callable[..., list[RunResult]]
    trainer: bool = False


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(name: str, *, trainer: bool = False) -> Callable[[Callable[..., list[RunResult]]],
                                                                  Callable[..., list[RunResult]]]:
    def deco(fn):
        EXPERIMENTS[name] = Experiment(name, (fn.__doc__ or "").strip().splitlines()[0], fn, trainer)
        return fn

    return deco


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def load_config(path: str | Path | None) -> dict:
    """Read a TOML or JSON config file (None: empty config, every default)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if path.suffix == ".json":
            cfg = json.loads(text)
            if not isinstance(cfg, dict):
                raise InputError(f"config file {path}: top level must be an object")
            return cfg
    except (ValueError, TypeError) as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise InputError(f"config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    raise InputError(f"config file {path}: unsupported extension {path.suffix!r} (use .toml or .json)")


def config_hash(name: str, cfg: Mapping) -> str:
    return hashlib.sha256(json.dumps({"experiment": name, "config": cfg}, sort_keys=True, default=str).encode()).hexdigest()[:12]


def section_config(cls, section: Mapping | None, *, where: str, presets: tuple[str, ...] | None = None,
                   default: str | None = None, **forced):
    """A config dataclass ``cls`` from the config-file section ``[where]``.

    With ``presets``, the key ``preset`` (default ``default``) picks a named constructor: the classmethod of that
    name, or plain ``cls(...)`` when the class has none; the section's other keys override fields. ``forced`` keys
    (e.g. ``seed`` from the command line) override the section when not None. An unknown key or preset is an
    InputError naming the section. Lists (all a TOML / YAML file can give) become tuples: config dataclasses are
    frozen and hash into cache keys."""
    sec = {k: tuple(v) if isinstance(v, list) else v for k, v in (section or {}).items()}
    sec.update({k: v for k, v in forced.items() if v is not None})
    preset = sec.pop("preset", default) if presets is not None else None
    if presets is not None and preset not in presets:
        raise InputError(f"[{where}] preset must be one of {list(presets)}, got {preset!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(sec) - known)
    if unknown:
        raise InputError(f"[{where}] unknown keys {unknown}; known: {sorted(known)}")
    make = getattr(cls, preset, None) if preset is not None else None
    return make(**sec) if callable(make) else cls(**sec)


def _pretrain_config(cfg: Mapping):
    from sims.tinygpt.pretrain import PretrainConfig

    sec = dict(cfg.get("pretrain", {}))
    sec.pop("cache_dir", None)  # where the cache lives, not what is trained
    return section_config(PretrainConfig, sec, where="pretrain", presets=("fast", "default"), default="default")


def _base_model(cfg: Mapping):
    from sims.tinygpt.pretrain import pretrain

    pcfg = _pretrain_config(cfg)
    cache = cfg.get("pretrain", {}).get("cache_dir", ".cache/threegate")
    model, info = pretrain(pcfg, cache_dir=cache, device=cfg.get("device", "cpu"))
    return model, info


def _with_endpoints(probe: ProbeConfig, steps: int) -> ProbeConfig:
    return replace(probe, steps=tuple(sorted(set(probe.steps) | {0, steps})))


def _rl_config(cfg: Mapping):
    from sims.tinygpt.rlvr import RLConfig

    rc = section_config(RLConfig, cfg.get("rlvr"), where="rlvr", seed=cfg.get("seed"), device=cfg.get("device"))
    rc.probe = _with_endpoints(rc.probe, rc.steps)
    return rc


def _sft_config(cfg: Mapping):
    from sims.tinygpt.sft import SFTConfig

    sc = section_config(SFTConfig, cfg.get("sft"), where="sft", seed=cfg.get("seed"), device=cfg.get("device"))
    sc.probe = _with_endpoints(sc.probe, sc.steps)
    return sc


# ----------------------------------------------------------------------------------------------------------------
# The experiments


@experiment("rlvr")
def exp_rlvr(cfg: dict) -> list[RunResult]:
    """RLVR (GRPO / DAPO / REINFORCE+KL) from the pretrained model, with probes and theory checks on real steps."""
    from sims.tinygpt.rlvr import train_rlvr

    model, _ = _base_model(cfg)
    return [train_rlvr(model, _rl_config(cfg), run_name="rlvr")]


@experiment("sft")
def exp_sft(cfg: dict) -> list[RunResult]:
    """SFT on correct demonstrations from the pretrained model, with probes and theory checks on real steps."""
    from sims.tinygpt.sft import train_sft

    model, _ = _base_model(cfg)
    return [train_sft(model, _sft_config(cfg), run_name="sft")]


@experiment("rl_vs_sft")
def exp_rl_vs_sft(cfg: dict) -> list[RunResult]:
    """RLVR and SFT on the same task from the same pretrained checkpoint (Table 1 / Fig. 4 at our scale)."""
    from sims.tinygpt.rlvr import train_rlvr
    from sims.tinygpt.sft import train_sft

    model, _ = _base_model(cfg)
    rl_cfg, sft_cfg = _rl_config(cfg), _sft_config(cfg)
    if "task" not in cfg.get("sft", {}):
        sft_cfg.task = rl_cfg.task  # the same task unless the config says otherwise
    return [train_rlvr(copy.deepcopy(model), rl_cfg, run_name="rlvr"),
            train_sft(copy.deepcopy(model), sft_cfg, run_name="sft")]


@experiment("clip_eps")
def exp_clip_eps(cfg: dict) -> list[RunResult]:
    """Lemma F.9 on real clip-only (DAPO) runs over a sweep of clip widths eps: band violations and KL vs eps."""
    from sims.tinygpt.rlvr import train_rlvr

    sweep = dict(cfg.get("clip_eps", {}))
    eps_list = [float(e) for e in sweep.pop("eps", [0.05, 0.1, 0.2, 0.4])]
    ratio_high = float(sweep.pop("high_over_low", 1.4))  # DAPO clip-higher: eps_high = ratio * eps_low
    if sweep:
        raise InputError(f"[clip_eps] unknown keys {sorted(sweep)}; known: ['eps', 'high_over_low']")
    if not eps_list or any(not 0 < e < 1 for e in eps_list) or ratio_high <= 1:
        raise InputError(f"[clip_eps] need eps in (0, 1) and high_over_low > 1, got {eps_list}, {ratio_high}")
    model, _ = _base_model(cfg)
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


# ----------------------------------------------------------------------------------------------------------------
# Tables


def summary_tables(results: list[RunResult], k: int | None = None) -> dict[str, pd.DataFrame]:
    """sparsity / spectrum / angles (final probed step vs step 0) and kl_beta0 from probed runs."""
    from theory.naming import layer_index, matrix_type  # TinyGPT and HF names alike
    from theory.linalg import singular_values
    from theory.metrics import bf16_changed_count, principal_angles_topk

    sparsity, spectrum, angles, klb = [], [], [], []
    for res in results:
        method = "RL" if res.kind == "rlvr" else "SFT"
        steps = res.config.get("steps")
        seed = res.config.get("seed")
        kk = k or res.config.get("probe", {}).get("k", 4)
        if 0 not in res.snapshots or len(res.snapshots) < 2:
            continue
        last = max(res.snapshots)
        base, final = res.snapshots[0], res.snapshots[last]
        pooled: dict[str, list[int]] = {}
        model = res.config.get("model") or "TinyGPT"
        for name in base:
            mt, layer = matrix_type(name), layer_index(name)
            if mt == "other" or layer is None or base[name].ndim != 2:
                continue
            changed, n = bf16_changed_count(base[name], final[name]), base[name].numel()
            for key in (mt, "all"):
                acc = pooled.setdefault(key, [0, 0])
                acc[0] += changed
                acc[1] += n
            s0, s1 = singular_values(base[name]), singular_values(final[name])
            for i, (a, b) in enumerate(zip(s0, s1)):
                spectrum.append({"run": res.name, "layer": layer, "matrix_type": mt, "i": i, "sigma_base": a,
                                 "sigma_tuned": b, "seed": seed, "steps": steps})
            aU, aV = principal_angles_topk(base[name], final[name], kk)
            for side, arr in (("U", aU), ("V", aV)):
                for i, th in enumerate(np.atleast_1d(arr)):
                    angles.append({"run": res.name, "layer": layer, "matrix_type": mt, "side": side, "i": i,
                                   "angle_deg": float(np.degrees(th)), "k": kk, "seed": seed, "steps": steps})
        for mt, (c, n) in pooled.items():
            sparsity.append({"run": res.name, "method": method, "matrix_type": mt, "sparsity": 1 - c / n,
                             "changed": c, "total": n, "precision": res.config.get("precision"), "seed": seed,
                             "steps": steps, "model": model})
        if res.kind == "rlvr" and res.config.get("beta", 0) == 0:
            m = res.metrics
            for _, row in m[m["metric"] == "kl_tok_base"].iterrows():
                klb.append({"run": res.name, "step": int(row["step"]), "kl": row["value"], "beta": 0.0,
                            "seed": seed, "steps": steps, "model": model})
    clip = []
    for res in results:
        c = res.checks
        if c.empty or "lemF.9" not in set(c["result_id"]):
            continue
        for _, row in c[c["result_id"] == "lemF.9"].iterrows():
            clip.append({"run": res.name, "step": int(row["step"]), "eps": row["d_eps"],
                         "eps_low": res.config.get("eps_low"), "eps_high": res.config.get("eps_high"),
                         "violation_fraction": row["d_violation_fraction"], "k1": row["d_k1"], "k3": row["d_k3"],
                         "small_step": row["d_small_step"], "mean_len": row["d_mean_len"], "bound": row["rhs"],
                         "small_step_band_bound": row["d_small_step_band_bound"],
                         "assumptions_hold": bool(row["assumptions_hold"]), "lr": res.config.get("lr"),
                         "seed": res.config.get("seed")})
    return {"sparsity": pd.DataFrame(sparsity), "spectrum": pd.DataFrame(spectrum), "angles": pd.DataFrame(angles),
            "kl_beta0": pd.DataFrame(klb), "clip_eps": pd.DataFrame(clip)}


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _write_table(df: pd.DataFrame, out: Path, name: str) -> None:
    df.to_csv(out / f"{name}.csv", index=False)
    df.to_parquet(out / f"{name}.parquet", index=False)


def run_experiment(name: str, cfg: dict, out: str | Path | None = None, *, trainer_callbacks=None) -> Path:
    """Run experiment ``name`` with config ``cfg`` and write its tables into ``out``; returns the directory.

    ``trainer_callbacks(out_dir, run_config, run_name) -> [TrainerCallback, ...]`` is handed to trainer
    experiments (``hf_rlvr``, ``hf_sft``; ``threegate run`` attaches ``ThreeGateCallback`` this way). Their empty
    tables are not written, so a table the live callback wrote into ``out`` (``sparsity``, ``checks``, ``angles``,
    ``spectrum``, the per-step ones) is never replaced by an empty one."""
    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    out = Path(out) if out is not None else Path("runs") / f"{name}-{config_hash(name, cfg)}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = exp.fn(cfg, out_dir=out, trainer_callbacks=trainer_callbacks) if exp.trainer else exp.fn(cfg)
    tables = {
        "checks": _concat([r.checks for r in results]),
        "metrics": _concat([r.metrics for r in results]),
        "history": _concat([r.history for r in results]),
        **summary_tables(results),
    }
    for tname, df in tables.items():
        if not (exp.trainer and df.empty):
            _write_table(df, out, tname)
    # claim experiments (sims.claims.base) attach their own tables and computed verdicts to the runs they return
    claim_tables = getattr(results[0], "tables", None) if results else None
    for tname, df in (claim_tables or {}).items():
        if tname not in tables:
            _write_table(df, out, tname)
    verdicts = getattr(results[0], "verdicts", None) if results else None
    if verdicts:
        from dataclasses import asdict

        (out / "verdicts.json").write_text(json.dumps([asdict(v) for v in verdicts], indent=2, default=float))
    for r in results:
        for t, sd in r.snapshots.items():
            from sims.tinygpt.storage import save_snapshot

            save_snapshot(sd, out / "snapshots" / f"{r.name}_step{t:05d}.safetensors", {"run": r.name, "step": t})
    resolved = {"experiment": name, "input": cfg, "runs": {r.name: r.config for r in results}}
    (out / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    info = {
        "experiment": name, "seed": cfg.get("seed", {r.name: r.config.get("seed") for r in results}),
        "config_hash": config_hash(name, cfg), "wall_seconds": time.perf_counter() - t0,
        "run_wall_seconds": {r.name: r.wall_seconds for r in results},
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    (out / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help=f"experiment name ({', '.join(sorted(EXPERIMENTS))})")
    parser.add_argument("--config", type=Path, default=None, help="TOML or JSON config file (default: all defaults)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/NAME-<hash>)")
    parser.add_argument("--seed", type=int, default=None, help="override the seed of every run")
    parser.add_argument("--device", default=None, help="override the device of every run (cpu, cuda)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")


def run(args: argparse.Namespace, *, trainer_callbacks=None) -> int:
    """``threegate run``; ``trainer_callbacks`` as in ``run_experiment`` (the threegate side passes its own)."""
    if args.list or not args.name:
        for e in EXPERIMENTS.values():
            print(f"{e.name:12s} {e.doc}")
        return 0 if args.list else 2
    cfg = load_config(args.config)
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.device is not None:
        cfg["device"] = args.device
    out = run_experiment(args.name, cfg, args.out, trainer_callbacks=trainer_callbacks)
    sp, chk = (pd.read_parquet(out / f"{t}.parquet") if (out / f"{t}.parquet").is_file() else pd.DataFrame()
               for t in ("sparsity", "checks"))
    print(f"threegate run {args.name}: wrote {out}")
    if len(sp):
        allrow = sp[sp["matrix_type"] == "all"]
        for _, r in allrow.iterrows():
            print(f"  {r['run']:6s} bf16 update sparsity (all block matrices): {r['sparsity']:.4f}")
    if len(chk) and {"assumptions_hold", "ratio", "holds"} <= set(chk.columns):
        met = chk[chk["assumptions_hold"].astype(bool)]
        worst = met.groupby("result_id")["ratio"].max()
        viol = met[~met["holds"].astype(bool)].groupby("result_id").size()
        for rid, w in worst.items():
            print(f"  {rid:18s} worst lhs/rhs {w:.4g}  violations {int(viol.get(rid, 0))}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Claim experiments (sims.claims.base): training runs plus their own tables and computed verdicts. ``threegate run``
# writes the standard tables of the runs and prints the verdicts; ``sims.claims.base.run_claims`` writes the claim
# tables (sparsity by storage, layer_sparsity, lr_sweep, probe_errors, mask_predictor, verdicts) as well.


def _register_claim_experiments() -> None:
    """Every claim experiment of ``sims.claims.base`` (built in or from ``CLAIM_MODULES``) is a ``threegate run`` name."""
    from sims.claims.base import as_run_results, claim_experiments

    for cname, fn in claim_experiments().items():
        if cname in EXPERIMENTS:
            continue
        doc = (fn.__doc__ or cname).strip().splitlines()[0]
        EXPERIMENTS[cname] = Experiment(cname, doc, lambda cfg, fn=fn: as_run_results(fn(cfg)))


_register_claim_experiments()


def _register_real_model_experiments() -> None:
    """``hf_rlvr`` / ``hf_sft`` (``sims.hf.backend``, transformers imported lazily there) as ``threegate run`` names."""
    import importlib

    try:
        importlib.import_module("sims.hf.backend")
    except ModuleNotFoundError as e:
        if e.name != "sims.hf.backend":
            raise


_register_real_model_experiments()
