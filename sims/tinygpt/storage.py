"""Precision modes for the training loops: fp32 master weights, AdamW, and the bf16 *stored* copy.

Two modes (``PRECISION_MODES``):

``"bf16"`` — the paper's setting (App. C: FSDP mixed precision with fp32 optimizer state). The optimizer owns an fp32
    **master** copy of every parameter and fp32 AdamW moments. After every optimizer step the master is rounded to
    bfloat16 by round-to-nearest-even (torch's float32 -> bfloat16 cast, one rounding) and that **stored** bf16 copy is
    what the model computes with: the model's own parameters hold the bf16 values cast up to float32 (exactly
    representable, so nothing is lost by the cast up). Rollouts, evaluation, the training forward and backward all
    see the stored bf16 weights; gradients with respect to them are copied onto the fp32 master before AdamW steps.
    Gate III metrics read the stored bf16 snapshots (``stored_state_dict``).
``"fp32"`` — pure float32: the model's parameters are the master, no rounding anywhere.

Snapshots are written with safetensors (never pickle) by ``save_snapshot`` and read back by ``load_snapshot``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

from theory.errors import CheckpointError, InputError, NonFiniteError

__all__ = [
    "PRECISION_MODES",
    "check_precision",
    "round_tensor_to_bf16",
    "MixedPrecisionAdamW",
    "save_snapshot",
    "load_snapshot",
]

PRECISION_MODES = ("bf16", "fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISION_MODES:
        raise InputError(f"precision mode {precision!r} is not one of {PRECISION_MODES}")
    return precision


def round_tensor_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """A float32 tensor rounded to a bfloat16 tensor by IEEE round-to-nearest-even (one rounding; torch's cast does
    exactly this). The exact oracle on one number, returning bf16 bits, is ``theory.precision.round_to_bf16_bits``."""
    if x.dtype != torch.float32:
        raise InputError(f"round_tensor_to_bf16 expects a float32 master tensor, got {x.dtype}")
    return x.to(torch.bfloat16)


class MixedPrecisionAdamW:
    """AdamW over fp32 master weights, with the model computing on the bf16 stored copy (``precision="bf16"``).

    Use like an optimizer: ``opt.zero_grad(); loss.backward(); opt.step()``. ``step`` returns nothing; after it, the
    model's parameters hold ``float32(bf16(master))`` in bf16 mode and the master itself in fp32 mode.

    ``grad_clip`` clips the global gradient norm (on the master gradients) before the step; ``None`` disables it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        precision: str = "bf16",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        grad_clip: float | None = 1.0,
    ) -> None:
        self.model = model
        self.precision = check_precision(precision)
        self.grad_clip = grad_clip
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        for n, p in zip(self.names, self.params):
            if p.dtype != torch.float32:
                raise InputError(f"parameter {n} is {p.dtype}; the training loops keep float32 models")
        if self.precision == "bf16":
            self.master = [nn.Parameter(p.detach().clone()) for p in self.params]
        else:
            self.master = self.params
        self.optimizer = torch.optim.AdamW(
            self.master, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, foreach=False
        )
        self._sync_model()
        self.n_steps = 0

    @torch.no_grad()
    def _sync_model(self) -> None:
        """Write the stored copy into the model (bf16 mode); fp32 mode shares tensors, nothing to do."""
        if self.precision == "bf16":
            for p, m in zip(self.params, self.master):
                p.copy_(round_tensor_to_bf16(m).to(torch.float32))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.master:
            m.grad = None

    @torch.no_grad()
    def step(self) -> float:
        """One AdamW step on the master; returns the gradient norm before clipping."""
        if self.precision == "bf16":
            for p, m in zip(self.params, self.master):
                m.grad = None if p.grad is None else p.grad.detach().clone()
        grads = [m.grad for m in self.master if m.grad is not None]
        for n, m in zip(self.names, self.master):
            if m.grad is not None and not torch.isfinite(m.grad).all():
                raise NonFiniteError(f"gradient of {n} has non-finite entries")
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        if self.grad_clip is not None and grads:
            torch.nn.utils.clip_grad_norm_([m for m in self.master if m.grad is not None], self.grad_clip, foreach=False)
        self.optimizer.step()
        self._sync_model()
        self.n_steps += 1
        return norm

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights (clones, on CPU)."""
        return {n: m.detach().to("cpu", copy=True) for n, m in zip(self.names, self.master)}

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """The stored weights: bf16 tensors in bf16 mode (exactly ``bf16(master)``), fp32 in fp32 mode (CPU clones)."""
        if self.precision == "bf16":
            return {n: round_tensor_to_bf16(m.detach()).to("cpu", copy=True) for n, m in zip(self.names, self.master)}
        return self.master_state_dict()


def save_snapshot(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, object] | None = None) -> Path:
    """Write ``tensors`` to a ``.safetensors`` file (metadata values JSON-encoded). Never pickle."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"snapshot path {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def load_snapshot(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a snapshot written by ``save_snapshot`` (optionally only ``names``); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"snapshot {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            wanted = keys if names is None else list(names)
            missing = [n for n in wanted if n not in keys]
            if missing:
                raise CheckpointError(f"snapshot {path} lacks tensors {missing[:5]}")
            return {n: f.get_tensor(n) for n in wanted}
    except SafetensorError as e:
        raise CheckpointError(f"snapshot {path} is not a readable safetensors file ({e})") from None
