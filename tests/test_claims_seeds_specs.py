"""examples/sweeps/claims_seeds_*.toml: the sweeps that run the seeds the power estimates ask for parse, and every
cell is a valid config of its claim experiment with the seed list it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from sims.experiments.registry import CLAIM_EXPERIMENTS, check_config
from sims.sweep.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "examples" / "sweeps"


@pytest.mark.parametrize("name, n_cells", [("claims_seeds_fast.toml", 7), ("claims_seeds_default.toml", 5)])
def test_spec_cells_are_valid_claim_configs(name, n_cells):
    spec = load_spec(SPECS / name)
    cells = spec.cells()
    assert len(cells) == n_cells
    for cell in cells:
        assert cell.experiment in CLAIM_EXPERIMENTS
        check_config(cell.experiment, cell.config)
        seeds = cell.config[cell.experiment]["seeds"]
        assert seeds == list(range(len(seeds))) and len(seeds) >= 3
