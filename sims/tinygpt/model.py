"""TinyGPT: a small decoder-only transformer in one readable file (nanoGPT style), for the simulations.

Architecture (Llama-like, so the paper's per-matrix-type statistics q, k, v, o, up, gate, down all exist):

    x = tok_emb[idx]                                   (B, T, d_model)
    for each block:   x = x + Attn(RMSNorm(x))          separate bias-free q, k, v, o projections, RoPE, causal
                      x = x + SwiGLU(RMSNorm(x))        down( silu(gate(x)) * up(x) )
    logits = lm_head(RMSNorm(x))                        (B, T, vocab)

Grouped-query attention: ``n_head`` query heads share ``n_kv_head`` key/value heads; query head ``h`` reads kv head
``h // n_rep`` with ``n_rep = n_head // n_kv_head`` (the convention of Llama / Qwen, ``repeat_interleave``).

Weights follow ``nn.Linear``: ``weight`` has shape ``(out_features, in_features)`` and ``y = x @ weight.T``.
Head ``h`` of q owns rows ``h*D:(h+1)*D`` of ``q.weight``; head ``h`` of o owns columns ``h*D:(h+1)*D`` of ``o.weight``.

Also here: a batched seeded sampler (``generate``), per-token log-probabilities for training losses
(``sequence_logprobs``), and the function-preserving interventions of the paper's App. D (``rotate_vo``,
``permute_kv_heads``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from theory.errors import InputError, NonFiniteError, ShapeMismatchError

__all__ = [
    "GPTConfig",
    "TinyGPT",
    "matrix_params",
    "Generation",
    "generate",
    "sequence_logprobs",
    "rotate_vo",
    "permute_kv_heads",
    "random_orthogonal",
]

_MATRIX_NAME = re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.(q|k|v|o|up|gate|down)\.weight$")


@dataclass(frozen=True)
class GPTConfig:
    """Model shape. ``d_ff=None`` means the SwiGLU default ``round(8/3 * d_model)`` rounded up to a multiple of 8."""

    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    d_model: int = 64
    d_ff: int | None = None
    max_seq_len: int = 64
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for field_ in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "max_seq_len"):
            if int(getattr(self, field_)) <= 0:
                raise InputError(f"GPTConfig.{field_} must be a positive integer, got {getattr(self, field_)!r}")
        if self.d_model % self.n_head:
            raise InputError(f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise InputError(f"GPTConfig: n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise InputError(f"GPTConfig: head_dim={self.d_model // self.n_head} must be even for RoPE")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 8 * math.ceil(8 * self.d_model / 3 / 8))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_rep(self) -> int:
        return self.n_head // self.n_kv_head

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, over the last dimension."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(T: int, head_dim: int, base: float, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim) for rotate-half RoPE; angles computed in float64, then cast."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(T, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Float[Tensor, "B H T D"], cos: Float[Tensor, "T D"], sin: Float[Tensor, "T D"]) -> Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by position-dependent angles (GPT-NeoX / Llama 'rotate half')."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_head * D, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_head * D, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_head * D, bias=False)
        self.o = nn.Linear(cfg.n_head * D, cfg.d_model, bias=False)

    def forward(
        self, x: Float[Tensor, "B T d"], key_mask: Bool[Tensor, "B T"] | None = None
    ) -> Float[Tensor, "B T d"]:
        cfg, (B, T, _) = self.cfg, x.shape
        D = cfg.head_dim
        q = self.q(x).view(B, T, cfg.n_head, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, cfg.n_kv_head, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v(x).view(B, T, cfg.n_kv_head, D).transpose(1, 2)  # (B, Hkv, T, D)
        cos, sin = rope_cos_sin(T, D, cfg.rope_base, x.dtype, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(cfg.n_rep, dim=1)  # (B, H, T, D): query head h reads kv head h // n_rep
        v = v.repeat_interleave(cfg.n_rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]  # causal
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
        # a finite fill (not -inf): a query that sees no key (a pad position) gets a uniform row instead of NaN
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        y = scores.softmax(dim=-1) @ v  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, cfg.n_head * D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Float[Tensor, "B T d"]) -> Float[Tensor, "B T d"]:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Float[Tensor, "B T d"], key_mask: Bool[Tensor, "B T"] | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), key_mask)
        return x + self.mlp(self.mlp_norm(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer. Initialisation is seeded by ``cfg.seed`` alone (a private ``torch.Generator``,
    drawn in float32 on CPU and then cast), so the same config gives bit-identical weights on any device/dtype."""

    def __init__(self, cfg: GPTConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # nn.Linear's default init would consume the global RNG
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
            self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()
        self.to(device=device, dtype=dtype)

    @torch.no_grad()
    def _init_weights(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed)
        resid_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)  # GPT-2: scale residual-branch outputs
        for name, p in self.named_parameters():  # fixed registration order => reproducible
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm gains
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * resid_std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * self.cfg.init_std)

    def forward(
        self, idx: Int[Tensor, "B T"], attention_mask: Bool[Tensor, "B T"] | None = None
    ) -> Float[Tensor, "B T V"]:
        """Logits for every position. ``attention_mask`` (True = real token) hides pad *keys*; with RoPE only
        relative positions matter, so a left-padded row gives the same logits as the unpadded row."""
        if idx.ndim != 2:
            raise InputError(f"TinyGPT.forward: idx must be (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise InputError(f"TinyGPT.forward: sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        if attention_mask is not None and attention_mask.shape != idx.shape:
            raise ShapeMismatchError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but idx has shape {tuple(idx.shape)}"
            )
        key_mask = None if attention_mask is None else attention_mask.to(device=idx.device, dtype=torch.bool)
        x = self.tok_emb(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.lm_head(self.norm_f(x))  # (B, T, V)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype


# ----------------------------------------------------------------------------------------------------------------
# Parameter naming helpers (the paper reports per layer and per matrix type)


def matrix_params(model: TinyGPT) -> dict[str, nn.Parameter]:
    """The 2-D block matrices (q, k, v, o, up, gate, down of every layer), in layer order; embeddings, lm_head and
    norm gains are excluded. Names like ``blocks.0.attn.q.weight``."""
    return {name: p for name, p in model.named_parameters() if _MATRIX_NAME.match(name)}


# ----------------------------------------------------------------------------------------------------------------
# Sampling and log-probabilities


class Generation(NamedTuple):
    """Output of ``generate``. Prompts are left-padded to a common length P; N = max_new_tokens.

    sequences:       (B, P+N) prompt + completion token ids (PAD after a row's EOS)
    attention_mask:  (B, P+N) True on real tokens (prompt tokens and completion tokens up to and including EOS)
    completion_mask: (B, P+N) True on completion tokens up to and including EOS (the tokens a policy loss uses)
    completions:     (B, N)   sampled token ids (PAD after EOS)
    logprobs:        (B, N)   log pi_theta(token | prefix) at temperature 1 of each sampled token (0 after EOS);
                              these are the behaviour log-probs an importance ratio needs when temperature == 1
    prompt_len:      P
    """

    sequences: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    completions: Tensor
    logprobs: Tensor
    prompt_len: int


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to (B, L) long tensor + bool mask (True = real token)."""
    if len(seqs) == 0:
        raise InputError("left_pad: empty batch")
    L = max(len(s) for s in seqs)
    if L == 0:
        raise InputError("left_pad: every sequence is empty")
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, L - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: TinyGPT,
    prompts_ids: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    eos_id: int,
    pad_id: int,
    prompt_mask: Tensor | None = None,
    device: str | torch.device | None = None,
) -> Generation:
    """Sample completions for a batch of prompts; ``temperature == 0`` is greedy decoding.

    Sampling draws from softmax(logits / temperature) with ``torch.multinomial(..., generator=generator)``; pass a
    generator on the model's device for reproducible runs. A row stops at its first EOS (kept in the completion);
    the loop ends when every row has stopped or after ``max_new_tokens``. No KV cache: each step reruns the prefix
    (sequences here are a few dozen tokens).
    """
    device = torch.device(device) if device is not None else model.device
    if max_new_tokens <= 0:
        raise InputError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not math.isfinite(temperature):
        raise InputError(f"generate: temperature must be finite and >= 0, got {temperature}")
    if isinstance(prompts_ids, Tensor):
        ids = prompts_ids.to(device=device, dtype=torch.long)
        mask = (torch.ones_like(ids, dtype=torch.bool) if prompt_mask is None
                else prompt_mask.to(device=device, dtype=torch.bool))
        if mask.shape != ids.shape:
            raise ShapeMismatchError(f"prompt_mask {tuple(mask.shape)} vs prompts {tuple(ids.shape)}")
    else:
        ids, mask = left_pad(prompts_ids, pad_id, device)
    B, P = ids.shape
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise InputError(f"generate: prompt length {P} + {max_new_tokens} new tokens > max_seq_len "
                         f"{model.cfg.max_seq_len}")
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens, new_logprobs, new_mask = [], [], []
    for _ in range(max_new_tokens):
        logits = model(ids, mask)[:, -1, :]  # (B, V)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        logp = logits.log_softmax(-1)
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = (logits / temperature).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        active = ~done
        tok = torch.where(active, tok, torch.full_like(tok, pad_id))
        new_tokens.append(tok)
        new_logprobs.append(torch.where(active, logp.gather(-1, tok[:, None]).squeeze(-1), torch.zeros_like(logp[:, 0])))
        new_mask.append(active)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        mask = torch.cat([mask, active[:, None]], dim=1)
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
    completions = torch.stack(new_tokens, 1)
    n = completions.shape[1]
    if n < max_new_tokens:  # pad to a fixed width so batches from different calls stack
        extra = max_new_tokens - n
        completions = F.pad(completions, (0, extra), value=pad_id)
        ids = F.pad(ids, (0, extra), value=pad_id)
        mask = F.pad(mask, (0, extra), value=False)
        new_logprobs.extend([torch.zeros_like(new_logprobs[0])] * extra)
        new_mask.extend([torch.zeros_like(new_mask[0])] * extra)
    completion_mask = torch.cat([torch.zeros(B, P, dtype=torch.bool, device=device), torch.stack(new_mask, 1)], 1)
    return Generation(ids, mask, completion_mask, completions, torch.stack(new_logprobs, 1), P)


def sequence_logprobs(
    model: TinyGPT,
    input_ids: Int[Tensor, "B T"],
    completion_mask: Bool[Tensor, "B T"] | None = None,
    attention_mask: Bool[Tensor, "B T"] | None = None,
) -> Float[Tensor, "B T"]:
    """Per-token log-probabilities aligned with ``input_ids``: ``out[b, t] = log pi(input_ids[b, t] | ids[b, <t])``
    for t >= 1, ``out[:, 0] = 0``, and 0 wherever ``completion_mask`` is False. Differentiable (training losses:
    e.g. SFT loss = -(out.sum() / completion_mask.sum())). Computed in at least float32."""
    if input_ids.ndim != 2:
        raise InputError(f"sequence_logprobs: input_ids must be (B, T), got {tuple(input_ids.shape)}")
    for nm, m in (("completion_mask", completion_mask), ("attention_mask", attention_mask)):
        if m is not None and m.shape != input_ids.shape:
            raise ShapeMismatchError(f"{nm} has shape {tuple(m.shape)} but input_ids has {tuple(input_ids.shape)}")
    logits = model(input_ids, attention_mask)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    out = F.pad(logp, (1, 0), value=0.0)
    if completion_mask is not None:
        out = out * completion_mask.to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Function-preserving interventions (paper App. D)


def random_orthogonal(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """Haar-random orthogonal (n, n): QR of a Gaussian with the sign fix diag(R) > 0."""
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return (Q * torch.sign(torch.diagonal(R))[None, :]).to(dtype)


def _check_layer(model: TinyGPT, layer: int) -> Attention:
    if not 0 <= layer < model.cfg.n_layer:
        raise InputError(f"layer {layer} out of range: the model has {model.cfg.n_layer} layers")
    return model.blocks[layer].attn


@torch.no_grad()
def rotate_vo(model: TinyGPT, layer: int, R: Tensor) -> None:
    """Rotate the value/output head space of one layer in place (paper Prop. D.1); the function is unchanged.

    With R (D, D) orthogonal, R_kv = blockdiag(R x H_kv), R_q = blockdiag(R x H_q):
        v.weight <- R_kv^T v.weight      (each kv head's values become R^T v_h)
        o.weight <- o.weight R_q         (each query head's output block absorbs R)
    so o(R_q^T y) with y the concatenated head outputs is unchanged, because attention mixes values linearly per
    head. In the paper's row-vector convention this is W_v' = W_v R_kv; its W_o' = W_o R_q is written for the
    (out, in) weight. q and k cannot be rotated this way: RoPE does not commute with a general R.
    Computed in float64 and cast back to the parameter dtype.
    """
    attn = _check_layer(model, layer)
    D = model.cfg.head_dim
    R64 = torch.as_tensor(R).detach().to(device="cpu", dtype=torch.float64)
    if R64.shape != (D, D):
        raise ShapeMismatchError(f"rotate_vo: R must be (head_dim, head_dim) = ({D}, {D}), got {tuple(R64.shape)}")
    if not torch.isfinite(R64).all():
        raise NonFiniteError("rotate_vo: R has NaN or Inf entries")
    r_dtype = R.dtype if isinstance(R, Tensor) and R.is_floating_point() else torch.float64
    err = (R64.T @ R64 - torch.eye(D, dtype=torch.float64)).abs().max().item()
    if err > 64 * D * torch.finfo(r_dtype).eps:
        raise InputError(f"rotate_vo: R is not orthogonal (max |R^T R - I| = {err:.3g})")
    R_kv = torch.block_diag(*([R64] * model.cfg.n_kv_head))
    R_q = torch.block_diag(*([R64] * model.cfg.n_head))
    for lin, new in ((attn.v, lambda W: R_kv.T @ W), (attn.o, lambda W: W @ R_q)):
        W = lin.weight
        lin.weight.copy_(new(W.detach().to("cpu", torch.float64)).to(device=W.device, dtype=W.dtype))


@torch.no_grad()
def permute_kv_heads(model: TinyGPT, layer: int, perm: Sequence[int]) -> None:
    """Permute the kv heads of one layer in place, with the grouped query heads following; function unchanged.

    New kv head j is old kv head perm[j]; new query head j*n_rep + r is old query head perm[j]*n_rep + r (so each
    query head keeps its kv head). Rows of q.weight, k.weight, v.weight are permuted per head; the columns of
    o.weight get the same query-head permutation. RoPE acts identically on every head, so q/k permutation is safe.
    """
    attn = _check_layer(model, layer)
    cfg = model.cfg
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(cfg.n_kv_head)):
        raise InputError(f"permute_kv_heads: {perm} is not a permutation of range({cfg.n_kv_head})")
    D, r = cfg.head_dim, cfg.n_rep
    q_heads = [p * r + j for p in perm for j in range(r)]
    kv_rows = torch.tensor([p * D + i for p in perm for i in range(D)], device=attn.k.weight.device)
    q_rows = torch.tensor([h * D + i for h in q_heads for i in range(D)], device=attn.q.weight.device)
    attn.q.weight.copy_(attn.q.weight[q_rows])
    attn.k.weight.copy_(attn.k.weight[kv_rows])
    attn.v.weight.copy_(attn.v.weight[kv_rows])
    attn.o.weight.copy_(attn.o.weight[:, q_rows])
