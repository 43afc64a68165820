"""Shared test configuration: hypothesis profiles per tier, seeded RNG fixture.

Profiles: ``dev`` (quick, random), ``ci`` (derandomized: the same examples every run), ``thorough`` (many examples,
for the slow tier). Select with ``HYPOTHESIS_PROFILE``; CI (``CI=true``) defaults to ``ci``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from threadpoolctl import threadpool_limits

# One BLAS / torch thread: the matrices in the tests are small, and on a 2-core box threads oversubscribe (a 176x64
# SVD took ~100x the CPU time with 2 OpenBLAS threads under load). It also keeps reductions bit-reproducible.
torch.set_num_threads(1)
threadpool_limits(1)

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20251111)


# Exact results that must never be exceeded on a real training step (where their assumptions hold).
RIGOROUS_IDS = ("cor3.4-weyl", "cor3.4-mirsky", "thm3.3-rigorous", "thm3.3-wedin", "cor3.5", "corF.13", "eq7")


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest on a shared machine, and reruns stay bit-identical."""
    from sims.tinygpt.determinism import deterministic

    with deterministic():
        yield


@pytest.fixture(scope="session")
def fast_base_model():
    """The fast pretrained base model (cached by config hash, so trained once per machine)."""
    from sims.tinygpt.pretrain import PretrainConfig, pretrain

    model, _ = pretrain(PretrainConfig.fast())
    return model


# --------------------------------------------------------------------------------- report of two compares of one base
#: The two-compare results folder below: per method, the entries of every matrix that its tuned copy changes.
TWO_COMPARES_CHANGED = {"RL": 3, "SFT": 40}


@pytest.fixture(scope="session")
def two_compares(tmp_path_factory):
    """``threegate compare BASE RL/model --method RL --out R/RL`` and ``... SFT/model --method SFT --out R/SFT`` on
    tiny bf16 checkpoints (2 layers x q, v, up + an embedding), then ``threegate figs R``: returns (R, Report).
    SFT's check tables are removed before the report (the check figures of one method are enough to test the page,
    and they cost most of its drawing time).

    Both tuned files are called ``model.safetensors`` (their run labels collide across the two folders). Per 8 x 6
    matrix, RL multiplies ``TWO_COMPARES_CHANGED['RL']`` entries by 1.5 and SFT ``['SFT']`` entries (a change far
    above the bf16 probe's eta = 1e-3: exactly these entries count as changed).
    """
    from safetensors.torch import save_file

    from paper_figs import report
    from threegate.cli import main

    root = tmp_path_factory.mktemp("two_compares")
    g = torch.Generator().manual_seed(13)
    names = [f"model.layers.{i}.self_attn.{t}_proj.weight" for i in range(2) for t in "qv"]
    names += [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)] + ["model.embed_tokens.weight"]
    base = {}
    for n in names:
        w = torch.randn(8, 6, generator=g, dtype=torch.float64)
        base[n] = (w + 0.25 * torch.sign(w)).to(torch.bfloat16)  # |w| >= 0.25: no zeros, x1.5 always changes it
    (root / "base").mkdir()
    save_file(base, str(root / "base" / "model.safetensors"))
    for method, n_changed in TWO_COMPARES_CHANGED.items():
        tuned = {}
        for n, w in base.items():
            flat = w.clone().flatten()
            flat[:n_changed] = (flat[:n_changed].double() * 1.5).to(torch.bfloat16)
            tuned[n] = flat.reshape(w.shape)
        (root / "ckpt" / method).mkdir(parents=True)
        save_file(tuned, str(root / "ckpt" / method / "model.safetensors"))
    results = root / "R"
    for method in TWO_COMPARES_CHANGED:
        tuned_file = root / "ckpt" / method / "model.safetensors"
        rc = main(["compare", str(root / "base" / "model.safetensors"), str(tuned_file), "--method", method, "--k", "2",
                   "--out", str(results / method), "--no-progress", "--no-figures"])
        assert rc == 0
    for f in (results / "SFT").glob("checks.*"):  # fewer check figures to draw: the page needs one method's only
        f.unlink()
    return results, report.render_all(results, results / "report")
