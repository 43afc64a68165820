"""Tests for sims.tinygpt.peft: structural masks, masked RL (bit-exact freezing), LoRA / PiSSA adapters and merging."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from sims.tinygpt.peft import (
    AdaptedLinear,
    add_adapters,
    adapter_parameter_count,
    check_frozen_outside_mask,
    mask_density,
    masked_training,
    merge_adapters,
    pissa_factors,
    structural_masks,
    train_rlvr_masked,
)
from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.rlvr import RLConfig, train_rlvr
from theory.errors import InputError, ShapeMismatchError
from theory.metrics import low_magnitude_mask, principal_mask, selection_count

U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)
U_BF16 = 2.0**-8
EPS64 = float(np.finfo(np.float64).eps)


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of an n-term dot product in any order."""
    return n * u / (1 - n * u)


def _short_rl(steps: int = 2, **kw) -> RLConfig:
    base = dict(task="counting", algorithm="dapo", steps=steps, prompts_per_step=4, group_size=4, lr=1e-3,
                probe=ProbeConfig(steps=(0, steps), n_eval_prompts=4, theory_checks=False))
    return RLConfig(**{**base, **kw})


def _structured(m: int, n: int, s: np.ndarray, seed: int) -> np.ndarray:
    """Q1 diag(s) Q2^T with Haar-ish orthonormal factors: a matrix with known singular values ``s``."""
    r = np.random.default_rng(seed)
    Q1, _ = np.linalg.qr(r.standard_normal((m, len(s))))
    Q2, _ = np.linalg.qr(r.standard_normal((n, len(s))))
    return (Q1 * s) @ Q2.T


# ----------------------------------------------------------------------------------------------------------------
# Masks


def test_structural_masks_are_the_metric_masks_and_their_combinations(fast_base_model):
    masks = structural_masks(fast_base_model, k=4, alpha=0.5, seed=3)
    name = "blocks.0.attn.q.weight"
    W = dict(fast_base_model.named_parameters())[name].detach()
    princ = torch.from_numpy(principal_mask(W, 4, 0.5))
    low = torch.from_numpy(low_magnitude_mask(W, 0.5))
    assert torch.equal(masks["princ"][name], princ)
    assert torch.equal(masks["princ_c"][name], ~princ)
    assert torch.equal(masks["low"][name], low)
    assert torch.equal(masks["safe"][name], ~princ | low)
    assert bool(masks["dense"][name].all())
    for n, safe in masks["safe"].items():
        # the random mask is matched in count to the safe mask, matrix by matrix
        assert int(masks["random"][n].sum()) == int(safe.sum())
        assert int(masks["princ"][n].sum()) == selection_count(0.5, safe.numel())
    assert set(masks["dense"]) == {n for n in dict(fast_base_model.named_parameters()) if ".weight" in n
                                   and (".attn." in n or ".mlp." in n)}
    # safe = princ^c | low contains princ^c: at least 1 - alpha of the entries
    assert mask_density(masks["safe"]) >= 0.5
    # a different seed gives a different random mask but the same structural ones
    other = structural_masks(fast_base_model, k=4, alpha=0.5, seed=4, names=("safe", "random"))
    assert torch.equal(other["safe"][name], masks["safe"][name])
    assert not torch.equal(other["random"][name], masks["random"][name])


def test_structural_masks_reject_unknown_names(fast_base_model):
    with pytest.raises(InputError, match="unknown mask names"):
        structural_masks(fast_base_model, k=4, alpha=0.5, seed=0, names=("princ", "nope"))


# ----------------------------------------------------------------------------------------------------------------
# Masked training


@pytest.fixture(scope="module")
def masked_run(fast_base_model):
    model = copy.deepcopy(fast_base_model)
    with torch.no_grad():  # start on the bf16 grid, as a bf16 checkpoint would
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    masks = structural_masks(model, k=4, alpha=0.5, seed=0, names=("random",))["random"]
    res = train_rlvr_masked(model, _short_rl(), masks, run_name="masked")
    return res, masks


def test_masked_rl_never_moves_a_stored_bf16_value_outside_the_mask(masked_run):
    res, masks = masked_run
    start, end = res.snapshots[0], res.snapshots[max(res.snapshots)]
    for n, keep in masks.items():
        a, b = start[n].view(torch.int16), end[n].view(torch.int16)
        assert torch.equal(a[~keep], b[~keep]), n  # bit-identical outside the mask
    # parameters with no mask (embeddings, norms, lm_head) are frozen entirely
    for n in start:
        if n not in masks:
            assert torch.equal(start[n].view(torch.int16), end[n].view(torch.int16)), n
    # and the run did train: some stored values inside the mask changed
    changed = sum(int((start[n].view(torch.int16) != end[n].view(torch.int16))[keep].sum()) for n, keep in masks.items())
    assert changed > 0


def test_masked_rl_rejects_weight_decay(fast_base_model):
    masks = structural_masks(fast_base_model, k=4, alpha=0.5, seed=0, names=("dense",))["dense"]
    with pytest.raises(InputError, match="weight_decay"):
        train_rlvr_masked(copy.deepcopy(fast_base_model), _short_rl(weight_decay=0.1), masks)


def test_masked_training_hooks_zero_the_gradient_outside_the_mask_and_are_removed():
    lin = torch.nn.Linear(3, 2, bias=False)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    with masked_training(lin, {"weight": keep}):
        lin(x).sum().backward()
    g = lin.weight.grad.clone()
    assert torch.equal(g[~keep], torch.zeros(int((~keep).sum())))
    lin.weight.grad = None
    lin(x).sum().backward()  # hooks gone: the full gradient
    assert torch.equal(lin.weight.grad[keep], g[keep]) and bool((lin.weight.grad[~keep] != 0).all())


def test_masked_training_names_bad_masks():
    lin = torch.nn.Linear(3, 2, bias=False)
    with pytest.raises(ShapeMismatchError, match="shape"):
        with masked_training(lin, {"weight": torch.ones(3, 2, dtype=torch.bool)}):
            pass
    with pytest.raises(ShapeMismatchError, match="lacks"):
        with masked_training(lin, {"bias": torch.ones(2, dtype=torch.bool)}):
            pass
    with pytest.raises(InputError, match="bool"):
        with masked_training(lin, {"weight": torch.ones(2, 3)}):
            pass


def test_frozen_check_compares_bits_not_values():
    a = {"w": torch.tensor([0.0, 1.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([-0.0, 1.0], dtype=torch.bfloat16)}  # equal values, different stored bits
    assert check_frozen_outside_mask(a, b, {"w": torch.tensor([False, False])}) == {"w": 1}
    assert check_frozen_outside_mask(a, b, {"w": torch.tensor([True, False])}) == {"w": 0}
    assert check_frozen_outside_mask(a, b, {}) == {"w": 1}  # no mask: fully frozen


# ----------------------------------------------------------------------------------------------------------------
# LoRA / PiSSA


@given(st.integers(1, 6), st.sampled_from([0.5, 1.0, 2.0, 16.0]), st.integers(0, 2**16))
@example(1, 1.0, 0)
@example(6, 16.0, 1)
def test_pissa_factors_are_the_principal_part_of_a_known_spectrum(rank, scale, seed):
    """Structured oracle: W = Q1 diag(s) Q2^T with distinct known s. Then s B A = Q1_r diag(s_r) Q2_r^T, W_res has
    singular values s_{r+1..}, and W_res + s B A = W, all to float64 resolution."""
    s = np.array([9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25])
    W = _structured(12, 10, s, seed)
    A, B, res = (t.numpy() for t in pissa_factors(torch.from_numpy(W), rank, scale))
    tol = 64 * EPS64 * s[0]
    r = np.random.default_rng(seed)
    Q1, _ = np.linalg.qr(r.standard_normal((12, 10)))
    Q2, _ = np.linalg.qr(r.standard_normal((10, 10)))
    principal = (Q1[:, :rank] * s[:rank]) @ Q2[:, :rank].T
    assert np.abs(scale * B @ A - principal).max() <= tol
    assert np.abs(res + scale * B @ A - W).max() <= tol
    sv = np.linalg.svd(res, compute_uv=False)
    assert np.abs(sv[: 10 - rank] - s[rank:]).max() <= tol and np.abs(sv[10 - rank:]).max() <= tol
    # A's rows are orthogonal with squared norms s_i / scale (B's columns likewise): the PiSSA factorisation
    assert np.abs(A @ A.T - np.diag(s[:rank] / scale)).max() <= tol / scale
    assert np.abs(B.T @ B - np.diag(s[:rank] / scale)).max() <= tol / scale


def _weight(seed: int = 0, shape=(24, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_lora_init_is_exactly_the_base():
    W = _weight()
    lin = AdaptedLinear.lora(W, 4, alpha=8.0, generator=torch.Generator().manual_seed(1))
    assert lin.scale == 2.0 and torch.equal(lin.lora_B, torch.zeros(24, 4)) and bool((lin.lora_A != 0).all())
    assert bool((lin.lora_A.abs() <= 1 / 4).all())  # U(-1/sqrt(in), 1/sqrt(in)), in = 16
    assert torch.equal(lin.merged_weight(), W)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(lin(x), F.linear(x, W))  # adding s (x A^T) 0^T = 0 changes nothing


def _pissa_weight_bound(W, lin, u):
    """Entrywise |W_res' + s B' A' - W| bound when W_res, A, B (exact in float64) are each rounded once with unit
    roundoff u: u |W_res| + s (2u + u^2) |B| |A| (+ the float64 residual of the SVD)."""
    Wd, R = W.double(), lin.weight.double()
    BA = lin.scale * lin.lora_B.double().abs() @ lin.lora_A.double().abs()
    return u * (R.abs() + u * R.abs()) + (2 * u + u * u) * (1 + 2 * u) * BA + 64 * EPS64 * Wd.abs().max()


@pytest.mark.parametrize("rank, alpha", [(1, None), (4, 8.0), (16, 2.0)])
def test_pissa_init_reconstructs_w_within_the_float32_storage_bound(rank, alpha):
    W = _weight(rank)
    lin = AdaptedLinear.pissa(W, rank, alpha=alpha)
    recon = lin.weight.double() + lin.delta()
    err = (recon - W.double()).abs()
    assert bool((err <= _pissa_weight_bound(W, lin, U32)).all())
    assert float(err.max()) > 0 or rank == 16  # the bound is not vacuous: storage does round
    # the merged weight is that reconstruction rounded once more to float32
    assert bool(((lin.merged_weight().double() - W.double()).abs()
                 <= _pissa_weight_bound(W, lin, U32) + U32 * W.double().abs() * (1 + U32)).all())


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_pissa_layer_computes_the_base_function_up_to_float32_rounding(rank):
    """|lin(x) - x W^T| <= storage error |x| E^T + computation error gamma_{in+r+3} |x| (|W_res| + s|B||A| + |W|)^T,
    every term derived from float32's unit roundoff (Higham's dot-product bound; any summation order)."""
    W = _weight(10 + rank)
    lin = AdaptedLinear.pissa(W, rank)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        diff = (lin(x).double() - F.linear(x, W).double()).abs()
    xa = x.double().abs()
    stored = _pissa_weight_bound(W, lin, U32)
    mags = lin.weight.double().abs() + lin.scale * lin.lora_B.double().abs() @ lin.lora_A.double().abs() \
        + W.double().abs()
    bound = xa @ stored.T + gamma(16 + rank + 3) * (xa @ mags.T)
    assert bool((diff <= bound).all())


def test_pissa_layer_stored_in_bf16_is_the_base_up_to_bf16_rounding():
    """The bf16 run computes with bf16(W_res), bf16(A), bf16(B); evaluated exactly (float64) that weight is within
    the bf16 storage bound of W."""
    W = _weight(3).to(torch.bfloat16).float()
    lin = AdaptedLinear.pissa(W, 4)
    R, A, B = (t.detach().to(torch.bfloat16).double() for t in (lin.weight, lin.lora_A, lin.lora_B))
    err = (R + lin.scale * B @ A - W.double()).abs()
    # float32 storage first, then bf16: u_total = U_BF16 + U32 + U_BF16 U32 per rounding
    u = U_BF16 + U32 + U_BF16 * U32
    assert bool((err <= _pissa_weight_bound(W, lin, u)).all())
    assert float(err.max()) > 100 * U32 * float(W.abs().max())  # bf16 rounding is visible, not float32's


def test_pissa_model_is_the_base_function_in_float64(fast_base_model):
    """A float64 model wrapped by PiSSA computes the base logits to float64 resolution (a missing scale or a wrong
    residual would be off by O(1)); 1e4 eps64 |logits| is a loose multiple, not a derived bound."""
    base = copy.deepcopy(fast_base_model).double()
    wrapped = add_adapters(copy.deepcopy(base), "PiSSA", 4)
    ids = torch.randint(3, 20, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = base(ids), wrapped(ids)
    assert float((a - b).abs().max()) <= 1e4 * EPS64 * float(a.abs().max())


def test_add_adapters_trains_only_the_adapters(fast_base_model):
    model = add_adapters(copy.deepcopy(fast_base_model), "LoRA", 2, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    cfg = fast_base_model.cfg
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    # rank r adds r (in + out) per matrix: q, o (d <-> H D), k, v (d -> Hkv D), up, gate, down (d <-> d_ff)
    per_layer = 2 * (2 * (cfg.d_model + cfg.n_head * cfg.head_dim) + 2 * (cfg.d_model + cfg.n_kv_head * cfg.head_dim)
                     + 3 * (cfg.d_model + cfg.d_ff))
    assert adapter_parameter_count(model) == cfg.n_layer * per_layer
    with pytest.raises(InputError, match="already has adapters"):
        add_adapters(model, "PiSSA", 2)
    with pytest.raises(InputError, match="rank"):
        add_adapters(copy.deepcopy(fast_base_model), "PiSSA", 10_000)
    with pytest.raises(InputError, match="method"):
        add_adapters(copy.deepcopy(fast_base_model), "DoRA", 2)


@pytest.mark.parametrize("method", ["LoRA", "PiSSA"])
def test_rl_on_an_adapted_model_moves_only_the_adapters_and_merges_back(fast_base_model, method):
    model = add_adapters(copy.deepcopy(fast_base_model), method, 2, alpha=4.0, seed=0)
    res = train_rlvr(model, _short_rl(precision="fp32"), run_name=method)
    start, end = res.snapshots[0], res.snapshots[max(res.snapshots)]
    moved = {n for n in start if not torch.equal(start[n], end[n])}
    assert moved and all(n.endswith((".lora_A", ".lora_B")) for n in moved)
    # the merged state dict is a plain TinyGPT that computes what the wrapped model computes
    merged = merge_adapters(model)
    assert set(merged) == set(fast_base_model.state_dict())
    plain = copy.deepcopy(fast_base_model)
    plain.load_state_dict(merged)
    ids = torch.randint(3, 20, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain.double()(ids), copy.deepcopy(model).double()(ids)
    assert float((a - b).abs().max()) <= 1e3 * U32 * float(a.abs().max())  # merged weights rounded to float32 once
    # merging a snapshot (a state dict) with the known scale gives the same tensors
    from_state = merge_adapters(end, scale=2.0)
    assert all(torch.equal(from_state[n], merged[n]) for n in merged)
    with pytest.raises(InputError, match="scale"):
        merge_adapters(end)
