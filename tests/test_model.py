"""Tests for sims.tinygpt.model: shapes, causality, GQA = MHA with repeated kv, App. D interventions, seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.naming import MATRIX_TYPES, layer_index, matrix_type
from sims.tinygpt.model import (
    GPTConfig,
    TinyGPT,
    generate,
    left_pad,
    matrix_params,
    permute_kv_heads,
    random_orthogonal,
    rotate_vo,
    sequence_logprobs,
)
from theory.errors import InputError, NonFiniteError, ShapeMismatchError

V = 23


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matrices: one intra-op thread (two threads on a busy 2-core box were ~30x slower per step, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=24, seed=3)
    base.update(kw)
    return GPTConfig(**base)


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


# ---------------------------------------------------------------------------------------------------------------
# shapes, naming


def test_forward_shape_and_dtype():
    for dtype in (torch.float32, torch.float64):
        m = TinyGPT(small_cfg(), dtype=dtype)
        out = m(ids(3, 7))
        assert out.shape == (3, 7, V) and out.dtype == dtype


def test_matrix_params_names_shapes_and_helpers():
    cfg = small_cfg(n_layer=3)
    mp = matrix_params(TinyGPT(cfg))
    D = cfg.head_dim
    assert len(mp) == 7 * cfg.n_layer
    expected_shapes = {
        "q": (cfg.n_head * D, cfg.d_model), "k": (cfg.n_kv_head * D, cfg.d_model),
        "v": (cfg.n_kv_head * D, cfg.d_model), "o": (cfg.d_model, cfg.n_head * D),
        "up": (cfg.d_ff, cfg.d_model), "gate": (cfg.d_ff, cfg.d_model), "down": (cfg.d_model, cfg.d_ff),
    }
    for name, p in mp.items():
        assert p.ndim == 2
        assert tuple(p.shape) == expected_shapes[matrix_type(name)]
    assert [matrix_type(n) for n in mp][:7] == list(MATRIX_TYPES)
    assert [layer_index(n) for n in mp] == [i for i in range(3) for _ in range(7)]
    assert "blocks.2.mlp.down.weight" in mp and "tok_emb.weight" not in mp and "lm_head.weight" not in mp


@pytest.mark.parametrize("name", ["tok_emb.weight", "lm_head.weight", "blocks.0.ln1.weight", "blocks.0.mlp.qq.weight"])
def test_non_block_matrix_names_are_other(name):
    """The one naming vocabulary (theory.naming) calls every non-block-matrix name 'other'."""
    assert matrix_type(name) == "other"
    assert name not in matrix_params(TinyGPT(GPTConfig(vocab_size=11, n_layer=1)))


@pytest.mark.parametrize("kw, msg", [
    (dict(n_head=4, n_kv_head=3), "does not divide"),
    (dict(d_model=30, n_head=4), "not divisible"),
    (dict(d_model=12, n_head=4, n_kv_head=2), "even for RoPE"),
    (dict(n_layer=0), "positive"),
])
def test_config_rejects_inconsistent_shapes(kw, msg):
    with pytest.raises(InputError, match=msg):
        small_cfg(**kw)


def test_forward_rejects_too_long_and_bad_mask():
    m = TinyGPT(small_cfg())
    with pytest.raises(InputError, match="max_seq_len"):
        m(ids(1, 25))
    with pytest.raises(ShapeMismatchError):
        m(ids(2, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InputError, match=r"\(B, T\)"):
        m(torch.zeros(5, dtype=torch.long))


def test_init_is_seeded_and_seed_sensitive():
    a, b, c = TinyGPT(small_cfg()), TinyGPT(small_cfg()), TinyGPT(small_cfg(seed=4))
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
        if p.ndim == 2:
            assert not torch.equal(p, r), n


def test_init_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    TinyGPT(small_cfg())
    assert torch.equal(torch.rand(3), expected)


def test_tied_embeddings_share_storage():
    m = TinyGPT(small_cfg(tie_embeddings=True))
    assert m.lm_head.weight is m.tok_emb.weight


# ---------------------------------------------------------------------------------------------------------------
# causality and padding


def test_causal_mask_future_tokens_do_not_change_past_logits():
    m = TinyGPT(small_cfg(), dtype=torch.float64)
    x = ids(2, 12)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 5) % V  # change every token from position 7 on
    a, b = m(x), m(y)
    assert torch.equal(a[:, :7], b[:, :7])  # bit-identical: rows 0..6 never read positions >= 7
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_left_padding_with_mask_equals_unpadded_logits():
    """RoPE makes scores depend on relative position only, so left pads hidden by the mask change nothing."""
    m = TinyGPT(small_cfg(), dtype=torch.float64)
    seq = ids(1, 6)[0].tolist()
    padded, mask = left_pad([seq, seq + [1, 2, 3]], pad_id=0)
    out = m(padded, mask)
    ref = m(torch.tensor([seq]))
    assert rel_err(out[0, 3:], ref[0]) < 1e3 * torch.finfo(torch.float64).eps
    assert torch.isfinite(out).all()  # fully masked pad queries give finite (uniform) rows, not NaN


# ---------------------------------------------------------------------------------------------------------------
# grouped-query attention


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa_cfg = small_cfg(n_head=4, n_kv_head=2)
    mha_cfg = small_cfg(n_head=4, n_kv_head=4)
    gqa, mha = TinyGPT(gqa_cfg, dtype=torch.float64), TinyGPT(mha_cfg, dtype=torch.float64)
    D, r = gqa_cfg.head_dim, gqa_cfg.n_rep
    state = gqa.state_dict()
    with torch.no_grad():
        for name, p in mha.named_parameters():
            src = state[name]
            if name.endswith(("attn.k.weight", "attn.v.weight")):  # kv head h//r serves query head h
                src = src.view(gqa_cfg.n_kv_head, D, -1).repeat_interleave(r, dim=0).reshape(p.shape)
            p.copy_(src)
    x = ids(3, 10)
    assert rel_err(mha(x), gqa(x)) < 1e2 * torch.finfo(torch.float64).eps


# ---------------------------------------------------------------------------------------------------------------
# App. D: rotate and permute preserve the function


def logits_scale_tol(dtype: torch.dtype, m: TinyGPT) -> float:
    """Relative tolerance for a function-preserving edit: eps(dtype) times a modest factor for the depth and
    width of the accumulations (each matmul sums at most max(d_ff, d_model) terms)."""
    cfg = m.cfg
    return torch.finfo(dtype).eps * 16 * math.sqrt(max(cfg.d_ff, cfg.d_model)) * cfg.n_layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_rotate_vo_preserves_logits(dtype, n_kv_head):
    m = TinyGPT(small_cfg(n_kv_head=n_kv_head), dtype=dtype)
    x = ids(2, 9)
    before = m(x).detach()
    v0, o0 = m.blocks[1].attn.v.weight.detach().clone(), m.blocks[1].attn.o.weight.detach().clone()
    R = random_orthogonal(m.cfg.head_dim, torch.Generator().manual_seed(1))
    rotate_vo(m, 1, R)
    after = m(x).detach()
    assert rel_err(after, before) < logits_scale_tol(dtype, m)
    # the weights did change (coordinate-wise) while their spectra did not
    assert (m.blocks[1].attn.v.weight - v0).abs().max() > 1e-3 * v0.abs().max()
    sv = lambda W: torch.linalg.svdvals(W.double())  # noqa: E731
    for W, W0 in ((m.blocks[1].attn.v.weight, v0), (m.blocks[1].attn.o.weight, o0)):
        assert rel_err(sv(W.detach()), sv(W0)) < 64 * torch.finfo(dtype).eps


def test_rotate_vo_float64_within_1e_12():
    m = TinyGPT(small_cfg(), dtype=torch.float64)
    x = ids(2, 9)
    before = m(x).detach()
    rotate_vo(m, 0, random_orthogonal(m.cfg.head_dim, torch.Generator().manual_seed(5)))
    assert rel_err(m(x).detach(), before) < 1e-12


def test_rotating_qk_would_change_the_function():
    """Why only v/o: the analogous rotation of q and k does not commute with RoPE (a control for the tests above)."""
    m = TinyGPT(small_cfg(), dtype=torch.float64)
    x = ids(2, 9)
    before = m(x).detach()
    R = random_orthogonal(m.cfg.head_dim, torch.Generator().manual_seed(2))
    attn = m.blocks[0].attn
    with torch.no_grad():
        attn.q.weight.copy_(torch.block_diag(*[R] * m.cfg.n_head).T @ attn.q.weight)
        attn.k.weight.copy_(torch.block_diag(*[R] * m.cfg.n_kv_head).T @ attn.k.weight)
    assert rel_err(m(x).detach(), before) > 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_kv_head, perm", [(2, [1, 0]), (4, [2, 0, 3, 1]), (1, [0])])
def test_permute_kv_heads_preserves_logits(dtype, n_kv_head, perm):
    m = TinyGPT(small_cfg(n_kv_head=n_kv_head), dtype=dtype)
    x = ids(2, 9)
    before = m(x).detach()
    q0 = m.blocks[0].attn.q.weight.detach().clone()
    permute_kv_heads(m, 0, perm)
    assert rel_err(m(x).detach(), before) < logits_scale_tol(dtype, m)
    if perm != sorted(perm):
        assert not torch.equal(m.blocks[0].attn.q.weight, q0)


def test_permute_then_rotate_preserves_logits_float64():
    m = TinyGPT(small_cfg(n_kv_head=2), dtype=torch.float64)
    x = ids(2, 9)
    before = m(x).detach()
    permute_kv_heads(m, 1, [1, 0])
    rotate_vo(m, 1, random_orthogonal(m.cfg.head_dim, torch.Generator().manual_seed(7)))
    assert rel_err(m(x).detach(), before) < 1e-12


def test_wrong_permutation_breaks_the_function():
    """Control: permuting only k (not q) changes the output, so the preservation tests can fail."""
    m = TinyGPT(small_cfg(n_kv_head=2), dtype=torch.float64)
    x = ids(2, 9)
    before = m(x).detach()
    D = m.cfg.head_dim
    with torch.no_grad():
        k = m.blocks[0].attn.k.weight
        k.copy_(torch.cat([k[D:], k[:D]]))
    assert rel_err(m(x).detach(), before) > 1e-6


def test_interventions_reject_bad_input():
    m = TinyGPT(small_cfg())
    D = m.cfg.head_dim
    with pytest.raises(InputError, match="not orthogonal"):
        rotate_vo(m, 0, 2 * torch.eye(D))
    with pytest.raises(ShapeMismatchError):
        rotate_vo(m, 0, torch.eye(D + 2))
    with pytest.raises(NonFiniteError):
        rotate_vo(m, 0, torch.full((D, D), float("nan")))
    with pytest.raises(InputError, match="out of range"):
        rotate_vo(m, 5, torch.eye(D))
    with pytest.raises(InputError, match="not a permutation"):
        permute_kv_heads(m, 0, [0, 0])


# ---------------------------------------------------------------------------------------------------------------
# sampling and log-probs


def test_generate_is_seeded_and_reproducible():
    m = TinyGPT(small_cfg())
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]

    def run(seed):
        return generate(m, prompts, 6, 1.0, torch.Generator().manual_seed(seed), eos_id=2, pad_id=0)

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completions, c.completions)


def test_generate_output_layout_and_logprobs_match_sequence_logprobs():
    m = TinyGPT(small_cfg(), dtype=torch.float64)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    g = generate(m, prompts, 5, 1.0, torch.Generator().manual_seed(0), eos_id=2, pad_id=0)
    B, P = 3, 4
    assert g.prompt_len == P and g.sequences.shape == (B, P + 5) and g.completions.shape == (B, 5)
    assert torch.equal(g.sequences[:, P:], g.completions)
    assert torch.equal(g.sequences[1, :2], torch.tensor([0, 0])) and not g.attention_mask[1, :2].any()
    assert not g.completion_mask[:, :P].any()
    lp = sequence_logprobs(m, g.sequences, g.completion_mask, g.attention_mask)
    assert rel_err(lp[:, P:], g.logprobs) < 1e3 * torch.finfo(torch.float64).eps
    assert (g.logprobs <= 0).all()


def test_generate_eos_handling_with_planted_eos_logit():
    """Deterministic check of the stopping rule: a zero lm_head makes the greedy token id 0, declared as EOS."""
    m = TinyGPT(small_cfg(), dtype=torch.float64)
    with torch.no_grad():
        m.lm_head.weight.zero_()
    # all logits are zero => greedy argmax picks id 0; declaring eos_id=0 makes that first token an EOS
    g = generate(m, [[1, 3], [1]], 4, 0.0, None, eos_id=0, pad_id=5)
    assert g.completions.tolist() == [[0, 5, 5, 5], [0, 5, 5, 5]]
    assert g.completion_mask[:, 2:].tolist() == [[True, False, False, False]] * 2
    assert torch.allclose(g.logprobs[:, 0], torch.full((2,), -math.log(V), dtype=torch.float64))
    assert g.logprobs[:, 1:].abs().sum() == 0


def test_greedy_generation_ignores_the_generator():
    m = TinyGPT(small_cfg())
    a = generate(m, [[1, 4]], 5, 0.0, torch.Generator().manual_seed(0), eos_id=2, pad_id=0)
    b = generate(m, [[1, 4]], 5, 0.0, torch.Generator().manual_seed(99), eos_id=2, pad_id=0)
    assert torch.equal(a.sequences, b.sequences)


def test_generate_rejects_bad_arguments():
    m = TinyGPT(small_cfg())
    with pytest.raises(InputError, match="max_seq_len"):
        generate(m, [[1] * 20], 10, 1.0, None, eos_id=2, pad_id=0)
    with pytest.raises(InputError, match="temperature"):
        generate(m, [[1]], 2, -1.0, None, eos_id=2, pad_id=0)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(m, [[1]], 0, 1.0, None, eos_id=2, pad_id=0)


@settings(max_examples=20)
@given(T=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_sequence_logprobs_is_the_log_softmax_of_the_next_token(T, seed):
    m = TinyGPT(small_cfg(), dtype=torch.float64)
    x = ids(2, T, seed)
    lp = sequence_logprobs(m, x)
    ref = torch.log_softmax(m(x), -1)
    assert lp.shape == (2, T) and torch.equal(lp[:, 0], torch.zeros(2, dtype=torch.float64))
    for t in range(1, T):
        for b in range(2):
            assert lp[b, t] == ref[b, t - 1, x[b, t]]


def test_sequence_logprobs_masks_and_is_differentiable():
    m = TinyGPT(small_cfg())
    x = ids(2, 6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 4:] = True
    lp = sequence_logprobs(m, x, mask)
    assert (lp[:, :4] == 0).all() and (lp[:, 4:] < 0).all()
    (-lp.sum()).backward()
    assert m.blocks[0].attn.q.weight.grad is not None and m.blocks[0].attn.q.weight.grad.abs().sum() > 0
    with pytest.raises(ShapeMismatchError):
        sequence_logprobs(m, x, mask[:, :5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_and_matches_cpu():
    cfg = small_cfg()
    cpu, gpu = TinyGPT(cfg, dtype=torch.float64), TinyGPT(cfg, dtype=torch.float64, device="cuda")
    x = ids(2, 8)
    assert rel_err(gpu(x.cuda()).cpu(), cpu(x)) < 1e-10
    g = generate(gpu, [[1, 2, 3]], 4, 1.0, torch.Generator(device="cuda").manual_seed(0), eos_id=2, pad_id=0)
    assert g.sequences.device.type == "cuda"


def test_generate_accepts_a_padded_tensor_with_mask():
    m = TinyGPT(small_cfg(), dtype=torch.float64)
    prompts = [[1, 5, 6], [1, 7]]
    padded, mask = left_pad(prompts, pad_id=0)
    a = generate(m, prompts, 4, 1.0, torch.Generator().manual_seed(3), eos_id=2, pad_id=0)
    b = generate(m, padded, 4, 1.0, torch.Generator().manual_seed(3), eos_id=2, pad_id=0, prompt_mask=mask)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    with pytest.raises(ShapeMismatchError):
        generate(m, padded, 4, 1.0, None, eos_id=2, pad_id=0, prompt_mask=mask[:, :2])
