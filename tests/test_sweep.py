"""Tests for sims.sweep.runner (``threegate sweep``): resume, failures, progress, kill-and-restart with a real
subprocess, the local pool and a Dask LocalCluster giving the same store.

Cells are of the cheap ``"theory"`` kind (Gate II checks on small synthetic pairs, milliseconds each) or small
functions defined here (``"tests.test_sweep:echo_cell"``), which the spawned workers import by name.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sims.sweep.runner import Progress, run_sweep
from sims.sweep.spec import Cell, SweepSpec, load_spec, parse_spec
from sims.sweep.store import CellOutcome, load_store, store_cells, store_tables_by_cell
from theory.errors import InputError
from threegate.cli import main

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Cell functions the workers import by name ("tests.test_sweep:echo_cell")


def echo_cell(cfg: dict) -> dict[str, pd.DataFrame]:
    """x -> x^2; ``raise`` makes the cell raise, ``crash`` kills the worker process outright (as a segfault would)."""
    if cfg.get("crash"):
        os._exit(3)
    if cfg.get("raise"):
        raise RuntimeError(f"cell asked to fail: {cfg['raise']}")
    return {"echo": pd.DataFrame({"x": [cfg["x"]], "x2": [cfg["x"] ** 2]})}


def not_a_table_cell(cfg: dict):
    return [1, 2, 3]


def warning_cell(cfg: dict) -> dict[str, pd.DataFrame]:
    """x -> x^2, warning as a numeric cell does: ``warn`` times the same non-finite RuntimeWarning plus one
    UserWarning about a fallback; ``raise`` also fails after warning."""
    import warnings

    for _ in range(cfg.get("warn", 0)):
        warnings.warn(f"non-finite value in x={cfg['x']}", RuntimeWarning)
    if cfg.get("warn"):
        warnings.warn("float32 fallback", UserWarning)
    if cfg.get("raise"):
        raise RuntimeError("failed after warning")
    return {"echo": pd.DataFrame({"x": [cfg["x"]], "x2": [cfg["x"] ** 2]})}


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def theory_spec(store: Path, *, workers: int = 0, **base) -> SweepSpec:
    """4 theory cells: two perturbation families x two ratios, two Gate II ids, two instances each."""
    data = {
        "sweep": {"name": "t", "experiment": "theory", "store": str(store), "workers": workers},
        "base": {"m": 10, "n": 7, "k": 2, "instances": 2, "ids": ["thm3.3", "thm3.3-rigorous"], **base},
        "grid": {"perturbation": ["gaussian", "swap"], "target_ratio": [0.1, 0.6]},
    }
    return parse_spec(data)


def assert_same_store(a: Path, b: Path) -> None:
    """Two stores hold the same cells (status, error, config) with equal result tables, cell by cell."""
    ca, cb = store_cells(a), store_cells(b)
    cols = ["cell_id", "experiment", "config_json", "grid_json", "status", "error"]
    pd.testing.assert_frame_equal(ca[cols], cb[cols])
    ta, tb = store_tables_by_cell(a), store_tables_by_cell(b)
    assert ta.keys() == tb.keys()
    for cell_id in ta:
        assert ta[cell_id].keys() == tb[cell_id].keys(), cell_id
        for name in ta[cell_id]:
            pd.testing.assert_frame_equal(ta[cell_id][name], tb[cell_id][name], check_exact=True, obj=f"{cell_id}/{name}")


def done_count(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT count(*) FROM cells WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


# ----------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_bad_spec_is_one_line_error(tmp_path, capsys):
    (tmp_path / "s.toml").write_text('[sweep]\nexperiment = "theory"\n[grid]\nk = 3\n')
    assert main(["sweep", str(tmp_path / "s.toml")]) == 1
    err = capsys.readouterr().err
    assert "grid key 'k' must be a list" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# Resume, failures, progress


def test_resume_is_idempotent(tmp_path):
    spec = theory_spec(tmp_path / "s.sqlite")
    first = run_sweep(spec, progress=False)
    assert (first.total, first.ran, first.done, first.failed) == (4, 4, 4, 0)
    before = store_cells(spec.store)
    second = run_sweep(spec, progress=False)
    assert (second.skipped, second.ran, second.done) == (4, 0, 0)
    pd.testing.assert_frame_equal(before, store_cells(spec.store))  # nothing recomputed: same timestamps
    # a grown grid runs only the new cells
    bigger = parse_spec({**_spec_dict(spec), "grid": {"perturbation": ["gaussian", "swap"],
                                                      "target_ratio": [0.1, 0.6, 0.9]}})
    third = run_sweep(bigger, progress=False)
    assert (third.skipped, third.ran, third.done) == (4, 2, 2)


def _spec_dict(spec: SweepSpec) -> dict:
    return {"sweep": {"name": spec.name, "experiment": spec.experiment, "store": str(spec.store),
                      "workers": spec.workers}, "base": spec.base, "grid": spec.grid}


def test_a_failing_cell_is_recorded_and_the_rest_finish(tmp_path, capsys):
    data = _spec_dict(theory_spec(tmp_path / "s.sqlite"))
    data["cells"] = [{"k": 20}]  # k > min(m, n): the synthetic generator refuses it when the cell runs
    spec = parse_spec(data)
    s = run_sweep(spec, progress=True)
    assert (s.ran, s.done, s.failed, s.failed_in_store) == (5, 4, 1, 1)
    cells = store_cells(spec.store)
    bad = cells[cells["status"] == "failed"].iloc[0]
    assert bad["error"].startswith("InputError: spectrum: k=20 outside 1..7")
    assert "Traceback" in bad["traceback"]
    assert json.loads(bad["grid_json"]) == {"k": 20}
    err = capsys.readouterr().err
    assert "5/5 finished, 1 failed" in err and "FAILED (InputError: spectrum: k=20" in err
    assert set(load_store(spec.store)["checks"]["cell_id"]) == set(cells.loc[cells["status"] == "done", "cell_id"])
    # failed cells are skipped on resume, run again with retry_failed (and fail again, recorded once)
    assert run_sweep(spec, progress=False).ran == 0
    again = run_sweep(spec, progress=False, retry_failed=True)
    assert (again.ran, again.failed) == (1, 1) and len(store_cells(spec.store)) == 5


def test_cli_exit_status_and_list(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(f'[sweep]\nexperiment = "theory"\nstore = "{tmp_path / "s.sqlite"}"\nworkers = 0\n'
                    '[base]\nm = 6\nn = 5\nids = ["cor3.4-weyl"]\n[grid]\nk = [1, 2, 9]\n')
    assert main(["sweep", str(spec), "--list"]) == 0
    out = capsys.readouterr().out
    assert out.count("pending") == 3 and "3 cells, 0 done" in out
    assert main(["sweep", str(spec), "--quiet"]) == 1  # k = 9 > min(m, n) fails
    captured = capsys.readouterr()
    assert "ran 3 (2 done, 1 failed)" in captured.out and "1 of 3 cells failed" in captured.err
    assert main(["sweep", str(spec), "--list"]) == 0
    out = capsys.readouterr().out
    assert out.count(" done ") == 2 and out.count("failed") == 1


def test_the_warnings_of_a_cell_are_stored_with_it_and_counted_in_the_summary(tmp_path, capsys):
    """Issue 12: a cell whose run warns keeps its warnings (deduplicated) in the store, every result table says how
    many, the progress line names the first, and the summary line counts the cells that warned; a failed cell keeps
    the warnings raised before it failed; a quiet cell has none."""
    spec = tmp_path / "s.toml"
    spec.write_text(f'[sweep]\nexperiment = "tests.test_sweep:warning_cell"\nstore = "{tmp_path / "s.sqlite"}"\n'
                    'workers = 0\n[grid]\nx = [1, 2]\n[[cells]]\nx = 3\nwarn = 3\n'
                    '[[cells]]\nx = 4\nwarn = 1\nraise = true\n')
    assert main(["sweep", str(spec)]) == 1  # x = 4 failed
    captured = capsys.readouterr()
    assert "; 2 cell(s) warned (column 'warnings'" in captured.out
    assert "ok, 2 warning(s): RuntimeWarning: non-finite value in x=3" in captured.err
    cells = store_cells(tmp_path / "s.sqlite")
    by_x = {json.loads(g)["x"]: row for g, (_, row) in zip(cells["grid_json"], cells.iterrows())}
    assert json.loads(by_x[3]["warnings"]) == [{"category": "RuntimeWarning", "message": "non-finite value in x=3"},
                                               {"category": "UserWarning", "message": "float32 fallback"}]
    assert by_x[4]["status"] == "failed" and by_x[4]["n_warnings"] == 2
    assert (by_x[1]["n_warnings"], by_x[2]["n_warnings"], by_x[3]["n_warnings"]) == (0, 0, 2)
    assert json.loads(by_x[1]["warnings"]) == []
    echo = load_store(tmp_path / "s.sqlite")["echo"].sort_values("x")
    assert echo["x"].tolist() == [1, 2, 3] and echo["cell_warnings"].tolist() == [0, 0, 2]
    # resumed: nothing runs, the summary still counts the stored cells that warned
    s = run_sweep(load_spec(spec), progress=False)
    assert (s.ran, s.warned, s.warned_in_store) == (0, 0, 2)


def test_cuda_cells_are_refused_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    spec = theory_spec(tmp_path / "s.sqlite", device="cuda")
    with pytest.raises(InputError, match="device='cuda'.*no CUDA device.*--scheduler"):
        run_sweep(spec, progress=False)


def test_progress_eta_is_mean_cell_time_times_remaining_over_workers(capsys):
    p = Progress("p", total=10, workers=2, stream=sys.stderr)
    cell = Cell("theory", {}, {"k": 1})
    p.update(cell, CellOutcome("a", "done", started=0.0, finished=2.0))
    p.update(cell, CellOutcome("b", "failed", error="E: x", started=0.0, finished=4.0))
    assert p.eta() == pytest.approx(3.0 * 8 / 2)
    err = capsys.readouterr().err.splitlines()
    assert "1/10 finished, 0 failed" in err[0] and "ETA 9.0s" in err[0]  # 2 s x 9 left / 2 workers
    assert "2/10 finished, 1 failed" in err[1] and "ETA 12.0s" in err[1] and "FAILED (E: x)" in err[1]


# ----------------------------------------------------------------------------------------------------------------
# Process pool: worker death; kill-and-restart; Dask


@pytest.mark.slow  # four spawned workers, each importing torch: ~20 s on 2 busy cores
def test_pool_survives_a_worker_that_dies_mid_cell(tmp_path):
    spec = parse_spec({"sweep": {"experiment": "tests.test_sweep:echo_cell", "store": str(tmp_path / "s.sqlite"),
                                 "workers": 2},
                       "grid": {"x": [1, 2, 3, 4]},
                       "cells": [{"x": 5, "crash": True}, {"x": 6, "raise": "on purpose"}]})
    s = run_sweep(spec, progress=False)
    assert (s.ran, s.done, s.failed) == (6, 4, 2)
    cells = store_cells(spec.store)
    err = {json.loads(g)["x"]: e for g, e in zip(cells["grid_json"], cells["error"])}
    assert err[5].startswith("WorkerDied") and err[6] == "RuntimeError: cell asked to fail: on purpose"
    assert all(pd.isna(err[x]) for x in (1, 2, 3, 4))
    echo = load_store(spec.store)["echo"].sort_values("x")
    assert echo["x"].tolist() == [1, 2, 3, 4] and echo["x2"].tolist() == [1, 4, 9, 16]


def test_sigkill_mid_sweep_then_restart_equals_an_uninterrupted_sweep(tmp_path):
    """A real ``threegate sweep`` process killed with SIGKILL after some cells are stored, then restarted, ends with
    the same store (cell by cell, result content) as a sweep that was never interrupted; the cells stored before the
    kill are not recomputed."""
    n_cells = 8
    spec_text = (
        f'[sweep]\nname = "kill"\nexperiment = "theory"\nstore = "STORE"\nworkers = 0\n'
        '[base]\nm = 48\nn = 40\nk = 4\ninstances = 30\n'
        f'[grid]\ntarget_ratio = {[0.05 * (i + 1) for i in range(n_cells // 2)]}\nperturbation = ["gaussian", "swap"]\n'
    )
    killed, ref = tmp_path / "killed.sqlite", tmp_path / "ref.sqlite"
    (tmp_path / "killed.toml").write_text(spec_text.replace("STORE", str(killed)))
    (tmp_path / "ref.toml").write_text(spec_text.replace("STORE", str(ref)))
    cmd = [sys.executable, "-m", "threegate", "sweep", str(tmp_path / "killed.toml"), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while done_count(killed) < 2:
            assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no cell finished in time"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = store_cells(killed)
    assert 2 <= len(before) < n_cells, "the kill came too late to interrupt the sweep"
    assert set(before["status"]) == {"done"}  # a cell is in the store complete, or absent

    restart = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr
    assert f"{len(before)} already in the store, ran {n_cells - len(before)}" in restart.stdout
    after = store_cells(killed).set_index("cell_id")
    for _, row in before.iterrows():  # finished cells kept, not recomputed
        assert after.loc[row["cell_id"], "started"] == row["started"]

    s = run_sweep(load_spec(tmp_path / "ref.toml"), progress=False)
    assert (s.done, s.failed) == (n_cells, 0)
    assert_same_store(killed, ref)


def test_dask_local_cluster_gives_the_same_store_as_the_local_pool(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    pool_spec = theory_spec(tmp_path / "pool.sqlite", workers=1)
    dask_spec = theory_spec(tmp_path / "dask.sqlite", workers=2)
    assert run_sweep(pool_spec, progress=False).done == 4
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        s = run_sweep(dask_spec, scheduler=cluster.scheduler_address, progress=False)
        # cuda cells need a worker with a GPU resource: without one they are refused, not queued forever
        with pytest.raises(InputError, match="no Dask worker .* GPU resource.*--resources GPU=1"):
            run_sweep(theory_spec(tmp_path / "gpu.sqlite", device="cuda"), scheduler=cluster.scheduler_address,
                      progress=False)
    assert (s.done, s.failed) == (4, 0)
    assert_same_store(pool_spec.store, dask_spec.store)
    hosts = set(store_cells(dask_spec.store)["host"])
    assert len(hosts) == 1 and hosts.pop()  # recorded by the worker that ran the cell


def test_cuda_cells_run_on_gpu_dask_workers(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    distributed = pytest.importorskip("dask.distributed")
    cpu = theory_spec(tmp_path / "cpu.sqlite")
    gpu = theory_spec(tmp_path / "gpu.sqlite", device="cuda")
    run_sweep(cpu, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, resources={"GPU": 1}) as cluster:
        s = run_sweep(gpu, scheduler=cluster.scheduler_address, progress=False)
    assert (s.done, s.failed) == (4, 0)
    assert set(store_cells(gpu.store)["device"]) == {"cuda"}
    a, b = load_store(cpu.store)["checks"], load_store(gpu.store)["checks"]
    key = ["perturbation", "target_ratio", "instance", "result_id"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert (a["verdict"] == b["verdict"]).all()


def test_unreachable_dask_scheduler_is_a_clear_error(tmp_path):
    pytest.importorskip("dask.distributed")
    import socket

    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(InputError, match=f"cannot reach the Dask scheduler 'tcp://127.0.0.1:{port}'"):
        run_sweep(theory_spec(tmp_path / "s.sqlite"), scheduler=f"tcp://127.0.0.1:{port}", progress=False,
                  connect_timeout=1.0)
    assert store_cells(tmp_path / "s.sqlite").empty  # nothing recorded
