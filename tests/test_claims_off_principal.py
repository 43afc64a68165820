"""sims.claims.off_principal: the per-matrix rows on structured matrices, the two verdicts on constructed tables
(for, against, too few seeds), and the fast preset (schema-valid tables, verdicts computed from them)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from paper_figs.schemas import Column, Schema, validate
from sims.claims.base import VERDICTS, block_matrix_index
from sims.claims.off_principal import (
    MIN_ENERGY_GAP,
    MIN_ISO_GAP,
    OffPrincipalConfig,
    iso_residual_rl_below_sft,
    off_principal_experiment,
    rl_update_energy_off_principal,
    update_geometry_rows,
)
from theory.errors import InputError

FAST_PRETRAIN = {"preset": "fast", "cache_dir": ".cache/threegate"}
EPS = np.finfo(np.float64).eps

#: The contract of the ``off_principal`` table (validated with the figure schemas' machinery).
OFF_PRINCIPAL_SCHEMA = Schema("off_principal", "follow-ups", "update geometry per run and block matrix", (
    Column("run", "str", "run label"), Column("method", "str", "RL or SFT"), Column("seed", "int", "seed"),
    Column("layer", "int", "layer"), Column("matrix_type", "str", "q, k, v, o, up, gate, down"),
    Column("k", "int", "subspace dimension"), Column("delta_norm", "float", "||dW||_F"),
    Column("energy_off_principal_subspace", "float?", "subspace-projection share"),
    Column("random_energy_off_expected", "float", "1 - k^2/(mn)"),
    Column("random_energy_off_measured", "float?", "one random direction's share"),
    Column("energy_outside_principal_mask", "float?", "coordinate-mask share"),
    Column("iso_residual_share", "float?", "ISO residual / displacement"),
    Column("unchanged", "bool", "no stored value moved"),
))


# ----------------------------------------------------------------------------------------------------------------
# Rows on structured matrices


def test_rows_of_a_spectrum_only_update_and_of_an_unchanged_matrix():
    """W0 = diag(distinct) padded; W1 rescales the top singular value only: dW = c e_0 e_0ᵀ lies in the top-k
    subspaces (share off 0), is a pure spectrum change (ISO residual share 1); a second matrix does not move."""
    W0 = np.zeros((40, 36))
    W0[np.arange(36), np.arange(36)] = np.linspace(4.0, 0.5, 36)
    W1 = W0.copy()
    W1[0, 0] *= 1.25
    base = {"blocks.0.attn.q.weight": torch.from_numpy(W0), "blocks.0.attn.k.weight": torch.from_numpy(W0)}
    tuned = {"blocks.0.attn.q.weight": torch.from_numpy(W1), "blocks.0.attn.k.weight": torch.from_numpy(W0)}
    rows = {r["matrix_type"]: r for r in update_geometry_rows(base, tuned, 16, random_seed=0, run="r")}
    q, k = rows["q"], rows["k"]
    assert q["k"] == 16 and q["random_energy_off_expected"] == 1 - 256 / (40 * 36)
    assert q["energy_off_principal_subspace"] <= 16 * EPS
    assert q["iso_residual_share"] == pytest.approx(1.0, abs=1e-12)
    assert q["energy_outside_principal_mask"] == 0.0  # entry (0, 0) is the largest of |W0^(16)|: in M_princ
    assert q["changed"] == 1 and not q["unchanged"]
    assert 0.8 < q["random_energy_off_measured"] < 1.0
    assert k["unchanged"] and np.isnan(k["energy_off_principal_subspace"]) and np.isnan(k["iso_residual_share"])


def test_k_is_capped_at_half_the_smaller_dimension():
    W0 = np.diag(np.linspace(3.0, 1.0, 10))
    W1 = W0 + 0.01 * np.random.default_rng(0).standard_normal((10, 10))
    (row,) = update_geometry_rows({"blocks.1.mlp.up.weight": torch.from_numpy(W0)},
                                  {"blocks.1.mlp.up.weight": torch.from_numpy(W1)}, 16, random_seed=0)
    assert row["k"] == 5 and row["random_energy_off_expected"] == 1 - 25 / 100


# ----------------------------------------------------------------------------------------------------------------
# Verdicts on constructed tables


def _table(rl: list[float], sft: list[float], col: str, matrices: int = 3) -> pd.DataFrame:
    rows = []
    for seed, (a, b) in enumerate(zip(rl, sft)):
        for m in range(matrices):
            for method, v in (("RL", a), ("SFT", b)):
                rows.append({"method": method, "seed": seed, "layer": m // 7, "matrix_type": "qkvoupgd"[m],
                             col: v, "random_energy_off_expected": 0.9})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("rl, sft, expected", [
    ([0.95, 0.96, 0.955], [0.90, 0.91, 0.905], "reproduced"),           # RL 5 points further off, tiny spread
    ([0.90, 0.91], [0.95, 0.96], "not reproduced"),                      # SFT further off
    ([0.95], [0.90], "inconclusive"),                                    # one seed
    ([0.95, 0.90], [0.90, 0.93], "inconclusive"),                        # spread swamps the gap
])
def test_energy_verdict_on_constructed_tables(rl, sft, expected):
    v = rl_update_energy_off_principal(_table(rl, sft, "energy_off_principal_subspace"))
    assert v.verdict == expected, v.reason
    assert v.numbers["min_effect"] == MIN_ENERGY_GAP
    assert v.numbers["random_expected"] == [0.9] * len(rl)
    if len(rl) == 1:
        assert v.seeds_needed is None and "one seed" in v.seeds_needed_note


def test_energy_verdict_says_where_rl_sits_against_random():
    v = rl_update_energy_off_principal(_table([0.85, 0.86], [0.80, 0.81], "energy_off_principal_subspace"))
    assert "below a random direction's 0.9000" in v.reason
    assert v.numbers["rl_minus_random"] == pytest.approx([-0.05, -0.04])


def test_verdicts_pair_matrices_and_skip_unchanged_ones():
    t = _table([0.95, 0.96], [0.90, 0.91], "energy_off_principal_subspace")
    t.loc[(t["method"] == "SFT") & (t["matrix_type"] == "q"), "energy_off_principal_subspace"] = np.nan
    v = rl_update_energy_off_principal(t)
    assert v.numbers["matrices"] == [2, 2]
    empty = t.assign(energy_off_principal_subspace=np.nan)
    assert rl_update_energy_off_principal(empty).verdict == "inconclusive"


@pytest.mark.parametrize("rl, sft, expected", [
    ([0.03, 0.04, 0.035], [0.35, 0.34, 0.36], "reproduced"),            # ISO's real-model contrast
    ([0.12, 0.13], [0.11, 0.115], "not reproduced"),                     # our fast-preset picture
    ([0.03], [0.35], "inconclusive"),
])
def test_iso_verdict_on_constructed_tables(rl, sft, expected):
    v = iso_residual_rl_below_sft(_table(rl, sft, "iso_residual_share"))
    assert v.verdict == expected, v.reason
    assert v.numbers["min_effect"] == MIN_ISO_GAP and v.numbers["rl"] == rl


def test_verdicts_name_missing_columns():
    with pytest.raises(InputError, match="rl_update_energy_off_principal: table lacks"):
        rl_update_energy_off_principal(pd.DataFrame({"method": ["RL"]}))
    with pytest.raises(InputError, match="iso_residual_rl_below_sft: table lacks"):
        iso_residual_rl_below_sft(pd.DataFrame({"seed": [0]}))


# ----------------------------------------------------------------------------------------------------------------
# The fast preset


@pytest.fixture(scope="module")
def fast_run():
    return off_principal_experiment({"pretrain": FAST_PRETRAIN, "off_principal": {"preset": "fast"}})


def test_fast_table_is_schema_valid_and_its_shares_are_in_range(fast_run):
    t = validate(fast_run.tables["off_principal"], OFF_PRINCIPAL_SCHEMA)
    c = OffPrincipalConfig.fast()
    assert len(t) == len(c.seeds) * 2 * 14  # seeds x (RL, SFT) x 2 layers x 7 matrix types
    moved = t[~t["unchanged"]]
    assert len(moved) > 0
    for col in ("energy_off_principal_subspace", "random_energy_off_measured", "energy_outside_principal_mask"):
        assert ((moved[col] >= 0) & (moved[col] <= 1 + 1e-12)).all(), col
    assert (moved["iso_residual_share"] <= 1 + 1e-9).all()  # Mirsky
    base = fast_run.results[0].snapshots[0]
    size = {key: base[n].numel() for n, key in block_matrix_index(base).items()}
    mn = np.array([size[(int(l), m)] for l, m in zip(t["layer"], t["matrix_type"])])
    np.testing.assert_array_equal(t["random_energy_off_expected"], 1 - t["k"] ** 2 / mn)


def test_fast_verdicts_are_computed_from_the_table(fast_run):
    t = fast_run.tables
    expected = [rl_update_energy_off_principal(t["off_principal"]), iso_residual_rl_below_sft(t["off_principal"])]
    assert [v.as_row() for v in expected] == [v.as_row() for v in fast_run.verdicts]
    assert list(t["verdicts"]["claim"]) == ["rl_update_energy_off_principal", "iso_residual_rl_below_sft"]
    assert all(v.verdict in VERDICTS for v in fast_run.verdicts)
    for n in t["verdicts"]["numbers"]:
        json.loads(n)
    assert all(v.seeds_needed_note for v in fast_run.verdicts)


def test_config_rejects_unknown_keys():
    with pytest.raises(InputError, match=r"\[off_principal\]: unknown key 'kk'"):
        off_principal_experiment({"pretrain": FAST_PRETRAIN, "off_principal": {"preset": "fast", "kk": 3}})


@pytest.mark.slow
def test_default_preset_runs_and_its_tables_are_valid(tmp_path):
    """The default preset (3 seeds, 40 AdamW updates each; ~1 min): structure and ranges, no number hard-coded."""
    from sims.experiments.registry import run_claims

    run, out = run_claims("off_principal", {"pretrain": {"cache_dir": ".cache/threegate"}}, tmp_path / "op")
    t = validate(run.tables["off_principal"], OFF_PRINCIPAL_SCHEMA)
    assert t["seed"].nunique() == 3 and (~t["unchanged"]).sum() > 0
    assert len(json.loads((out / "verdicts.json").read_text())) == 2
    assert all(v.verdict in VERDICTS for v in run.verdicts)
