"""Tests for sims.sweep.spec: spec files, validation naming the key, grid expansion and cell ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sims.experiments.config import experiment_hash
from sims.sweep.spec import load_spec, parse_spec
from theory.errors import InputError

REPO = Path(__file__).resolve().parents[1]


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
    assert cells[0].cell_id == experiment_hash("rl_vs_sft", cells[0].config)
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
    ({"sweep": {"experiment": "rlvr", "wrokers": 2}, "grid": {"a": [1]}},
     r"\[sweep\]: unknown key 'wrokers' \(did you mean 'workers'\?\)"),
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


def test_example_specs_parse_and_the_yaml_twin_gives_the_same_cells():
    examples = sorted((REPO / "examples" / "sweeps").glob("*.*"))
    assert {p.name for p in examples} >= {"theory_gate2.toml", "theory_gate2.yaml", "rlvr_lr_seed.toml"}
    specs = {p.name: load_spec(p) for p in examples}
    assert all(s.cells() for s in specs.values())
    assert [c.cell_id for c in specs["theory_gate2.toml"].cells()] == [
        c.cell_id for c in specs["theory_gate2.yaml"].cells()]
    rl = specs["rlvr_lr_seed.toml"].cells()
    assert len(rl) == 9 and {c.config["rlvr"]["lr"] for c in rl} == {1e-4, 1e-3, 1e-2}
