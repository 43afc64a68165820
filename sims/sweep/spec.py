"""A ``threegate sweep`` spec: the TOML / YAML file, validated, and the cells it expands to.

A **spec** (TOML or YAML, the same structure)::

    [sweep]
    name = "gate2-theory"            # default: the spec file's stem
    experiment = "theory"            # a cell kind (``sims.sweep.cells``)
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

A **cell** is (experiment, resolved config); its id is ``sims.experiments.config.experiment_hash(experiment,
config)``, so the same cell has the same id in every spec and every store. Every problem of a spec is an
``InputError`` naming the key, raised before anything runs.
"""

from __future__ import annotations

import copy
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sims.experiments.config import check_fields, experiment_hash, unknown_keys_message
from sims.experiments.registry import EXPERIMENTS, check_config
from sims.hf.backend import cell_config
from sims.sweep.cells import SPECIAL_KINDS, hf_flat_config, import_cell_function, theory_config
from theory.errors import InputError

__all__ = ["Cell", "SweepTable", "SweepSpec", "load_spec", "parse_spec", "expand_cells", "validate_cell"]


@dataclass(frozen=True)
class Cell:
    """One unit of work: an experiment (cell kind) and its fully resolved config; ``grid`` = the values it varies."""

    experiment: str
    config: Mapping[str, Any]
    grid: Mapping[str, Any]

    @property
    def cell_id(self) -> str:
        return experiment_hash(self.experiment, self.config)

    @property
    def device(self) -> str:
        return str(self.config.get("device", "cpu"))

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.grid.items()) or "(base)"


@dataclass(frozen=True)
class SweepTable:
    """The ``[sweep]`` table of a spec (its schema; see the module docstring)."""

    experiment: str
    name: str | None = None
    store: str | None = None
    workers: int = 2
    threads: int = 1


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
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
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
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: experiment must be a non-empty string, got {name!r}")
    if name in SPECIAL_KINDS or name in EXPERIMENTS:
        return name
    if ":" in name:
        import_cell_function(name)  # fails here, with the reason, rather than in every cell
        return name
    raise InputError(f"{where}: unknown experiment {name!r}; known: {sorted(set(SPECIAL_KINDS) | set(EXPERIMENTS))}"
                     " or 'package.module:function'")


def _as_int(value: Any, key: str, where: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InputError(f"{where}: {key} must be an integer >= {lo}, got {value!r}")
    return value


def parse_spec(data: Mapping, *, source: str = "<spec>", default_name: str = "sweep",
               store: str | Path | None = None, workers: int | None = None) -> SweepSpec:
    """Validate a spec mapping (the parsed TOML / YAML): every problem is an ``InputError`` naming the key."""
    known = ["sweep", "base", "grid", "cells"]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise InputError(f"sweep spec {source}: top level: {unknown_keys_message(unknown, known)}")
    sw = data.get("sweep", {})
    if not isinstance(sw, Mapping):
        raise InputError(f"sweep spec {source}: [sweep] must be a table")
    try:
        sw = check_fields(SweepTable, sw, "[sweep]")
    except InputError as e:
        raise type(e)(f"sweep spec {source}: {e}") from None
    if "experiment" not in sw:
        raise InputError(f"sweep spec {source}: [sweep] needs 'experiment' (a cell kind)")
    experiment = _check_experiment(sw["experiment"], f"sweep spec {source}: [sweep] experiment")
    name = str(sw.get("name") or default_name)
    store_path = Path(store if store is not None else sw.get("store") or Path("runs") / "sweeps" / f"{name}.sqlite")
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
        validate_cell(c, where=f"sweep spec {spec.source}: cell ({c.label()})")
        if c.cell_id in seen:
            raise InputError(f"sweep spec {spec.source}: duplicated cell: ({c.label()}) resolves to the same config "
                             f"as ({seen[c.cell_id].label()}) (cell id {c.cell_id})")
        seen[c.cell_id] = c
    return cells


def validate_cell(cell: Cell, *, where: str) -> None:
    """Check a cell's resolved config before any cell runs, with the schema of its kind: the theory-cell keys,
    an experiment's config sections (``sims.experiments.registry.check_config``), an HF run's flat config; a
    ``package.module:function`` cell has no schema. Errors start with ``where``."""
    if cell.experiment == "theory":
        theory_config(cell.config, where=where)
    elif cell.experiment in ("hf_rlvr", "hf_sft"):
        try:
            cell_config(hf_flat_config(cell.experiment, cell.config, where=where))
        except InputError as e:
            msg = str(e)
            raise type(e)(msg if msg.startswith(where) else f"{where}: {msg}") from None
    elif cell.experiment in EXPERIMENTS:
        check_config(cell.experiment, cell.config, source=where)
