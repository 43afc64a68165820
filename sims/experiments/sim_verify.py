"""Theory checks on the real steps of real runs, for ``threegate verify`` (the ``sim:rlvr`` / ``sim:sft`` rows).

``default_simulation_checks(seed, budget)`` pretrains (or loads from ``.cache/threegate``) the base model, runs a
clip-only DAPO run and an SFT run on the same task from it with probes, and returns every check row: Gate II on each
block matrix against the base and the previous step, Lemma F.9 on the RL steps' token ratios, Prop 3.2 and Eq 7
with the restricted next-token Fisher (column ``fisher_estimator``; see ``sims.tinygpt.probe``), and Prop E.3 (the
eta = 1e-3 probe against bit equality) on the stored bf16 snapshots.

Budgets: ``"fast"`` uses ``PretrainConfig.fast()`` and 3 steps per run (seconds; for tests);
``"default"`` uses ``PretrainConfig.default()`` (cached after the first call) and 12 steps per run probed at 4, 8
and 12 — about a minute of training and probing on 2 CPU cores after the pretraining.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pandas as pd
import torch

from sims.tinygpt.model import matrix_params
from sims.tinygpt.pretrain import PretrainConfig, pretrain
from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.rlvr import RLConfig, train_rlvr
from sims.tinygpt.sft import SFTConfig, train_sft
from sims.tinygpt.storage import round_tensor_to_bf16
from theory.errors import InputError
from theory.precision import probe_unchanged

__all__ = ["default_simulation_checks", "SIM_COLUMNS", "BUDGETS"]

SIM_COLUMNS = ["result_id", "lhs", "rhs", "ratio", "holds", "assumptions_hold", "failed_assumption", "source", "step",
               "matrix", "reference", "fisher_estimator"]

BUDGETS = {
    # budget: (pretrain preset, steps, probe steps, eval prompts, fisher rollouts)
    "fast": ("fast", 3, (2, 3), 8, 8),
    "default": ("default", 12, (4, 8, 12), 32, 32),
}


def gate3_probe_rows(base_stored: dict[str, torch.Tensor], snapshots: dict[int, dict[str, torch.Tensor]],
                     source: str, eta: float = 1e-3) -> pd.DataFrame:
    """Prop E.3 on the real stored bf16 weights of a run: the Def 2.1 probe (eta = 1e-3, evaluated exactly by
    ``theory.precision.probe_unchanged``) against bit equality, per matrix, between consecutive probed snapshots
    (the first against the bf16-rounded base). lhs = number of entries where the two disagree, rhs = 0.
    The proposition assumes finite nonzero normal values, so entries where either side is zero or subnormal are
    left out (and counted in ``n_outside_assumption``). The proposition also assumes eta < 2^-9: for a larger eta
    the probe and bit equality may rightly differ (they do from eta = 2^-8 on), so every row is then an assumption
    failure, never "violated"."""
    eta_ok = 0 <= eta < 2.0**-9
    rows, prev = [], base_stored
    for step in sorted(snapshots):
        cur = snapshots[step]
        for name, w1 in cur.items():
            if name not in prev:
                continue
            a = prev[name].to(torch.bfloat16)
            b = w1.to(torch.bfloat16)
            normal = lambda t: (t.float().abs() >= 2.0**-126) & torch.isfinite(t.float())  # noqa: E731
            keep = (normal(a) & normal(b)).numpy()
            same_bits = (a.view(torch.int16) == b.view(torch.int16)).numpy()
            probe = np.asarray(probe_unchanged(a.float().numpy()[keep], b.float().numpy()[keep], eta))
            disagree = int(np.count_nonzero(probe != same_bits[keep]))
            rows.append({"result_id": "propE.3", "lhs": float(disagree), "rhs": 0.0,
                         "ratio": 0.0 if disagree == 0 else float("inf"), "holds": eta_ok and disagree == 0,
                         "assumptions_hold": eta_ok, "failed_assumption": None if eta_ok else "0 <= eta < 2^-9",
                         "source": source, "step": step,
                         "matrix": name, "reference": "prev", "fisher_estimator": None,
                         "n_entries": int(keep.sum()), "n_changed": int((~same_bits[keep]).sum()),
                         "n_outside_assumption": int((~keep).sum())})
        prev = cur
    return pd.DataFrame(rows)


def default_simulation_checks(seed: int = 0, budget: str = "default", *, cache_dir: str | None = ".cache/threegate",
                              device: str = "cpu") -> pd.DataFrame:
    """Check rows from a seeded DAPO run and a seeded SFT run from the same pretrained model (see module doc)."""
    if budget not in BUDGETS:
        raise InputError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    preset, steps, probe_steps, n_eval, n_fisher = BUDGETS[budget]
    t0 = time.perf_counter()
    base, _ = pretrain(getattr(PretrainConfig, preset)(), cache_dir=cache_dir, device=device)
    probe = ProbeConfig(steps=probe_steps, n_eval_prompts=n_eval, n_fisher_rollouts=n_fisher)
    rl = train_rlvr(copy.deepcopy(base), RLConfig(task="counting", algorithm="dapo", steps=steps, lr=3e-4, seed=seed,
                                                  device=device, probe=probe), run_name="rlvr")
    sft = train_sft(copy.deepcopy(base), SFTConfig(task="counting", steps=steps, lr=3e-4, seed=seed, device=device,
                                                   probe=probe), run_name="sft")
    frames = []
    base_stored = {n: round_tensor_to_bf16(p.detach().float().cpu()) for n, p in matrix_params(base).items()}
    for res, source in ((rl, "rlvr"), (sft, "sft")):
        df = res.checks.copy()
        df["source"] = source
        frames.append(df)
        frames.append(gate3_probe_rows(base_stored, res.snapshots, source))
    out = pd.concat(frames, ignore_index=True)
    rest = [c for c in out.columns if c not in SIM_COLUMNS]
    out = out[SIM_COLUMNS + rest]
    out.attrs["seconds"] = time.perf_counter() - t0
    return out
