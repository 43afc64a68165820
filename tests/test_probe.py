"""Tests for sims.tinygpt.probe: exact token KL, update-history bases, the restricted Fisher against a brute-force Jacobian,
the second-order link K ~ 1/2 d^T F d, and the RunResult files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import functional_call

from sims.tinygpt.determinism import deterministic
from sims.tinygpt.model import GPTConfig, TinyGPT
from sims.tinygpt.probe import (
    CHECK_COLUMNS,
    ProbeConfig,
    RunResult,
    _action_positions,
    history_basis,
    restricted_fisher,
    token_kl,
)
from sims.tinygpt.storage import load_snapshot
from sims.tinygpt.tasks import Tokenizer
from theory.errors import InputError

EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True)
def _one_thread():
    with deterministic():
        yield


def _tiny_model() -> TinyGPT:
    cfg = GPTConfig(vocab_size=Tokenizer().vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=8, max_seq_len=16,
                    seed=3)
    return TinyGPT(cfg, dtype=torch.float64)


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 6), generator=g)
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[0, :2] = False  # a left-padded row
    cmask = torch.zeros_like(attn)
    cmask[:, 3:] = True
    return ids, attn, _action_positions(cmask)


def test_action_positions_shift_the_completion_mask_left():
    cm = torch.tensor([[False, False, True, True, False]])
    assert _action_positions(cm).tolist() == [[False, True, True, False, False]]


def test_token_kl_matches_definition_and_is_zero_on_equal_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    p, q = a.softmax(-1), b.softmax(-1)
    expected = (p * (p / q).log()).sum(-1)
    torch.testing.assert_close(token_kl(a, b), expected, rtol=0, atol=50 * EPS64)
    assert torch.all(token_kl(a, a) == 0)
    assert torch.all(token_kl(a, b) > 0)
    # shift invariance of logits: adding a constant per row changes nothing
    torch.testing.assert_close(token_kl(a + 3.0, b - 1.0), expected, rtol=0, atol=50 * EPS64)


def test_history_basis_is_orthonormal_and_spans_the_deltas():
    g = torch.Generator().manual_seed(2)
    d1 = {"a": torch.randn(3, 2, generator=g), "b": torch.zeros(4)}
    d2 = {"a": 2 * d1["a"], "b": torch.zeros(4)}  # repeats d1's direction in block a
    d3 = {"a": torch.randn(3, 2, generator=g), "b": torch.zeros(4)}
    basis = history_basis([d1, d2, d3], {"A": ["a"], "B": ["b"]})
    assert basis["B"].shape == (4, 0)  # a block that never moved contributes no direction
    Q = basis["A"]
    assert Q.shape == (6, 2)  # rank 2, not 3: the repeated direction is dropped
    torch.testing.assert_close(Q.T @ Q, torch.eye(2, dtype=torch.float64), rtol=0, atol=20 * EPS64)
    for d in (d1, d2, d3):
        v = d["a"].reshape(-1).double()
        torch.testing.assert_close(Q @ (Q.T @ v), v, rtol=0, atol=100 * EPS64 * float(v.norm()))


def _flat_fisher_bruteforce(model, params, ids, attn, pos) -> torch.Tensor:
    """Full P x P next-token Fisher from the full Jacobian of the logits (reverse mode, one row per output)."""
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def logits_flat(flat):
        p, i = {}, 0
        for n, s, k in zip(names, shapes, sizes):
            p[n] = flat[i:i + k].reshape(s)
            i += k
        return functional_call(model, p, (ids, attn))[pos]  # (n_pos, V)

    J = torch.autograd.functional.jacobian(logits_flat, flat0, vectorize=True)  # (n_pos, V, P)
    probs = logits_flat(flat0).softmax(-1)
    C = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (n_pos, V, V)
    return torch.einsum("pvi,pvw,pwj->ij", J, C, J) / ids.shape[0], names, sizes


def test_restricted_fisher_equals_projected_bruteforce_fisher():
    model = _tiny_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, attn, pos = _batch(model.cfg.vocab_size)
    F_full, names, sizes = _flat_fisher_bruteforce(model, params, ids, attn, pos)
    g = torch.Generator().manual_seed(5)
    P = F_full.shape[0]
    B, _ = torch.linalg.qr(torch.randn(P, 5, generator=g, dtype=torch.float64))
    tangents = []
    for j in range(B.shape[1]):
        t, i = {}, 0
        for n, k in zip(names, sizes):
            t[n] = B[i:i + k, j].reshape(params[n].shape)
            i += k
        tangents.append(t)
    FB = restricted_fisher(model, params, ids, attn, pos, tangents)
    expected = B.T @ F_full @ B
    scale = float(torch.linalg.matrix_norm(expected, 2))
    assert scale > 0
    torch.testing.assert_close(FB, expected, rtol=0, atol=1e3 * EPS64 * scale)
    assert torch.allclose(FB, FB.T, rtol=0, atol=10 * EPS64 * scale)
    assert float(torch.linalg.eigvalsh(FB).min()) > -1e3 * EPS64 * scale  # PSD up to rounding


def test_half_quadratic_form_is_the_second_order_term_of_the_exact_kl():
    """K(s d) = 1/2 s^2 d^T F d + O(s^3): the relative error of the quadratic model shrinks linearly in s."""
    model = _tiny_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, attn, pos = _batch(model.cfg.vocab_size)
    g = torch.Generator().manual_seed(7)
    direction = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    norm = math.sqrt(sum(float((d**2).sum()) for d in direction.values()))
    direction = {n: d / norm for n, d in direction.items()}
    quad = float(restricted_fisher(model, params, ids, attn, pos, [direction])[0, 0])
    logits0 = functional_call(model, params, (ids, attn))
    rel = []
    for s in (1e-2, 1e-3):
        moved = {n: params[n] + s * direction[n] for n in params}
        K = float(token_kl(functional_call(model, moved, (ids, attn)), logits0)[pos].sum() / ids.shape[0])
        rel.append(abs(K - 0.5 * s * s * quad) / K)
    assert rel[1] < 0.2 * rel[0]  # ~10x smaller for a 10x smaller step (third-order remainder)
    assert rel[1] < 1e-2


def test_probe_config_validation():
    assert ProbeConfig(steps=(3, 0, 3)).steps == (0, 3)
    with pytest.raises(InputError, match="steps"):
        ProbeConfig(steps=(-1,))
    with pytest.raises(InputError, match="history"):
        ProbeConfig(history=0)


def test_run_result_save_writes_tables_config_and_safe_snapshots(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)}
    checks = pd.DataFrame([{c: None for c in CHECK_COLUMNS}])
    res = RunResult(kind="rlvr", name="r", config={"seed": 3}, history=pd.DataFrame({"step": [1], "x": [0.5]}),
                    metrics=pd.DataFrame({"step": [0], "metric": ["m"], "value": [1.0]}), checks=checks,
                    snapshots={0: sd}, master={}, wall_seconds=0.0)
    out = res.save(tmp_path / "o")
    for name in ("history", "metrics", "checks"):
        assert (out / f"r_{name}.csv").is_file()
        assert pd.read_parquet(out / f"r_{name}.parquet").shape[0] == 1
    assert '"seed": 3' in (out / "r_config.json").read_text()
    back = load_snapshot(out / "snapshots" / "r_step00000.safetensors")
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], sd["w"])
