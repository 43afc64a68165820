"""Tests for sims.sweep.runner and sims.sweep.store (``threegate sweep``): spec parsing, resume, atomicity, failures,
kill-and-restart with a real subprocess, the local pool and a Dask LocalCluster giving the same store.

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

import numpy as np
import pandas as pd
import pytest

from hypothesis import example, given
from hypothesis import strategies as st

from sims.experiments.registry import config_hash
from sims.sweep.runner import Progress, SweepSpec, load_spec, parse_spec, run_cell_tables, run_sweep, theory_cell
from sims.sweep.store import CellOutcome, SweepStore, encode_table, load_store, store_cells, store_tables_by_cell
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
# Spec parsing and grid expansion


def test_grid_is_the_cartesian_product_in_file_order_with_dotted_paths():
    spec = parse_spec({
        "sweep": {"experiment": "rl_vs_sft", "store": "s.sqlite"},
        "base": {"pretrain": {"preset": "fast"}, "rlvr": {"steps": 2}},
        "grid": {"rlvr.lr": [1e-4, 1e-3], "seed": [0, 1, 2]},
        "cells": [{"rlvr.lr": 5e-2, "seed": 9, "sft.steps": 3}],
    })
    cells = spec.cells()
    assert len(cells) == 2 * 3 + 1
    assert [(c.config["rlvr"]["lr"], c.config["seed"]) for c in cells[:6]] == [
        (1e-4, 0), (1e-4, 1), (1e-4, 2), (1e-3, 0), (1e-3, 1), (1e-3, 2)]
    assert all(c.config["rlvr"]["steps"] == 2 and c.config["pretrain"] == {"preset": "fast"} for c in cells)
    assert cells[-1].config["sft"] == {"steps": 3} and cells[-1].grid == {"rlvr.lr": 5e-2, "seed": 9, "sft.steps": 3}
    assert cells[0].grid == {"rlvr.lr": 1e-4, "seed": 0}
    # the id is the experiment's config hash: the same cell has the same id in any spec or store
    assert cells[0].cell_id == config_hash("rl_vs_sft", cells[0].config)
    assert len({c.cell_id for c in cells}) == len(cells)
    # the base is not shared between cells (deep copies)
    cells[0].config["rlvr"]["steps"] = 99
    assert cells[1].config["rlvr"]["steps"] == 2


_keys = st.sampled_from(["seed", "rlvr.lr", "rlvr.temperature", "sft.steps", "sft.lr", "sft.batch_size"])


@given(st.dictionaries(_keys, st.lists(st.integers(1, 9), min_size=1, max_size=3, unique=True), min_size=1,
                       max_size=4))
def test_grid_expansion_covers_the_product_exactly_once(grid):
    spec = parse_spec({"sweep": {"experiment": "rl_vs_sft"}, "base": {"rlvr": {"steps": 1}}, "grid": grid})
    cells = spec.cells()
    assert len(cells) == np.prod([len(v) for v in grid.values()])
    assert len({c.cell_id for c in cells}) == len(cells)
    seen = set()
    for c in cells:
        for key, value in c.grid.items():
            node = c.config
            for part in key.split("."):
                node = node[part]
            assert node == value  # the grid value sits at its dotted path
        assert c.config["rlvr"]["steps"] == 1
        seen.add(tuple(c.grid[k] for k in grid))
    assert len(seen) == len(cells)


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=2, max_size=20))
@example([0.1, -0.0, 5e-324, float("nan"), float("inf"), -float("inf"), 1.7976931348623157e308])
@example([0.0, np.uint64(0x7FF8000000000001).view(np.float64)])  # a NaN with a payload
def test_tables_round_trip_bit_exactly_in_both_formats(values):
    from sims.sweep.store import decode_table

    df = pd.DataFrame({"v": values, "s": [str(i) for i in range(len(values))]})
    mixed = df.assign(o=pd.Series(([1, "a"] * len(values))[:len(values)], dtype=object))
    fmt_p, payload_p = encode_table(df)
    fmt_j, payload_j = encode_table(mixed)  # a mixed object column forces the JSON fallback
    assert (fmt_p, fmt_j) == ("parquet", "json")
    for fmt, payload in ((fmt_p, payload_p), (fmt_j, payload_j)):
        back, want = decode_table(fmt, payload)["v"].to_numpy(np.float64), np.asarray(values, np.float64)
        nan = np.isnan(want)  # NaN payload bits are not kept (JSON has one NaN); every other value is bit-exact
        np.testing.assert_array_equal(np.isnan(back), nan)
        np.testing.assert_array_equal(back[~nan].view(np.uint64), want[~nan].view(np.uint64))


def test_nested_grid_table_equals_quoted_dotted_key():
    a = parse_spec({"sweep": {"experiment": "rlvr"}, "grid": {"rlvr.lr": [1e-4, 1e-3]}})
    b = parse_spec({"sweep": {"experiment": "rlvr"}, "grid": {"rlvr": {"lr": [1e-4, 1e-3]}}})
    assert [c.cell_id for c in a.cells()] == [c.cell_id for c in b.cells()]


def test_toml_and_yaml_specs_give_the_same_cells(tmp_path):
    (tmp_path / "s.toml").write_text(
        '[sweep]\nexperiment = "theory"\nworkers = 0\n[base]\nm = 9\n[grid]\nk = [1, 2]\n"target_ratio" = [0.1]\n'
        '[[cells]]\nk = 4\n')
    (tmp_path / "s.yaml").write_text(
        'sweep: {experiment: theory, workers: 0}\nbase: {m: 9}\ngrid:\n  k: [1, 2]\n  target_ratio: [0.1]\n'
        'cells:\n  - {k: 4}\n')
    a, b = load_spec(tmp_path / "s.toml"), load_spec(tmp_path / "s.yaml")
    assert [c.cell_id for c in a.cells()] == [c.cell_id for c in b.cells()]
    assert len(a.cells()) == 3 and a.name == "s" and a.store == Path("runs/sweeps/s.sqlite")
    assert load_spec(tmp_path / "s.toml", store=tmp_path / "x.sqlite", workers=5).workers == 5


@pytest.mark.parametrize("data, match", [
    ({"sweep": {"experiment": "no_such_exp"}, "grid": {"a": [1]}}, "unknown experiment 'no_such_exp'"),
    ({"sweep": {"experiment": "rlvr"}}, "empty grid"),
    ({"sweep": {"experiment": "rlvr"}, "grid": {}}, "empty grid"),
    ({"sweep": {"experiment": "rlvr"}, "grid": {"rlvr.lr": 1e-4}}, "grid key 'rlvr.lr' must be a list"),
    ({"sweep": {"experiment": "rlvr"}, "grid": {"rlvr": {"lr": []}}}, "grid key 'rlvr.lr' is an empty list"),
    ({"sweep": {"experiment": "rlvr"}, "grid": {"seed": [0, 1, 0]}}, "duplicated cell"),
    ({"sweep": {"experiment": "rlvr"}, "grid": {"seed": [0]}, "cells": [{"seed": 0}]}, "duplicated cell"),
    ({"sweep": {"experiment": "rlvr"}, "base": {"seed": 0}, "grid": {"seed.x": [1]}}, "'seed.x' goes through 'seed'"),
    ({"sweep": {"experiment": "rlvr"}, "grid": {"a..b": [1]}}, "'a..b' is not a valid dotted path"),
    ({"sweep": {}, "grid": {"a": [1]}}, "needs 'experiment'"),
    ({"sweep": {"experiment": "rlvr", "wrokers": 2}, "grid": {"a": [1]}}, r"\[sweep\]: unknown key 'wrokers' \(did you mean 'workers'\?\)"),
    ({"sweep": {"experiment": "rlvr", "workers": -1}, "grid": {"a": [1]}}, "workers must be an integer >= 0"),
    ({"sweep": {"experiment": "rlvr"}, "grid": {"a": [1]}, "extra": 1}, "top level: unknown key 'extra'"),
    ({"sweep": {"experiment": "theory"}, "grid": {"kk": [1]}}, r"unknown key 'kk' \(did you mean 'k'\?\)"),
    ({"sweep": {"experiment": "theory"}, "grid": {"ids": [["lemE.1"]]}}, "not Gate II result ids"),
    ({"sweep": {"experiment": "theory"}, "grid": {"k": [1.5]}}, "k: expected an integer, got the float 1.5"),
    ({"sweep": {"experiment": "no_module_xyz:f"}, "grid": {"a": [1]}}, "cannot be imported"),
    ({"sweep": {"experiment": "rlvr"}, "grid": {"a": [1]}, "cells": [{"experiment": "nope"}]}, "cells\\[0\\]"),
])
def test_bad_specs_are_input_errors_naming_the_key(data, match):
    with pytest.raises(InputError, match=match):
        parse_spec(data)


def test_spec_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(InputError, match="unsupported extension"):
        load_spec(tmp_path / "s.json")
    (tmp_path / "bad.toml").write_text("[sweep\nexperiment=")
    with pytest.raises(InputError, match="not valid TOML"):
        load_spec(tmp_path / "bad.toml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="top level must be a table"):
        load_spec(tmp_path / "list.yaml")


def test_cli_bad_spec_is_one_line_error(tmp_path, capsys):
    (tmp_path / "s.toml").write_text('[sweep]\nexperiment = "theory"\n[grid]\nk = 3\n')
    assert main(["sweep", str(tmp_path / "s.toml")]) == 1
    err = capsys.readouterr().err
    assert "grid key 'k' must be a list" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# The theory cell kind


def test_theory_cell_rows_and_the_swap_counterexample_to_as_stated_thm33():
    """swap: dW = c (u_{k+1} v_{k+1}^T - u_k v_k^T), ||dW||_2 = c = ratio * gamma_k. For ratio > 1/2 the k-th and
    (k+1)-th singular values cross, so sin Theta = 1 > ratio: the as-stated Thm 3.3 fails below ratio 1 while the
    rigorous form's assumption ||dW||_2 < gamma_k holds and the rigorous bound holds."""
    ids = ["thm3.3", "thm3.3-wedin", "thm3.3-rigorous", "cor3.4-weyl"]
    t = theory_cell({"perturbation": "swap", "target_ratio": 0.6, "instances": 3, "ids": ids})["checks"]
    assert len(t) == 3 * len(ids) and list(t["result_id"][:4]) == ids
    by = t.set_index(["instance", "result_id"])
    for i in range(3):
        assert by.loc[(i, "thm3.3"), "verdict"] == "violated"
        assert by.loc[(i, "thm3.3"), "lhs"] == pytest.approx(1.0, abs=1e-12)  # the subspaces swapped a direction
        assert by.loc[(i, "thm3.3-rigorous"), "verdict"] == "holds"
        # the swap attains Wedin (lhs = rhs): indeterminate within the tolerance, never violated
        assert by.loc[(i, "thm3.3-wedin"), "verdict"] == "indeterminate"
        assert by.loc[(i, "cor3.4-weyl"), "verdict"] == "holds"
    assert (t["dW_over_gap"] - 0.6).abs().max() < 1e-9
    assert t["instance_seed"].nunique() == 3
    # below 1/2 the swap does not cross and every form holds
    small = theory_cell({"perturbation": "swap", "target_ratio": 0.4, "ids": ids})["checks"]
    assert (small["verdict"] == "holds").sum() == 3 and (small["verdict"] != "violated").all()  # Weyl: attained
    # reproducible bit for bit
    pd.testing.assert_frame_equal(t, theory_cell({"perturbation": "swap", "target_ratio": 0.6, "instances": 3,
                                                  "ids": ids})["checks"], check_exact=True)


def test_theory_cell_rigorous_assumption_fails_beyond_the_gap():
    t = theory_cell({"target_ratio": 2.0, "ids": ["thm3.3-rigorous"]})["checks"]
    assert list(t["verdict"]) == ["assumption-failed"]
    assert "gamma_k" in t["failed_assumption"].iloc[0]


def test_function_cell_must_return_tables():
    with pytest.raises(TypeError, match="dict\\[str, pandas.DataFrame\\]"):
        run_cell_tables("tests.test_sweep:not_a_table_cell", {})


# ----------------------------------------------------------------------------------------------------------------
# Store: atomic cells


def test_store_records_a_cell_atomically(tmp_path):
    path = tmp_path / "s.sqlite"
    df = pd.DataFrame({"a": [1, 2], "b": ["x", None]})
    good = CellOutcome("c1", "done", tables={"t": encode_table(df)}, started=1.0, finished=3.5)
    with SweepStore(path) as st:
        st.record(good, experiment="e", config={"a": 1}, grid={"a": 1})
        # a write that fails half-way (the second table's payload cannot be stored) leaves no trace of the cell
        bad = CellOutcome("c2", "done", tables={"t": encode_table(df), "u": ("parquet", object())})
        with pytest.raises(Exception):
            st.record(bad, experiment="e", config={"a": 2}, grid={"a": 2})
        assert st.statuses() == {"c1": "done"}
        assert st.conn.execute("SELECT count(*) FROM rows WHERE cell_id = 'c2'").fetchone() == (0,)
        with pytest.raises(InputError, match="status"):
            st.record(CellOutcome("c3", "running"), experiment="e", config={}, grid={})
    tables = load_store(path)
    pd.testing.assert_frame_equal(tables["t"][["a", "b"]], df)
    assert list(tables["t"]["cell_id"]) == ["c1", "c1"]
    assert store_cells(path)["seconds"].tolist() == [2.5]


def test_store_rerecord_replaces_the_cell_and_its_tables(tmp_path):
    path = tmp_path / "s.sqlite"
    with SweepStore(path) as st:
        st.record(CellOutcome("c", "failed", error="RuntimeError: x"), experiment="e", config={}, grid={})
        st.record(CellOutcome("c", "done", tables={"t": encode_table(pd.DataFrame({"v": [7]}))}),
                  experiment="e", config={}, grid={})
        assert st.statuses() == {"c": "done"}
    assert load_store(path)["t"]["v"].tolist() == [7]
    assert store_cells(path)["error"].isna().all()


def test_store_json_fallback_and_bad_files(tmp_path):
    mixed = pd.DataFrame({"m": [1, "a", 2.5]})  # pyarrow cannot encode a mixed int/str/float object column
    fmt, payload = encode_table(mixed)
    assert fmt == "json"
    from sims.sweep.store import decode_table

    assert decode_table(fmt, payload)["m"].tolist() == [1, "a", 2.5]
    with pytest.raises(InputError, match="does not exist"):
        load_store(tmp_path / "none.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(InputError, match="not a readable SQLite database"):
        load_store(tmp_path / "junk.sqlite")


def test_load_store_adds_grid_columns_without_clobbering(tmp_path):
    spec = theory_spec(tmp_path / "s.sqlite")
    run_sweep(spec, progress=False)
    t = load_store(spec.store)
    c = t["checks"]
    assert len(c) == 4 * 2 * 2  # cells x instances x ids
    # 'perturbation' and 'target_ratio' are row columns holding the grid value: not repeated
    assert "grid.perturbation" not in c.columns and "grid.target_ratio" not in c.columns
    assert set(c["perturbation"]) == {"gaussian", "swap"} and set(c["target_ratio"]) == {0.1, 0.6}
    assert c.groupby("cell_id").size().tolist() == [4, 4, 4, 4]
    assert list(t["_cells"]["status"]) == ["done"] * 4


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


def test_missing_hf_backend_fails_the_cell_not_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sims.hf.backend", None)  # as if the module were not installed
    spec = parse_spec({"sweep": {"experiment": "hf_rlvr", "store": str(tmp_path / "s.sqlite"), "workers": 0},
                       "grid": {"seed": [0]},
                       "cells": [{"experiment": "theory", "seed": 1}]})
    s = run_sweep(spec, progress=False)
    assert (s.done, s.failed) == (1, 1)
    cells = store_cells(spec.store).set_index("experiment")
    assert cells.loc["hf_rlvr", "error"].startswith("ModuleNotFoundError") and "sims.hf.backend" in cells.loc[
        "hf_rlvr", "error"]
    assert cells.loc["theory", "status"] == "done"


def test_hf_kinds_call_run_cell_with_a_flat_config(monkeypatch):
    import types

    seen = []
    fake = types.SimpleNamespace(run_cell=lambda cfg: seen.append(cfg) or {"history": pd.DataFrame({"step": [0]})})
    monkeypatch.setitem(sys.modules, "sims.hf.backend", fake)
    assert run_cell_tables("hf_sft", {"lr": 1e-5, "seed": 2})["history"]["step"].tolist() == [0]
    run_cell_tables("hf_rlvr", {"algorithm": "dapo", "eps": 0.2})
    assert seen == [{"lr": 1e-5, "seed": 2, "algorithm": "sft"}, {"algorithm": "dapo", "eps": 0.2}]
    with pytest.raises(InputError, match="hf_sft"):
        run_cell_tables("hf_rlvr", {"algorithm": "sft"})
    with pytest.raises(InputError, match="hf_rlvr"):
        run_cell_tables("hf_sft", {"algorithm": "grpo"})


def test_cuda_cells_are_refused_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    spec = theory_spec(tmp_path / "s.sqlite", device="cuda")
    with pytest.raises(InputError, match="device='cuda'.*no CUDA device.*--scheduler"):
        run_sweep(spec, progress=False)


def test_progress_eta_is_mean_cell_time_times_remaining_over_workers(capsys):
    from sims.sweep.runner import Cell

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


def test_example_specs_parse_and_the_yaml_twin_gives_the_same_cells():
    examples = sorted((REPO / "examples" / "sweeps").glob("*.*"))
    assert {p.name for p in examples} >= {"theory_gate2.toml", "theory_gate2.yaml", "rlvr_lr_seed.toml"}
    specs = {p.name: load_spec(p) for p in examples}
    assert all(s.cells() for s in specs.values())
    assert [c.cell_id for c in specs["theory_gate2.toml"].cells()] == [
        c.cell_id for c in specs["theory_gate2.yaml"].cells()]
    rl = specs["rlvr_lr_seed.toml"].cells()
    assert len(rl) == 9 and {c.config["rlvr"]["lr"] for c in rl} == {1e-4, 1e-3, 1e-2}


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
