"""Bit-for-bit reruns on one machine: seeded generators and a fixed thread count, set inside a context only.

``deterministic(num_threads)`` fixes torch's intra-op threads and numpy's BLAS threads (the simulation matrices
are tiny, 64 x 176: one thread is fastest, and a multithreaded OpenBLAS on a shared, oversubscribed 2-core machine
measured 75x slower per SVD; a fixed count also keeps reruns bit-identical) and, with ``algorithms=True``, torch's
deterministic algorithms (warn-only: an op without a deterministic kernel warns) with the cuBLAS workspace they
need. Everything it changes is restored on exit.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits

__all__ = ["seed_everything", "deterministic"]

_CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(num_threads: int = 1, *, algorithms: bool = True) -> Iterator[None]:
    """``num_threads`` torch / BLAS threads and (``algorithms``) torch's deterministic algorithms inside the block.

    ``algorithms=False`` leaves the deterministic-algorithms flag alone: on a CPU every op of the pretraining loop is
    deterministic anyway, and enabling the flag imports ``torch._inductor`` (seconds)."""
    prev_det, prev_threads, prev_cublas = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
                                           os.environ.get(_CUBLAS))
    if algorithms:
        os.environ.setdefault(_CUBLAS, ":4096:8")  # deterministic cuBLAS (read at the first CUDA use)
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(num_threads)
    try:
        with threadpool_limits(num_threads):
            yield
    finally:
        if algorithms:
            torch.use_deterministic_algorithms(prev_det)
            if prev_cublas is None:
                os.environ.pop(_CUBLAS, None)
        torch.set_num_threads(prev_threads)
