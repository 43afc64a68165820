"""Tests for sims.tinygpt.determinism: seeded generators, and the thread / algorithm settings restored on exit."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from sims.tinygpt.determinism import deterministic, seed_everything


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]


def test_deterministic_sets_and_restores_everything(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), _blas_threads())
    with deterministic(1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert all(n == 1 for n in _blas_threads())
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), _blas_threads()) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with pytest.raises(RuntimeError), deterministic(1):
        raise RuntimeError("inside")
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before[:2]


def test_algorithms_false_leaves_the_flag_and_the_environment_alone(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    prev = torch.are_deterministic_algorithms_enabled()
    with deterministic(1, algorithms=False):
        assert torch.are_deterministic_algorithms_enabled() == prev and torch.get_num_threads() == 1
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), float(np.random.random()), float(torch.rand(1))

    seed_everything(7)
    a = draw()
    seed_everything(7)
    assert draw() == a
    seed_everything(8)
    assert draw() != a
