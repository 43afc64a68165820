"""threegate.compare's update-geometry columns (issue 17): per matrix ``energy_off_principal_subspace`` (a
subspace projection) and ``iso_residual_share`` equal theory.update_geometry's functions on the same matrices, the
random baseline is 1 - k²/(m n), the fast route leaves the ISO share out and says so, and the pooled values are
the shares of the concatenated update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from threegate.compare import compare
from theory.update_geometry import energy_off_principal_subspace, iso_residual_share

NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.layers.1.self_attn.q_proj.weight")


def _pair(seed: int = 0, shapes=((48, 48), (96, 48), (48, 48))):
    """Base matrices with separated spectra; tuned = base + a small dense update (the third matrix untouched)."""
    rng = np.random.default_rng(seed)
    base, tuned = {}, {}
    for i, (name, shape) in enumerate(zip(NAMES, shapes)):
        Q1, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
        Q2, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
        D = np.zeros(shape)
        D[np.arange(min(shape)), np.arange(min(shape))] = np.linspace(2.0, 0.1, min(shape))
        W0 = (Q1 @ D @ Q2.T).astype(np.float32)
        dW = np.zeros(shape, np.float32) if i == 2 else (0.02 * rng.standard_normal(shape)).astype(np.float32)
        base[name], tuned[name] = torch.from_numpy(W0), torch.from_numpy(W0 + dW)
    return base, tuned


@pytest.fixture(scope="module")
def tables():
    base, tuned = _pair()
    return base, tuned, compare(base, tuned, k=8)


def test_per_matrix_columns_equal_the_theory_functions(tables):
    base, tuned, t = tables
    m = t.matrices.set_index("name")
    for name in NAMES[:2]:
        W0, W1 = base[name].double().numpy(), tuned[name].double().numpy()
        row = m.loc[name]
        # error model: the bases of W0 carry ~eps ||W0|| / gap (gaps ~0.04 here), the spectra ~eps ||W||
        assert row["energy_off_principal_subspace"] == pytest.approx(
            energy_off_principal_subspace(W1 - W0, W0, 8), abs=1e-10)
        assert row["iso_residual_share"] == pytest.approx(iso_residual_share(W0, W1), abs=1e-10)
        assert row["random_energy_off_principal_subspace"] == 1 - 64 / W0.size
    untouched = m.loc[NAMES[2]]
    assert untouched["dW_fro"] == 0 and math.isnan(untouched["energy_off_principal_subspace"])
    assert math.isnan(untouched["iso_residual_share"])
    assert any("energy" in c for c in t.matrices.columns) and any("iso" in c for c in t.matrices.columns)


def test_pooled_values_are_the_shares_of_the_concatenated_update(tables):
    _, _, t = tables
    m = t.matrices
    w = m["dW_fro"] ** 2
    ok = w > 0
    energy = float((m.loc[ok, "energy_off_principal_subspace"] * w[ok]).sum() / w[ok].sum())
    iso = float(np.sqrt((m.loc[ok, "iso_residual_share"] ** 2 * w[ok]).sum() / w[ok].sum()))
    overall = t.summary[t.summary["scope"] == "overall"].iloc[0]
    assert overall["energy_off_principal_subspace"] == pytest.approx(energy, rel=1e-12)
    assert overall["iso_residual_share"] == pytest.approx(iso, rel=1e-12)
    by_layer = t.by_layer.set_index("layer")
    assert math.isnan(by_layer.loc[1, "energy_off_principal_subspace"])  # layer 1 did not move
    assert by_layer.loc[0, "energy_off_principal_subspace"] == pytest.approx(energy, rel=1e-12)


def test_fast_route_skips_the_iso_share_and_says_so():
    base, tuned = _pair(1, shapes=((128, 64), (192, 64), (128, 64)))  # r = 64 >= 4 (k + 1): the fast route
    t = compare(base, tuned, k=4, fast=True)
    fast = t.matrices[t.matrices["spectral_route"].str.startswith("fast") & (t.matrices["dW_fro"] > 0)]
    assert len(fast) == 2
    assert fast["iso_residual_share"].isna().all()
    assert fast["energy_off_principal_subspace"].between(0, 1).all()  # certified top-k bases: still measured
    assert fast["skipped"].str.contains("iso_residual_share").all()
