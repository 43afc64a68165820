"""Gate I on a real Hugging Face causal LM, along the update that was actually taken (Prop. 3.2 on span(D)).

Prop. 3.2 needs the Fisher F(theta) of the whole model, which for SmolLM2 (135M parameters) cannot be formed; its
restricted form on an update subspace U costs one Jacobian-vector product per basis direction. Along the realized
update D = theta_tuned - theta_base (U = span(D), ``theory.kl_leash.prop32_from_fisher(..., subspace="span")``)
one directional derivative suffices:

    q  = D^T F(theta_0) D = E_prefix sum_t sum_v pi_0(v | prefix_t) (d/ds log pi_{theta_0 + s D}(v | prefix_t))^2,
    K(s) = KL(pi_{theta_0 + s D} || pi_{theta_0})  (sum over completion positions, mean over sequences),

with the prefixes fixed (teacher-forced sequences, e.g. completions sampled from the base), so both sides are exact
per prefix: K(s) = s^2 q / 2 + O(s^3). The derivative is a central difference with step ``h`` on a float64 copy of
the model (forward-mode AD would be exact, but PyTorch's CPU SDPA kernel has no forward derivative). Error:
O(h^2) truncation plus rounding / h, and the rounding is not float64's: HF's ``LlamaRMSNorm`` computes in float32
whatever the model dtype, so log-probs carry ~1e-10 noise. Against a forward-mode oracle (eager attention) on a
tiny Llama, q's relative error was 1.4e-4 at h = 1e-2, 4.6e-6 at 1e-3, 1.1e-5 at 1e-4, 3e-4 at 1e-5: the default
h = 1e-3 sits at the minimum. Prop. 3.2 restricted to span(D) reads

    ||s D||_2 <= sqrt(2 K(s) / mu),   mu = q / ||D||^2   (the Rayleigh quotient of F along D),

i.e. it holds iff 2 K(s) >= s^2 q: the quadratic (Fisher) model of the KL must not overestimate the real KL.
To first order the two sides are equal; the table shows at which scale of the real update that stops being true.

``prop32_along_update`` returns one row per scale and the corresponding ``theory`` checks.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from sims.hf.backend import completion_log_softmax
from theory.check import Check
from theory.errors import InputError, NonFiniteError, ShapeMismatchError
from theory.kl_leash import prop32_from_fisher

__all__ = ["update_direction", "prop32_along_update"]

DEFAULT_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def update_direction(base: torch.nn.Module | Mapping[str, Tensor],
                     tuned: torch.nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """D = tuned - base per parameter name, in float64 on the CPU. Names and shapes must match exactly (tied
    weights appear once, as in ``named_parameters``); non-finite weights are an error naming the parameter."""
    a, b = _named(base), _named(tuned)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ShapeMismatchError(f"base and tuned parameter names differ: only in base {only_a[:5]}, "
                                 f"only in tuned {only_b[:5]}")
    out = {}
    for n in a:
        if a[n].shape != b[n].shape:
            raise ShapeMismatchError(f"parameter {n!r}: base shape {tuple(a[n].shape)} vs tuned {tuple(b[n].shape)}")
        for which, t in (("base", a[n]), ("tuned", b[n])):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"parameter {n!r} of the {which} weights has NaN or Inf entries")
        out[n] = b[n].detach().to("cpu", torch.float64) - a[n].detach().to("cpu", torch.float64)
    return out


def _named(x: torch.nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(x, torch.nn.Module):
        return dict(x.named_parameters())
    if isinstance(x, Mapping):
        return dict(x)
    raise InputError(f"expected a torch module or a name -> tensor mapping, got {type(x).__name__}")


@torch.no_grad()
def prop32_along_update(
    base: torch.nn.Module,
    tuned: torch.nn.Module | Mapping[str, Tensor],
    sequences: Int[Tensor, "B T"],
    attention_mask: Bool[Tensor, "B T"],
    completion_mask: Bool[Tensor, "B N"],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    h: float = 1e-3,
    device: str | torch.device = "cpu",
) -> tuple[pd.DataFrame, list[Check]]:
    """Prop. 3.2 on span(D) for the update base -> tuned, on the given teacher-forced completions (module
    docstring). ``base`` is not modified (a float64 copy is evaluated on ``device``).

    Returns a table with one row per scale s: ``delta_norm`` = ||s D||_2, ``kl`` = K(s), ``half_quadratic`` =
    s^2 q / 2, ``kl_over_quadratic`` = K(s) / (s^2 q / 2) (-> 1 as s -> 0), and the check's lhs, rhs, holds; plus
    ``score_mean`` = max |sum_v pi_0(v) d log pi(v)| over positions (0 up to the finite-difference error: the
    score has mean zero), and the checks themselves.
    """
    scales = [float(s) for s in scales]
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise InputError(f"scales must be positive and finite, got {scales}")
    if not (math.isfinite(h) and 0 < h < 1):
        raise InputError(f"finite-difference step h must be in (0, 1), got {h}")
    if completion_mask.shape[0] != sequences.shape[0] or completion_mask.shape[1] > sequences.shape[1]:
        raise ShapeMismatchError(f"completion_mask {tuple(completion_mask.shape)} does not fit sequences "
                                 f"{tuple(sequences.shape)}")
    D = update_direction(base, tuned)
    norm = math.sqrt(sum(float((d * d).sum()) for d in D.values()))
    changed = sum(int((d != 0).sum()) for d in D.values())
    model = copy.deepcopy(base).to(device=device, dtype=torch.float64).eval()
    params = dict(model.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    Dd = {n: d.to(device) for n, d in D.items()}
    ids, attn, cmask = sequences.to(device), attention_mask.to(device), completion_mask.to(device)
    w = cmask.to(torch.float64)
    n_seq = sequences.shape[0]

    def logp_at(s: float) -> Tensor:
        for n, p in params.items():
            p.copy_(theta0[n] + s * Dd[n])
        return completion_log_softmax(model, ids, attn, cmask)

    lp0 = logp_at(0.0)
    p0 = lp0.exp()
    dlog = (logp_at(h) - logp_at(-h)) / (2 * h)  # (B, N, V): d/ds log pi_{theta0 + sD}(v | prefix) at s = 0
    q = float(((p0 * dlog.square()).sum(-1) * w).sum()) / n_seq
    score_mean = float(((p0 * dlog).sum(-1) * w).abs().max()) if bool(cmask.any()) else 0.0
    mu = q / norm**2 if norm > 0 else 0.0  # Rayleigh quotient of F along D: its lambda_min on span(D)
    rows, checks = [], []
    for s in scales:
        lps = logp_at(s)
        kl = float(((lps.exp() * (lps - lp0)).sum(-1) * w).sum()) / n_seq
        chk = prop32_from_fisher(np.array([[mu]]), np.array([s * norm]), max(kl, 0.0))
        half_q = 0.5 * s * s * q
        rows.append({"scale": s, "delta_norm": s * norm, "kl": kl, "half_quadratic": half_q,
                     "kl_over_quadratic": kl / half_q if half_q > 0 else math.nan, "rayleigh_mu": mu,
                     "lhs": chk.lhs, "rhs": chk.rhs, "holds": chk.holds, "assumptions_hold": chk.assumptions_hold,
                     "score_mean": score_mean, "sequences": n_seq, "completion_tokens": int(cmask.sum()),
                     "changed_params": changed, "h": h})
        checks.append(chk)
    return pd.DataFrame(rows), checks
