"""Gate II's mechanism measured directly: the policy's curvature along principal vs complement directions.

The paper reads Gate II as "the KL leash keeps RL off the principal directions because they are the high-curvature
ones". rlvr-geometry (thunderingluck/rlvr-geometry; DeepSeek-R1-Distill-Qwen-1.5B -> DeepScaleR, Hessian-vector
products of a token-NLL proxy, rank-64 subspace projections of the realized update) found no significant
principal-vs-complement gap: 0 of 31 pre-registered cells at n = 16 minibatches. Here the curvature is the one the
leash is about: the Fisher of the policy, ``q(D) = vec(D)ᵀ F vec(D)``, the second-order term of
``KL(pi_theta || pi_{theta + D})`` (Lemma F.5), along unit rank-one directions of one block matrix W0:

* **principal** ``u_i v_iᵀ`` for the top-k singular pairs (i < k) of W0;
* **complement** ``u_j v_jᵀ`` for ``n_complement`` pairs j >= k spread evenly over k..r-1 (all of them when
  ``n_complement`` is None); every such direction is orthogonal to the top-k principal subspaces.

``F`` is exact on the sampled prefixes: completions sampled (temperature 1) from the base as it computes (the
stored bf16 weights), and at every completion position the next-token distribution over the whole vocabulary
(``sims.tinygpt.probe.restricted_fisher``: forward-mode JVPs vmapped over the directions, float64).
``sims.tinygpt.probe.hvp_quadratic_forms`` computes the same ``q`` as ``Dᵀ H D`` with H the Hessian of
``sum_pos KL(pi_0 || pi_theta)`` at theta_0 (which is F there) by double backward: the route for models without
forward-mode AD (SmolLM2: ``sims.hf.curvature``, experiment ``curvature_smollm2``); the tests check that the two
routes agree on TinyGPT. The directions are ``theory.update_geometry.rank_one_directions``.

**Pre-registration** (this docstring and the constants below were fixed, and committed, before the default preset
was run; only the fast preset on the fast-pretrained test model had been run, to debug the code):

* hypothesis H1: per block matrix, ``r_m = log10(mean_i q(u_i v_iᵀ) / mean_j q(u_j v_jᵀ)) > 0``;
* statistic and test: the exact one-sided sign test (``theory.power.sign_test_pvalue``) of H0 "P(r_m > 0) = 1/2"
  on the M block matrices (M = 14 on TinyGPT: 2 layers x 7 types), r_m averaged over seeds, at ``ALPHA = 0.05``;
* power, known before running: at the design alternative ``P(r_m > 0) = DESIGN_P1 = 0.8``, M = 14 rejects at 11 or
  more successes with exact power 0.698; 18 matrices would be needed for 0.8 (both are in the verdict's numbers);
* verdict ``curvature_principal_above_complement``: the seed rule (``sims.claims.base.effect_verdict``) on the
  per-seed effect ``e_s = mean_m r_m`` with min effect ``MIN_LOG10_RATIO = log10(2)`` (the principal directions at
  least twice as curved, geometric mean over matrices); "reproduced" additionally needs the sign test to reject
  H0; the seeds vary the sampled prefixes (the Monte Carlo part of F), not the model;
* SmolLM2 (``curvature_smollm2``, slow tier, a few matrices): per matrix, the exact one-sided permutation test of
  "the k principal q's exceed the n_complement complement q's" (rank sum; with 4 and 4 the smallest attainable
  p-value is 1/70); "reproduced" iff every measured matrix rejects at ``ALPHA``, otherwise inconclusive (a null at
  three matrices and 4 + 4 directions is never read as "not reproduced").
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sims.claims.base import (
    Claim,
    ClaimRun,
    Verdict,
    block_matrix_index,
    config_from_section,
    effect_verdict,
    require_columns,
    start_model,
    verdicts_frame,
)
from sims.tinygpt.model import generate
from sims.tinygpt.determinism import deterministic
from sims.tinygpt.probe import _action_positions, restricted_fisher
from sims.tinygpt.tasks import Tokenizer, task_by_name
from theory.errors import InputError
from theory.power import (
    rank_sum_pvalue,
    sign_test_critical_count,
    sign_test_n_for_power,
    sign_test_power,
    sign_test_pvalue,
)
from theory.update_geometry import rank_one_directions

__all__ = [
    "ALPHA", "DESIGN_P1", "MIN_LOG10_RATIO", "CLAIM", "SMOLLM2_CLAIM", "CurvatureConfig", "fisher_quadratic_forms",
    "curvature_rows", "curvature_principal_above_complement", "smollm2_curvature_verdict", "curvature_experiment",
]

#: Level of the pre-registered tests.
ALPHA = 0.05
#: Design alternative of the sign test: P(r_m > 0) under H1.
DESIGN_P1 = Fraction(4, 5)
#: Smallest per-seed effect (mean over matrices of log10 principal / complement curvature) that counts.
MIN_LOG10_RATIO = math.log10(2.0)

CLAIM = Claim("curvature_principal_above_complement",
              "Gate II mechanism: the policy Fisher is more curved along principal directions u_i v_i^T of a "
              "block matrix than along complement directions")
SMOLLM2_CLAIM = Claim("curvature_principal_above_complement_smollm2",
                      "Gate II mechanism on SmolLM2-135M: Fisher curvature (Hessian-vector products) along principal "
                      "directions exceeds the complement's")


@dataclass(frozen=True)
class CurvatureConfig:
    """``[curvature]``: Fisher quadratic forms at the (bf16) base on prefixes sampled per seed."""

    seeds: tuple[int, ...] = (0, 1, 2)
    task: str = "counting"
    k: int = 8
    n_complement: int | None = None  # None: every pair j >= k
    n_prefixes: int = 16
    bf16_checkpoint: bool = True

    @classmethod
    def fast(cls, **kw) -> "CurvatureConfig":
        return replace(cls(seeds=(0, 1), k=4, n_complement=4, n_prefixes=4), **kw)

    @classmethod
    def default(cls, **kw) -> "CurvatureConfig":
        return replace(cls(), **kw)


def _checked(c: CurvatureConfig) -> CurvatureConfig:
    if c.k < 1 or c.n_prefixes < 1 or (c.n_complement is not None and c.n_complement < 1):
        raise InputError(f"[curvature] k, n_prefixes and n_complement must be positive, got {c.k}, "
                         f"{c.n_prefixes}, {c.n_complement}")
    return c


# ----------------------------------------------------------------------------------------------------------------
# Directions and quadratic forms


def fisher_quadratic_forms(model64: torch.nn.Module, params64: Mapping[str, Tensor], name: str,
                           directions: Sequence[np.ndarray], ids: Tensor, attn: Tensor, positions: Tensor) -> np.ndarray:
    """``q(D) = vec(D)ᵀ F vec(D)`` for each direction D of parameter ``name`` (zero elsewhere): the exact
    next-token Fisher of ``model64`` at ``params64`` on the given prefixes (mean over sequences, sum over
    ``positions``): the diagonal of ``restricted_fisher`` in these directions. Float64."""
    tangents = [{name: torch.as_tensor(D, dtype=params64[name].dtype, device=params64[name].device)}
                for D in directions]
    with torch.enable_grad():
        FB = restricted_fisher(model64, params64, ids, attn, positions, tangents)
    return torch.diagonal(FB).detach().cpu().numpy().astype(np.float64)


def _sample_prefixes(model: torch.nn.Module, task_name: str, n: int, seed: int, device: str):
    task, tok = task_by_name(task_name), Tokenizer()
    prompts = [ex.prompt for ex in task.sample(np.random.default_rng([seed, 7]), n)]
    gen = torch.Generator(device=device).manual_seed(seed)
    roll = generate(model, [tok.encode(p, bos=True) for p in prompts], task.max_answer_len + 1, 1.0, gen,
                    eos_id=tok.eos_id, pad_id=tok.pad_id, device=device)
    return roll.sequences, roll.attention_mask, _action_positions(roll.completion_mask)


def curvature_rows(model: torch.nn.Module, c: CurvatureConfig, seed: int, device: str = "cpu") -> list[dict]:
    """One row per (block matrix, direction): kind, index, sigma, the Fisher quadratic form ``q`` at the base on
    the prefixes sampled with ``seed``."""
    model = model.to(device).eval()
    ids, attn, pos = _sample_prefixes(model, c.task, c.n_prefixes, seed, device)
    model64 = copy.deepcopy(model).to(dtype=torch.float64)
    for p in model64.parameters():
        p.requires_grad_(False)
    params64 = {n: p.detach() for n, p in model64.named_parameters()}
    rows = []
    for name, (layer, mt) in block_matrix_index(params64).items():
        dirs = rank_one_directions(params64[name], c.k, c.n_complement)
        q = fisher_quadratic_forms(model64, params64, name, [d for *_, d in dirs], ids, attn, pos)
        rows += [{"seed": seed, "layer": layer, "matrix_type": mt, "matrix": name, "kind": kind, "index": i,
                  "sigma": s, "q": float(v), "k": c.k, "prefixes": int(ids.shape[0]),
                  "positions": int(pos.sum()), "model": "TinyGPT"}
                 for (kind, i, s, _), v in zip(dirs, q)]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Verdicts (pure)


def _log10_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Per (seed, layer, matrix_type): r = log10(mean principal q / mean complement q) (NaN unless both > 0)."""
    g = table.groupby(["seed", "layer", "matrix_type", "kind"])["q"].mean().unstack("kind")
    if not {"principal", "complement"} <= set(g.columns):
        return pd.DataFrame(columns=["seed", "layer", "matrix_type", "r"])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where((g["principal"] > 0) & (g["complement"] > 0), np.log10(g["principal"] / g["complement"]),
                     np.nan)
    return g.assign(r=r).reset_index()[["seed", "layer", "matrix_type", "r"]]


def curvature_principal_above_complement(table: pd.DataFrame) -> Verdict:
    """The pre-registered verdict (module docstring) from the direction table (columns seed, layer, matrix_type,
    kind, q)."""
    require_columns(table, ("seed", "layer", "matrix_type", "kind", "q"), CLAIM)
    R = _log10_ratios(table)
    if R.empty or not np.isfinite(R["r"]).any():
        return CLAIM.verdict("inconclusive", "no matrix has both principal and complement quadratic forms > 0", {})
    effects = {int(s): float(g["r"].mean()) for s, g in R.groupby("seed")}
    v = effect_verdict(CLAIM, effects, min_effect=MIN_LOG10_RATIO,
                       what="mean over matrices of log10(principal / complement Fisher curvature)")
    per_matrix = R.groupby(["layer", "matrix_type"])["r"].mean().dropna()
    n, wins = len(per_matrix), int((per_matrix > 0).sum())
    p = sign_test_pvalue(wins, n)
    p_inverted = sign_test_pvalue(n - wins, n)  # the same test in the other direction: complement more curved
    crit = sign_test_critical_count(n, ALPHA)
    design_power = float(sign_test_power(n, DESIGN_P1, ALPHA))
    nums = {**v.numbers, "alpha": ALPHA, "matrices": n, "matrices_principal_above": wins,
            "sign_test_p": float(p), "sign_test_p_inverted": float(p_inverted), "critical_count": crit,
            "design_p1": float(DESIGN_P1), "design_power": design_power,
            "matrices_for_power_0.8": sign_test_n_for_power(DESIGN_P1, ALPHA),
            "log10_ratio_per_matrix": {f"{int(l)}.{mt}": float(r) for (l, mt), r in per_matrix.items()}}
    test = (f"sign test: {wins} of {n} matrices principal > complement, one-sided p = {float(p):.4g} "
            f"(alpha {ALPHA:g}; design power {design_power:.3f} at P = {float(DESIGN_P1):g})")
    if v.verdict == "reproduced" and p > ALPHA:
        return replace(v, verdict="inconclusive", numbers=nums,
                       reason=f"{v.reason}; but the pre-registered {test} does not reject")
    return replace(v, numbers=nums, reason=f"{v.reason}; {test}")


def smollm2_curvature_verdict(table: pd.DataFrame) -> Verdict:
    """SmolLM2: per matrix the exact rank-sum test of principal q > complement q; reproduced iff every matrix rejects
    at ALPHA, else inconclusive (module docstring). Needs columns matrix, kind, q."""
    require_columns(table, ("matrix", "kind", "q"), SMOLLM2_CLAIM)
    per = {}
    for m, g in table.groupby("matrix", sort=True):
        a, b = g.loc[g["kind"] == "principal", "q"].to_numpy(), g.loc[g["kind"] == "complement", "q"].to_numpy()
        if len(a) and len(b):
            ratio = a.mean() / b.mean() if b.mean() > 0 else math.nan
            per[str(m)] = {"p": float(rank_sum_pvalue(a, b)), "log10_ratio": float(np.log10(ratio)) if ratio > 0
                           else math.nan, "principal": len(a), "complement": len(b)}
    if not per:
        return SMOLLM2_CLAIM.verdict("inconclusive", "no matrix has both principal and complement directions", {})
    rejected = [m for m, d in per.items() if d["p"] <= ALPHA]
    nums = {"alpha": ALPHA, "per_matrix": per, "rejected": len(rejected), "matrices": len(per)}
    text = "; ".join(f"{m}: log10 ratio {d['log10_ratio']:+.3f}, p = {d['p']:.4g}" for m, d in per.items())
    if len(rejected) == len(per):
        return SMOLLM2_CLAIM.verdict("reproduced", f"every matrix rejects at alpha {ALPHA:g} ({text})", nums,
                                     seeds_needed=1, seeds_needed_note="one model, exact permutation tests")
    return SMOLLM2_CLAIM.verdict("inconclusive", f"{len(rejected)} of {len(per)} matrices reject at alpha {ALPHA:g} "
                                                 f"({text}); a null at this n is not read as a refutation", nums)


# ----------------------------------------------------------------------------------------------------------------
# The experiments


def curvature_experiment(cfg: Mapping) -> ClaimRun:
    """Gate II mechanism: exact Fisher quadratic forms along principal vs complement rank-one directions of every
    block matrix of the base, per seed of sampled prefixes; the pre-registered verdict."""
    c = _checked(config_from_section(CurvatureConfig, cfg, "curvature"))
    device = cfg.get("device", "cpu")
    model = start_model(cfg, c.bf16_checkpoint)
    with deterministic():
        rows = [r for seed in c.seeds for r in curvature_rows(copy.deepcopy(model), c, seed, device)]
    table = pd.DataFrame(rows)
    ratios = _log10_ratios(table)
    verdicts = [curvature_principal_above_complement(table)]
    return ClaimRun([], {"curvature": table, "curvature_ratios": ratios, "verdicts": verdicts_frame(verdicts)},
                    verdicts, asdict(c))
