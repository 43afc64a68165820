"""``threegate run NAME``: the named experiments of ``sims.experiments.registry``, with ``ThreeGateCallback``
attached to the trainer runs.

The experiments live in ``sims`` (which never imports ``threegate``); the live callback lives here. For a trainer
experiment (``hf_rlvr``, ``hf_sft``: TRL's ``GRPOTrainer`` / ``SFTTrainer``) ``live_callbacks`` builds
``ThreeGateCallback(out_dir=<run folder>)`` with the run's ``snapshot_steps``, ``k``, ``fast_analysis`` and
``analysis_only`` (its ``only=``), so the run folder holds, besides ``history`` and ``rollouts``, the callback's
tables (``steps``, ``step_sparsity``, ``steps_by_layer``, ``sparsity`` = Table 1, ``checks`` / ``angles`` /
``spectrum`` / ``mask_overlap`` at the snapshot steps, ``gate1_kl`` when the trainer logs a KL, ``steps_timing``)
and ``snapshots/step_{t:06d}.safetensors`` (stored bf16 weights under the model's parameter names) for ``threegate
compare`` and ``threegate figs``. Adapter runs get no callback (``sims.hf.backend``).

What the callback counts is the **stored bf16 view**: the HF Trainer keeps float32 parameters (the master, updated
by AdamW) and the view is their bf16 rounding, i.e. what a bf16 checkpoint of the run would hold; with
``storage = "bf16"`` the parameters are bf16 and the view is the parameter itself.

Examples
--------
>>> from types import SimpleNamespace
>>> cfg = SimpleNamespace(snapshot_steps=(0, 10, 20), k=8, fast_analysis=False, analysis_only=None)
>>> cb, = live_callbacks(Path("runs/x"), cfg, "hf_rlvr")
>>> sorted(cb.snapshot_set), cb.k, cb.run_name
([10, 20], 8, 'hf_rlvr')
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sims.experiments import registry
from threegate.callback import ThreeGateCallback

__all__ = ["live_callbacks", "add_arguments", "run"]


def live_callbacks(out_dir: Path, run_config: Any, run_name: str) -> list[ThreeGateCallback]:
    """The callbacks ``threegate run`` attaches to a trainer experiment writing into ``out_dir``.

    ``run_config``: an ``HFRLConfig`` / ``HFSFTConfig`` (``snapshot_steps`` -- step 0 is the base, which the
    callback always writes --, ``k``, ``fast_analysis``, ``analysis_only``)."""
    steps = [int(s) for s in run_config.snapshot_steps if int(s) > 0]
    return [ThreeGateCallback(out_dir=out_dir, snapshot_steps=steps or None, k=int(run_config.k),
                              fast=bool(run_config.fast_analysis), only=run_config.analysis_only, run_name=run_name)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    registry.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return registry.run(args, trainer_callbacks=live_callbacks)
