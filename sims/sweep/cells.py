"""The cell kinds of ``threegate sweep``: what one cell computes, in whichever process runs it.

* ``"theory"`` — the Gate II checks of ``theory.RESULTS`` (``theory.spectral.gate2_all``) on seeded synthetic pairs
  (``theory.spectral.gate2_synthetic``) at the cell's regime. Config keys (defaults in ``THEORY_DEFAULTS``):
  ``spectrum``, ``perturbation``, ``m``, ``n``, ``k``, ``target_ratio`` (= ||dW||_2 / gamma_k, the noise scale),
  ``seed``, ``instances`` (seeded pairs per cell), ``ids`` (Gate II result ids), ``spectrum_params``, ``device``.
  Table ``checks``: one row per (instance, result id), the columns of ``Check.as_row()`` plus the regime.
* every ``threegate run`` experiment (``sims.experiments.registry.EXPERIMENTS``: ``rlvr``, ``sft``, ``rl_vs_sft``,
  ...): ``run_experiment`` into a temporary directory; the cell's tables are its ``*.parquet`` tables (and
  ``verdicts``).
* ``"hf_rlvr"`` / ``"hf_sft"`` — ``sims.hf.backend.run_cell(config)``: a TRL run on a real Hugging Face model, with
  its *flat* config (``model``, ``algorithm`` = grpo | dapo, ``lr``, ``beta``, ``eps``, ``storage``, ``adapter``,
  ``steps``, ``seed``, ``device``, ``preset``, ...; ``hf_sft`` sets ``algorithm = "sft"``).
* ``"package.module:function"`` — any importable ``function(config: dict) -> dict[str, DataFrame]``.

``execute_cell`` is the worker entry point: it runs one cell with a fixed number of BLAS / torch threads and hands
back a ``sims.sweep.store.CellOutcome`` (the tables encoded, or the error), never raising for a cell's error. The
warnings the cell's run raises (under the warning filters in force: what a plain run would print) are kept with it,
deduplicated by category and message, at most ``sims.sweep.store.MAX_CELL_WARNINGS`` (``cell_warnings``).
"""

from __future__ import annotations

import copy
import importlib
import json
import socket
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from sims.experiments import registry
from sims.experiments.config import check_fields
from sims.hf import backend as hf_backend
from sims.sweep.store import MAX_CELL_WARNINGS, CellOutcome, encode_table
from sims.tinygpt.determinism import deterministic
from theory.errors import InputError
from theory.spectral import GATE2_IDS, gate2_synthetic

__all__ = ["SPECIAL_KINDS", "TheoryCellConfig", "THEORY_DEFAULTS", "theory_config", "hf_flat_config",
           "import_cell_function", "theory_cell", "run_cell_tables", "execute_cell", "cell_warnings"]

#: Characters of one warning message kept in the store.
MAX_WARNING_CHARS = 500

SPECIAL_KINDS = ("theory", "hf_rlvr", "hf_sft")

@dataclass(frozen=True)
class TheoryCellConfig:
    """The config of a ``theory`` cell (its schema: ``sims.experiments.config`` checks every key against it)."""

    spectrum: str = "gapped"
    perturbation: str = "gaussian"
    m: int = 12
    n: int = 8
    k: int = 3
    target_ratio: float = 0.1
    seed: int = 0
    instances: int = 1
    ids: str | tuple[str, ...] | None = None  # None: every Gate II id (theory.spectral.GATE2_IDS)
    spectrum_params: dict = field(default_factory=dict)
    device: str = "cpu"


THEORY_DEFAULTS: dict[str, Any] = {f.name: getattr(TheoryCellConfig(), f.name) for f in fields(TheoryCellConfig)}


def import_cell_function(name: str) -> Callable[[dict], Mapping[str, pd.DataFrame]]:
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


def theory_config(cfg: Mapping, *, where: str = "theory cell") -> dict:
    """A theory cell's config, every key checked against ``TheoryCellConfig``, with the defaults filled in."""
    try:
        c = {**THEORY_DEFAULTS, **check_fields(TheoryCellConfig, cfg, "[theory cell]")}
    except InputError as e:
        raise type(e)(f"{where}: {e}") from None
    ids = c["ids"] if c["ids"] is not None else list(GATE2_IDS)
    if isinstance(ids, str):
        ids = [ids]
    bad = [i for i in ids if i not in GATE2_IDS]
    if bad or not ids:
        raise InputError(f"{where}: ids {bad or list(ids)} are not Gate II result ids; choose from {list(GATE2_IDS)}")
    c["ids"] = list(ids)
    return c


def theory_cell(cfg: Mapping) -> dict[str, pd.DataFrame]:
    """Gate II checks on ``instances`` seeded synthetic pairs at the cell's regime -> ``{"checks": rows}``.

    Instance i uses the seed ``SeedSequence([seed, i])``; ``dW_over_gap`` is ||W1 - W0||_2 / gamma_k measured on
    the float64 matrices (the x axis of ``paper_figs.sweep_figs.sweep_bounds``).
    """
    c = theory_config(cfg)
    rows = []
    for i in range(c["instances"]):
        inst_seed = int(np.random.SeedSequence([c["seed"], i]).generate_state(1)[0])
        dW_over_gap, checks = gate2_synthetic(inst_seed, c["spectrum"], c["perturbation"], c["m"], c["n"], c["k"],
                                              float(c["target_ratio"]), device=c["device"],
                                              **dict(c["spectrum_params"]))
        for rid in c["ids"]:
            row = {"instance": i, "instance_seed": inst_seed, "spectrum": c["spectrum"],
                   "perturbation": c["perturbation"], "m": c["m"], "n": c["n"], "k": c["k"],
                   "target_ratio": float(c["target_ratio"]), "dW_over_gap": dW_over_gap, **checks[rid].as_row()}
            row["failed_assumption"] = row["failed_assumption"] or ""
            rows.append(row)
    return {"checks": pd.DataFrame(rows)}


def _experiment_cell(name: str, cfg: Mapping) -> dict[str, pd.DataFrame]:
    with tempfile.TemporaryDirectory(prefix="threegate-sweep-") as tmp:
        out = registry.run_experiment(name, copy.deepcopy(dict(cfg)), Path(tmp) / "run")
        tables = {p.stem: pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))}
        verdicts = out / "verdicts.json"
        if verdicts.is_file():
            v = pd.DataFrame(json.loads(verdicts.read_text()))
            if "numbers" in v.columns:
                v["numbers"] = [json.dumps(x, sort_keys=True, default=float) for x in v["numbers"]]
            tables["verdicts"] = v
    return tables


def hf_flat_config(kind: str, cfg: Mapping, *, where: str = "cell") -> dict:
    """The flat config of ``sims.hf.backend.run_cell``: ``hf_sft`` is its ``algorithm = "sft"``."""
    cell = copy.deepcopy(dict(cfg))
    algorithm = cell.get("algorithm")
    if kind == "hf_sft":
        if algorithm not in (None, "sft"):
            raise InputError(f"{where}: an hf_sft cell trains SFT; it cannot take algorithm={algorithm!r} "
                             "(use hf_rlvr)")
        cell["algorithm"] = "sft"
    elif algorithm == "sft":
        raise InputError(f"{where}: an hf_rlvr cell cannot take algorithm='sft' (use experiment hf_sft)")
    return cell


def _hf_cell(kind: str, cfg: Mapping) -> Mapping[str, pd.DataFrame]:
    """``sims.hf.backend.run_cell`` with a flat config."""
    return hf_backend.run_cell(hf_flat_config(kind, cfg))


def run_cell_tables(experiment: str, cfg: Mapping) -> dict[str, pd.DataFrame]:
    """Run one cell in this process and return its result tables (raises whatever the cell raises)."""
    if experiment == "theory":
        tables = theory_cell(cfg)
    elif experiment in ("hf_rlvr", "hf_sft"):
        tables = _hf_cell(experiment, cfg)
    elif experiment in registry.EXPERIMENTS:
        tables = _experiment_cell(experiment, cfg)
    elif ":" in experiment:
        tables = import_cell_function(experiment)(copy.deepcopy(dict(cfg)))
    else:
        raise InputError(f"unknown experiment {experiment!r}")
    if not isinstance(tables, Mapping) or not all(isinstance(v, pd.DataFrame) for v in tables.values()):
        raise TypeError(f"cell kind {experiment!r} must return dict[str, pandas.DataFrame], got {type(tables).__name__}")
    return dict(tables)


def cell_warnings(caught: list[warnings.WarningMessage]) -> list[dict[str, str]]:
    """The warnings a cell raised as stored: ``{"category", "message"}`` in the order first raised, deduplicated,
    each message cut to ``MAX_WARNING_CHARS``; past ``MAX_CELL_WARNINGS`` distinct ones, a last entry
    ``{"category": "truncated", "message": "N more distinct warnings"}``.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     for x in (1, 2, 1):
    ...         warnings.warn(f"x={x}", RuntimeWarning)
    >>> cell_warnings(caught)
    [{'category': 'RuntimeWarning', 'message': 'x=1'}, {'category': 'RuntimeWarning', 'message': 'x=2'}]
    """
    seen: dict[tuple[str, str], None] = {}
    for w in caught:
        message = str(w.message)
        if len(message) > MAX_WARNING_CHARS:
            message = message[:MAX_WARNING_CHARS - 3] + "..."
        seen.setdefault((w.category.__name__, message), None)
    kept = [{"category": c, "message": m} for c, m in list(seen)[:MAX_CELL_WARNINGS]]
    if len(seen) > MAX_CELL_WARNINGS:
        kept.append({"category": "truncated", "message": f"{len(seen) - MAX_CELL_WARNINGS} more distinct warnings"})
    return kept


def execute_cell(task: Mapping[str, Any]) -> CellOutcome:
    """Worker entry point: run one cell with ``threads`` BLAS/torch threads; never raises for a cell's error.

    ``task`` = {"cell_id", "experiment", "config", "threads"} (plain data: it crosses process and machine
    boundaries). The tables come back encoded (Parquet bytes) so the parent only writes them, with the warnings
    the run raised (``cell_warnings``), whether the cell finished or failed.
    """
    cfg = task["config"]
    out = CellOutcome(cell_id=task["cell_id"], status="failed", host=socket.gethostname(),
                      device=str(cfg.get("device", "cpu")), started=time.time())
    with warnings.catch_warnings(record=True) as caught:  # the filters in force decide what is recorded
        try:
            with deterministic(int(task.get("threads", 1)), algorithms=False):
                tables = run_cell_tables(task["experiment"], cfg)
            out.tables = {name: encode_table(df) for name, df in tables.items()}
            out.status = "done"
        except (Exception, SystemExit) as e:  # a failed cell is a result, not a crash of the sweep
            out.error = f"{type(e).__name__}: {e}"
            out.traceback = "".join(traceback.format_exception(e))[-8000:]
        finally:
            out.finished = time.time()
    out.warnings = cell_warnings(caught)
    return out
