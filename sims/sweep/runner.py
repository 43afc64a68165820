"""``threegate sweep SPEC``: a resumable grid of experiment cells, written atomically to one SQLite store.

A **spec** (TOML or YAML, the same structure)::

    [sweep]
    name = "gate2-theory"            # default: the spec file's stem
    experiment = "theory"            # a cell kind (below)
    store = "runs/sweeps/gate2.sqlite"   # default runs/sweeps/<name>.sqlite (relative to the working directory)
    workers = 2                      # local process pool size; 0 runs the cells in this process
    threads = 1                      # BLAS / torch threads inside each cell (1 keeps cells bit-reproducible)

    [base]                           # the fixed config, nested as ``threegate run`` configs take it
    m = 12
    n = 8

    [grid]                           # dotted paths into the config -> lists; the cells are the Cartesian product
    k = [2, 3]
    target_ratio = [0.01, 0.1, 1.0]
    "rlvr.lr" = [1e-4, 1e-3]         # (a nested table rlvr = {lr = [...]} means the same)

    [[cells]]                        # optional extra cells: dotted overrides of [base] (may set "experiment")
    k = 5

A **cell** is (experiment, resolved config); its id is ``sims.experiments.registry.config_hash(experiment, config)``, so the
same cell has the same id in every spec and every store. Cell kinds:

* ``"theory"`` — the Gate II checks of ``theory.RESULTS`` (``theory.spectral.gate2_all``) on seeded synthetic pairs
  (``theory.synthetic.synthetic_pair``) at the cell's regime. Config keys (defaults in ``THEORY_DEFAULTS``):
  ``spectrum``, ``perturbation``, ``m``, ``n``, ``k``, ``target_ratio`` (= ||dW||_2 / gamma_k, the noise scale),
  ``seed``,
  ``instances`` (seeded pairs per cell), ``ids`` (Gate II result ids), ``spectrum_params``, ``device``.
  Table ``checks``: one row per (instance, result id), the columns of ``Check.as_row()`` plus the regime.
* every ``threegate run`` experiment (``sims.experiments.registry.EXPERIMENTS``: ``rlvr``, ``sft``, ``rl_vs_sft``, ...):
  ``run_experiment`` into a temporary directory; the cell's tables are its ``*.parquet`` tables (and ``verdicts``).
* ``"hf_rlvr"`` / ``"hf_sft"`` — ``sims.hf.backend.run_cell(config)``: a TRL run on a real Hugging Face model, with
  its *flat* config (``model``, ``algorithm`` = grpo | dapo, ``lr``, ``beta``, ``eps``, ``storage``, ``adapter``,
  ``steps``, ``seed``, ``device``, ``preset``, ...; ``hf_sft`` sets ``algorithm = "sft"``). The module is imported
  when the cell runs; if it is missing the cell fails with the import error recorded.
* ``"package.module:function"`` — any importable ``function(config: dict) -> dict[str, DataFrame]``.

**Store and resume** (``sims.sweep.store``): only this (parent) process writes the store, one transaction per
finished cell. Cells whose id is ``done`` are skipped, so an interrupted sweep (Ctrl-C, SIGKILL, a crashed machine)
restarted with the same command computes only what is missing; ``failed`` cells (the exception type and message are
recorded) are skipped too unless ``--retry-failed``. A cell that raises never stops the others; a worker process that
dies mid-cell (segfault, OOM kill) breaks the process pool: the sweep re-runs the cells that were in flight one by
one in fresh pools, records the one that kills its worker again as failed, and goes on.

**Execution**: a local ``ProcessPoolExecutor`` (spawn) by default; ``--scheduler ADDRESS`` submits the cells to a
Dask cluster (``dask.distributed.Client(ADDRESS)``; Slurm / Kubernetes through ``dask-jobqueue`` /
``dask-kubernetes``). Cells with ``device = "cuda"`` are submitted with ``resources={"GPU": 1}``: start GPU workers
with ``dask worker tcp://SCHEDULER:8786 --resources GPU=1`` (one per GPU). Locally, cuda cells are refused up front
when torch sees no CUDA device.

Progress: one line per finished cell on stderr (done / total, failed, elapsed, ETA = mean cell time x remaining /
workers); a tqdm bar instead when stderr is a terminal. Exit status 0 when every cell of the spec is done, 1 when
some cell failed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import numpy as np
import pandas as pd

from sims.sweep.store import CellOutcome, SweepStore, encode_table, load_store
from theory.errors import InputError

__all__ = ["THEORY_DEFAULTS", "SPECIAL_KINDS", "Cell", "SweepSpec", "SweepSummary", "load_spec", "parse_spec",
           "expand_cells", "run_cell_tables", "execute_cell", "theory_cell", "run_sweep", "load_store",
           "add_arguments", "run"]

SPECIAL_KINDS = ("theory", "hf_rlvr", "hf_sft")

THEORY_DEFAULTS: dict[str, Any] = {
    "spectrum": "gapped",
    "perturbation": "gaussian",
    "m": 12,
    "n": 8,
    "k": 3,
    "target_ratio": 0.1,
    "seed": 0,
    "instances": 1,
    "ids": None,  # None: every Gate II id (theory.spectral.GATE2_IDS)
    "spectrum_params": {},
    "device": "cpu",
}


# ----------------------------------------------------------------------------------------------------------------
# Spec and cells


@dataclass(frozen=True)
class Cell:
    """One unit of work: an experiment (cell kind) and its fully resolved config; ``grid`` = the values it varies."""

    experiment: str
    config: Mapping[str, Any]
    grid: Mapping[str, Any]

    @property
    def cell_id(self) -> str:
        from sims.experiments.registry import config_hash

        return config_hash(self.experiment, self.config)

    @property
    def device(self) -> str:
        return str(self.config.get("device", "cpu"))

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.grid.items()) or "(base)"


@dataclass
class SweepSpec:
    """A parsed spec: ``cells()`` expands ``grid`` (Cartesian product, keys in file order) then ``extra_cells``."""

    name: str
    experiment: str
    store: Path
    workers: int = 2
    threads: int = 1
    base: dict = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    extra_cells: list[dict] = field(default_factory=list)
    source: str = "<spec>"

    def cells(self) -> list[Cell]:
        return expand_cells(self)


def _read_spec_file(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"sweep spec {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise InputError(f"sweep spec {path}: unsupported extension {path.suffix!r} (use .toml, .yaml or .yml)")
    except InputError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise InputError(f"sweep spec {path} is not valid {suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"sweep spec {path}: the top level must be a table / mapping")
    return data


def load_spec(path: str | Path, *, store: str | Path | None = None, workers: int | None = None) -> SweepSpec:
    """Read and validate a TOML / YAML sweep spec (``store`` / ``workers`` override the file's)."""
    path = Path(path)
    return parse_spec(_read_spec_file(path), source=str(path), default_name=path.stem, store=store, workers=workers)


def _flatten_grid(grid: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"rlvr": {"lr": [..]}, "seed": [..]} -> {"rlvr.lr": [..], "seed": [..]} (a quoted "rlvr.lr" key stays)."""
    out: dict[str, Any] = {}
    for key, value in grid.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten_grid(value, prefix=f"{full}."))
        else:
            out[full] = value
    return out


def _set_dotted(cfg: dict, key: str, value: Any, *, where: str) -> None:
    parts = key.split(".")
    if any(not p for p in parts):
        raise InputError(f"{where}: key {key!r} is not a valid dotted path")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise InputError(f"{where}: key {key!r} goes through {'.'.join(parts[:i + 1])!r}, which is "
                             f"{nxt!r}, not a table")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def _check_experiment(name: Any, where: str) -> str:
    from sims.experiments.registry import EXPERIMENTS

    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: experiment must be a non-empty string, got {name!r}")
    if name in SPECIAL_KINDS or name in EXPERIMENTS:
        return name
    if ":" in name:
        _import_cell_function(name)  # fails here, with the reason, rather than in every cell
        return name
    raise InputError(f"{where}: unknown experiment {name!r}; known: {sorted(set(SPECIAL_KINDS) | set(EXPERIMENTS))}"
                     " or 'package.module:function'")


def _import_cell_function(name: str) -> Callable[[dict], Mapping[str, pd.DataFrame]]:
    modname, _, fname = name.partition(":")
    try:
        fn = getattr(importlib.import_module(modname), fname)
    except (ImportError, AttributeError) as e:
        raise InputError(f"cell function {name!r} cannot be imported: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise InputError(f"cell function {name!r} is not callable")
    return fn


def _as_int(value: Any, key: str, where: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InputError(f"{where}: {key} must be an integer >= {lo}, got {value!r}")
    return value


def parse_spec(data: Mapping, *, source: str = "<spec>", default_name: str = "sweep",
               store: str | Path | None = None, workers: int | None = None) -> SweepSpec:
    """Validate a spec mapping (the parsed TOML / YAML): every problem is an ``InputError`` naming the key."""
    known = {"sweep", "base", "grid", "cells"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"sweep spec {source}: unknown top-level keys {unknown}; known: {sorted(known)}")
    sw = data.get("sweep", {})
    if not isinstance(sw, Mapping):
        raise InputError(f"sweep spec {source}: [sweep] must be a table")
    sw_known = {"name", "experiment", "store", "workers", "threads"}
    bad = sorted(set(sw) - sw_known)
    if bad:
        raise InputError(f"sweep spec {source}: unknown keys {bad} in [sweep]; known: {sorted(sw_known)}")
    if "experiment" not in sw:
        raise InputError(f"sweep spec {source}: [sweep] needs 'experiment' (a cell kind)")
    experiment = _check_experiment(sw["experiment"], f"sweep spec {source}: [sweep] experiment")
    name = str(sw.get("name", default_name))
    store_path = Path(store if store is not None else sw.get("store", Path("runs") / "sweeps" / f"{name}.sqlite"))
    n_workers = _as_int(workers if workers is not None else sw.get("workers", 2), "workers", f"sweep spec {source}", 0)
    threads = _as_int(sw.get("threads", 1), "threads", f"sweep spec {source}", 1)

    base = data.get("base", {})
    if not isinstance(base, Mapping):
        raise InputError(f"sweep spec {source}: [base] must be a table")
    raw_grid = data.get("grid", {})
    if not isinstance(raw_grid, Mapping):
        raise InputError(f"sweep spec {source}: [grid] must be a table of lists")
    grid = _flatten_grid(raw_grid)
    for key, values in grid.items():
        if not isinstance(values, list):
            raise InputError(f"sweep spec {source}: grid key {key!r} must be a list of values, got {values!r}")
        if not values:
            raise InputError(f"sweep spec {source}: grid key {key!r} is an empty list (the grid would have no cells)")
    extra = data.get("cells", [])
    if not isinstance(extra, list) or not all(isinstance(c, Mapping) for c in extra):
        raise InputError(f"sweep spec {source}: [[cells]] must be a list of tables")
    if not grid and not extra:
        raise InputError(f"sweep spec {source}: empty grid: give [grid] keys with lists of values, or [[cells]]")
    spec = SweepSpec(name=name, experiment=experiment, store=store_path, workers=n_workers, threads=threads,
                     base=copy.deepcopy(dict(base)), grid=grid, extra_cells=[_flatten_grid(c) for c in extra],
                     source=source)
    expand_cells(spec)  # validates the cells (dotted paths, duplicates, theory keys) before anything runs
    return spec


def expand_cells(spec: SweepSpec) -> list[Cell]:
    """The grid's Cartesian product (first key varies slowest), then the extra cells; duplicates are an error."""
    cells: list[Cell] = []
    keys = list(spec.grid)
    combos = itertools.product(*(spec.grid[k] for k in keys)) if keys else []
    for combo in combos:
        cfg = copy.deepcopy(spec.base)
        for key, value in zip(keys, combo):
            _set_dotted(cfg, key, value, where=f"sweep spec {spec.source}: [grid]")
        cells.append(Cell(spec.experiment, cfg, dict(zip(keys, combo))))
    for i, over in enumerate(spec.extra_cells):
        over = dict(over)
        exp = _check_experiment(over.pop("experiment", spec.experiment), f"sweep spec {spec.source}: cells[{i}]")
        cfg = copy.deepcopy(spec.base)
        for key, value in over.items():
            _set_dotted(cfg, key, value, where=f"sweep spec {spec.source}: cells[{i}]")
        grid = dict(over) if exp == spec.experiment else {"experiment": exp, **over}
        cells.append(Cell(exp, cfg, grid))
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.experiment == "theory":
            _theory_config(c.config, where=f"sweep spec {spec.source}: cell ({c.label()})")
        if c.cell_id in seen:
            raise InputError(f"sweep spec {spec.source}: duplicated cell: ({c.label()}) resolves to the same config "
                             f"as ({seen[c.cell_id].label()}) (cell id {c.cell_id})")
        seen[c.cell_id] = c
    return cells


# ----------------------------------------------------------------------------------------------------------------
# Cell kinds


def _theory_config(cfg: Mapping, *, where: str = "theory cell") -> dict:
    from theory.spectral import GATE2_IDS

    unknown = sorted(set(cfg) - set(THEORY_DEFAULTS))
    if unknown:
        raise InputError(f"{where}: unknown theory-cell keys {unknown}; known: {sorted(THEORY_DEFAULTS)}")
    c = {**THEORY_DEFAULTS, **cfg}
    ids = c["ids"] if c["ids"] is not None else list(GATE2_IDS)
    if isinstance(ids, str):
        ids = [ids]
    bad = [i for i in ids if i not in GATE2_IDS]
    if bad or not ids:
        raise InputError(f"{where}: ids {bad or ids} are not Gate II result ids; choose from {list(GATE2_IDS)}")
    c["ids"] = list(ids)
    for key in ("m", "n", "k", "instances", "seed"):
        if isinstance(c[key], bool) or not isinstance(c[key], int):
            raise InputError(f"{where}: {key} must be an integer, got {c[key]!r}")
    if not isinstance(c["spectrum_params"], Mapping):
        raise InputError(f"{where}: spectrum_params must be a table, got {c['spectrum_params']!r}")
    return c


def theory_cell(cfg: Mapping) -> dict[str, pd.DataFrame]:
    """Gate II checks on ``instances`` seeded synthetic pairs at the cell's regime -> ``{"checks": rows}``.

    Instance i uses the seed ``SeedSequence([seed, i])``; ``dW_over_gap`` is ||W1 - W0||_2 / gamma_k measured on
    the float64 matrices (the x axis of ``paper_figs.sweep_figs.sweep_bounds``).
    """
    from theory.synthetic import synthetic_pair
    from theory.spectral import gate2_all

    c = _theory_config(cfg)
    rows = []
    for i in range(c["instances"]):
        inst_seed = int(np.random.SeedSequence([c["seed"], i]).generate_state(1)[0])
        pair = synthetic_pair(inst_seed, c["spectrum"], c["perturbation"], c["m"], c["n"], c["k"],
                              float(c["target_ratio"]), **dict(c["spectrum_params"]))
        kl = {key: pair[key] for key in ("delta_W", "mu_W") if key in pair}
        checks = gate2_all(pair["W0"], pair["W1"], c["k"], device=c["device"], **kl)
        dW_over_gap = float(np.linalg.norm(pair["W1"] - pair["W0"], 2) / pair["gap"])
        for rid in c["ids"]:
            row = {"instance": i, "instance_seed": inst_seed, "spectrum": c["spectrum"],
                   "perturbation": c["perturbation"], "m": c["m"], "n": c["n"], "k": c["k"],
                   "target_ratio": float(c["target_ratio"]), "dW_over_gap": dW_over_gap, **checks[rid].as_row()}
            row["failed_assumption"] = row["failed_assumption"] or ""
            rows.append(row)
    return {"checks": pd.DataFrame(rows)}


def _experiment_cell(name: str, cfg: Mapping) -> dict[str, pd.DataFrame]:
    from sims.experiments.registry import run_experiment

    with tempfile.TemporaryDirectory(prefix="threegate-sweep-") as tmp:
        out = run_experiment(name, copy.deepcopy(dict(cfg)), Path(tmp) / "run")
        tables = {p.stem: pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))}
        verdicts = out / "verdicts.json"
        if verdicts.is_file():
            v = pd.DataFrame(json.loads(verdicts.read_text()))
            if "numbers" in v.columns:
                v["numbers"] = [json.dumps(x, sort_keys=True, default=float) for x in v["numbers"]]
            tables["verdicts"] = v
    return tables


def _hf_cell(kind: str, cfg: Mapping) -> Mapping[str, pd.DataFrame]:
    """``sims.hf.backend.run_cell`` with a flat config; ``hf_sft`` is its ``algorithm = "sft"``."""
    cell = copy.deepcopy(dict(cfg))
    algorithm = cell.get("algorithm")
    if kind == "hf_sft":
        if algorithm not in (None, "sft"):
            raise InputError(f"an hf_sft cell trains SFT; it cannot take algorithm={algorithm!r} (use hf_rlvr)")
        cell["algorithm"] = "sft"
    elif algorithm == "sft":
        raise InputError("an hf_rlvr cell cannot take algorithm='sft' (use experiment hf_sft)")
    hf_backend = importlib.import_module("sims.hf.backend")  # the cell fails (recorded) if it is missing
    return hf_backend.run_cell(cell)


def run_cell_tables(experiment: str, cfg: Mapping) -> dict[str, pd.DataFrame]:
    """Run one cell in this process and return its result tables (raises whatever the cell raises)."""
    from sims.experiments.registry import EXPERIMENTS

    if experiment == "theory":
        tables = theory_cell(cfg)
    elif experiment in ("hf_rlvr", "hf_sft"):
        tables = _hf_cell(experiment, cfg)
    elif experiment in EXPERIMENTS:
        tables = _experiment_cell(experiment, cfg)
    elif ":" in experiment:
        tables = _import_cell_function(experiment)(copy.deepcopy(dict(cfg)))
    else:
        raise InputError(f"unknown experiment {experiment!r}")
    if not isinstance(tables, Mapping) or not all(isinstance(v, pd.DataFrame) for v in tables.values()):
        raise TypeError(f"cell kind {experiment!r} must return dict[str, pandas.DataFrame], got {type(tables).__name__}")
    return dict(tables)


def execute_cell(task: Mapping[str, Any]) -> CellOutcome:
    """Worker entry point: run one cell with ``threads`` BLAS/torch threads; never raises for a cell's error.

    ``task`` = {"cell_id", "experiment", "config", "threads"} (plain data: it crosses process and machine
    boundaries). The tables come back encoded (Parquet bytes) so the parent only writes them.
    """
    import torch
    from threadpoolctl import threadpool_limits

    cfg = task["config"]
    out = CellOutcome(cell_id=task["cell_id"], status="failed", host=socket.gethostname(),
                      device=str(cfg.get("device", "cpu")), started=time.time())
    prev_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(int(task.get("threads", 1)))
        with threadpool_limits(int(task.get("threads", 1))):
            tables = run_cell_tables(task["experiment"], cfg)
        out.tables = {name: encode_table(df) for name, df in tables.items()}
        out.status = "done"
    except (Exception, SystemExit) as e:  # a failed cell is a result, not a crash of the sweep
        out.error = f"{type(e).__name__}: {e}"
        out.traceback = "".join(traceback.format_exception(e))[-8000:]
    finally:
        torch.set_num_threads(prev_threads)
        out.finished = time.time()
    return out


def _task(cell: Cell, threads: int) -> dict[str, Any]:
    return {"cell_id": cell.cell_id, "experiment": cell.experiment, "config": dict(cell.config), "threads": threads}


def _died(cell: Cell, why: str) -> CellOutcome:
    now = time.time()
    return CellOutcome(cell_id=cell.cell_id, status="failed", error=why, started=now, finished=now,
                       host=socket.gethostname(), device=cell.device)


# ----------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Done / total, failed, elapsed and ETA (mean cell seconds x remaining / workers), per finished cell."""

    def __init__(self, name: str, total: int, workers: int, *, stream: TextIO | None = None, enabled: bool = True):
        self.name, self.total, self.workers = name, total, max(1, workers)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = self.failed = 0
        self.cell_seconds: list[float] = []
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and total and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"sweep {name}", file=self.stream, unit="cell")

    def eta(self) -> float:
        remaining = self.total - self.done - self.failed
        if not self.cell_seconds:
            return math.nan
        return float(np.mean(self.cell_seconds)) * remaining / self.workers

    def update(self, cell: Cell, outcome: CellOutcome) -> None:
        if outcome.status == "done":
            self.done += 1
        else:
            self.failed += 1
        self.cell_seconds.append(outcome.seconds)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.set_postfix(failed=self.failed, eta=f"{self.eta():.0f}s")
            self.bar.update(1)
            return
        status = "ok" if outcome.status == "done" else f"FAILED ({outcome.error})"
        print(f"[sweep {self.name}] {self.done + self.failed}/{self.total} finished, {self.failed} failed, "
              f"elapsed {elapsed:.1f}s, ETA {self.eta():.1f}s | cell {cell.cell_id} ({cell.label()}) "
              f"{outcome.seconds:.2f}s {status}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Execution


@dataclass
class SweepSummary:
    """What one ``run_sweep`` call did: ``ran`` cells this call (``done`` + ``failed`` of them), ``skipped``."""

    store: Path
    total: int
    skipped: int
    ran: int
    done: int
    failed: int
    failed_in_store: int
    seconds: float


def _run_inprocess(todo: Sequence[Cell], threads: int, finish: Callable[[Cell, CellOutcome], None]) -> None:
    for cell in todo:
        finish(cell, execute_cell(_task(cell, threads)))


def _run_pool(todo: Sequence[Cell], workers: int, threads: int,
              finish: Callable[[Cell, CellOutcome], None]) -> None:
    """A spawn process pool with at most ``workers`` cells in flight (so a broken pool has few suspects)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    queue = list(todo)
    ctx = mp.get_context("spawn")
    while queue:
        suspects: list[Cell] = []
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        try:
            inflight: dict[Any, Cell] = {}
            while queue or inflight:
                while queue and len(inflight) < workers:
                    cell = queue.pop(0)
                    inflight[pool.submit(execute_cell, _task(cell, threads))] = cell
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    cell = inflight.pop(fut)
                    try:
                        finish(cell, fut.result())
                    except BrokenProcessPool:
                        suspects.append(cell)
                if suspects:  # every in-flight future fails with the pool: collect them all, then isolate
                    suspects.extend(inflight.values())
                    inflight.clear()
                    break
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        for cell in suspects:  # alone in a fresh pool: a cell that kills its worker again is the culprit
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as solo:
                try:
                    outcome = solo.submit(execute_cell, _task(cell, threads)).result()
                except BrokenProcessPool:
                    outcome = _died(cell, "WorkerDied: the worker process running this cell exited abruptly "
                                          "(killed, out of memory or crashed in native code)")
            finish(cell, outcome)


def _run_dask(todo: Sequence[Cell], scheduler: Any, threads: int,
              finish: Callable[[Cell, CellOutcome], None], connect_timeout: float) -> None:
    from dask.distributed import Client, as_completed

    if isinstance(scheduler, Client):
        client = scheduler
    else:
        try:
            client = Client(scheduler, timeout=connect_timeout)
        except (OSError, TimeoutError, ValueError) as e:
            raise InputError(f"cannot reach the Dask scheduler {scheduler!r} within {connect_timeout:g}s: "
                             f"{type(e).__name__}: {e}") from None
    try:
        if any(c.device.startswith("cuda") for c in todo):
            workers = client.scheduler_info().get("workers", {})
            if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
                raise InputError(
                    f"{sum(c.device.startswith('cuda') for c in todo)} cells ask for device='cuda' but no Dask worker "
                    f"of {client.scheduler.address} has a GPU resource; start GPU workers with "
                    f"'dask worker {client.scheduler.address} --resources GPU=1'")
        futures = {}
        for cell in todo:
            res = {"GPU": 1} if cell.device.startswith("cuda") else None
            fut = client.submit(execute_cell, _task(cell, threads), pure=False, resources=res,
                                key=f"threegate-cell-{cell.cell_id}-{os.getpid()}-{time.time_ns()}")
            futures[fut] = cell
        for fut in as_completed(list(futures)):
            cell = futures[fut]
            try:
                outcome = fut.result()
            except Exception as e:  # KilledWorker (the cell killed its workers repeatedly), lost connection
                outcome = _died(cell, f"{type(e).__name__}: {e}")
            finish(cell, outcome)
    finally:
        if client is not scheduler:
            client.close()


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run_sweep(spec: SweepSpec, *, workers: int | None = None, scheduler: Any = None, retry_failed: bool = False,
              progress: bool = True, stream: TextIO | None = None, connect_timeout: float = 30.0) -> SweepSummary:
    """Run every cell of ``spec`` not yet done in its store; returns what was done.

    ``workers``: overrides ``spec.workers`` (0 = in this process). ``scheduler``: a Dask scheduler address or
    ``dask.distributed.Client`` (then ``workers`` is only used for the ETA). Finished cells are committed to the store
    one by one as they arrive, so an interruption loses at most the cells that were running. The local pool spawns
    its workers: a script that calls this needs the ``if __name__ == "__main__":`` guard.
    """
    t0 = time.perf_counter()
    cells = spec.cells()
    n_workers = spec.workers if workers is None else workers
    if n_workers < 0:
        raise InputError(f"sweep {spec.name}: workers must be >= 0, got {n_workers}")
    with SweepStore(spec.store) as store:
        store.set_meta("sweep_name", spec.name)
        store.set_meta("spec_source", spec.source)
        status = store.statuses()
        skip = {"done", "failed"} if not retry_failed else {"done"}
        todo = [c for c in cells if status.get(c.cell_id) not in skip]
        if scheduler is None and not _cuda_available():
            cuda = [c for c in todo if c.device.startswith("cuda")]
            if cuda:
                raise InputError(f"sweep {spec.name}: {len(cuda)} cells ask for device='cuda' (first: {cuda[0].label()}) "
                                 "but torch sees no CUDA device here; run them on GPU Dask workers with --scheduler")
        prog = Progress(spec.name, len(todo), n_workers if scheduler is None else max(n_workers, 1),
                        stream=stream, enabled=progress)
        counts = {"done": 0, "failed": 0}

        def finish(cell: Cell, outcome: CellOutcome) -> None:
            store.record(outcome, experiment=cell.experiment, config=cell.config, grid=cell.grid)
            counts[outcome.status] += 1
            prog.update(cell, outcome)

        try:
            if not todo:
                pass
            elif scheduler is not None:
                _run_dask(todo, scheduler, spec.threads, finish, connect_timeout)
            elif n_workers == 0:
                _run_inprocess(todo, spec.threads, finish)
            else:
                _run_pool(todo, n_workers, spec.threads, finish)
        finally:
            prog.close()
        status = store.statuses()
    ids = {c.cell_id for c in cells}
    return SweepSummary(store=spec.store, total=len(cells), skipped=len(cells) - len(todo), ran=len(todo),
                        done=counts["done"], failed=counts["failed"],
                        failed_in_store=sum(1 for i, s in status.items() if i in ids and s == "failed"),
                        seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="sweep spec (.toml, .yaml or .yml)")
    parser.add_argument("--store", type=Path, default=None, help="results store (SQLite); default from the spec")
    parser.add_argument("--workers", type=int, default=None,
                        help="local process pool size (default from the spec; 0 = run the cells in this process)")
    parser.add_argument("--scheduler", default=None,
                        help="Dask scheduler address (e.g. tcp://host:8786): run the cells on that cluster")
    parser.add_argument("--retry-failed", action="store_true", help="run the cells recorded as failed again")
    parser.add_argument("--list", action="store_true", help="list the cells with their id and status, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no per-cell progress lines")


def _list_cells(spec: SweepSpec) -> int:
    status: dict[str, str] = {}
    if spec.store.is_file():
        with SweepStore(spec.store, create=False) as st:
            status = st.statuses()
    cells = spec.cells()
    for c in cells:
        print(f"{c.cell_id}  {status.get(c.cell_id, 'pending'):7s}  {c.experiment}  {c.label()}")
    n_done = sum(status.get(c.cell_id) == "done" for c in cells)
    print(f"sweep {spec.name}: {len(cells)} cells, {n_done} done, store {spec.store}")
    return 0


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, store=args.store, workers=args.workers)
    if args.list:
        return _list_cells(spec)
    s = run_sweep(spec, scheduler=args.scheduler, retry_failed=args.retry_failed, progress=not args.quiet)
    print(f"threegate sweep {spec.name}: {s.total} cells, {s.skipped} already in the store, ran {s.ran} "
          f"({s.done} done, {s.failed} failed) in {s.seconds:.1f}s; store {s.store}")
    if s.failed_in_store:
        print(f"  {s.failed_in_store} cells failed (errors in the store's 'cells' table; rerun them with "
              "--retry-failed)", file=sys.stderr)
        return 1
    return 0
