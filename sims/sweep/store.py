"""The results store of ``threegate sweep``: one SQLite file, one transaction per finished cell.

Schema (SQLite, WAL journal, ``synchronous = FULL``)::

    cells(cell_id TEXT PRIMARY KEY,   -- sims.experiments.registry.config_hash(experiment, config)
          experiment TEXT, config_json TEXT, grid_json TEXT,   -- the resolved config and this cell's grid values
          status TEXT,                -- 'done' | 'failed'
          error TEXT, traceback TEXT, -- 'ExceptionType: message' of a failed cell (NULL when done)
          started REAL, finished REAL, seconds REAL, host TEXT, device TEXT,
          warnings TEXT)             -- JSON list of the warnings the cell's run raised: [{"category", "message"}]
    rows(cell_id TEXT, table_name TEXT, format TEXT, payload BLOB,   -- one result table of one cell
         PRIMARY KEY (cell_id, table_name))
    meta(key TEXT PRIMARY KEY, value TEXT)                             -- sweep name, spec, store version

A cell's warnings (``sims.sweep.cells.execute_cell`` records what the warning filters in force let through,
deduplicated by category and message, at most ``MAX_CELL_WARNINGS``; a last entry of category ``"truncated"`` counts
the rest) are kept with its row, so a reader of the results can tell that a cell's run warned: ``cells()`` and
``load_store``'s ``"_cells"`` carry ``warnings`` (the JSON list) and ``n_warnings``, and every result table from
``load_store`` carries ``cell_warnings`` (its cell's ``n_warnings``). A store written before this column existed
gains it when opened (``n_warnings`` 0 for its cells).

A cell is written by :meth:`SweepStore.record` in a single transaction (its ``cells`` row and all its ``rows``), so
after a crash or SIGKILL of the writer a cell is either fully in the store or absent; a cell that was running is
simply not there and a restarted sweep runs it again. Only the sweep's parent process writes the store.

Each result table is stored as Parquet bytes (``format = 'parquet'``); a table pyarrow cannot encode (mixed-type
object columns) falls back to JSON records (``format = 'json'``). :func:`load_store` concatenates each table over the
done cells and adds the cell's grid values as columns (named by their dotted keys, e.g. ``rlvr.lr``; a grid key that
collides with a column of the table is added as ``grid.<key>``), plus ``cell_id``.
"""

from __future__ import annotations

import io
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

from theory.errors import InputError

__all__ = ["SCHEMA_VERSION", "MAX_CELL_WARNINGS", "CellOutcome", "SweepStore", "encode_table", "decode_table",
           "load_store", "store_cells", "store_tables_by_cell", "count_warnings"]

SCHEMA_VERSION = "2"  # 2: cells.warnings
#: Distinct warnings kept per cell (category, message); more are counted in one last "truncated" entry.
MAX_CELL_WARNINGS = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, config_json TEXT NOT NULL, grid_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')), error TEXT, traceback TEXT,
    started REAL, finished REAL, seconds REAL, host TEXT, device TEXT, warnings TEXT
);
CREATE TABLE IF NOT EXISTS rows (
    cell_id TEXT NOT NULL, table_name TEXT NOT NULL, format TEXT NOT NULL CHECK (format IN ('parquet', 'json')),
    payload BLOB NOT NULL, PRIMARY KEY (cell_id, table_name)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


@dataclass
class CellOutcome:
    """What a worker hands back for one cell: the encoded tables or the error. Plain data, cheap to pickle."""

    cell_id: str
    status: str  # 'done' | 'failed'
    tables: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # table name -> (format, payload)
    error: str | None = None
    traceback: str | None = None
    started: float = 0.0
    finished: float = 0.0
    host: str = ""
    device: str = "cpu"
    warnings: list[dict[str, str]] = field(default_factory=list)  # [{"category", "message"}], see MAX_CELL_WARNINGS

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def encode_table(df: pd.DataFrame) -> tuple[str, bytes]:
    """A DataFrame as Parquet bytes, or JSON records when pyarrow cannot encode a column."""
    df = df.reset_index(drop=True)
    try:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return "parquet", buf.getvalue()
    except Exception:  # pyarrow raises several types (ArrowTypeError, ArrowInvalid, ...) for mixed object columns
        split = df.to_dict(orient="split")  # stdlib json writes floats by repr: they round-trip exactly
        return "json", json.dumps({"columns": split["columns"], "data": split["data"]}, default=_json_scalar).encode()


def _json_scalar(x: Any) -> Any:
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return str(x)


def decode_table(fmt: str, payload: bytes) -> pd.DataFrame:
    if fmt == "parquet":
        return pd.read_parquet(io.BytesIO(payload))
    if fmt == "json":
        split = json.loads(payload.decode())
        return pd.DataFrame(split["data"], columns=split["columns"])
    raise InputError(f"sweep store: unknown table format {fmt!r}")


class SweepStore:
    """The SQLite results store of one sweep (created if missing). Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(f"sweep store {self.path} does not exist")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
            self._add_warnings_column()
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        except sqlite3.DatabaseError as e:
            raise InputError(f"sweep store {self.path} is not a readable SQLite database: {e}") from None

    def _add_warnings_column(self) -> None:
        """A store of schema 1 (no ``cells.warnings``) gains the column; a read-only one is read without it."""
        columns = [r[1] for r in self.conn.execute("PRAGMA table_info(cells)")]
        if "warnings" not in columns:
            try:
                self.conn.execute("ALTER TABLE cells ADD COLUMN warnings TEXT")
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            except sqlite3.OperationalError:  # read-only file: cells() fills the column in
                pass

    def __enter__(self) -> "SweepStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    # -- meta ----------------------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def meta(self) -> dict[str, Any]:
        out = {}
        for k, v in self.conn.execute("SELECT key, value FROM meta"):
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                out[k] = v
        return out

    # -- cells ---------------------------------------------------------------------------------------------------
    def statuses(self) -> dict[str, str]:
        """cell_id -> 'done' | 'failed' for every cell in the store."""
        return dict(self.conn.execute("SELECT cell_id, status FROM cells"))

    def record(self, outcome: CellOutcome, *, experiment: str, config: Mapping, grid: Mapping) -> None:
        """Write one finished cell (its row in ``cells`` and every result table) in a single transaction.

        A cell recorded again (``--retry-failed``) replaces its old row and tables in the same transaction.
        """
        if outcome.status not in ("done", "failed"):
            raise InputError(f"sweep store: cell status must be 'done' or 'failed', got {outcome.status!r}")
        cfg_json = json.dumps(config, sort_keys=True, default=str)
        grid_json = json.dumps(grid, sort_keys=True, default=str)
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("DELETE FROM rows WHERE cell_id = ?", (outcome.cell_id,))
            c.execute(
                "INSERT OR REPLACE INTO cells (cell_id, experiment, config_json, grid_json, status, error, traceback, "
                "started, finished, seconds, host, device, warnings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (outcome.cell_id, experiment, cfg_json, grid_json, outcome.status, outcome.error, outcome.traceback,
                 outcome.started, outcome.finished, outcome.seconds, outcome.host, outcome.device,
                 json.dumps(outcome.warnings)),
            )
            c.executemany(
                "INSERT INTO rows VALUES (?, ?, ?, ?)",
                [(outcome.cell_id, name, fmt, sqlite3.Binary(payload))
                 for name, (fmt, payload) in sorted(outcome.tables.items())],
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def cells(self) -> pd.DataFrame:
        """The ``cells`` table (one row per recorded cell), grid values decoded into a ``grid`` dict column, and
        ``n_warnings``: how many distinct warnings the cell's run raised (a ``truncated`` entry adds its count)."""
        df = pd.read_sql_query("SELECT * FROM cells ORDER BY cell_id", self.conn)
        df["grid"] = [json.loads(g) for g in df["grid_json"]]
        if "warnings" not in df.columns:
            df["warnings"] = None
        df["warnings"] = [w if isinstance(w, str) else "[]" for w in df["warnings"]]
        df["n_warnings"] = [count_warnings(json.loads(w)) for w in df["warnings"]]
        return df

    def iter_tables(self, status: str = "done") -> Iterator[tuple[str, str, pd.DataFrame]]:
        """(cell_id, table_name, DataFrame) for every stored table of the cells with ``status``."""
        q = ("SELECT r.cell_id, r.table_name, r.format, r.payload FROM rows r JOIN cells c USING (cell_id) "
             "WHERE c.status = ? ORDER BY r.cell_id, r.table_name")
        for cell_id, name, fmt, payload in self.conn.execute(q, (status,)):
            yield cell_id, name, decode_table(fmt, bytes(payload))


def count_warnings(entries: list[dict]) -> int:
    """Distinct warnings in a cell's list: one per entry, a ``truncated`` entry counting those it stands for.

    >>> count_warnings([{"category": "RuntimeWarning", "message": "x"},
    ...                 {"category": "truncated", "message": "3 more distinct warnings"}])
    4
    """
    return sum(int(e["message"].split()[0]) if e.get("category") == "truncated" else 1 for e in entries)


def store_cells(path: str | Path) -> pd.DataFrame:
    """The ``cells`` table of the store at ``path`` (status, error, timings, host, device per cell)."""
    with SweepStore(path, create=False) as st:
        return st.cells()


def store_tables_by_cell(path: str | Path) -> dict[str, dict[str, pd.DataFrame]]:
    """cell_id -> {table name -> DataFrame} of the done cells, exactly as stored (no grid columns added)."""
    out: dict[str, dict[str, pd.DataFrame]] = {}
    with SweepStore(path, create=False) as st:
        for cell_id, name, df in st.iter_tables():
            out.setdefault(cell_id, {})[name] = df
    return out


def _column_equals(col: pd.Series, value: Any) -> bool:
    try:
        return bool((col == value).all())
    except (TypeError, ValueError):
        return False


def load_store(path: str | Path) -> dict[str, pd.DataFrame]:
    """Each result table concatenated over the done cells, with the cell's grid values as columns and ``cell_id``.

    Every table also has ``cell_warnings``: how many distinct warnings its cell's run raised (0: none; the messages
    are in ``"_cells"``'s ``warnings``). Also ``"_cells"``: the ``cells`` table itself (failed cells included, with
    their errors and warnings). Cells appear in
    ``cell_id`` order, so two stores holding the same cells give equal tables whatever order the cells finished in.
    """
    with SweepStore(path, create=False) as st:
        cells = st.cells()
        grid_of = dict(zip(cells["cell_id"], cells["grid"]))
        warned = dict(zip(cells["cell_id"], cells["n_warnings"]))
        parts: dict[str, list[pd.DataFrame]] = {}
        for cell_id, name, df in st.iter_tables():
            df = df.copy()
            for key, value in grid_of.get(cell_id, {}).items():
                if key in df.columns and _column_equals(df[key], value):
                    continue  # the table already carries this grid value
                col = key if key not in df.columns else f"grid.{key}"
                df[col] = [value] * len(df) if isinstance(value, (list, dict)) else value
            df["cell_id"] = cell_id
            df["cell_warnings"] = int(warned.get(cell_id, 0))
            parts.setdefault(name, []).append(df)
    out = {name: pd.concat(frames, ignore_index=True) for name, frames in parts.items()}
    out["_cells"] = cells.drop(columns=["grid"])
    return out
