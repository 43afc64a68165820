"""Tests for threegate.live.LiveCounter: per-step bf16 change counts, packed masks, Gate III rules (no trainer).

Oracles: an independent integer recount of the int16 bit patterns (+0 == -0) written here, numpy.packbits, and
for Gate III the exactness of the realization rule fed the float32 master (precision = recall = 1, exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from threegate import live
from threegate.live import LiveCounter, and_count, pack_mask, popcount, stored_bf16
from theory.errors import InputError, NonFiniteError


def recount(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Independent oracle: stored bf16 values differ (int16 patterns differ, except a +0/-0 pair)."""
    x = a.contiguous().view(torch.int16).numpy().astype(np.int32)
    y = b.contiguous().view(torch.int16).numpy().astype(np.int32)
    both_zero = ((x | y) & 0x7FFF) == 0
    return (x != y) & ~both_zero


class Model(torch.nn.Module):
    def __init__(self, seed: int, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter((torch.randn(6, 10, generator=g) * 0.05).to(dtype))
        self.b = torch.nn.Parameter((torch.randn(9, 5, generator=g) * 3.0).to(dtype))
        self.bias = torch.nn.Parameter(torch.zeros(10, dtype=dtype))  # 1-D: never tracked
        self.frozen = torch.nn.Parameter(torch.ones(3, 3, dtype=dtype), requires_grad=False)


def adam_steps(model: Model, steps: int, lr: float, seed: int, counter: LiveCounter | None = None):
    """A few AdamW steps on a random quadratic; returns the bf16 views after each step (base first)."""
    g = torch.Generator().manual_seed(seed)
    targets = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    views = [{n: stored_bf16(p) for n, p in model.named_parameters() if p.ndim == 2 and p.requires_grad}]
    rows = []
    for t in range(1, steps + 1):
        loss = sum(((p.float() - targets[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad)
        opt.zero_grad()
        loss.backward()
        if counter is not None:
            counter.capture_pre_step()
        opt.step()
        views.append({n: stored_bf16(p) for n, p in model.named_parameters() if p.ndim == 2 and p.requires_grad})
        if counter is not None:
            rows += counter.count(t)
    return views, rows


@pytest.mark.parametrize("chunk", [8, 24, live.CHUNK_CPU])  # blocks that split the 60- and 45-entry matrices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_equal_an_independent_recount_every_step(dtype, chunk, monkeypatch):
    monkeypatch.setattr(live, "CHUNK_CPU", chunk)
    model = Model(0, dtype)
    counter = LiveCounter(model.named_parameters())
    assert counter.names == ["a", "b"]  # 1-D and frozen tensors are not tracked
    views, rows = adam_steps(model, 4, lr=1e-3, seed=1, counter=counter)
    by = {(r.step, r.matrix): r for r in rows}
    seen_partial = False
    for t in range(1, 5):
        for n in ("a", "b"):
            r = by[(t, n)]
            m_t = recount(views[t - 1][n], views[t][n])
            assert r.numel == m_t.size
            assert r.changed_prev == int(m_t.sum())
            assert r.changed_base == int(recount(views[0][n], views[t][n]).sum())
            if t == 1:
                assert r.size_prev == -1 and r.inter_prev == 0
            else:
                m_prev = recount(views[t - 2][n], views[t - 1][n])
                assert r.size_prev == int(m_prev.sum()) and r.inter_prev == int((m_t & m_prev).sum())
            seen_partial |= 0 < r.changed_prev < r.numel
    assert seen_partial  # the oracle compared something non-trivial


@settings(max_examples=30, deadline=None)
@given(j=st.integers(-20, 20), seed=st.integers(0, 2**16))
@example(j=0, seed=0)
@example(j=-20, seed=3)
def test_scaling_weights_and_updates_by_a_power_of_two_leaves_every_count_unchanged(j, seed):
    """bf16 rounding commutes with 2^j (no over/underflow at these magnitudes), so the masks are the same."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(7, 11, generator=g)
    steps = [torch.randn(7, 11, generator=g) * 10.0 ** float(torch.randint(-5, -1, (1,), generator=g)) for _ in range(3)]
    results = []
    for scale in (1.0, 2.0 ** j):
        p = torch.nn.Parameter(w0 * scale)
        counter = LiveCounter([("w", p)])
        rows = []
        for t, d in enumerate(steps, 1):
            with torch.no_grad():
                p.add_(d * scale)
            rows += counter.count(t)
        results.append([(r.changed_prev, r.changed_base, r.inter_prev, r.size_prev) for r in rows])
    assert results[0] == results[1]


def test_signed_zero_flips_are_not_changes_and_zero_to_subnormal_is():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    counter = LiveCounter([("w", p)])
    with torch.no_grad():
        p[0, 0] = -0.0                    # same value
        p[0, 1] = 2.0 ** -133             # smallest bf16 subnormal: a change
        p[1, 0] = 2.0 ** -135             # rounds to 0 in bf16: no change
    (r,) = counter.count(1)
    assert (r.changed_prev, r.changed_base) == (1, 1)


def test_memory_is_4_125_bytes_per_parameter_after_a_step():
    model = Model(0)
    counter = LiveCounter(model.named_parameters())
    n = 6 * 10 + 9 * 5
    assert counter.memory_bytes() == 2 * n + 2 * n  # base and previous bits
    adam_steps(model, 1, lr=1e-3, seed=0, counter=counter)
    assert counter.memory_bytes() == 2 * n + 2 * n + (60 + 7) // 8 + (45 + 7) // 8  # + the packed previous mask


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_packed_masks_match_numpy_packbits_and_count_intersections(n):
    rng = np.random.default_rng(n)
    a, b = rng.random(n) < 0.3, rng.random(n) < 0.6
    pa, pb = pack_mask(torch.from_numpy(a)), pack_mask(torch.from_numpy(b))
    np.testing.assert_array_equal(pa.numpy(), np.packbits(a))
    assert popcount(pa) == int(a.sum()) and and_count(pa, pb) == int((a & b).sum())
    # the device path (used off the CPU), run on the CPU against the same oracle
    pt = live._pack_torch(torch.from_numpy(a))
    np.testing.assert_array_equal(pt.numpy(), np.packbits(a))
    assert live._popcount_torch(pt & pb) == int((a & b).sum())


@pytest.mark.parametrize("chunk", [16, live.CHUNK_CPU])
def test_gate3_exact_rule_fed_the_master_has_precision_and_recall_one(chunk, monkeypatch):
    monkeypatch.setattr(live, "CHUNK_CPU", chunk)
    model = Model(2)
    counter = LiveCounter(model.named_parameters(), gate3=True)
    _, rows = adam_steps(model, 6, lr=3e-4, seed=5, counter=counter)
    changed = sum(r.changed_prev for r in rows)
    assert changed > 0 and any(r.changed_prev < r.numel for r in rows)
    for r in rows:
        assert r.pred_master == r.tp_master == r.changed_prev, r  # exact: no false positive, no false negative
        assert 0 <= r.tp_update <= min(r.pred_update, r.changed_prev)


def test_gate3_update_rule_equals_the_master_rule_when_the_master_is_a_bf16_value():
    """With a bf16 parameter there is no residue master - w: both rules see the same delta."""
    model = Model(3, torch.bfloat16)
    counter = LiveCounter(model.named_parameters(), gate3=True)
    _, rows = adam_steps(model, 3, lr=1e-2, seed=1, counter=counter)
    for r in rows:
        assert (r.pred_update, r.tp_update) == (r.pred_master, r.tp_master) == (r.changed_prev, r.changed_prev)


def test_bad_states_and_options_raise_one_line_errors():
    model = Model(0)
    counter = LiveCounter(model.named_parameters(), gate3=True)
    with pytest.raises(InputError, match="capture_pre_step"):
        counter.count(1)
    plain = LiveCounter(model.named_parameters())
    with torch.no_grad():
        model.b[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 3, matrix 'b'"):
        plain.count(3)
    with pytest.raises(InputError, match="no 2-D weight"):
        LiveCounter([("bias", torch.nn.Parameter(torch.zeros(3)))])
    with pytest.raises(InputError, match="eta < 2\\*\\*-8"):
        LiveCounter(model.named_parameters(), gate3=True, eta=0.01)
    with pytest.raises(InputError, match="gate3"):
        LiveCounter(model.named_parameters(), gate3="yes")
    assert LiveCounter(model.named_parameters(), include_frozen=True).names == ["a", "b", "frozen"]
