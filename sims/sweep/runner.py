"""``threegate sweep SPEC``: a resumable grid of experiment cells, written atomically to one SQLite store.

The spec and its cells: ``sims.sweep.spec``; what a cell computes: ``sims.sweep.cells``.

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
workers; a cell whose run warned says how many warnings and the first); a tqdm bar instead when stderr is a
terminal. The summary line counts the cells whose run warned (their warnings are in the store's ``cells`` table,
column ``warnings``; every table of ``load_store`` has ``cell_warnings``). Exit status 0 when every cell of the spec
is done, 1 when some cell failed, with one line on stderr naming the failed cells (``failed_cells_line``). Every
cell's resolved config is validated (``sims.sweep.spec.validate_cell``: types, unknown keys, each section's own
checks) before any cell runs.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np
import torch
from tqdm import tqdm

from sims.sweep.cells import execute_cell
from sims.sweep.spec import Cell, SweepSpec, load_spec
from sims.sweep.store import CellOutcome, SweepStore, count_warnings, store_cells
from theory.errors import InputError

__all__ = ["Progress", "SweepSummary", "run_sweep", "add_arguments", "run", "failed_cells_line"]


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
        if outcome.warnings:
            first = outcome.warnings[0]
            text = " ".join(f"{first['category']}: {first['message']}".split())
            status += (f", {count_warnings(outcome.warnings)} warning(s): "
                       f"{text if len(text) <= 120 else text[:117] + '...'}")
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
    """What one ``run_sweep`` call did: ``ran`` cells this call (``done`` + ``failed`` of them), ``skipped``;
    ``warned``: cells run this call whose run raised a warning; ``warned_in_store``: the spec's cells in the store
    (this call's and earlier ones) whose run did."""

    store: Path
    total: int
    skipped: int
    ran: int
    done: int
    failed: int
    failed_in_store: int
    seconds: float
    warned: int = 0
    warned_in_store: int = 0


def _run_inprocess(todo: Sequence[Cell], threads: int, finish: Callable[[Cell, CellOutcome], None]) -> None:
    for cell in todo:
        finish(cell, execute_cell(_task(cell, threads)))


def _run_pool(todo: Sequence[Cell], workers: int, threads: int,
              finish: Callable[[Cell, CellOutcome], None]) -> None:
    """A spawn process pool with at most ``workers`` cells in flight (so a broken pool has few suspects)."""
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
    from dask.distributed import Client, as_completed  # heavy (~1 s, starts a tornado loop): --scheduler only

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
        counts = {"done": 0, "failed": 0, "warned": 0}

        def finish(cell: Cell, outcome: CellOutcome) -> None:
            store.record(outcome, experiment=cell.experiment, config=cell.config, grid=cell.grid)
            counts[outcome.status] += 1
            counts["warned"] += bool(outcome.warnings)
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
        stored = store.cells()
    ids = {c.cell_id for c in cells}
    return SweepSummary(store=spec.store, total=len(cells), skipped=len(cells) - len(todo), ran=len(todo),
                        done=counts["done"], failed=counts["failed"],
                        failed_in_store=sum(1 for i, s in status.items() if i in ids and s == "failed"),
                        seconds=time.perf_counter() - t0, warned=counts["warned"],
                        warned_in_store=int(((stored["n_warnings"] > 0) & stored["cell_id"].isin(list(ids))).sum()))


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
          f"({s.done} done, {s.failed} failed) in {s.seconds:.1f}s; store {s.store}"
          + (f"; {s.warned_in_store} cell(s) warned (column 'warnings' of the store's cells table)"
             if s.warned_in_store else ""))
    if s.failed_in_store:
        print(failed_cells_line(spec), file=sys.stderr)
        return 1
    return 0


#: Failed cells named one by one in the summary line; the rest are counted.
SHOWN_FAILURES = 3


def failed_cells_line(spec: SweepSpec) -> str:
    """One line: how many of the spec's cells are recorded as failed, the first ``SHOWN_FAILURES`` of them (id,
    grid values, error) and how to rerun them."""
    cells = {c.cell_id: c for c in spec.cells()}
    table = store_cells(spec.store)
    failed = table[(table["status"] == "failed") & table["cell_id"].isin(list(cells))]
    parts = []
    for _, row in failed.head(SHOWN_FAILURES).iterrows():
        error = " ".join(str(row["error"]).split())
        parts.append(f"{row['cell_id']} ({cells[row['cell_id']].label()}): "
                     f"{error if len(error) <= 200 else error[:197] + '...'}")
    more = f"; and {len(failed) - SHOWN_FAILURES} more" if len(failed) > SHOWN_FAILURES else ""
    return (f"threegate sweep {spec.name}: {len(failed)} of {len(cells)} cells failed: {'; '.join(parts)}{more} "
            f"(errors in the store's 'cells' table; rerun them with --retry-failed)")
