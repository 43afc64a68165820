"""Parameter-efficient RL on TinyGPT: masked (sparse) updates, LoRA and PiSSA adapters, and merging back.

**Masked training** (``masked_training``, ``train_rlvr_masked``). A mask ``M`` (bool, the matrix's shape) per
trainable parameter; every other parameter is frozen. A gradient hook on each parameter replaces its gradient by
``where(M, g, 0)`` (zeros everywhere for a frozen one), so the fp32 master's AdamW state of a masked-out entry starts
at 0 and stays 0:

    m <- b1 m + (1 - b1) * 0 = 0,   v <- b2 v + (1 - b2) * 0 = 0,   w <- w - lr * m_hat / (sqrt(v_hat) + eps) = w,

bit for bit (0 / eps = 0), provided the weight decay is 0 (AdamW's decoupled decay ``w <- w (1 - lr wd)`` would move
every entry; ``train_rlvr_masked`` rejects ``weight_decay != 0``). Gradient clipping rescales the masked gradient,
whose zeros stay zero. ``train_rlvr_masked`` then checks exactly that every stored bf16 value outside the mask is
bit-identical to the start, and raises if not.

**Masks** (``structural_masks``, from the start weights W0 of each block matrix; the masks of the paper's Fig. 5
and Fig. 9):
``princ`` = M_princ (top-α entries of |W0^(k)|, the rank-k reconstruction), ``princ_c`` = its complement,
``low`` = M_low (bottom-α of |W0|), ``safe`` = M_princ^c ∪ M_low, ``random`` = a uniformly random mask with exactly
as many entries as ``safe`` in every matrix (seeded), ``dense`` = all entries.

**LoRA / PiSSA** (``AdaptedLinear``, ``add_adapters``, ``merge_adapters``). A block matrix ``W (out, in)`` becomes
a frozen base ``W_base`` plus a trainable low-rank product, with scale ``s = alpha / r``:

    y = x W_base^T + s * (x A^T) B^T,     A: (r, in),  B: (out, r).

* LoRA: ``W_base = W``, ``B = 0``, ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (seeded; PEFT's Kaiming-uniform bound), so the
  adapted model is exactly the base at init.
* PiSSA (Meng et al. 2024; PEFT's ``init_lora_weights="pissa"``): the top-r singular triplets of W in float64,
  ``W = U S V^T``, ``A = diag(sqrt(S_r / s)) V_r^T``, ``B = U_r diag(sqrt(S_r / s))``, ``W_base = W_res = W - s B A``.
  In exact arithmetic ``W_res + s B A = W`` and ``s B A = U_r S_r V_r^T`` (the principal part); in storage each of
  ``W_res, A, B`` is rounded once to the parameter dtype, so the initial function equals the base's only up to that
  rounding (the tests bound it entrywise).

``merge_adapters`` returns a plain TinyGPT state dict: ``W = W_base + s B A`` evaluated in float64 and rounded once
to the parameter dtype. The wrapped model keeps the TinyGPT class and its parameter names for everything it does not
adapt (``blocks.i.attn.q.weight`` is then the frozen base), so ``sims.tinygpt.rlvr.train_rlvr`` trains it unchanged: the
frozen base has ``requires_grad = False``, gets no gradient, and AdamW skips it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from sims.tinygpt.rlvr import train_rlvr
from theory.errors import InputError, NonFiniteError, ShapeMismatchError
from theory.metrics import low_magnitude_mask, principal_mask
from theory.naming import MATRIX_TYPES, layer_index, matrix_type

__all__ = [
    "MASK_NAMES",
    "ADAPTER_METHODS",
    "structural_masks",
    "mask_density",
    "masked_training",
    "train_rlvr_masked",
    "check_frozen_outside_mask",
    "AdaptedLinear",
    "add_adapters",
    "merge_adapters",
    "adapter_parameter_count",
]

MASK_NAMES = ("dense", "princ", "princ_c", "low", "safe", "random")
ADAPTER_METHODS = ("LoRA", "PiSSA")


# ----------------------------------------------------------------------------------------------------------------
# Masks


def _is_block_matrix(name: str) -> bool:
    return matrix_type(name) != "other" and layer_index(name) is not None


def _block_matrices(model_or_state) -> dict[str, Tensor]:
    items = model_or_state.items() if isinstance(model_or_state, Mapping) else model_or_state.named_parameters()
    return {n: p.detach() for n, p in items if _is_block_matrix(n)}


def structural_masks(
    start: nn.Module | Mapping[str, Tensor], *, k: int, alpha: float, seed: int, names: tuple[str, ...] = MASK_NAMES,
) -> dict[str, dict[str, Bool[Tensor, "m n"]]]:
    """``{mask_name: {block matrix name: bool mask}}`` from the start weights (see the module docstring).

    ``k``: rank of the reconstruction that scores M_princ; ``alpha``: the fraction both M_princ and M_low select;
    ``seed``: the random mask's generator (matched in count to ``safe`` matrix by matrix)."""
    unknown = sorted(set(names) - set(MASK_NAMES))
    if unknown:
        raise InputError(f"structural_masks: unknown mask names {unknown}; known: {list(MASK_NAMES)}")
    mats = _block_matrices(start)
    if not mats:
        raise InputError("structural_masks: no block matrices ('blocks.<i>.attn|mlp.<type>.weight') in the model")
    rng = np.random.default_rng([seed, 6])
    out: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    for name, W in mats.items():
        princ = principal_mask(W, k, alpha)
        low = low_magnitude_mask(W, alpha)
        safe = ~princ | low
        per = {"dense": np.ones_like(princ), "princ": princ, "princ_c": ~princ, "low": low, "safe": safe}
        if "random" in names:
            flat = np.zeros(safe.size, dtype=bool)
            flat[rng.permutation(safe.size)[: int(safe.sum())]] = True
            per["random"] = flat.reshape(safe.shape)
        for n in names:
            out[n][name] = torch.from_numpy(np.ascontiguousarray(per[n]))
    return out


def mask_density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of selected entries over all matrices of one mask."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        raise InputError("mask_density: empty mask set")
    return sum(int(m.sum()) for m in masks.values()) / total


# ----------------------------------------------------------------------------------------------------------------
# Masked training


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise ShapeMismatchError(f"masks name parameters the model lacks: {missing[:5]}")
    for n, m in masks.items():
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise InputError(f"mask of {n} must be a bool tensor, got {getattr(m, 'dtype', type(m).__name__)}")
        if tuple(m.shape) != tuple(params[n].shape):
            raise ShapeMismatchError(f"mask of {n} has shape {tuple(m.shape)} but the parameter has "
                                     f"{tuple(params[n].shape)}")
    return params


@contextlib.contextmanager
def masked_training(model: nn.Module, masks: Mapping[str, Tensor]) -> Iterator[None]:
    """While active, only the entries ``masks[name]`` of the named parameters receive gradient; parameters not in
    ``masks`` receive an all-zero gradient (frozen). Hooks are removed on exit."""
    params = _check_masks(model, masks)
    handles = []
    for n, p in params.items():
        if not p.requires_grad:
            continue
        keep = masks.get(n)
        if keep is None:
            handles.append(p.register_hook(torch.zeros_like))
        else:
            keep = keep.to(p.device)
            handles.append(p.register_hook(lambda g, keep=keep: torch.where(keep, g, torch.zeros_like(g))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_frozen_outside_mask(
    start: Mapping[str, Tensor], end: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> dict[str, int]:
    """Number of entries outside the mask whose stored value is not bit-identical between ``start`` and ``end``,
    per parameter (parameters absent from ``masks`` count as fully masked out). All zeros when masking worked."""
    if set(start) != set(end):
        raise ShapeMismatchError(f"start and end name different tensors: {sorted(set(start) ^ set(end))[:5]}")
    out = {}
    for n, a in start.items():
        b = end[n]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ShapeMismatchError(f"{n}: start {tuple(a.shape)} {a.dtype} vs end {tuple(b.shape)} {b.dtype}")
        outside = ~masks[n] if n in masks else torch.ones(a.shape, dtype=torch.bool)
        # bit patterns, not values: -0 vs +0 or a NaN payload would be a change of the stored bits
        ia, ib = _bits(a), _bits(b)
        out[n] = int(torch.count_nonzero((ia != ib) & outside))
    return out


def _bits(t: Tensor) -> Tensor:
    t = t.detach().cpu().contiguous()
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}.get(t.dtype)
    if view is None:
        raise InputError(f"unsupported dtype {t.dtype} for a bit comparison")
    return t.view(view)


def train_rlvr_masked(model: nn.Module, cfg, masks: Mapping[str, Tensor], *, run_name: str = "rlvr-masked", **kw):
    """``sims.tinygpt.rlvr.train_rlvr`` with only ``masks``' entries trainable (every other parameter frozen).

    Raises ``InputError`` for a weight decay other than 0 (it would move masked-out entries), and ``RuntimeError``
    if any stored value (snapshot bits) or fp32 master entry outside the mask moved — that would be a bug here."""
    if cfg.weight_decay != 0:
        raise InputError(f"masked training needs weight_decay = 0 (AdamW's decay moves masked-out entries), "
                         f"got {cfg.weight_decay}")
    start_master = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    with masked_training(model, masks):
        res = train_rlvr(model, cfg, run_name=run_name, **kw)
    snaps = res.snapshots
    moved = {n: c for n, c in check_frozen_outside_mask(snaps[min(snaps)], snaps[max(snaps)], masks).items() if c}
    moved_master = {n: c for n, c in check_frozen_outside_mask(start_master, res.master, masks).items() if c}
    if moved or moved_master:
        raise RuntimeError(f"masked training moved entries outside the mask: stored {moved}, master {moved_master}")
    return res


# ----------------------------------------------------------------------------------------------------------------
# LoRA / PiSSA


class AdaptedLinear(nn.Module):
    """A bias-free linear layer ``W_base + s B A`` with a frozen ``weight`` (= W_base) and trainable ``lora_A``,
    ``lora_B`` (see the module docstring). Build with ``AdaptedLinear.lora`` or ``AdaptedLinear.pissa``."""

    def __init__(self, weight: Float[Tensor, "out inp"], A: Float[Tensor, "r inp"], B: Float[Tensor, "out r"],
                 scale: float, method: str) -> None:
        super().__init__()
        if method not in ADAPTER_METHODS:
            raise InputError(f"adapter method {method!r} is not one of {ADAPTER_METHODS}")
        if A.shape[0] != B.shape[1] or A.shape[1] != weight.shape[1] or B.shape[0] != weight.shape[0]:
            raise ShapeMismatchError(f"adapter shapes W {tuple(weight.shape)}, A {tuple(A.shape)}, "
                                     f"B {tuple(B.shape)} do not fit W + B A")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(B)
        self.scale = float(scale)
        self.method = method

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @staticmethod
    def _check(W: Tensor, rank: int, alpha: float | None) -> float:
        if W.ndim != 2:
            raise InputError(f"adapters wrap 2-D weights, got shape {tuple(W.shape)}")
        if not 1 <= rank <= min(W.shape):
            raise InputError(f"adapter rank {rank} outside 1..{min(W.shape)} for a {tuple(W.shape)} weight")
        if not torch.isfinite(W).all():
            raise NonFiniteError("adapter base weight has non-finite entries")
        a = float(rank if alpha is None else alpha)
        if not (a > 0 and math.isfinite(a)):
            raise InputError(f"adapter alpha must be finite and > 0, got {alpha}")
        return a / rank

    @classmethod
    def lora(cls, W: Tensor, rank: int, *, alpha: float | None = None, generator: torch.Generator) -> "AdaptedLinear":
        """LoRA: base W, B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)) drawn in float32 on CPU from ``generator``."""
        s = cls._check(W, rank, alpha)
        bound = 1.0 / math.sqrt(W.shape[1])
        A = (torch.rand((rank, W.shape[1]), generator=generator) * 2 - 1) * bound
        B = torch.zeros((W.shape[0], rank))
        return cls(W.detach().clone(), A.to(W), B.to(W), s, "LoRA")

    @classmethod
    def pissa(cls, W: Tensor, rank: int, *, alpha: float | None = None) -> "AdaptedLinear":
        """PiSSA: A, B from the top-``rank`` singular triplets of W (float64), W_res = W - s B A."""
        s = cls._check(W, rank, alpha)
        A64, B64, res64 = pissa_factors(W, rank, s)
        return cls(res64.to(W), A64.to(W), B64.to(W), s, "PiSSA")

    def delta(self) -> Float[Tensor, "out inp"]:
        """s B A, in float64."""
        return self.scale * (self.lora_B.detach().double() @ self.lora_A.detach().double())

    def merged_weight(self) -> Float[Tensor, "out inp"]:
        """W_base + s B A evaluated in float64, rounded once to the base's dtype."""
        return (self.weight.detach().double() + self.delta()).to(self.weight.dtype)

    def forward(self, x: Float[Tensor, "... inp"]) -> Float[Tensor, "... out"]:
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def pissa_factors(W: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(A, B, W_res) in float64: ``A = diag(sqrt(S_r/s)) V_r^T``, ``B = U_r diag(sqrt(S_r/s))``, ``W_res = W - s B A``."""
    W64 = W.detach().to("cpu", torch.float64)
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    root = torch.sqrt(S[:rank] / scale)
    A = root[:, None] * Vh[:rank]
    B = U[:, :rank] * root[None, :]
    return A, B, W64 - scale * (B @ A)


def _linear_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """{weight name: (parent module, attribute)} of every block matrix (q, k, v, o, up, gate, down)."""
    slots = {}
    for mname, mod in model.named_modules():
        for attr, child in mod.named_children():
            full = f"{mname}.{attr}.weight" if mname else f"{attr}.weight"
            if isinstance(child, (nn.Linear, AdaptedLinear)) and _is_block_matrix(full):
                slots[full] = (mod, attr)
    return slots


def add_adapters(model: nn.Module, method: str, rank: int, *, alpha: float | None = None, seed: int = 0,
                 types: tuple[str, ...] | None = None) -> nn.Module:
    """Replace every block matrix (of ``types``, default all) of ``model`` in place by an ``AdaptedLinear`` and
    freeze every other parameter; returns the model. ``seed`` draws LoRA's A (matrices in name order)."""
    if method not in ADAPTER_METHODS:
        raise InputError(f"adapter method {method!r} is not one of {ADAPTER_METHODS}")
    types = tuple(MATRIX_TYPES if types is None else types)
    bad = sorted(set(types) - set(MATRIX_TYPES))
    if bad:
        raise InputError(f"unknown matrix types {bad}; known: {list(MATRIX_TYPES)}")
    slots = _linear_slots(model)
    if any(isinstance(getattr(mod, attr), AdaptedLinear) for mod, attr in slots.values()):
        raise InputError("add_adapters: the model already has adapters (merge them first)")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name in sorted(slots):
        if matrix_type(name) not in types:
            continue
        mod, attr = slots[name]
        lin = getattr(mod, attr)
        if lin.bias is not None:
            raise InputError(f"{name}: adapters here wrap bias-free layers")
        W = lin.weight.detach()
        new = (AdaptedLinear.lora(W, rank, alpha=alpha, generator=g) if method == "LoRA"
               else AdaptedLinear.pissa(W, rank, alpha=alpha))
        setattr(mod, attr, new.to(W.device))
    return model


def merge_adapters(model_or_state: nn.Module | Mapping[str, Tensor],
                   scale: float | Mapping[str, float] | None = None) -> dict[str, Tensor]:
    """A plain TinyGPT state dict: each adapted ``W = W_base + s B A`` (float64, rounded once to the stored dtype),
    other tensors copied. From a wrapped model (its scales are known) or from a state dict of one (e.g. a run's
    snapshot; then ``scale`` must be given: one number, or ``{weight name: s}``)."""
    if isinstance(model_or_state, nn.Module):
        scales = {}
        for name, (mod, attr) in _linear_slots(model_or_state).items():
            child = getattr(mod, attr)
            if isinstance(child, AdaptedLinear):
                scales[name] = child.scale
        state = {n: t.detach() for n, t in model_or_state.state_dict().items()}
    else:
        state = dict(model_or_state)
        prefixes = [n[: -len(".lora_A")] for n in state if n.endswith(".lora_A")]
        if prefixes and scale is None:
            raise InputError("merge_adapters: a state dict with adapters needs their scale s = alpha / r")
        scales = {f"{p}.weight": (scale[f"{p}.weight"] if isinstance(scale, Mapping) else float(scale))
                  for p in prefixes}
    out = {}
    for n, t in state.items():
        if n.endswith((".lora_A", ".lora_B")):
            continue
        if n in scales:
            p = n[: -len(".weight")]
            A, B = state[f"{p}.lora_A"], state[f"{p}.lora_B"]
            out[n] = (t.double() + scales[n] * (B.double() @ A.double())).to(t.dtype)
        else:
            out[n] = t.clone()
    return out


def adapter_parameter_count(model: nn.Module) -> int:
    """Number of trainable adapter entries (A and B of every AdaptedLinear)."""
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, AdaptedLinear))
