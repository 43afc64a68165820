"""``ThreeGateCallback``: watch a Hugging Face / TRL training run through the three gates, step by step.

Add it to any ``transformers.Trainer`` (TRL's ``GRPOTrainer``, ``SFTTrainer``, ...)::

    from threegate import ThreeGateCallback
    trainer = GRPOTrainer(..., callbacks=[ThreeGateCallback(out_dir="tg", snapshot_steps=50)])
    trainer.train()          # then: threegate figs tg   /   threegate compare tg/snapshots/step_000000.safetensors ...

**Every optimizer step** (``on_step_end``, which the Trainer calls after ``optimizer.step()``): per 2-D trainable
weight, the stored-bf16 view is compared with the previous step's and with the base (the weights at
``on_train_begin``; after a resume, the resumed weights), by ``threegate.live.LiveCounter`` (memory: 4.125 bytes per parameter on its device; see there).
Tables written to ``out_dir`` (CSV + Parquet, rewritten at each snapshot step, every ``flush_every`` steps and at
the end of training; on the main process only):

* ``steps``: one row per (step, matrix): ``step, matrix, matrix_type, layer, numel, changed_prev, changed_base,
  inter_prev, size_prev`` (``matrix`` = the parameter's name; ``layer`` -1 outside the blocks);
* ``step_sparsity`` (schema ``step_sparsity``): the counts pooled per step and matrix type (``all`` = every
  tracked matrix), with per-step sparsity ``1 - |M_t| / n``, sparsity against the base, and the Jaccard of
  consecutive step masks ``|M_t ∩ M_{t-1}| / |M_t ∪ M_{t-1}|`` beside the independent-Bernoulli baseline;
* ``steps_by_layer``: the same pooled per step and layer;
* ``sparsity`` (schema ``sparsity``, Table 1): sparsity against the base at the last counted step, per type;
* ``steps_timing``: seconds per step (the Trainer's work, callback excluded) and the callback's seconds.

**At snapshot steps** (``snapshot_steps``: an interval or a list; the last step is always one): the stored-bf16
weights go to ``out_dir/snapshots/step_{t:06d}.safetensors`` under the model's parameter names (the base is
``step_000000``), ready for ``threegate compare``; the snapshot is compared with the base by
``threegate.compare.compare_tables`` (the same code as ``threegate compare``: Gate II checks, principal angles,
NSS, M_princ / M_low overlaps; ``fast=True`` takes the ``theory.fast_spectral`` path, which leaves out NSS and the
Gate II checks), giving ``checks``, ``angles``, ``mask_overlap``, ``spectrum`` and ``snapshot_matrices`` (run
label ``{run_name}@step{t}``, the run's method). **Gate I**: where the trainer logs a KL to the reference policy (TRL's GRPO logs ``kl``
when ``beta > 0``), every logged value goes to ``gate1_kl`` and the ``checks`` rows of that step carry it.

**Gate III** (``gate3=True``): each step's change mask against the exact realization rule fed the float32 master
and against the rule fed the optimizer's update alone (``threegate.live``); counts per matrix in
``steps_gate3_by_matrix``, precision and recall per step in ``steps_gate3``. It copies the float32 master to the
host before every step and runs the rules in numpy: an analysis mode, not for production-size runs.

**Several processes**: counting follows ``threegate.live`` (rank 0 for replicated DDP weights; every rank and
one all-reduce per step for FSDP2 / ZeRO-3 shards); snapshots of ``DTensor`` weights are gathered with
``full_tensor()`` on every rank and written by rank 0.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from sims import tables as sims_tables
from theory import metrics
from theory.errors import InputError, ThreegateError
from theory.naming import layer_index, matrix_type
from threegate.checkpoints import save_safetensors
from threegate.compare import _validate_options, compare_tables
from threegate.live import LiveCounter, MatrixCounts, dtensor_class, local_shard, stored_bf16

__all__ = ["ThreeGateCallback", "steps_frame", "pool_steps", "gate3_tables", "table1_from_steps", "RL_CONFIGS"]

#: TrainingArguments subclasses whose runs are RL (Table 1's "method"); SFTConfig is "SFT"; others "tuned".
RL_CONFIGS = ("GRPOConfig", "RLOOConfig", "PPOConfig", "OnlineDPOConfig", "DAPOConfig")
_POOLED = ("numel", "changed_prev", "changed_base", "inter_prev", "size_prev")


# ----------------------------------------------------------------------------------------------- tables


def steps_frame(rows: Iterable[MatrixCounts]) -> pd.DataFrame:
    """The per-(step, matrix) table from ``LiveCounter.count`` rows, with ``matrix_type`` and ``layer``."""
    df = pd.DataFrame([vars(r) for r in rows], columns=[f.name for f in fields(MatrixCounts)])
    if df.empty:
        return df
    names = df["matrix"].drop_duplicates()
    types = {n: matrix_type(n) for n in names}
    layers = {n: (-1 if layer_index(n) is None else layer_index(n)) for n in names}
    df.insert(2, "matrix_type", df["matrix"].map(types))
    df.insert(3, "layer", df["matrix"].map(layers).astype(np.int64))
    return df


def _jaccard_columns(g: pd.DataFrame) -> pd.DataFrame:
    """Per-step sparsities and consecutive-mask Jaccard from pooled counts (NaN where no previous mask)."""
    n = g["numel"].to_numpy(np.float64)
    cur, prev, inter = (g[c].to_numpy(np.float64) for c in ("changed_prev", "size_prev", "inter_prev"))
    has_prev = prev >= 0
    union = cur + prev - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)  # two empty masks: J = 1
    p, q = cur / n, np.where(has_prev, prev / n, 0.0)
    base = np.array([metrics.bernoulli_jaccard_baseline(a, b) for a, b in zip(p, q)])
    g = g.copy()
    g["sparsity_step"] = 1.0 - cur / n
    g["sparsity_base"] = 1.0 - g["changed_base"].to_numpy(np.float64) / n
    g["jaccard_prev"] = np.where(has_prev, jac, np.nan)
    g["baseline_prev"] = np.where(has_prev, base, np.nan)
    return g


def pool_steps(steps: pd.DataFrame, by: str) -> pd.DataFrame:
    """Counts pooled per (step, ``by``) -- ``by`` is ``"matrix_type"`` (plus an ``all`` row per step) or
    ``"layer"`` -- then sparsities and Jaccard from the pooled counts (never averaged ratios)."""
    if steps.empty:
        return pd.DataFrame()
    first = steps["size_prev"] < 0
    s = steps.assign(size_prev=steps["size_prev"].where(~first, 0), _first=first)
    parts = [s.groupby(["step", by], sort=True).agg(**{c: (c, "sum") for c in _POOLED}, _first=("_first", "any"))
             .reset_index()]
    if by == "matrix_type":
        whole = s.groupby("step", sort=True).agg(**{c: (c, "sum") for c in _POOLED}, _first=("_first", "any"))
        parts.append(whole.reset_index().assign(matrix_type="all"))
    g = pd.concat(parts, ignore_index=True)
    g.loc[g["_first"], "size_prev"] = -1
    g = g.drop(columns="_first").sort_values(["step", by], kind="stable").reset_index(drop=True)
    return _jaccard_columns(g)


def table1_from_steps(steps: pd.DataFrame, *, run: str, method: str) -> pd.DataFrame:
    """Table 1 (schema ``sparsity``): sparsity against the base at the last step, per matrix type and ``all``."""
    last = steps[steps["step"] == steps["step"].max()]
    g = last.groupby("matrix_type")[["changed_base", "numel"]].sum().reset_index()
    g = pd.concat([g, pd.DataFrame([{"matrix_type": "all", "changed_base": int(last["changed_base"].sum()),
                                      "numel": int(last["numel"].sum())}])], ignore_index=True)
    g["sparsity"] = 1.0 - g["changed_base"] / g["numel"]
    g = g.rename(columns={"changed_base": "changed"})
    g.insert(0, "method", method)
    g.insert(0, "run", run)
    g["steps"] = int(last["step"].max())
    return g[["run", "method", "matrix_type", "sparsity", "changed", "numel", "steps"]]


def _ratio(num: pd.Series, den: pd.Series) -> np.ndarray:
    d = den.to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(d > 0, num.to_numpy(np.float64) / np.where(d > 0, d, 1.0), np.nan)


def gate3_tables(steps: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per step, per matrix) Gate III tables: counts, and precision / recall of both predictors
    (precision NaN when nothing is predicted, recall NaN when nothing changed)."""
    cols = ["step", "matrix", "matrix_type", "layer", "numel", "changed_prev", "pred_master", "tp_master",
            "pred_update", "tp_update"]
    g3 = steps[steps["pred_master"] >= 0][cols].rename(columns={"changed_prev": "changed"})
    if g3.empty:
        return pd.DataFrame(), pd.DataFrame()
    per_step = g3.groupby("step", sort=True)[["numel", "changed", "pred_master", "tp_master", "pred_update",
                                              "tp_update"]].sum().reset_index()
    for tab in (per_step, g3):
        for rule in ("master", "update"):
            tab[f"precision_{rule}"] = _ratio(tab[f"tp_{rule}"], tab[f"pred_{rule}"])
            tab[f"recall_{rule}"] = _ratio(tab[f"tp_{rule}"], tab["changed"])
    return per_step, g3.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- callback


def _snapshot_schedule(snapshot_steps: int | Iterable[int] | None) -> tuple[int, frozenset[int]]:
    """(interval, explicit steps) from an int interval (0: none), an iterable of steps, or None."""
    if snapshot_steps is None:
        return 0, frozenset()
    if isinstance(snapshot_steps, bool):
        raise InputError(f"snapshot_steps must be an int interval or a list of steps, got {snapshot_steps!r}")
    if isinstance(snapshot_steps, (int, np.integer)):
        if snapshot_steps < 0:
            raise InputError(f"snapshot_steps must be >= 0 (an interval; 0 = only the last step), got {snapshot_steps}")
        return int(snapshot_steps), frozenset()
    try:
        steps = [int(s) for s in snapshot_steps]
    except (TypeError, ValueError):
        raise InputError(f"snapshot_steps must be an int interval or a list of step numbers, got {snapshot_steps!r}") \
            from None
    if any(s < 1 for s in steps):
        raise InputError(f"snapshot_steps: step numbers start at 1, got {sorted(steps)[:3]}")
    return 0, frozenset(steps)


def _method_of(args: Any) -> str:
    name = type(args).__name__
    if name in RL_CONFIGS:
        return "RL"
    return "SFT" if name == "SFTConfig" else "tuned"


class ThreeGateCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that records bf16 update sparsity every step and the three gates at
    snapshot steps (see the module docstring for every table).

    Parameters
    ----------
    out_dir : str or Path
        Folder for the tables and ``snapshots/`` (created).
    snapshot_steps : int or iterable of int, optional
        An interval (every N steps), or explicit step numbers; the last step of training is always a snapshot
        step. ``0`` or ``None``: only the last step.
    k, alpha : int, float
        Top-k subspace size and the fraction of M_princ / M_low (as in ``threegate compare``).
    eta : float
        bf16 probe tolerance (Def. 2.1).
    gate3 : bool
        Evaluate the Gate III predictors on every step (host copies of the master; slow on large models).
    fast : bool
        Snapshot analysis on the ``theory.fast_spectral`` path (no NSS, no Gate II checks).
    only : str, optional
        A regular expression: analyse only the matrices whose name matches at snapshot steps (the snapshot files
        still hold every tracked matrix). For large models, where a full analysis costs a ``threegate compare``.
    save_snapshots : bool
        Write and analyse snapshots (False: per-step counts only).
    run_name, method : str, optional
        Labels in Table 1; default ``"{method}-seed{seed}"`` and the method from the config class
        (``GRPOConfig`` and other RL configs: ``RL``; ``SFTConfig``: ``SFT``; else ``tuned``).
    flush_every : int
        Rewrite the per-step tables every this many steps (they are also written at snapshots and at the end).
    device : str, optional
        Where the snapshot linear algebra runs (default: the parameters' device type).
    include_frozen : bool
        Track 2-D weights that do not require gradients too.

    Examples
    --------
    >>> cb = ThreeGateCallback(out_dir="tg_run", snapshot_steps=[1, 2])
    >>> cb.snapshot_interval, sorted(cb.snapshot_set)
    (0, [1, 2])
    """

    def __init__(self, out_dir: str | Path, *, snapshot_steps: int | Iterable[int] | None = None, k: int = 16,
                 alpha: float = 0.5, eta: float = metrics.ETA_DEFAULT, gate3: bool = False, fast: bool = False,
                 save_snapshots: bool = True, run_name: str | None = None, method: str | None = None,
                 flush_every: int = 50, device: str | None = None, include_frozen: bool = False,
                 only: str | None = None):
        _validate_options(k, alpha, eta, device or "cpu", None, 0)
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise InputError(f"flush_every must be a positive integer, got {flush_every!r}")
        for nm, v in (("gate3", gate3), ("fast", fast), ("save_snapshots", save_snapshots),
                      ("include_frozen", include_frozen)):
            if not isinstance(v, bool):
                raise InputError(f"ThreeGateCallback: {nm} must be True or False, got {v!r}")
        self.out_dir = Path(out_dir)
        self.snapshot_interval, self.snapshot_set = _snapshot_schedule(snapshot_steps)
        self.k, self.alpha, self.eta = int(k), float(alpha), float(eta)
        self.gate3, self.fast, self.save_snapshots = gate3, fast, save_snapshots
        self.run_name, self.method, self.device = run_name, method, device
        self.flush_every, self.include_frozen = flush_every, include_frozen
        if only is not None:
            try:
                re.compile(only)
            except re.error as e:
                raise InputError(f"ThreeGateCallback: only={only!r} is not a valid regular expression ({e})") from None
        self.only = only
        self.counter: LiveCounter | None = None
        self.rows: list[MatrixCounts] = []
        self.timing: list[dict[str, float]] = []
        self.kl: list[dict[str, float]] = []
        self.snapshot_tables: dict[str, list[pd.DataFrame]] = {}
        self._main = True
        self._model_name = ""
        self._last_end = 0.0
        self._pre_s = 0.0
        self._last_counted = 0
        self._snapshotted: set[int] = set()
        self.snapshot_errors: list[str] = []
        self._steps_df: pd.DataFrame | None = None
        self._converted = 0

    # ---------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise InputError("ThreeGateCallback: the trainer passed no model to on_train_begin")
        self._main = bool(state.is_world_process_zero)
        self.method = self.method or _method_of(args)
        self.run_name = self.run_name or f"{self.method}-seed{getattr(args, 'seed', 0)}"
        self._model_name = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")).name
        self.counter = LiveCounter(model.named_parameters(), eta=self.eta, gate3=self.gate3,
                                   include_frozen=self.include_frozen)
        self._names = [n for n, p in model.named_parameters()
                       if p.ndim == 2 and (self.include_frozen or p.requires_grad)]
        if self.device is None:
            first = next(p for _, p in model.named_parameters() if p.ndim == 2)
            self.device = local_shard(first)[0].device.type
        if self._main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.save_snapshots:
            self._base_path = self._write_snapshot(model, 0)
        self._last_end = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.counter is not None and self.gate3:
            t0 = time.perf_counter()
            self.counter.capture_pre_step()
            self._pre_s += time.perf_counter() - t0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.counter is None:
            return
        t0 = time.perf_counter()
        step = int(state.global_step)
        self.rows.extend(self.counter.count(step))
        self._last_counted = step
        snap_s = 0.0
        is_last = state.max_steps > 0 and step >= state.max_steps
        if self.save_snapshots and (is_last or step in self.snapshot_set
                                    or (self.snapshot_interval and step % self.snapshot_interval == 0)):
            t1 = time.perf_counter()
            self._snapshot(model, step)
            snap_s = time.perf_counter() - t1
        elif self._main and step % self.flush_every == 0:
            self.write_tables()
        callback_s = time.perf_counter() - t0 - snap_s + self._pre_s
        self.timing.append({"step": step, "step_s": t0 - self._last_end - self._pre_s, "callback_s": callback_s,
                            "snapshot_s": snap_s})
        self._pre_s = 0.0
        self._last_end = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = (logs or {}).get("kl")
        if isinstance(kl, (int, float)) and math.isfinite(kl):
            self.kl.append({"step": int(state.global_step), "kl": float(kl),
                            "beta": float(getattr(args, "beta", math.nan))})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.counter is None:
            return
        if self.save_snapshots and self._last_counted and self._last_counted not in self._snapshotted:
            self._snapshot(model, self._last_counted)  # training stopped before max_steps
        if self._main:
            self.write_tables()

    # ---------------------------------------------------------------------------------------- snapshots
    def _write_snapshot(self, model, step: int) -> Path:
        """Stored-bf16 weights of the tracked matrices (gathered if sharded) -> snapshots/step_{step:06d}."""
        DTensor = dtensor_class()
        params = dict(model.named_parameters())
        state = {}
        for name in self._names:
            p = params[name]
            full = p.full_tensor() if DTensor is not None and isinstance(p, DTensor) else p  # collective
            if self._main:
                state[name] = stored_bf16(full).cpu()
        path = self.out_dir / "snapshots" / f"step_{step:06d}.safetensors"
        if self._main:
            save_safetensors(state, path, metadata={"step": str(step), "view": "stored bf16"})
        return path

    def _snapshot(self, model, step: int) -> None:
        path = self._write_snapshot(model, step)
        self._snapshotted.add(step)
        if not self._main:
            return
        run = f"{self.run_name}@step{step}"
        try:
            t = compare_tables(self._base_path, [path], k=self.k, alpha=self.alpha, eta=self.eta,
                               device=self.device, method=self.method, keep_spectra=True, fast=self.fast,
                               only=self.only)
        except ThreegateError as e:  # an analysis problem must not end a training run: recorded, then go on
            self.snapshot_errors.append(f"step {step}: {e}")
            warnings.warn(f"ThreeGateCallback: snapshot analysis at step {step} failed: {e}", stacklevel=2)
            self.write_tables()
            return
        for name, df in (("checks", t.checks), ("angles", t.angles), ("mask_overlap", t.mask_overlap),
                         ("spectrum", t.spectrum), ("snapshot_matrices", t.matrices)):
            if df is not None and not df.empty:
                df = df.assign(run=run, step=step, method=self.method)
                self.snapshot_tables.setdefault(name, []).append(df)
        self.write_tables()

    # ---------------------------------------------------------------------------------------- output
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the run so far (empty ones left out)."""
        out: dict[str, pd.DataFrame] = {}
        steps = self._steps_frame()
        if not steps.empty:
            g3 = steps[["pred_master", "tp_master", "pred_update", "tp_update"]]
            out["steps"] = steps if self.gate3 else steps.drop(columns=g3.columns)
            out["step_sparsity"] = pool_steps(steps, "matrix_type").assign(run=self.run_name)
            out["steps_by_layer"] = pool_steps(steps, "layer").assign(run=self.run_name)
            out["sparsity"] = table1_from_steps(steps, run=self.run_name, method=self.method)
            if self.gate3:
                out["steps_gate3"], out["steps_gate3_by_matrix"] = gate3_tables(steps)
        if self.timing:
            out["steps_timing"] = pd.DataFrame(self.timing)
        kl = pd.DataFrame(self.kl)
        if not kl.empty:
            out["gate1_kl"] = kl
        for name, parts in self.snapshot_tables.items():
            df = pd.concat(parts, ignore_index=True)
            if name == "checks":
                df = df.drop(columns=["kl"], errors="ignore")
                last_kl = kl.groupby("step")["kl"].last() if not kl.empty else pd.Series(dtype=float)
                df["kl"] = df["step"].map(last_kl).astype(float)
            out[name] = df
        return {k: v for k, v in out.items() if v is not None and not v.empty}

    def _steps_frame(self) -> pd.DataFrame:
        """``steps_frame`` of every row so far, converting only the rows added since the last call."""
        new = self.rows[self._converted:]
        if new:
            parts = [df for df in (self._steps_df, steps_frame(new)) if df is not None and not df.empty]
            self._steps_df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
            self._converted = len(self.rows)
        return self._steps_df if self._steps_df is not None else pd.DataFrame()

    def write_tables(self) -> list[Path]:
        """Write every table as CSV and Parquet under ``out_dir`` (with a ``.meta.json`` sidecar)."""
        meta = {"model": self._model_name,
                "description": f"ThreeGateCallback on {self._model_name or 'a model'}: run {self.run_name} "
                               f"({self.method}), {self._last_counted} optimizer steps counted"}
        if self.snapshot_errors:
            meta["error"] = "; ".join(self.snapshot_errors)
        tables = {name: df.assign(model=self._model_name) if self._model_name and "model" not in df.columns else df
                  for name, df in self.tables().items()}
        return sims_tables.write_tables(tables, self.out_dir, meta=meta, atomic=True)
