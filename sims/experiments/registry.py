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
import hashlib
import json
import platform
import shutil
import tempfile
import textwrap
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
import yaml

from sims.experiments.config import Section, resolve_section, section_config, validate_config
from sims.tinygpt.pretrain import PretrainConfig
from sims.tinygpt.probe import ProbeConfig, RunResult
from sims.tinygpt.rlvr import RLConfig
from sims.tinygpt.sft import SFTConfig
from theory.errors import InputError

__all__ = ["EXPERIMENTS", "Experiment", "experiment", "load_config", "config_hash", "section_config", "run_experiment",
           "check_config", "summary_tables", "add_arguments", "run", "SECTIONS", "ClipEpsConfig"]


@dataclass(frozen=True)
class Experiment:
    """A ``threegate run`` name: its description (the first paragraph of its docstring), the function, and the
    config sections it reads (``{name: Section}``; the schema ``check_config`` validates a config against)."""

    name: str
    doc: str
    fn: Callable[[dict], list[RunResult]]
    sections: Mapping[str, Section] = field(default_factory=dict)


EXPERIMENTS: dict[str, Experiment] = {}


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring as one line (``run --list`` prints it whole)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def experiment(name: str, sections: Mapping[str, Section] | None = None
               ) -> Callable[[Callable[[dict], list[RunResult]]], Callable[[dict], list[RunResult]]]:
    def deco(fn):
        EXPERIMENTS[name] = Experiment(name, first_paragraph(fn.__doc__), fn, dict(sections or {}))
        return fn

    return deco


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def load_config(path: str | Path | None) -> dict:
    """Read a TOML, JSON or YAML config file (None: empty config, every default); checked by ``check_config``."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    kind = {".toml": "TOML", ".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}.get(suffix)
    if kind is None:
        raise InputError(f"config file {path}: unsupported extension {path.suffix!r} (use .toml, .json or .yaml)")
    try:
        if kind == "TOML":
            cfg = tomllib.loads(text)
        elif kind == "JSON":
            cfg = json.loads(text)
        else:
            cfg = yaml.safe_load(text)
    except (ValueError, TypeError, yaml.YAMLError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"config file {path} is not valid {kind}: {' '.join(str(e).split())}") from None
    if cfg is None and kind == "YAML":
        return {}
    if not isinstance(cfg, dict):
        raise InputError(f"config file {path}: the top level must be a table / mapping")
    return cfg


def config_hash(name: str, cfg: Mapping) -> str:
    return hashlib.sha256(json.dumps({"experiment": name, "config": cfg}, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ClipEpsConfig:
    """``[clip_eps]``: the clip widths of the DAPO runs (eps_low; eps_high = high_over_low * eps_low)."""

    eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    high_over_low: float = 1.4  # DAPO clip-higher

    def __post_init__(self) -> None:
        if not self.eps or any(not 0 < e < 1 for e in self.eps) or self.high_over_low <= 1:
            raise InputError(f"need eps in (0, 1) and high_over_low > 1, got {list(self.eps)}, {self.high_over_low}")


#: The config sections of the TinyGPT experiments (claim and HF experiments declare theirs where they live).
SECTIONS: dict[str, Section] = {
    "pretrain": Section(PretrainConfig, presets=("fast", "default"), default="default", extra={"cache_dir": str}),
    "rlvr": Section(RLConfig, forced=("seed", "device")),
    "sft": Section(SFTConfig, forced=("seed", "device")),
    "clip_eps": Section(ClipEpsConfig),
}


def check_config(name: str, cfg: Mapping, *, source: str = "config") -> None:
    """Validate ``cfg`` for experiment ``name`` before any work (types, unknown keys at every level, each section's
    own checks); a ``ConfigError`` / ``InputError`` starting with ``source`` otherwise."""
    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    validate_config(cfg, EXPERIMENTS[name].sections, source=source, experiment=name)


def _pretrain_config(cfg: Mapping):
    return resolve_section(SECTIONS["pretrain"], cfg, "pretrain")[0]


def _base_model(cfg: Mapping):
    from sims.tinygpt.pretrain import pretrain

    pcfg, extra = resolve_section(SECTIONS["pretrain"], cfg, "pretrain")
    cache = extra.get("cache_dir", ".cache/threegate")
    model, info = pretrain(pcfg, cache_dir=cache, device=cfg.get("device", "cpu"))
    return model, info


def _with_endpoints(probe: ProbeConfig, steps: int) -> ProbeConfig:
    return replace(probe, steps=tuple(sorted(set(probe.steps) | {0, steps})))


def _rl_config(cfg: Mapping):
    rc = resolve_section(SECTIONS["rlvr"], cfg, "rlvr")[0]
    rc.probe = _with_endpoints(rc.probe, rc.steps)
    return rc


def _sft_config(cfg: Mapping):
    sc = resolve_section(SECTIONS["sft"], cfg, "sft")[0]
    sc.probe = _with_endpoints(sc.probe, sc.steps)
    return sc


# ----------------------------------------------------------------------------------------------------------------
# The experiments


_TINY = {"pretrain": SECTIONS["pretrain"]}


@experiment("rlvr", {**_TINY, "rlvr": SECTIONS["rlvr"]})
def exp_rlvr(cfg: dict) -> list[RunResult]:
    """RLVR (GRPO / DAPO / REINFORCE+KL) from the pretrained model, with probes and theory checks on real steps."""
    from sims.tinygpt.rlvr import train_rlvr

    model, _ = _base_model(cfg)
    return [train_rlvr(model, _rl_config(cfg), run_name="rlvr")]


@experiment("sft", {**_TINY, "sft": SECTIONS["sft"]})
def exp_sft(cfg: dict) -> list[RunResult]:
    """SFT on correct demonstrations from the pretrained model, with probes and theory checks on real steps."""
    from sims.tinygpt.sft import train_sft

    model, _ = _base_model(cfg)
    return [train_sft(model, _sft_config(cfg), run_name="sft")]


@experiment("rl_vs_sft", {**_TINY, "rlvr": SECTIONS["rlvr"], "sft": SECTIONS["sft"]})
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


@experiment("clip_eps", {**_TINY, "rlvr": SECTIONS["rlvr"], "clip_eps": SECTIONS["clip_eps"]})
def exp_clip_eps(cfg: dict) -> list[RunResult]:
    """Lemma F.9 on real clip-only (DAPO) runs over a sweep of clip widths eps: band violations and KL vs eps."""
    from sims.tinygpt.rlvr import train_rlvr

    sweep = resolve_section(SECTIONS["clip_eps"], cfg, "clip_eps")[0]
    ratio_high = sweep.high_over_low
    model, _ = _base_model(cfg)
    out = []
    for eps in sweep.eps:
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


def run_experiment(name: str, cfg: dict, out: str | Path | None = None) -> Path:
    """Run experiment ``name`` with config ``cfg`` and write its tables into ``out``; returns the directory.

    The config is validated first (``check_config``); the tables are written into a temporary sibling folder that
    becomes ``out`` only when the run succeeded."""
    check_config(name, cfg)
    out = Path(out) if out is not None else Path("runs") / f"{name}-{config_hash(name, cfg)}"
    with _atomic_dir(out) as tmp:
        _run_into(name, cfg, tmp)
    return out


def _run_into(name: str, cfg: dict, out: Path) -> None:
    t0 = time.perf_counter()
    results = EXPERIMENTS[name].fn(cfg)
    tables = {
        "checks": _concat([r.checks for r in results]),
        "metrics": _concat([r.metrics for r in results]),
        "history": _concat([r.history for r in results]),
        **summary_tables(results),
    }
    for tname, df in tables.items():
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
        print(textwrap.fill(e.doc, width=110, initial_indent=e.name.ljust(width), subsequent_indent=" " * width))


def run(args: argparse.Namespace) -> int:
    from sims.tinygpt.progress import show_progress

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


# ----------------------------------------------------------------------------------------------------------------
# Claim experiments (sims.claims.base): training runs plus their own tables and computed verdicts. ``threegate run``
# writes the standard tables of the runs and prints the verdicts; ``sims.claims.base.run_claims`` writes the claim
# tables (sparsity by storage, layer_sparsity, lr_sweep, probe_errors, mask_predictor, verdicts) as well.


def _register_claim_experiments() -> None:
    """Every claim experiment of ``sims.claims.base`` (built in or from ``CLAIM_MODULES``) is a ``threegate run`` name."""
    from sims.claims.base import as_run_results, claim_configs, claim_experiments

    configs = claim_configs()
    for cname, fn in claim_experiments().items():
        if cname in EXPERIMENTS:
            continue
        if cname not in configs:
            raise InputError(f"claim experiment {cname!r} declares no config class (CLAIM_CONFIGS)")
        sections = {**_TINY, cname: Section(configs[cname], presets=("fast", "default"), default="default")}
        EXPERIMENTS[cname] = Experiment(cname, first_paragraph(fn.__doc__) or cname,
                                        lambda cfg, fn=fn: as_run_results(fn(cfg)), sections)


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
