"""Live bf16 change counting over optimizer steps: the state kept per weight matrix and the counts of one step.

``LiveCounter`` watches the 2-D weights of a model while it trains (``threegate.callback.ThreeGateCallback`` drives
it from a ``transformers`` Trainer; any loop can call it). After every optimizer step it takes each weight's
**stored-bf16 view** -- ``bf16(master)`` for a float32 parameter (the mixed-precision master), the parameter itself
when it is bf16 -- and counts, per matrix,

* ``changed_prev = |M_t|``: entries whose stored value changed since the previous step, ``M_t = 1[w_t ≉ w_{t-1}]``
  (Def. 2.1 with ``eta``; for ``eta < 2**-8`` bit inequality with ``+0 == -0``, ``theory.metrics``);
* ``changed_base``: entries changed since the base (the weights when counting started);
* ``inter_prev = |M_t ∩ M_{t-1}|`` and ``size_prev = |M_{t-1}|``: the Jaccard of consecutive step masks is
  ``inter_prev / (changed_prev + size_prev - inter_prev)``.

The counts come from ``theory.metrics.update_mask`` and ``theory.metrics.bf16_changed_count`` (the project's bf16
change-count kernel), run on the parameter's device: in one pass over each matrix, block by block on the CPU
(``CHUNK_CPU`` entries, so the block's bf16 view and masks stay in cache; one torch thread for the pass), the whole
matrix at once on a GPU. The previous bits and the packed mask are overwritten in place.

Memory kept per tracked parameter (``n`` entries): the base bf16 bits (2n bytes), the previous step's bf16 bits
(2n bytes) and the previous change mask packed one bit per entry (n/8 bytes): **4.125 bytes per parameter**, on the
parameter's device (SmolLM2-135M's 134.5M tracked entries: 555 MB). Transients per step: one block on the CPU; on
a GPU about 3.1n bytes for the matrix being counted (bf16 view, boolean mask, packed mask). With ``gate3=True`` a
float32 copy of the master before the step is kept too (4n bytes more, host memory) and the Gate III rules run on
the host in numpy (float64).

**Gate III on live steps** (``gate3=True``; ``capture_pre_step()`` must run right before ``optimizer.step()``).
With ``w = bf16(master_{t-1})`` the stored value before the step, it compares the real change mask ``M_t`` with

* the exact realization rule (``theory.precision.predict_change_mask``, "exact" semantics) fed the float32 master:
  ``delta = master_t - w``. Rounding ``master_t`` to bf16 moves ``w`` iff ``master_t`` leaves ``w``'s rounding
  interval, which is what the rule decides, so precision and recall must both be 1 (a failure is a bug);
* the same rule fed the optimizer's update alone, ``delta = master_t - master_{t-1}`` (Adam's proposed step, with
  weight decay, as applied in float32) added to the stored ``w``: what one can predict from the optimizer state
  without the master's sub-threshold residue ``master_{t-1} - w``.

Per matrix it counts ``pred_master``, ``tp_master``, ``pred_update``, ``tp_update`` (true positives = predicted and
changed). When the parameter is bf16 itself there is no separate master: both rules see ``delta = w_t - w_{t-1}``.

**Several processes.** Replicated parameters (DDP): every rank holds the same weights, so the counts of rank 0
are the counts and the other ranks keep no state (``count_on_all_ranks=False``, the default). Sharded parameters
(FSDP2 ``DTensor`` with a ``Shard`` placement; DeepSpeed ZeRO-3's ``ds_tensor`` partitions): each rank counts its
local shard and the per-matrix integer counts are summed with one ``torch.distributed.all_reduce`` per step (every
rank must call ``count``); ``numel`` is summed the same way, so totals are exact. Jaccard stays exact because
intersections are counted per shard and added.

Examples
--------
>>> import torch
>>> lin = torch.nn.Linear(4, 3, bias=False)
>>> with torch.no_grad():
...     _ = lin.weight.copy_(torch.ones(3, 4))
>>> live = LiveCounter(lin.named_parameters())
>>> with torch.no_grad():
...     lin.weight[0, 0] += 0.5           # changes the stored bf16 value
...     lin.weight[1, 1] += 2.0 ** -12    # below half a bf16 step at 1.0: the stored value stays
>>> [(r.matrix, r.numel, r.changed_prev, r.changed_base) for r in live.count(step=1)]
[('weight', 12, 1, 1)]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from theory import metrics
from theory.bf16_array import predict_change_mask
from theory.errors import InputError, NonFiniteError, ThreegateError

__all__ = ["MatrixCounts", "LiveCounter", "dtensor_class", "stored_bf16", "local_shard", "pack_mask", "popcount",
           "and_count"]

_COUNT_FIELDS = ("numel", "changed_prev", "changed_base", "inter_prev", "size_prev",
                 "pred_master", "tp_master", "pred_update", "tp_update")


@dataclass
class MatrixCounts:
    """Integer counts of one weight matrix at one step (totals over shards). ``size_prev`` is -1 at the first
    counted step (no previous mask); the Gate III fields are -1 when Gate III is off."""

    step: int
    matrix: str
    numel: int
    changed_prev: int
    changed_base: int
    inter_prev: int
    size_prev: int
    pred_master: int = -1
    tp_master: int = -1
    pred_update: int = -1
    tp_update: int = -1


def stored_bf16(t: torch.Tensor) -> torch.Tensor:
    """The stored-bf16 view of a weight: ``t.to(bfloat16)`` (round to nearest even), or a copy if t is bf16."""
    t = t.detach()
    return t.clone() if t.dtype == torch.bfloat16 else t.to(torch.bfloat16)


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(local tensor, is_sharded)``: a ``DTensor``'s local part (sharded if any placement is ``Shard``),
    a DeepSpeed ZeRO-3 parameter's ``ds_tensor`` partition, else the tensor itself (replicated)."""
    DTensor = dtensor_class()
    if DTensor is not None and isinstance(p, DTensor):
        return p.to_local(), any(pl.is_shard() for pl in p.placements)
    ds = getattr(p, "ds_tensor", None)
    if isinstance(ds, torch.Tensor):
        return ds, True
    return p, False


def dtensor_class():
    """``torch.distributed.tensor.DTensor``, or None where torch was built without distributed support."""
    try:
        from torch.distributed.tensor import DTensor  # optional: torch builds without distributed lack it
    except ImportError:  # torch built without distributed
        return None
    return DTensor


#: Entries per block on the CPU: the block's bf16 view, mask and packed mask stay in cache between the passes.
CHUNK_CPU = 1 << 18
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as a flat uint8 tensor, 8 entries per byte (``numpy.packbits`` order), on mask's device."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy()))
    return _pack_torch(flat)


def _pack_torch(flat: torch.Tensor) -> torch.Tensor:
    """``pack_mask`` in torch ops (any device)."""
    flat = flat.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a packed mask (``pack_mask``): the size of the mask."""
    if packed.device.type == "cpu":
        return int(np.bitwise_count(packed.numpy()).sum(dtype=np.int64))
    return _popcount_torch(packed)


def _popcount_torch(packed: torch.Tensor) -> int:
    """``popcount`` by a 256-entry table lookup in torch ops (any device)."""
    return int(_POPCOUNT.to(packed.device)[packed.to(torch.int64)].sum())


def _count_true(mask: torch.Tensor) -> int:
    if mask.device.type == "cpu":  # numpy's count is ~4x torch's on CPU bool tensors (measured)
        return int(np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def and_count(a: torch.Tensor, b: torch.Tensor) -> int:
    """``popcount(a & b)`` of two packed masks (``pack_mask``): the size of the intersection."""
    return popcount(a & b)


@contextlib.contextmanager
def _one_torch_thread():
    """One intra-op torch thread for the block-wise CPU pass, restored after. The blocks are cache-sized, so more
    threads only add synchronisation; on a loaded 2-core machine 2 threads made the pass 30x slower (measured:
    SmolLM2's 211 matrices, 0.6 s with one thread against 18-32 s with two)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


class _Tracked:
    """State of one parameter: base bits, previous bits, previous packed mask (and the Gate III pre-step copy)."""

    __slots__ = ("name", "param", "sharded", "base", "prev", "prev_mask", "prev_changed", "pre_master")

    def __init__(self, name: str, param: torch.Tensor):
        self.name, self.param = name, param
        local, self.sharded = local_shard(param)
        self.base = stored_bf16(local).contiguous()
        self.prev = self.base.clone()
        self.prev_mask: torch.Tensor | None = None
        self.prev_changed = 0
        self.pre_master: torch.Tensor | None = None


class LiveCounter:
    """Per-step bf16 change counts of a set of named weights (see the module docstring).

    Parameters
    ----------
    named_parameters : iterable of (name, tensor)
        Typically ``model.named_parameters()``. Only 2-D tensors are tracked, and only those with
        ``requires_grad`` unless ``include_frozen``. Tied weights appear once (as ``named_parameters`` yields them).
    eta : float
        Probe tolerance of Def. 2.1 (default 1e-3: bit equality).
    gate3 : bool
        Also evaluate the Gate III predictors each step (needs ``capture_pre_step`` before each optimizer step).
    include_frozen : bool
        Track 2-D tensors that do not require gradients too (they never change; they cost memory).
    count_on_all_ranks : bool
        Under ``torch.distributed`` with only replicated parameters, count on every rank (default: rank 0 only).
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], *, eta: float = metrics.ETA_DEFAULT,
                 gate3: bool = False, include_frozen: bool = False, count_on_all_ranks: bool = False):
        if not isinstance(gate3, bool):
            raise InputError(f"gate3 must be True or False, got {gate3!r}")
        self.eta = metrics._check_eta(eta)
        if gate3 and self.eta >= metrics.ETA_BIT_EQUALITY_LIMIT:
            raise InputError(f"Gate III compares stored-value changes: it needs eta < 2**-8, got eta = {self.eta}")
        self.gate3 = gate3
        params = [(str(n), p) for n, p in named_parameters
                  if isinstance(p, torch.Tensor) and p.ndim == 2 and (include_frozen or p.requires_grad)]
        if not params:
            raise InputError("LiveCounter: no 2-D weight to track (no parameter is 2-D and trainable)")
        for n, p in params:
            if not p.dtype.is_floating_point:
                raise InputError(f"LiveCounter: parameter {n!r} has dtype {p.dtype}, not a float")
        sharded = [local_shard(p)[1] for _, p in params]
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.any_sharded = any(sharded)
        self.active = self.rank == 0 or self.any_sharded or count_on_all_ranks
        self._tracked = [_Tracked(n, p) for n, p in params] if self.active else []

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tracked]

    def memory_bytes(self) -> int:
        """Bytes held on this rank by the counting state (base + previous bits, packed masks, Gate III copies)."""
        return sum(x.numel() * x.element_size() for t in self._tracked
                   for x in (t.base, t.prev, t.prev_mask, t.pre_master) if x is not None)

    def capture_pre_step(self) -> None:
        """Gate III: keep the float32 master of every tracked weight as it is before ``optimizer.step()``."""
        if not (self.gate3 and self.active):
            return
        for t in self._tracked:
            local, _ = local_shard(t.param)
            t.pre_master = local.detach().to(device="cpu", dtype=torch.float32, copy=True)

    def count(self, step: int) -> list[MatrixCounts]:
        """Counts of every tracked matrix after the optimizer step ``step``; updates the kept state.

        Raises ``NonFiniteError`` naming the matrix and step if a weight became NaN/Inf, and ``InputError`` if
        Gate III is on and ``capture_pre_step`` did not run before this step.
        """
        if not self.active:
            return []
        if self.gate3 and any(t.pre_master is None for t in self._tracked):
            raise InputError(f"LiveCounter: Gate III is on but capture_pre_step() was not called before step {step}")
        rows = []
        with _one_torch_thread():
            for t in self._tracked:
                try:
                    rows.append(self._count_one(t, step))
                except ThreegateError as e:
                    raise type(e)(f"step {step}, matrix {t.name!r}: {e}") from None
        if self.any_sharded and self.distributed:
            rows = self._all_reduce(rows)
        return rows

    def _count_one(self, t: _Tracked, step: int) -> MatrixCounts:
        """One pass over the matrix in blocks of ``CHUNK_CPU`` entries on the CPU (cache-resident: no n-sized
        temporaries), the whole tensor at once elsewhere; ``prev`` and the packed mask are updated in place."""
        local = local_shard(t.param)[0].detach()
        flat = local.reshape(-1)
        n = flat.numel()
        chunk = CHUNK_CPU if flat.device.type == "cpu" else max(n, 8)
        prev, base = t.prev.view(-1), t.base.view(-1)
        packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=flat.device)
        changed_prev = changed_base = inter = 0
        g3 = [0, 0, 0, 0]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            cur = stored_bf16(flat[s:e])
            try:
                mask = metrics.update_mask(prev[s:e], cur, self.eta)
                changed_base += metrics.bf16_changed_count(base[s:e], cur, self.eta)
            except NonFiniteError:
                bad = int((~torch.isfinite(stored_bf16(local))).sum())
                raise NonFiniteError(f"{bad} non-finite entries (NaN or Inf) as bf16") from None
            changed_prev += _count_true(mask)
            pk = pack_mask(mask)
            p0 = s // 8
            packed[p0:p0 + pk.numel()] = pk
            if t.prev_mask is not None:
                inter += and_count(pk, t.prev_mask[p0:p0 + pk.numel()])
            if self.gate3:
                for i, v in enumerate(self._gate3(prev[s:e], flat[s:e], t.pre_master.view(-1)[s:e], mask)):
                    g3[i] += v
            prev[s:e] = cur
        size_prev = -1 if t.prev_mask is None else t.prev_changed
        row = MatrixCounts(step, t.name, n, changed_prev, changed_base, inter, size_prev)
        if self.gate3:
            row.pred_master, row.tp_master, row.pred_update, row.tp_update = g3
            t.pre_master = None
        t.prev_mask, t.prev_changed = packed, changed_prev
        return row

    @staticmethod
    def _gate3(w: torch.Tensor, new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
        """(pred_master, tp_master, pred_update, tp_update) of one block: ``w`` the stored bf16 before the step,
        ``new`` / ``old`` the master after / before it, ``mask`` the real change mask."""
        w = w.cpu()
        new64 = new.to(device="cpu", dtype=torch.float64)
        actual = mask.cpu().numpy()
        # w and the masters are float32 values: each difference below is exact or is compared exactly with the
        # rule's threshold (a float64 value), see the module docstring of theory.precision.
        by_master = predict_change_mask(w, new64 - w.to(torch.float64))
        by_update = predict_change_mask(w, new64 - old.to(torch.float64))
        return (int(by_master.sum()), int((by_master & actual).sum()),
                int(by_update.sum()), int((by_update & actual).sum()))

    def _all_reduce(self, rows: list[MatrixCounts]) -> list[MatrixCounts]:
        """Sum the counts of sharded matrices over ranks (one collective); replicated ones are left as they are."""
        idx = [i for i, t in enumerate(self._tracked) if t.sharded]
        vec = torch.tensor([[getattr(rows[i], f) for f in _COUNT_FIELDS] for i in idx], dtype=torch.int64)
        first = torch.tensor([[rows[i].size_prev < 0] for i in idx], dtype=torch.int64)
        gate3_off = torch.tensor([[rows[i].pred_master < 0] for i in idx], dtype=torch.int64)
        dev = self._tracked[idx[0]].base.device
        backend = torch.distributed.get_backend()
        if backend == "nccl":
            vec, first, gate3_off = vec.to(dev), first.to(dev), gate3_off.to(dev)
        torch.distributed.all_reduce(vec)
        vec = vec.cpu()
        for j, i in enumerate(idx):
            vals = dict(zip(_COUNT_FIELDS, vec[j].tolist()))
            if bool(first[j]):
                vals["size_prev"] = -1
            if bool(gate3_off[j]):
                for f in ("pred_master", "tp_master", "pred_update", "tp_update"):
                    vals[f] = -1
            for f, v in vals.items():
                setattr(rows[i], f, int(v))
        return rows
