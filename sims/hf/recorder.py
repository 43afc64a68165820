"""What an HF RLVR / SFT run records at its snapshot steps: stored weights, per-matrix metrics, Gate II checks, sparsity.

``probe_matrix_names`` picks the 2-D block matrices the Gate II checks look at; ``Recorder`` takes the stored
weights after every step (``after_step``) and, at the run's ``snapshot_steps``, keeps a snapshot (Hugging Face
names), the metrics ||dW||_F, ||dW||_2 and bf16 sparsity of each probed matrix against the base, the Gate II checks
of ``theory.spectral.gate2_all`` against the base, and the bf16 sparsity per matrix type (``sims.tables.pooled_sparsity``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from sims.tables import pooled_sparsity
from sims.tinygpt.probe import CHECK_COLUMNS
from theory.errors import InputError
from theory.linalg import spectral_norm, svd64
from theory.metrics import bf16_changed_count
from theory.naming import layer_index, matrix_type
from theory.spectral import gate2_all

__all__ = ["probe_matrix_names", "Recorder"]


def probe_matrix_names(model: torch.nn.Module, spec: str | Sequence[str] | None = None) -> list[str]:
    """The 2-D block matrices the Gate II checks look at.

    ``None``: q, v, o and down of the first and the last layer; a string: a regex (``re.search``) over the 2-D
    block matrix names; a sequence: exactly those names (each must be a 2-D parameter)."""
    params = dict(model.named_parameters())
    blocks = [n for n, p in params.items() if p.ndim == 2 and matrix_type(n) != "other"]
    if not blocks:
        raise InputError("the model has no q/k/v/o/up/gate/down block matrices to probe")
    if spec is None:
        layers = sorted({layer_index(n) for n in blocks if layer_index(n) is not None})
        ends = {layers[0], layers[-1]} if layers else set()
        return [n for n in blocks if layer_index(n) in ends and matrix_type(n) in ("q", "v", "o", "down")]
    if isinstance(spec, str):
        try:
            pat = re.compile(spec)
        except re.error as e:
            raise InputError(f"probe_matrices {spec!r}: not a valid regular expression ({e})") from None
        chosen = [n for n in blocks if pat.search(n)]
        if not chosen:
            raise InputError(f"probe_matrices {spec!r} matches no block matrix (e.g. {blocks[0]!r})")
        return chosen
    bad = [n for n in spec if n not in params or params[n].ndim != 2]
    if bad:
        raise InputError(f"probe_matrices: {bad[:3]} are not 2-D parameters of the model")
    return list(spec)


class Recorder:
    """Snapshots, per-matrix metrics, Gate II checks and the sparsity table at the snapshot steps."""

    def __init__(self, model, cfg, run: str, kind: str, device) -> None:
        self.run, self.kind, self.cfg = run, kind, cfg
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.probed = probe_matrix_names(model, cfg.probe_matrices)
        self.blocks = [n for n in self.names if len(self.shapes[n]) == 2 and matrix_type(n) != "other"]
        self.base: dict[str, Tensor] = {}
        self.snapshots: dict[int, dict[str, Tensor]] = {}
        self.metrics: list[dict] = []
        self.checks: list[dict] = []
        self.sparsity: list[dict] = []
        self._svd_base: dict[str, Any] = {}
        self.device = device

    def changed_counts(self, stored: Mapping[str, Tensor]) -> dict[str, int]:
        return {n: bf16_changed_count(self.base[n], stored[n]) for n in self.names}

    def after_step(self, t: int, stored: dict[str, Tensor]) -> float:
        """Record step t; returns bf16 sparsity so far (all parameters)."""
        if t == 0:
            self.base = stored
            self._base_numel = sum(v.numel() for v in stored.values())
        counts = self.changed_counts(stored)
        so_far = 1.0 - sum(counts.values()) / self._base_numel
        if t in self.cfg.snapshot_steps:
            self.snapshots[t] = stored
            self._probe(t, stored, counts)
        return so_far

    def _row(self, t, metric, value, matrix=""):
        self.metrics.append({"run": self.run, "kind": self.kind, "step": t, "matrix": matrix, "metric": metric,
                             "value": float(value)})

    def _probe(self, t: int, stored, counts) -> None:
        method = "RL" if self.kind == "rlvr" else "SFT"
        for row in pooled_sparsity((matrix_type(n), counts[n], stored[n].numel()) for n in self.blocks):
            self.sparsity.append({"run": self.run, "method": method, "step": t, **row,
                                  "precision": self.cfg.precision, "seed": self.cfg.seed, "steps": self.cfg.steps})
        if t == 0:
            return
        for n in self.probed:
            dW = stored[n].double() - self.base[n].double()
            self._row(t, "fro_base", float(torch.linalg.norm(dW)), n)
            self._row(t, "spec_base", spectral_norm(dW, n), n)
            self._row(t, "bf16_sparsity_base", 1 - counts[n] / stored[n].numel(), n)
            if n not in self._svd_base:
                self._svd_base[n] = svd64(self.base[n], n)
            k = min(self.cfg.k, min(self.shapes[n]) - 1)
            for rid, chk in gate2_all(self.base[n], stored[n], k, svd0=self._svd_base[n]).items():
                self.checks.append({"run": self.run, "kind": self.kind, "step": t, "matrix": n, "reference": "base",
                                    "fisher_estimator": None, **chk.as_row()})

    def add_check(self, t: int, chk, matrix: str = "", reference: str = "prev") -> None:
        self.checks.append({"run": self.run, "kind": self.kind, "step": t, "matrix": matrix, "reference": reference,
                            "fisher_estimator": None, **chk.as_row()})

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        checks = pd.DataFrame(self.checks)
        if checks.empty:
            checks = pd.DataFrame(columns=CHECK_COLUMNS)
        else:
            checks = checks[CHECK_COLUMNS + [c for c in checks.columns if c not in CHECK_COLUMNS]]
        return (pd.DataFrame(self.metrics, columns=["run", "kind", "step", "matrix", "metric", "value"]), checks,
                pd.DataFrame(self.sparsity))
