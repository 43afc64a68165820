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
