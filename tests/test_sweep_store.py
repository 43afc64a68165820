"""Tests for sims.sweep.store: atomic cells, bit-exact tables in both formats, grid columns on load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sims.sweep.runner import run_sweep
from sims.sweep.store import CellOutcome, SweepStore, decode_table, encode_table, load_store, store_cells
from tests.test_sweep import theory_spec
from theory.errors import InputError


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=2, max_size=20))
@example([0.1, -0.0, 5e-324, float("nan"), float("inf"), -float("inf"), 1.7976931348623157e308])
@example([0.0, np.uint64(0x7FF8000000000001).view(np.float64)])  # a NaN with a payload
def test_tables_round_trip_bit_exactly_in_both_formats(values):
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


def test_a_store_written_before_cell_warnings_is_read_and_gains_the_column(tmp_path):
    """A schema-1 store (no ``cells.warnings``; made here with the old CREATE TABLE) loads with ``n_warnings`` 0,
    gains the column when opened, and records a warned cell after that."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as c:
        c.executescript(
            "CREATE TABLE cells (cell_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, config_json TEXT NOT NULL, "
            "grid_json TEXT NOT NULL, status TEXT NOT NULL, error TEXT, traceback TEXT, started REAL, finished REAL, "
            "seconds REAL, host TEXT, device TEXT);"
            "CREATE TABLE rows (cell_id TEXT NOT NULL, table_name TEXT NOT NULL, format TEXT NOT NULL, "
            "payload BLOB NOT NULL, PRIMARY KEY (cell_id, table_name));"
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
            "INSERT INTO meta VALUES ('schema_version', '1');")
        fmt, payload = encode_table(pd.DataFrame({"v": [1]}))
        c.execute("INSERT INTO cells VALUES ('old', 'e', '{}', '{}', 'done', NULL, NULL, 0, 1, 1, 'h', 'cpu')")
        c.execute("INSERT INTO rows VALUES ('old', 't', ?, ?)", (fmt, payload))
    tables = load_store(path)
    assert tables["t"]["cell_warnings"].tolist() == [0] and tables["_cells"]["n_warnings"].tolist() == [0]
    with SweepStore(path) as st:
        assert st.meta()["schema_version"] == 2
        st.record(CellOutcome("new", "done", tables={"t": encode_table(pd.DataFrame({"v": [2]}))},
                              warnings=[{"category": "RuntimeWarning", "message": "overflow"}]),
                  experiment="e", config={}, grid={})
    t = load_store(path)["t"].sort_values("v")
    assert t["cell_warnings"].tolist() == [0, 1]
