"""Answer key of ``docs/04_rl_vs_sft.md``: reference solutions and the expected answers behind ``check(n)``.

Not part of the student's notebook. ``SOLUTIONS[n]`` is run in the notebook in place of exercise n's cell by the
test suite (``threegate.tutorials.execute_tutorial``); ``CHECKS[n](nb)`` computes the expected answers from the
notebook's variables ``nb`` by another route than the solution where the project has one (the experiment's own
tables and verdicts, ``theory.metrics.principal_angles_topk``).
"""

from __future__ import annotations

import numpy as np

from theory.linalg import singular_values
from theory.metrics import principal_angles_topk
from threegate.answers import Expected

EPS = float(np.finfo(np.float64).eps)
MATRIX, K = "blocks.0.attn.o.weight", 4

SOLUTIONS = {
    1: """
res = runs["RL-bf16-s0"]
first, last = res.snapshots[min(res.snapshots)], res.snapshots[max(res.snapshots)]
names = block_matrix_index(first)
changed = sum(bf16_changed_count(first[n], last[n]) for n in names)
answer_1 = 1 - changed / sum(first[n].numel() for n in names)
""",
    2: """
t = sp[(sp.matrix_type == "all") & (sp.storage == "bf16") & (sp.lr == run.config["lr"])]
per = t.pivot_table(index="seed", columns="method", values="sparsity")
answer_2_effects = {int(s): float(per.loc[s, "RL"] - per.loc[s, "SFT"]) for s in per.index}
answer_2_verdict = effect_verdict("Table 1", answer_2_effects, min_effect=MIN_SPARSITY_GAP, what="gap").verdict
""",
    3: """
def largest_angle(res, name="blocks.0.attn.o.weight", k=4):
    first, last = res.snapshots[min(res.snapshots)], res.snapshots[max(res.snapshots)]
    U0 = top_k_subspaces(first[name].double().numpy(), k)[0]
    U1 = top_k_subspaces(last[name].double().numpy(), k)[0]
    return float(principal_angles(U0, U1).max())


answer_3 = {m: largest_angle(runs[f"{m}-bf16-s0"]) for m in ("RL", "SFT")}
""",
}


def exercise_1(nb) -> dict[str, Expected]:
    sp = nb.run.tables["sparsity"]
    row = sp[(sp.run == "RL-bf16-s0") & (sp.matrix_type == "all") & (sp.storage == "bf16")]
    # the table counts changes by float comparison, the exercise by bits: the same count; sparsities are
    # multiples of 1/total, so half a count separates a right answer from a wrong one
    total = int(row["total"].iloc[0])
    return {"answer_1": Expected(float(row["sparsity"].iloc[0]), abs_tol=0.5 / total,
                                 hint="sum bf16_changed_count over the names block_matrix_index gives, divide by "
                                      "the summed numel, and subtract from one")}


def exercise_2(nb) -> dict[str, Expected]:
    v = nb.run.verdicts[0]  # the experiment's own Table 1 verdict, computed from the same effects
    effects = {int(s): float(e) for s, e in zip(v.numbers["seeds"], v.numbers["effects"])}
    # both routes subtract the same two float64 sparsities: at most one rounding apart
    return {"answer_2_effects": Expected(effects, abs_tol=4 * EPS,
                                         hint="one entry per seed, RL minus SFT, from the rows at the matched lr "
                                              "(pivot_table by seed and method helps)"),
            "answer_2_verdict": Expected(v.verdict, hint="the verdict attribute of what effect_verdict returns")}


def exercise_3(nb) -> dict[str, Expected]:
    refs, tol = {}, 0.0
    for m in ("RL", "SFT"):
        res = nb.runs[f"{m}-bf16-s0"]
        W0 = res.snapshots[min(res.snapshots)][MATRIX].double().numpy()
        W1 = res.snapshots[max(res.snapshots)][MATRIX].double().numpy()
        refs[m] = float(principal_angles_topk(W0, W1, K)[0].max())
        # a backward-stable SVD's top-k subspace is within ~ n eps sigma_1 / gap_k of the exact one (Wedin applied
        # to rounding); two routes, two matrices each
        for W in (W0, W1):
            S = singular_values(W)
            tol = max(tol, 4 * W.shape[0] * EPS * S[0] / (S[K - 1] - S[K]))
    return {"answer_3": Expected(refs, abs_tol=tol,
                                 hint="top_k_subspaces of the float64 matrices at the first and last snapshot, "
                                      "then the largest of their principal_angles, once per run")}


CHECKS = {1: exercise_1, 2: exercise_2, 3: exercise_3}
