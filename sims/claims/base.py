"""Verdicts on the paper's claims, and what every claim experiment shares.

A **verdict** is ``"reproduced"``, ``"not reproduced"`` or ``"inconclusive"``, with a reason and the numbers it was
computed from (``Verdict``: the claim's ``id`` and ``statement``, the ``verdict``, the ``reason``, the ``numbers``).
A claim (``Claim``: a stable snake_case id and the statement, with the paper's figure or table) makes its verdicts
through ``Claim.verdict``. The judging functions of the claim modules (``sims.claims.sparsity``, ``consistency``,
``geometry``, ``interventions``, ``peft``) are pure: they take a results table and return a Verdict; their thresholds
are named constants. Seed-to-seed noise is respected: a claim about an effect (a difference between conditions) is
judged on the per-seed effects e_1..e_n (``effect_verdict``),

* **reproduced** iff n >= ``MIN_SEEDS``, every e_s > ``min_effect`` and mean(e) > ``SPREAD_FACTOR`` * spread,
  spread = max(e) - min(e) (the effect is larger than the seed-to-seed spread);
* **not reproduced** iff n >= ``MIN_SEEDS`` and mean(e) + ``SPREAD_FACTOR`` * spread < ``min_effect`` (even the
  optimistic reading of the measurements falls short of the effect the claim needs; an effect in the opposite
  direction included);
* **inconclusive** otherwise, and always with fewer than ``MIN_SEEDS`` seeds (no spread to compare against).

A claim experiment ``fn(cfg) -> ClaimRun`` reads its config section ``[name]`` (``config_from_section``:
``preset = "fast"`` runs in seconds, ``"default"`` in minutes), trains from the cached pretrained model
(``start_model``; ``run_rl`` / ``run_sft`` for the common RL and SFT runs) and returns the training runs, its tables
and its verdicts; ``write_claim_run`` writes them (tables, ``verdicts.json``, ``claims_config.json``). The registry
of every experiment is ``sims.experiments.registry``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from sims.experiments.config import section_config
from sims.experiments.pretrained import base_model
from sims.tables import concat_tables, write_tables
from sims.tinygpt.probe import ProbeConfig, RunResult
from sims.tinygpt.rlvr import RLConfig, train_rlvr
from sims.tinygpt.sft import SFTConfig, train_sft
from theory.errors import InputError
from theory.naming import layer_index, matrix_type

__all__ = [
    "VERDICTS", "MIN_SEEDS", "SPREAD_FACTOR", "VERDICT_COLUMNS", "Claim", "Verdict", "effect_verdict",
    "require_columns", "only_rows", "verdicts_frame", "print_verdicts", "verdicts_json", "ClaimRun",
    "config_from_section", "start_model", "run_rl", "run_sft", "block_matrix_index",
    "write_claim_run",
]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")
#: Fewest seeds that give a seed-to-seed spread; with fewer, every effect claim is inconclusive.
MIN_SEEDS = 2
#: The mean effect must exceed this multiple of the seed-to-seed spread (max - min of the per-seed effects).
SPREAD_FACTOR = 1.0
#: Columns of a verdicts table (``verdicts_frame``): ``claim`` is the claim's id.
VERDICT_COLUMNS = ["claim", "statement", "verdict", "reason", "numbers"]


@dataclass(frozen=True)
class Verdict:
    """The verdict on one claim: the claim's ``id`` and ``statement``, ``verdict`` in ``VERDICTS``, why, and the
    numbers it was computed from."""

    id: str
    statement: str
    verdict: str
    reason: str
    numbers: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise InputError(f"{self.id}: verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict:
        """The record for ``verdicts.json`` (keys ``VERDICT_COLUMNS``; ``numbers`` as a mapping)."""
        return {"claim": self.id, "statement": self.statement, "verdict": self.verdict, "reason": self.reason,
                "numbers": self.numbers}

    def as_row(self) -> dict:
        """The row of a verdicts table (``numbers`` as sorted JSON)."""
        return {**self.to_dict(), "numbers": json.dumps(self.numbers, sort_keys=True, default=float)}


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: a stable snake_case ``id`` and the ``statement`` (with the figure or table it is from).

    ``str(claim)`` is the id (error messages name it)."""

    id: str
    statement: str = ""

    def verdict(self, verdict: str, reason: str, numbers: Mapping | None = None) -> Verdict:
        return Verdict(self.id, self.statement, verdict, reason, dict(numbers or {}))

    def __str__(self) -> str:
        return self.id


# ----------------------------------------------------------------------------------------------------------------
# Verdict logic (pure)


def effect_verdict(claim: Claim | str, effects: Mapping[Any, float], *, min_effect: float, what: str) -> Verdict:
    """Judge per-seed effects ``{seed: e}`` (positive = supports the claim) by the seed rule of the module doc.

    ``claim``: the ``Claim`` judged, or only its id."""
    claim = claim if isinstance(claim, Claim) else Claim(str(claim))
    e = np.array([float(v) for v in effects.values()], dtype=np.float64)
    if not np.isfinite(e).all():
        return claim.verdict("inconclusive", f"non-finite {what} on some seed", {"effects": e.tolist()})
    nums = {"seeds": [str(k) for k in effects], "effects": e.tolist(), "min_effect": min_effect,
            "spread_factor": SPREAD_FACTOR}
    if e.size < MIN_SEEDS:
        return claim.verdict("inconclusive",
                             f"{e.size} seed(s) < MIN_SEEDS={MIN_SEEDS}: no seed-to-seed spread to compare the "
                             f"{what} with" + (f" (measured {e[0]:+.4f})" if e.size else ""), nums)
    mean, spread = float(e.mean()), float(e.max() - e.min())
    nums.update(mean=mean, spread=spread)
    if e.min() > min_effect and mean > SPREAD_FACTOR * spread:
        return claim.verdict("reproduced",
                             f"{what} {mean:+.4f} (mean of {e.size} seeds) exceeds the seed-to-seed spread "
                             f"{spread:.4f} and every seed exceeds {min_effect:g}", nums)
    if mean + SPREAD_FACTOR * spread < min_effect:
        return claim.verdict("not reproduced",
                             f"{what} {mean:+.4f} (mean of {e.size} seeds) plus the spread {spread:.4f} stays below "
                             f"the {min_effect:g} the claim needs", nums)
    return claim.verdict("inconclusive",
                         f"{what} {mean:+.4f} (mean of {e.size} seeds, per seed {np.round(e, 4).tolist()}) is not "
                         f"separated from {min_effect:g} by more than the seed-to-seed spread {spread:.4f}", nums)


def require_columns(table: pd.DataFrame, cols: Iterable[str], claim: Claim | str) -> None:
    """InputError naming ``claim`` unless ``table`` is a DataFrame with every column of ``cols``."""
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{claim}: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise InputError(f"{claim}: table lacks column(s) {missing}; has {list(table.columns)}")


def only_rows(table: pd.DataFrame, **wanted) -> pd.DataFrame:
    """Rows whose column equals the wanted value, for the columns the table has."""
    for col, val in wanted.items():
        if col in table.columns:
            table = table[table[col] == val]
    return table


def verdicts_frame(verdicts: Iterable[Verdict]) -> pd.DataFrame:
    return pd.DataFrame([v.as_row() for v in verdicts], columns=VERDICT_COLUMNS)


def verdicts_json(verdicts: Iterable[Verdict]) -> str:
    """The text of ``verdicts.json``: one ``Verdict.to_dict`` per verdict."""
    return json.dumps([v.to_dict() for v in verdicts], indent=2, default=float)


def print_verdicts(verdicts: Iterable[Verdict]) -> None:
    for v in verdicts:
        print(f"  [{v.verdict.upper()}] {v.id}\n      {v.reason}")


# ----------------------------------------------------------------------------------------------------------------
# What a claim experiment produced


@dataclass
class ClaimRun:
    """What an experiment produced: the training runs, its own tables and its verdicts (none for a plain run)."""

    results: list[RunResult]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def write_claim_run(run: ClaimRun, out: str | Path) -> Path:
    """Write the run's tables (``<name>.csv`` and ``.parquet``), the training history / probe metrics of its runs,
    ``verdicts.json`` and ``claims_config.json`` into ``out``."""
    out = Path(out)
    tables = dict(run.tables)
    for name in ("history", "metrics"):
        frames = [getattr(r, name) for r in run.results if not getattr(r, name).empty]
        if frames and name not in tables:
            tables[name] = concat_tables(frames)
    write_tables(tables, out)
    (out / "verdicts.json").write_text(verdicts_json(run.verdicts))
    (out / "claims_config.json").write_text(json.dumps(run.config, indent=2, sort_keys=True, default=str))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Configurations and training


def config_from_section(cls, cfg: Mapping, section: str):
    """``cls.fast()`` / ``cls.default()`` (key ``preset``) with the section's other keys overriding fields."""
    c = section_config(cls, cfg.get(section, {}), where=section, presets=("fast", "default"), default="default")
    if "seed" in cfg:  # ``threegate run --seed S``: the seed list starts at S
        c = replace(c, seeds=tuple(int(cfg["seed"]) + i for i in range(len(c.seeds))))
    if not c.seeds or len(set(c.seeds)) != len(c.seeds):
        raise InputError(f"[{section}] seeds must be distinct and non-empty, got {c.seeds}")
    return c


def _probe(steps: int, n_eval: int) -> ProbeConfig:
    return ProbeConfig(steps=(0, steps), n_eval_prompts=n_eval, theory_checks=False)


def run_rl(model, c, *, seed: int, lr: float, precision: str, device: str, name: str) -> RunResult:
    """RL with the task, algorithm and batch sizes of claim config ``c``, probed at step 0 and the last step."""
    rc = RLConfig(task=c.task, algorithm=c.algorithm, steps=c.rl_steps, prompts_per_step=c.prompts_per_step,
                  group_size=c.group_size, minibatches=c.minibatches, lr=lr, precision=precision, seed=seed,
                  device=device, probe=_probe(c.rl_steps, c.n_eval_prompts))
    return train_rlvr(model, rc, run_name=name)


def run_sft(model, c, *, seed: int, lr: float, precision: str, device: str, name: str) -> RunResult:
    """SFT with as many AdamW updates as ``run_rl`` makes with the same claim config ``c``."""
    steps = c.rl_steps * c.minibatches  # the same number of AdamW updates as the RL run
    sc = SFTConfig(task=c.task, steps=steps, batch_size=c.sft_batch_size, lr=lr, precision=precision, seed=seed,
                   device=device, probe=_probe(steps, c.n_eval_prompts))
    return train_sft(model, sc, run_name=name)


def start_model(cfg: Mapping, bf16_checkpoint: bool) -> torch.nn.Module:
    """The cached pretrained model; with ``bf16_checkpoint`` its weights rounded to bf16 (kept as float32), as when
    a bf16 checkpoint is loaded into an fp32 master: the master then starts exactly on the stored values."""
    model, _ = base_model(cfg)
    if bf16_checkpoint:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    return model


def block_matrix_index(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """{name: (layer, matrix_type)} of the transformer-block matrices (``theory.naming``; the rest is left out)."""
    out = {}
    for n in state:
        mt, layer = matrix_type(n), layer_index(n)
        if mt != "other" and layer is not None:
            out[n] = (layer, mt)
    return out
