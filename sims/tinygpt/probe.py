"""The probe: what a training run records at chosen steps, and the theory checks evaluated on its real updates.

At step t (the number of optimizer *RL/SFT steps* done; t = 0 is the starting model) in ``ProbeConfig.steps`` the
``Prober`` records, from the **stored** weights (bf16 in ``precision="bf16"``: what the model computes with):

* ``metrics`` (tidy: run, step, matrix, metric, value; matrix = "" for model-level metrics):
  reward and accuracy on a fixed set of eval prompts, greedy and temperature-1 sampled; exact token-wise KL
  (full vocabulary, mean over completion tokens) of pi_t to the base pi_0 and to the previous policy pi_{t-1}, on a
  fixed eval set of prompt + correct-answer sequences; per block matrix ||dW||_F, ||dW||_2 against the base and
  against the previous step, Def 2.2 bf16 sparsity (``theory.metrics.bf16_sparsity``) against both, and the fraction
  of entries whose stored value is bit-identical; the token ratios w = pi_t / pi_{t-1} of the step's update on the
  step's own tokens (fraction outside the run's clip band [1 - eps_low, 1 + eps_high]).
* ``checks`` (tidy: one row per (run, step, matrix, reference, result_id) with lhs, rhs, ratio, holds,
  assumptions_hold, failed_assumption, fisher_estimator): Gate II (``theory.spectral.gate2_all``: Thm 3.3 in its
  three forms, Cor F.13, Cor 3.4 Weyl / Mirsky, Cor 3.5) on every block matrix against the base and against the
  previous step; Lemma F.9 on the step's token ratios; Prop 3.2 and Eq 7 on the step's update with the Fisher below.

The Fisher (column ``fisher_estimator`` = ``FISHER_ESTIMATOR`` on Prop 3.2 / Eq 7 rows, empty on rows that use no
Fisher; columns ``fisher_rollouts`` N, ``fisher_history`` r, ``fisher_dim`` dim B) — what is computed, and what
approximation it is:

1. Prefixes: ``n_fisher_rollouts`` completions sampled from pi_{t-1} (temperature 1) on a fixed set of task prompts.
   At every completion position the next-token distribution is enumerated exactly over the vocabulary, so
       F = (1/N) sum_seq sum_pos  J_pos^T (diag p - p p^T) J_pos,      J_pos = d logits_pos / d theta,
   the exact Fisher of pi_{t-1} *conditional on the sampled prefixes* (Monte Carlo only over prefixes).
   The measured budget is the exact KL on the same prefixes, K = (1/N) sum_seq sum_pos KL(pi_t || pi_{t-1}),
   so 1/2 dtheta^T F dtheta is exactly K's second-order Taylor term.
2. Low-dimensional restriction: a d_model = 64 transformer has ~10^5 parameters, and any Fisher estimated from fewer
   samples than "the rest" has dimensions has a Schur complement that is exactly 0. So F is restricted (Galerkin) to
   the subspace B = (+)_blocks span{the block's last ``history`` single-step updates} — each block matrix W is one
   block, all other parameters (embeddings, norms, lm_head) form the block ``other``; the bases are orthonormal
   within a block and blocks are disjoint, so B is orthonormal. F_B = B^T F B is computed with one forward-mode JVP
   per basis column (no per-sample gradients, no d x d matrix).
3. On B: S_W = Schur complement of W's columns in F_B (``theory.kl_leash.schur_complement``), the update's
   coordinates c = B^T dtheta (exact: the step lies in B), delta_W = 1/2 c_W^T S_W c_W, mu_W = lambda_min(S_W) on
   W's history span, mu = lambda_min(F_B). Restricting the minimisation over the rest to span(B_rest) can only raise
   the Schur form: S_W(B) >= B_W^T S_W B_W, so delta_W here is an upper bound of the full-space delta_W for the same
   dW, and mu_W is the curvature on W's recent update directions, not on all of W's space.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call, jvp

from sims.tables import write_tables
from sims.tinygpt.determinism import seed_everything
from sims.tinygpt.model import TinyGPT, generate, matrix_params
from sims.tinygpt.storage import MixedPrecisionAdamW, save_snapshot
from sims.tinygpt.tasks import Task, Tokenizer, encode_demonstrations, task_by_name
from theory.errors import InputError
from theory.kl_leash import eq7, kl_budget_radius, lemF9, prop32_from_fisher
from theory.linalg import spectral_norm, svd64
from theory.metrics import bf16_sparsity
from theory.spectral import gate2_all

__all__ = [
    "ProbeConfig",
    "Prober",
    "RunResult",
    "FISHER_ESTIMATOR",
    "CHECK_COLUMNS",
    "CHECK_FAMILIES",
    "restricted_fisher",
    "history_basis",
    "token_kl",
]

FISHER_ESTIMATOR = "exact-next-token Fisher on sampled prefixes, restricted to per-block update-history subspace"
CHECK_COLUMNS = ["run", "kind", "step", "matrix", "reference", "result_id", "lhs", "rhs", "ratio", "slack", "holds",
                 "assumptions_hold", "failed_assumption", "verdict", "fisher_estimator"]
OTHER_BLOCK = "other"
CHECK_FAMILIES = ("gate2", "fisher", "lemF.9")  # Gate II per matrix; Prop 3.2 + Eq 7; Lemma F.9


@dataclass
class ProbeConfig:
    """Which steps to probe and how big the probe's sample sets are."""

    steps: tuple[int, ...] = ()
    n_eval_prompts: int = 64
    n_fisher_rollouts: int = 32
    history: int = 4  # r: each block's update subspace is spanned by its last r single-step updates
    k: int = 4  # top-k singular subspaces for Gate II
    seed: int = 12345  # eval prompts, Fisher prompts and the probe's sampling (independent of the run's seed)
    theory_checks: bool = True
    checks: tuple[str, ...] = CHECK_FAMILIES  # which families to evaluate when theory_checks is on

    def __post_init__(self) -> None:
        self.steps = tuple(sorted(set(int(s) for s in self.steps)))
        if any(s < 0 for s in self.steps):
            raise InputError(f"ProbeConfig.steps must be >= 0, got {self.steps}")
        if self.history < 1 or self.k < 1 or self.n_eval_prompts < 1 or self.n_fisher_rollouts < 1:
            raise InputError("ProbeConfig: history, k, n_eval_prompts and n_fisher_rollouts must be >= 1")
        self.checks = tuple(self.checks)
        unknown = sorted(set(self.checks) - set(CHECK_FAMILIES))
        if unknown:
            raise InputError(f"ProbeConfig.checks: unknown families {unknown}; known: {list(CHECK_FAMILIES)}")


@dataclass
class RunResult:
    """Everything a probed training run produced. ``snapshots[t]`` = stored weights at probed step t (CPU);
    ``tables``: the run's own further tables by name (e.g. the HF backend's ``hf_sparsity``)."""

    kind: str
    name: str
    config: dict
    history: pd.DataFrame
    metrics: pd.DataFrame
    checks: pd.DataFrame
    snapshots: dict[int, dict[str, torch.Tensor]]
    master: dict[str, torch.Tensor]
    wall_seconds: float
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """history / metrics / checks as CSV and Parquet, config as JSON, snapshots as safetensors."""
        out = Path(out_dir)
        write_tables({**{name: getattr(self, name) for name in ("history", "metrics", "checks")}, **self.tables},
                     out, prefix=f"{self.name}_")
        (out / f"{self.name}_config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True, default=str))
        for t, sd in self.snapshots.items():
            save_snapshot(sd, out / "snapshots" / f"{self.name}_step{t:05d}.safetensors",
                          {"run": self.name, "step": t, "kind": self.kind})
        return out


# ----------------------------------------------------------------------------------------------------------------
# Exact KL and the restricted Fisher


def _action_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t whose logits predict a completion token t+1 (the policy's actions)."""
    pos = torch.zeros_like(completion_mask)
    pos[:, :-1] = completion_mask[:, 1:]
    return pos


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(p || q) per position from logits (..., V) -> (...), in the logits' dtype."""
    lp, lq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def history_basis(
    deltas: list[Mapping[str, torch.Tensor]], blocks: Mapping[str, list[str]]
) -> dict[str, torch.Tensor]:
    """Orthonormal basis (p_b, r_b) float64 of span{delta[block] for delta in deltas} for every block; numerical
    rank by singular values > max(p_b, r) * eps64 * sigma_max (a block that never moved gets r_b = 0)."""
    out = {}
    for b, names in blocks.items():
        M = torch.stack([torch.cat([d[n].reshape(-1).double() for n in names]) for d in deltas], dim=1)
        if not bool(M.any()):
            out[b] = M.new_zeros((M.shape[0], 0))
            continue
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        keep = S > max(M.shape) * torch.finfo(torch.float64).eps * S[0]
        out[b] = U[:, keep]
    return out


def _tangent(names: list[str], col: torch.Tensor, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    t = {n: torch.zeros_like(v) for n, v in template.items()}
    i = 0
    for n in names:
        k = template[n].numel()
        t[n] = col[i:i + k].reshape(template[n].shape).to(template[n])
        i += k
    return t


def restricted_fisher(
    model64: TinyGPT,
    params: Mapping[str, torch.Tensor],
    ids: torch.Tensor,
    attn: torch.Tensor,
    action_pos: torch.Tensor,
    tangents: list[Mapping[str, torch.Tensor]],
) -> torch.Tensor:
    """F_B[i, j] = (1/N) sum_pos sum_v p_v (J_iv - pbar.J_i)(J_jv - pbar.J_j): the exact next-token Fisher at
    ``params`` on the given prefixes, in the directions ``tangents`` (one forward-mode JVP each). (d, d) float64."""
    n_seq = ids.shape[0]

    def logits_of(p):
        return functional_call(model64, p, (ids, attn))

    cols, probs = [], None
    for tan in tangents:
        logits, dlogits = jvp(logits_of, (dict(params),), (dict(tan),))
        if probs is None:
            probs = logits[action_pos].softmax(-1)  # (n_pos, V)
        cols.append(dlogits[action_pos])  # (n_pos, V)
    J = torch.stack(cols, dim=-1)  # (n_pos, V, d)
    Jc = J - torch.einsum("pv,pvd->pd", probs, J)[:, None, :]
    return torch.einsum("pv,pvi,pvj->ij", probs, Jc, Jc) / n_seq


# ----------------------------------------------------------------------------------------------------------------
# The prober


class Prober:
    """Collects probe metrics and theory checks during a run (see the module docstring for what and how).

    The training loop calls ``after_step(t, stored_state, token_ratios=...)`` after every step (t = 0 once before
    training): the prober keeps the last ``history + 1`` stored states and probes when t is in ``cfg.steps``.
    """

    def __init__(
        self,
        model: TinyGPT,
        task: Task,
        tok: Tokenizer,
        cfg: ProbeConfig,
        *,
        run: str,
        kind: str,
        max_new_tokens: int,
        clip_band: tuple[float, float] | None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model, self.task, self.tok, self.cfg = model, task, tok, cfg
        self.run, self.kind, self.max_new = run, kind, max_new_tokens
        self.clip_band = clip_band
        self.device = torch.device(device)
        self.names = [n for n, _ in model.named_parameters()]
        self.matrices = list(matrix_params(model))
        others = [n for n in self.names if n not in self.matrices]
        self.blocks = {m: [m] for m in self.matrices}
        if others:
            self.blocks[OTHER_BLOCK] = others
        self.scratch = copy.deepcopy(model).to(device=self.device, dtype=torch.float64)
        for p in self.scratch.parameters():
            p.requires_grad_(False)
        rng = np.random.default_rng([cfg.seed, 0])
        self.eval_examples = task.sample(rng, cfg.n_eval_prompts)
        self.fisher_prompts = [ex.prompt for ex in task.sample(np.random.default_rng([cfg.seed, 1]), cfg.n_fisher_rollouts)]
        self.demo_ids, self.demo_attn, demo_cmask = encode_demonstrations(tok, self.eval_examples, self.device)
        self.demo_pos = _action_positions(demo_cmask)
        self.recent: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=cfg.history + 1)
        self.base: dict[str, torch.Tensor] | None = None
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self._metrics: list[dict] = []
        self._checks: list[dict] = []
        self._svd_base: dict[str, Any] = {}

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def after_step(self, t: int, stored: dict[str, torch.Tensor], *, token_ratios: list[np.ndarray] | None = None) -> None:
        stored = {n: v.detach().cpu() for n, v in stored.items()}
        if t == 0:
            self.base = stored
        self.recent.append((t, stored))
        if t in self.cfg.steps:
            self.snapshots[t] = stored
            with torch.no_grad():
                self._probe(t, stored, token_ratios)

    def metrics_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self._metrics, columns=["run", "kind", "step", "matrix", "metric", "value"])

    def checks_frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self._checks)
        if df.empty:
            return pd.DataFrame(columns=CHECK_COLUMNS)
        extra = [c for c in df.columns if c not in CHECK_COLUMNS]
        return df[CHECK_COLUMNS + extra]

    def _metric(self, t: int, metric: str, value: float, matrix: str = "") -> None:
        self._metrics.append({"run": self.run, "kind": self.kind, "step": t, "matrix": matrix, "metric": metric,
                              "value": float(value)})

    def _check(self, t: int, check, *, matrix: str = "", reference: str = "", fisher: str | None = None,
               **extra) -> None:
        row = check.as_row()
        self._checks.append({"run": self.run, "kind": self.kind, "step": t, "matrix": matrix, "reference": reference,
                             "fisher_estimator": fisher, **row, **extra})

    def _params64(self, stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: stored[n].to(device=self.device, dtype=torch.float64) for n in self.names}

    # -- the probe ----------------------------------------------------------------------------------------------
    def _probe(self, t: int, stored: dict[str, torch.Tensor], token_ratios) -> None:
        self._eval_rewards(t)
        prev = self.recent[-2][1] if len(self.recent) >= 2 else None
        p_now = self._params64(stored)
        logits_now = functional_call(self.scratch, p_now, (self.demo_ids, self.demo_attn))
        for ref_name, ref in (("base", self.base), ("prev", prev)):
            if ref is None or t == 0:
                continue
            logits_ref = functional_call(self.scratch, self._params64(ref), (self.demo_ids, self.demo_attn))
            kl = token_kl(logits_now, logits_ref)[self.demo_pos]
            self._metric(t, f"kl_tok_{ref_name}", float(kl.mean()))
        if t == 0:
            return
        self._matrix_metrics(t, stored, prev)
        if token_ratios is not None:
            self._token_ratio_metrics(t, token_ratios)
        if self.cfg.theory_checks:
            fisher = prev is not None and "fisher" in self.cfg.checks
            kl_forms = self._fisher_checks(t, stored) if fisher else {}
            if "gate2" in self.cfg.checks:
                self._gate2_checks(t, stored, prev, kl_forms)

    def _eval_rewards(self, t: int) -> None:
        prompts = [self.tok.encode(ex.prompt, bos=True) for ex in self.eval_examples]
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7919 * t)
        for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
            g = generate(self.model, prompts, self.max_new, temp, gen, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                         device=self.device)
            rewards = [self.task.reward(ex.prompt, self.tok.decode(c)) for ex, c in zip(self.eval_examples, g.completions)]
            self._metric(t, f"reward_{mode}", float(np.mean(rewards)))
            self._metric(t, f"accuracy_{mode}", float(np.mean([r > 0 for r in rewards])))

    def _matrix_metrics(self, t: int, stored, prev) -> None:
        for m in self.matrices:
            for ref_name, ref in (("base", self.base), ("prev", prev)):
                if ref is None:
                    continue
                dW = stored[m].double() - ref[m].double()
                self._metric(t, f"fro_{ref_name}", float(torch.linalg.norm(dW)), m)
                self._metric(t, f"spec_{ref_name}", spectral_norm(dW, m), m)
                self._metric(t, f"bf16_sparsity_{ref_name}", bf16_sparsity(ref[m], stored[m]), m)
                self._metric(t, f"bit_identical_{ref_name}", float((stored[m] == ref[m]).double().mean()), m)

    def _token_ratio_metrics(self, t: int, ratios: list[np.ndarray]) -> None:
        flat = np.concatenate([r for r in ratios if len(r)]) if any(len(r) for r in ratios) else np.zeros(0)
        self._metric(t, "token_ratio_max_abs_log", float(np.max(np.abs(np.log(flat)))) if len(flat) else 0.0)
        if self.clip_band is not None and len(flat):
            lo, hi = 1 - self.clip_band[0], 1 + self.clip_band[1]
            self._metric(t, "token_ratio_out_of_band_frac", float(np.mean((flat < lo) | (flat > hi))))
        if not self.cfg.theory_checks or self.clip_band is None or "lemF.9" not in self.cfg.checks:
            return
        # Lemma F.9 has one symmetric band [1 - eps, 1 + eps]; with DAPO's clip-higher (eps_low < eps_high) we use
        # eps = max(eps_low, eps_high): the widest band the run's clipping allows, the most generous reading.
        self._check(t, lemF9([r for r in ratios if len(r)], max(self.clip_band)), reference="prev")

    def _gate2_checks(self, t: int, stored, prev, kl_forms: Mapping[str, tuple[float, float]]) -> None:
        for m in self.matrices:
            if m not in self._svd_base:
                self._svd_base[m] = svd64(self.base[m], m)
            for ref_name, ref in (("base", self.base), ("prev", prev)):
                if ref is None:
                    continue
                kw = {}
                if ref_name == "prev" and m in kl_forms:  # Lemma F.10's sqrt(2 delta_W / mu_W) of this very step
                    kw = {"delta_W": kl_forms[m][0], "mu_W": kl_forms[m][1]}
                svd0 = self._svd_base[m] if ref_name == "base" else None
                for rid, chk in gate2_all(ref[m], stored[m], self.cfg.k, svd0=svd0, **kw).items():
                    self._check(t, chk, matrix=m, reference=ref_name)

    def _fisher_checks(self, t: int, stored) -> dict[str, tuple[float, float]]:
        """Prop 3.2 and Eq 7 on the update pi_{t-1} -> pi_t (see the module docstring for the estimator).

        Returns {matrix: (delta_W, mu_W)} for the blocks whose Eq 7 assumptions held (Gate II's KL-form bound)."""
        states = [s for _, s in self.recent]
        prev = states[-2]
        deltas = [{n: b[n].double() - a[n].double() for n in self.names} for a, b in zip(states[:-1], states[1:])]
        basis = history_basis(deltas, self.blocks)
        template = self._params64(prev)
        tangents, col_block, coords = [], [], []
        last = deltas[-1]
        for b, Q in basis.items():
            vec = torch.cat([last[n].reshape(-1) for n in self.blocks[b]]).to(Q)
            for j in range(Q.shape[1]):
                tangents.append(_tangent(self.blocks[b], Q[:, j], template))
                col_block.append(b)
                coords.append(float(Q[:, j] @ vec))
        if not tangents:
            return {}
        c = np.array(coords)
        # prefixes: completions sampled from pi_{t-1} on the fixed Fisher prompts
        self.scratch.load_state_dict(template, strict=True)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 104729 * t)
        roll = generate(self.scratch, [self.tok.encode(p, bos=True) for p in self.fisher_prompts], self.max_new, 1.0,
                        gen, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id, device=self.device)
        ids, attn, pos = roll.sequences, roll.attention_mask, _action_positions(roll.completion_mask)
        logits_prev = functional_call(self.scratch, template, (ids, attn))
        logits_now = functional_call(self.scratch, self._params64(stored), (ids, attn))
        K = float(token_kl(logits_now, logits_prev)[pos].sum() / ids.shape[0])
        with torch.enable_grad():
            FB = restricted_fisher(self.scratch, template, ids, attn, pos, tangents).cpu().numpy()
        half_quad = 0.5 * float(c @ FB @ c)
        self._metric(t, "kl_step_fisher_prefixes", K)
        self._metric(t, "half_quadratic_form", half_quad)
        self._metric(t, "fisher_subspace_dim", len(tangents))
        fisher = FISHER_ESTIMATOR
        sizes = {"fisher_rollouts": int(ids.shape[0]), "fisher_history": len(self.recent) - 1,
                 "fisher_dim": len(tangents)}
        # the update subspace is B itself ("full" in B's coordinates): F_B >= mu I there, or the assumption fails
        self._check(t, prop32_from_fisher(FB, c, K, subspace="full"), matrix="(all)", reference="prev",
                    fisher=fisher, **sizes)
        cb = np.array(col_block)
        kl_forms: dict[str, tuple[float, float]] = {}
        for m in self.matrices:
            idx = np.flatnonzero(cb == m)
            if len(idx) == 0:
                continue  # the block did not move in the history window (stored bf16 unchanged): nothing to bound
            chk = eq7(FB, c, idx, K=K, subspace="full")
            extra = {}
            mu_W, dW = chk.details.get("mu_W"), chk.details.get("delta_W")
            if chk.assumptions_hold and mu_W and mu_W > 0 and math.isfinite(mu_W):
                kl_forms[m] = (float(dW), float(mu_W))
                rhs_K = kl_budget_radius(K, mu_W)  # the paper's delta_W <= K form: first order only
                extra = {"rhs_K": rhs_K, "ratio_K": chk.lhs / rhs_K if rhs_K > 0 else math.inf}
            self._check(t, chk, matrix=m, reference="prev", fisher=fisher, **sizes, **extra)
        return kl_forms


def start_run(model, cfg):
    """Common start of a training run (RLVR or SFT): seed everything, move the model to ``cfg.device``, and build
    the tokenizer, task, completion length and the mixed-precision AdamW from ``cfg``.

    Returns ``(device, tokenizer, task, max_new_tokens, optimizer)``."""
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    task = task_by_name(cfg.task)
    max_new = cfg.max_new_tokens or task.max_answer_len + 1
    opt = MixedPrecisionAdamW(model, precision=cfg.precision, lr=cfg.lr, betas=cfg.betas,
                              weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    return device, Tokenizer(), task, max_new, opt
