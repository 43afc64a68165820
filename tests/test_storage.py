"""Tests for sims.tinygpt.storage: the bf16 stored copy is exactly RNE(fp32 master), bit for bit; snapshots are safe."""

from __future__ import annotations

import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sims.tinygpt.determinism import deterministic
from sims.tinygpt.storage import MixedPrecisionAdamW, load_snapshot, round_tensor_to_bf16, save_snapshot
from theory.errors import CheckpointError, InputError, NonFiniteError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest on a shared machine, and reruns stay bit-identical."""
    with deterministic():
        yield


def rne_bf16_bits_oracle(x32: np.ndarray) -> np.ndarray:
    """Independent integer oracle: float32 bits -> bf16 bits by round-to-nearest-even on the 16 dropped bits."""
    u = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    keep, rem = u >> 16, u & 0xFFFF
    up = (rem > 0x8000) | ((rem == 0x8000) & ((keep & 1) == 1))
    return (keep + up.astype(np.uint64)).astype(np.uint16)  # a carry into the exponent is the correct next binade


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def _tiny_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(model, opt, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        y = torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_oracle_on_hand_checked_values():
    # 1 + 2^-8 is the exact midpoint of bf16 1 and 1+2^-7: ties to even (1.0); 1 + 3*2^-8 ties up to 1+2^-6.
    vals = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20, -(1 + 2.0**-8)], dtype=np.float32)
    exact = [Fraction(1), Fraction(1) + Fraction(1, 64), Fraction(1) + Fraction(1, 128), Fraction(-1)]
    bits = rne_bf16_bits_oracle(vals)
    got = [Fraction(float(b)) for b in torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()]
    assert got == exact


@given(st.integers(min_value=0, max_value=2**32 - 1))
@example(0x3F808000)  # tie, even keep -> stays
@example(0x3F818000)  # tie, odd keep -> rounds up
@example(0x7F7FFFFF)  # float32 max -> overflows to +inf in bf16
@example(0x00008000)  # subnormal tie
@example(0x80000000)  # -0.0
def test_round_to_bf16_matches_integer_oracle(bits32: int):
    x = np.array([bits32], dtype=np.uint32).view(np.float32)
    if not np.isfinite(x).all():
        return  # NaN payloads are not rounded values; the master is checked finite before every step
    t = torch.from_numpy(x.copy())
    assert bf16_bits(round_tensor_to_bf16(t)).tolist() == rne_bf16_bits_oracle(x).tolist()


def test_stored_copy_equals_rounded_master_bit_for_bit_after_training():
    model = _tiny_mlp()
    opt = MixedPrecisionAdamW(model, precision="bf16", lr=3e-3, weight_decay=0.01)
    _train(model, opt, steps=25)
    stored, master = opt.stored_state_dict(), opt.master_state_dict()
    moved = 0
    for name, p in model.named_parameters():
        assert stored[name].dtype == torch.bfloat16 and master[name].dtype == torch.float32
        assert bf16_bits(stored[name]).tolist() == rne_bf16_bits_oracle(master[name].numpy()).tolist(), name
        # the model computes with the stored copy, cast up exactly
        assert torch.equal(p.detach(), stored[name].float()), name
        moved += int((master[name] != stored[name].float()).sum())
    assert moved > 0  # the master really holds bits the stored copy does not


def test_small_updates_move_master_but_not_stored_copy():
    # AdamW's first step moves every weight by about lr (m/sqrt(v) = sign(g)); at w = 1 the nearest bf16 below is
    # 1 - 2^-8, so the stored 1.0 changes only for a downward step larger than 2^-9 (half the spacing below 1).
    for lr, expect_stored_change in [(1e-3, False), (3e-3, True)]:
        lin = torch.nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            lin.weight.fill_(1.0)
        opt = MixedPrecisionAdamW(lin, precision="bf16", lr=lr, grad_clip=None)
        lin(torch.ones(2, 4)).sum().backward()  # positive gradient -> every weight steps down
        opt.step()
        master = opt.master_state_dict()["weight"]
        assert bool((master < 1.0).all())
        stored = opt.stored_state_dict()["weight"].float()
        if expect_stored_change:
            assert bool((stored == 1 - 2.0**-8).all())
        else:
            assert bool((stored == 1.0).all())


def test_fp32_mode_shares_master_with_model():
    model = _tiny_mlp()
    opt = MixedPrecisionAdamW(model, precision="fp32", lr=3e-3)
    _train(model, opt, steps=3)
    for name, p in model.named_parameters():
        assert opt.stored_state_dict()[name].dtype == torch.float32
        assert torch.equal(p.detach(), opt.master_state_dict()[name])


def test_same_seed_bit_identical_and_modes_differ():
    outs = []
    for precision in ("bf16", "bf16", "fp32"):
        model = _tiny_mlp(seed=3)
        opt = MixedPrecisionAdamW(model, precision=precision, lr=3e-3)
        _train(model, opt, steps=10, seed=4)
        outs.append(opt.master_state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_bad_inputs_are_named():
    with pytest.raises(InputError, match="precision mode"):
        MixedPrecisionAdamW(_tiny_mlp(), precision="fp16")
    with pytest.raises(InputError, match="float64"):
        MixedPrecisionAdamW(_tiny_mlp().double(), precision="bf16")
    model = _tiny_mlp()
    opt = MixedPrecisionAdamW(model, precision="bf16")
    (model(torch.full((1, 8), float("nan"))).sum()).backward()
    with pytest.raises(NonFiniteError, match="gradient of"):
        opt.step()
    with pytest.raises(InputError, match="float32"):
        round_tensor_to_bf16(torch.zeros(2, dtype=torch.float64))


def test_snapshot_round_trip_and_bad_files(tmp_path):
    model = _tiny_mlp()
    opt = MixedPrecisionAdamW(model, precision="bf16")
    sd = opt.stored_state_dict()
    path = save_snapshot(sd, tmp_path / "s" / "step_0.safetensors", {"step": 0})
    back = load_snapshot(path)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    assert list(load_snapshot(path, ["0.weight"])) == ["0.weight"]
    with pytest.raises(CheckpointError, match="lacks tensors"):
        load_snapshot(path, ["nope"])
    with pytest.raises(CheckpointError, match="does not exist"):
        load_snapshot(tmp_path / "missing.safetensors")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_snapshot(truncated)
    pickled = tmp_path / "pickle.safetensors"
    pickled.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_snapshot(pickled)
    with pytest.raises(InputError, match=".safetensors"):
        save_snapshot(sd, tmp_path / "x.pt")
