"""Metamorphic properties of every result in ``theory.RESULTS`` and of the metrics (hypothesis).

A check's verdict must not depend on how an instance is presented:

- **scale by 2**j** (|j| up to ~1000 while the inputs stay finite and normal): every check scales its inputs by a
  power of two first, so the verdict, and lhs / rhs up to the exact factor, are *bit-identical*;
- **transpose** (left and right roles swapped), **rotate** (U W V^T; features Phi Q for a log-linear policy),
  **permute** (rows / columns, outputs, contexts, tokens, where the statement allows): the inputs change by rounding
  only, so the verdict may change only at an edge of the error band or of a rounding-resolution assumption, never
  from "holds" to "violated" (``tests.instances.same_verdict_up_to_rounding``, which also bounds how close to the
  edge such a change must be).

Every id of ``theory.RESULTS`` is covered (``test_every_registered_result_has_a_metamorphic_test``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import theory
from tests.instances import (
    GATE2_KINDS,
    clamp,
    exact_pow2_range,
    gate2_pair,
    ldexp_or_inf,
    loglinear_instance,
    orthogonal,
    same_verdict_up_to_rounding,
    tabular_instance,
)
from theory import metrics as M
from theory import precision as P
from theory.errors import ZeroGapError
from theory.kl_leash import eq7, lemF5, lemF6, lemF9, prop31, prop32, prop32_from_fisher
from theory.policies import LogLinear, TabularSoftmax, m_project, tilt
from theory.spectral import GATE2_IDS, gate2_all

#: ids whose lhs and rhs are homogeneous of degree one in (W0, W1); the others are scale-free
DEGREE_ONE = {"cor3.4-weyl", "cor3.4-mirsky", "cor3.5"}

COVERED: set[str] = set()


def covers(*ids: str):
    COVERED.update(ids)
    return lambda f: f


# ---------------------------------------------------------------------------------------------------------------
# Gate II
# ---------------------------------------------------------------------------------------------------------------

gate2 = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5),
    st.sampled_from(GATE2_KINDS), st.sampled_from([1e-6, 1e-2, 0.3, 0.6, 2.0]),
).map(lambda t: (t[0], t[1], t[2], min(t[3], t[1], t[2]), t[4], t[5]))


@covers(*GATE2_IDS)
@given(gate2, st.integers(-1000, 1000))
@example((0, 2, 2, 1, "swap", 0.6), 1000)
@example((1, 5, 3, 3, "repeated_at_k", 0.3), -1000)
@example((2, 3, 3, 3, "rank_deficient", 1e-6), 977)
def test_gate2_scaling_by_a_power_of_two_is_bit_identical(inst, j):
    W0, W1 = gate2_pair(*inst)
    j = clamp(j, exact_pow2_range(W0, W1))
    A, B = np.ldexp(W0, j), np.ldexp(W1, j)
    assert np.array_equal(np.ldexp(A, -j), W0) and np.array_equal(np.ldexp(B, -j), W1)  # exact scaling
    k = inst[3]
    ref, got = gate2_all(W0, W1, k), gate2_all(A, B, k)
    for rid in GATE2_IDS:
        assert got[rid].verdict == ref[rid].verdict, (rid, ref[rid], got[rid])
        e = j if rid in DEGREE_ONE else 0
        for a, b in ((ref[rid].lhs, got[rid].lhs), (ref[rid].rhs, got[rid].rhs)):
            assert (math.isnan(a) and math.isnan(b)) or b == ldexp_or_inf(a, e), (rid, a, b, e)


@covers(*GATE2_IDS)
@given(gate2, st.sampled_from(["transpose", "rotate", "permute"]))
@example((0, 2, 2, 1, "swap", 0.6), "transpose")
@example((3, 4, 2, 2, "repeated_at_k", 0.3), "rotate")
@example((4, 1, 3, 1, "generic", 2.0), "permute")
def test_gate2_verdicts_survive_transpose_rotation_and_permutation(inst, how):
    W0, W1 = gate2_pair(*inst)
    m, n = W0.shape
    k = inst[3]
    rng = np.random.default_rng(inst[0] + 1)
    if how == "transpose":
        A, B = W0.T, W1.T
    elif how == "rotate":
        U, V = orthogonal(rng, m), orthogonal(rng, n)
        A, B = U @ W0 @ V.T, U @ W1 @ V.T
    else:
        pr, pc = rng.permutation(m), rng.permutation(n)
        A, B = W0[pr][:, pc], W1[pr][:, pc]
    ref, got = gate2_all(W0, W1, k), gate2_all(A, B, k)
    for rid in GATE2_IDS:
        assert same_verdict_up_to_rounding(ref[rid], got[rid]), (rid, how, ref[rid], got[rid])


# ---------------------------------------------------------------------------------------------------------------
# Gate I
# ---------------------------------------------------------------------------------------------------------------

policy_choice = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(["tabular", "loglinear"]), st.integers(2, 4),
                          st.integers(1, 2))


def _policy(seed: int, kind: str, Y: int, X: int):
    """(policy, theta, R, unit direction) of a small tabular or log-linear policy."""
    if kind == "tabular":
        th, R, v = tabular_instance(seed, Y, X)
        return TabularSoftmax(Y, n_contexts=X), th, R, v
    Phi, th, R, v = loglinear_instance(seed, X, Y, 3)
    return LogLinear(Phi), th, R, v


def _permuted(pol, th, R, v, rng):
    """The same policy with outputs (within every context) and contexts permuted: theta, R and D follow."""
    X, Y = pol.shape
    py, px = rng.permutation(Y), rng.permutation(X)
    R2 = R[px][:, py]
    if isinstance(pol, TabularSoftmax):
        idx = (px[:, None] * Y + py[None, :]).reshape(-1)
        return TabularSoftmax(Y, n_contexts=X), th[idx], R2, v[idx]
    return LogLinear(pol.Phi[px][:, py]), th, R2, v


@covers("prop3.1")
@given(policy_choice, st.floats(0.1, 100.0), st.integers(-1000, 1000), st.integers(0, 2**32 - 1))
@example((0, "tabular", 2, 1), 0.1, 1000, 0)
@example((1, "loglinear", 4, 2), 100.0, -1000, 1)
def test_prop31_invariant_under_reward_scaling_and_permutation(pc, beta, j, perm_seed):
    pol, th, R, _ = _policy(*pc)
    ref = prop31(pol, th, R, beta)
    j = clamp(j, exact_pow2_range(R, np.array([beta])))
    scaled = prop31(pol, th, np.ldexp(R, j), math.ldexp(beta, j))  # the tilt sees R / beta: the same bits
    assert (scaled.verdict, scaled.lhs, scaled.rhs) == (ref.verdict, ref.lhs, ref.rhs)
    p2 = _permuted(pol, th, R, np.zeros(pol.n_params), np.random.default_rng(perm_seed))
    assert same_verdict_up_to_rounding(ref, prop31(p2[0], p2[1], p2[2], beta))


@covers("lemF.5")
@given(policy_choice, st.floats(1e-9, 2.0), st.integers(-1000, 1000), st.integers(0, 2**32 - 1))
@example((0, "loglinear", 3, 1), 1e-9, 500, 0)
@example((2, "tabular", 2, 2), 1e-9, 0, 3)
def test_lemF5_invariant_under_feature_scaling_rotation_and_permutation(pc, s, j, perm_seed):
    pol, th, R, v = _policy(*pc)
    D = s * v
    ref = lemF5(pol, th, D)
    rng = np.random.default_rng(perm_seed)
    p2 = _permuted(pol, th, R, D, rng)
    assert same_verdict_up_to_rounding(ref, lemF5(p2[0], p2[1], p2[3])), ref
    if isinstance(pol, LogLinear):
        # Phi 2^j, theta 2^-j, D 2^-j: the same logits bit for bit; F scales by 2^2j (kept finite: |j| <= ~500)
        j = clamp(j, exact_pow2_range(pol.Phi, th, D, limit=480))
        got = lemF5(LogLinear(np.ldexp(pol.Phi, j)), np.ldexp(th, -j), np.ldexp(D, -j))
        assert (got.verdict, got.lhs, got.rhs) == (ref.verdict, ref.lhs, ref.rhs)
        Q = orthogonal(rng, pol.n_params)  # Phi Q, Q^T theta, Q^T D: the same policy, rotated parameters
        assert same_verdict_up_to_rounding(ref, lemF5(LogLinear(pol.Phi @ Q), Q.T @ th, Q.T @ D))


@covers("lemF.6")
@given(policy_choice, st.floats(0.2, 50.0), st.integers(-1000, 1000), st.integers(0, 2**32 - 1))
@example((0, "tabular", 3, 2), 0.2, -1000, 0)
def test_lemF6_invariant_under_reward_scaling_and_permutation(pc, beta, j, perm_seed):
    pol, th, R, _ = _policy(*pc)
    ref = lemF6(pol, th, R=R, beta=beta)
    j = clamp(j, exact_pow2_range(R, np.array([beta])))
    got = lemF6(pol, th, R=np.ldexp(R, j), beta=math.ldexp(beta, j))
    assert (got.verdict, got.lhs, got.rhs) == (ref.verdict, ref.lhs, ref.rhs)
    p2 = _permuted(pol, th, R, np.zeros(pol.n_params), np.random.default_rng(perm_seed))
    assert same_verdict_up_to_rounding(ref, lemF6(p2[0], p2[1], R=p2[2], beta=beta))


@covers("lemF.9")
@given(st.integers(0, 2**32 - 1), st.floats(0.01, 0.5), st.floats(0.5, 1.5))
@example(0, 0.2, 1.0)  # every ratio at the band edge: attained, indeterminate either way
def test_lemF9_invariant_under_permutation_of_sequences_and_tokens(seed, eps, spread):
    g = np.random.default_rng(seed)
    seqs = [np.clip(1 + spread * eps * g.uniform(-1, 1, int(g.integers(1, 12))), 1e-3, None)
            for _ in range(int(g.integers(1, 6)))]
    if seed % 5 == 0:
        seqs = [np.full(s.size, 1 - eps) for s in seqs]
    ref = lemF9(seqs, eps)
    shuffled = [s[g.permutation(s.size)] for s in seqs]
    shuffled = [shuffled[i] for i in g.permutation(len(seqs))]
    assert same_verdict_up_to_rounding(ref, lemF9(shuffled, eps))
    assert lemF9([s[::-1] for s in seqs[::-1]], eps).details["n_violations"] == ref.details["n_violations"]


fisher_inst = st.tuples(st.integers(0, 2**32 - 1), st.integers(2, 5), st.integers(0, 2), st.floats(1e-6, 1.0))


def _fisher_pair(seed: int, n: int, null_rank: int, s: float):
    """A PSD F (rank n - null_rank), a step D, and K = 1/2 D^T F D (a first-order budget)."""
    g = np.random.default_rng(seed)
    A = g.standard_normal((n, max(n - null_rank, 1)))
    F = A @ A.T
    D = s * g.standard_normal(n)
    return F, D, 0.5 * float(D @ F @ D) * (1 + g.uniform(-0.5, 0.5))


@covers("prop3.2")
@given(fisher_inst, st.integers(-1000, 1000), st.integers(-1000, 1000))
@example((0, 3, 1, 1e-6), 1000, -1000)
@example((1, 2, 0, 1.0), -1000, 1000)
def test_prop32_invariant_under_independent_scaling_of_F_and_D(fi, a, b):
    F, D, K = _fisher_pair(*fi)
    ref = prop32_from_fisher(F, D, K)
    a = clamp(a, exact_pow2_range(F, limit=1000))
    b = clamp(b, exact_pow2_range(D, limit=1000))
    Kab = math.ldexp(K, a + 2 * b) if abs(a + 2 * b) < 1000 else None
    if Kab is None or not (0 < Kab < math.inf) or math.ldexp(Kab, -a - 2 * b) != K:
        b = 0
        a = clamp(a, exact_pow2_range(F, np.array([K]), limit=1000))
        Kab = math.ldexp(K, a)
    got = prop32_from_fisher(np.ldexp(F, a), np.ldexp(D, b), Kab)
    assert got.verdict == ref.verdict
    assert got.lhs == ldexp_or_inf(ref.lhs, b) and got.rhs == ldexp_or_inf(ref.rhs, b)


@covers("prop3.2")
@given(fisher_inst, st.sampled_from(["rotate", "permute"]))
def test_prop32_invariant_under_rotation_and_permutation(fi, how):
    F, D, K = _fisher_pair(*fi)
    g = np.random.default_rng(fi[0] + 7)
    Q = orthogonal(g, F.shape[0]) if how == "rotate" else np.eye(F.shape[0])[g.permutation(F.shape[0])]
    assert same_verdict_up_to_rounding(prop32_from_fisher(F, D, K), prop32_from_fisher(Q.T @ F @ Q, Q.T @ D, K))


@covers("prop3.2")
@given(st.integers(0, 2**32 - 1), st.integers(-480, 480), st.floats(1.0, 100.0))
@example(0, 480, 1.0)
def test_prop32_policy_form_invariant_under_feature_scaling(seed, j, beta):
    Phi, th, R, _ = loglinear_instance(seed, 2, 4, 3)
    pol = LogLinear(Phi)
    tp = m_project(pol, th, tilt(pol.probs(th), R, beta)).theta_plus
    ref = prop32(pol, th, tp)
    j = clamp(j, exact_pow2_range(Phi, th, tp, limit=480))
    got = prop32(LogLinear(np.ldexp(Phi, j)), np.ldexp(th, -j), np.ldexp(tp, -j))
    assert got.verdict == ref.verdict
    assert got.lhs == ldexp_or_inf(ref.lhs, -j) and got.rhs == ldexp_or_inf(ref.rhs, -j)


@covers("eq7")
@given(fisher_inst, st.integers(1, 3), st.integers(-1000, 1000), st.integers(-1000, 1000))
@example((0, 4, 2, 1e-6), 2, 1000, -1000)
@example((0, 2, 0, 1.0), 1, 0, 1)  # found by hypothesis: a rank-one S_W attains the bound (indeterminate)
def test_eq7_invariant_under_scaling_permutation_and_block_rotation(fi, w, a, b):
    F, D, _ = _fisher_pair(*fi)
    n = F.shape[0]
    w = min(w, n)
    block = np.arange(w)
    ref = eq7(F, D, block)
    a, b = clamp(a, exact_pow2_range(F)), clamp(b, exact_pow2_range(D))
    got = eq7(np.ldexp(F, a), np.ldexp(D, b), block)
    assert got.verdict == ref.verdict
    if ref.verdict == "assumption-failed":
        assert got.failed_assumption == ref.failed_assumption
    for x, y in ((ref.lhs, got.lhs), (ref.rhs, got.rhs)):
        assert (math.isnan(x) and math.isnan(y)) or y == ldexp_or_inf(x, b)
    g = np.random.default_rng(fi[0] + 3)
    perm = g.permutation(n)  # relabel the parameters; the block follows
    inv = np.argsort(perm)
    assert same_verdict_up_to_rounding(ref, eq7(F[np.ix_(perm, perm)], D[perm], inv[block]))
    Q = np.eye(n)
    Q[:w, :w] = orthogonal(g, w)  # rotate inside the block: S_W -> Q^T S_W Q
    assert same_verdict_up_to_rounding(ref, eq7(Q.T @ F @ Q, Q.T @ D, block))


# ---------------------------------------------------------------------------------------------------------------
# Gate III: exact bf16 arithmetic, so every transformation keeps the verdict exactly
# ---------------------------------------------------------------------------------------------------------------

# normal bf16 patterns whose exponent leaves room to scale (and whose fp32 thresholds stay normal in float32)
normal_bits = st.integers(0, 0xFFFF).filter(lambda b: 40 <= (b >> 7) & 0xFF <= 250)


def _pow2_room(*bits: int) -> tuple[int, int]:
    es = [(b >> 7) & 0xFF for b in bits]
    return 40 - min(es), 250 - max(es)


@covers("cor3.6")
@given(normal_bits, st.sampled_from([1, -1]), st.sampled_from(["exact", "fp32"]), st.integers(-250, 250))
@example(0x3F80, -1, "exact", 0)  # a power of two stepping down: ratio 2
@example(0x3F81, 1, "fp32", 100)  # double rounding
def test_cor36_invariant_under_scaling_and_reflection(b, sgn, sem, j):
    w = P.bf16_value(b)
    ref = P.check_cor36(w, sgn, sem)
    j = clamp(j, _pow2_room(b))
    got = P.check_cor36(math.ldexp(w, j), sgn, sem)
    assert (got.verdict, got.lhs, got.rhs) == (ref.verdict, math.ldexp(ref.lhs, j), math.ldexp(ref.rhs, j))
    mirror = P.check_cor36(-w, -sgn, sem)  # the step of -w towards -direction is the mirror image
    assert (mirror.verdict, mirror.lhs, mirror.rhs) == (ref.verdict, ref.lhs, ref.rhs)


@covers("lemE.1", "lemE.1-across", "propE.3")
@given(normal_bits, st.integers(-3, 3), st.integers(-250, 250), st.sampled_from([1e-3, 2.0**-10]))
@example(0x3F80, -1, 0, 1e-3)  # (1, its lower neighbour): the cross-binade counterexample
def test_pair_results_invariant_under_scaling_swap_and_negation(b, off, j, eta):
    b2 = b + off
    if not 40 <= (b2 >> 7) & 0xFF <= 250 or (b2 >> 15) != (b >> 15):
        b2 = b
    x, y = P.bf16_value(b), P.bf16_value(b2)
    j = clamp(j, _pow2_room(b, b2))
    for rid, f in (("lemE.1", P.check_lemE1), ("lemE.1-across", P.check_lemE1_across),
                   ("propE.3", lambda u, v: P.check_propE3(u, v, eta))):
        ref = f(x, y)
        for args in ((math.ldexp(x, j), math.ldexp(y, j)), (y, x), (-x, -y)):
            got = f(*args)
            assert got.verdict == ref.verdict and got.failed_assumption == ref.failed_assumption, (rid, args)


@covers("lemE.2")
@given(normal_bits, st.integers(-250, 250))
def test_lemE2_invariant_under_scaling_and_negation(b, j):
    x = P.bf16_value(b)
    ref = P.check_lemE2(x)
    for got in (P.check_lemE2(math.ldexp(x, clamp(j, _pow2_room(b)))), P.check_lemE2(-x)):
        assert (got.verdict, got.lhs, got.rhs) == (ref.verdict, ref.lhs, ref.rhs)


def test_every_registered_result_has_a_metamorphic_test():
    assert set(theory.RESULTS) <= COVERED, sorted(set(theory.RESULTS) - COVERED)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


@given(gate2, st.integers(-1000, 1000))
@example((0, 3, 3, 3, "generic", 0.3), 1000)
@example((1, 4, 2, 2, "generic", 0.3), -1000)
def test_spectral_metrics_scaling_is_bit_identical_and_geometry_invariant(inst, j):
    W0, W1 = gate2_pair(*inst)
    if not np.any(W0):
        return
    k = inst[3]
    j = clamp(j, exact_pow2_range(W0, W1))
    A, B = np.ldexp(W0, j), np.ldexp(W1, j)
    ref = M.nss(W0, W1)
    assert M.nss(A, B) == ref  # scale first, then compute: the same bits at 1e-300 and at 1e300
    rng = np.random.default_rng(inst[0])
    m, n = W0.shape
    U, V = orthogonal(rng, m), orthogonal(rng, n)
    s0 = np.linalg.svd(W0, compute_uv=False)
    err = 64 * max(m, n) * np.finfo(float).eps * max(s0[0], np.abs(W1).max() * math.sqrt(m * n)) / np.linalg.norm(s0)
    for X0, X1 in ((W0.T, W1.T), (U @ W0 @ V.T, U @ W1 @ V.T), (W0[::-1], W1[::-1])):
        assert abs(M.nss(X0, X1) - ref) <= err
    try:
        aU, aV = M.principal_angles_topk(W0, W1, k)
    except ZeroGapError:
        with pytest.raises(ZeroGapError):
            M.principal_angles_topk(A, B, k)  # the same decision at any scale
        return
    sU, sV = M.principal_angles_topk(A, B, k)
    assert np.array_equal(sU, aU) and np.array_equal(sV, aV)
    tU, tV = M.principal_angles_topk(W0.T, W1.T, k)  # transposing swaps the left and right subspaces
    assert np.allclose(tU, aV, atol=1e-6) or not np.isfinite(aV).all()
    assert np.allclose(tV, aU, atol=1e-6)


@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 4), st.floats(0, 1), st.integers(-1000, 1000),
       st.booleans())
@example(0, 2, 3, 0.5, 0, True)  # exact ties everywhere
def test_masks_scaling_invariant_and_equivariant_under_transpose_and_permutation(seed, m, n, alpha, j, ties):
    g = np.random.default_rng(seed)
    W = np.ones((m, n)) if ties else g.standard_normal((m, n))
    k = 1 if ties else int(g.integers(1, min(m, n) + 1))
    j = clamp(j, exact_pow2_range(W))
    try:
        ref = M.principal_mask(W, k, alpha)
    except ZeroGapError:
        return
    assert np.array_equal(M.principal_mask(np.ldexp(W, j), k, alpha), ref)
    assert np.array_equal(M.low_magnitude_mask(np.ldexp(W, j), alpha), M.low_magnitude_mask(W, alpha))
    if ties:  # exact ties (up to the reconstruction's rounding) are taken in row-major order
        count = M.selection_count(alpha, W.size)
        assert np.array_equal(ref.ravel(), np.arange(W.size) < count)
        return
    # without ties the rule is a pure ranking: transposition and permutation carry the mask along
    assert np.array_equal(M.low_magnitude_mask(W.T, alpha), M.low_magnitude_mask(W, alpha).T)
    perm = g.permutation(m)
    assert np.array_equal(M.low_magnitude_mask(W[perm], alpha), M.low_magnitude_mask(W, alpha)[perm])


@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(-100, 100), st.sampled_from([1e-3, 2.0**-8, 0.01]))
def test_bf16_metrics_invariant_under_scaling_permutation_and_swap(seed, size, j, eta):
    g = np.random.default_rng(seed)
    import ml_dtypes

    w0 = (g.standard_normal(size) * 2.0 ** g.integers(-20, 20, size)).astype(ml_dtypes.bfloat16)
    w1 = np.where(g.random(size) < 0.5, w0, (w0.astype(np.float64) * (1 + g.normal(0, 0.01, size))).astype(ml_dtypes.bfloat16))
    ref = M.bf16_sparsity(w0, w1, eta)
    j = clamp(j, (-80, 80))  # bf16 keeps its 8-bit exponent: these stay normal
    s0 = (w0.astype(np.float64) * 2.0**j).astype(ml_dtypes.bfloat16)
    s1 = (w1.astype(np.float64) * 2.0**j).astype(ml_dtypes.bfloat16)
    assert M.bf16_sparsity(s0, s1, eta) == ref
    perm = g.permutation(size)
    assert M.bf16_sparsity(w0[perm], w1[perm], eta) == ref and M.bf16_sparsity(w1, w0, eta) == ref
    mask = M.update_mask(w0, w1, eta)
    assert np.array_equal(M.update_mask(w0[perm], w1[perm], eta), mask[perm])
    other = g.random(size) < 0.5
    assert M.jaccard(mask[perm], other[perm]) == M.jaccard(mask, other) == M.jaccard(other, mask)
    if mask.any():
        assert M.overlap(other[perm], mask[perm]) == M.overlap(other, mask)
    stack = np.stack([mask, other, mask ^ other])
    order = g.permutation(3)
    assert np.array_equal(M.consensus(stack[order]), M.consensus(stack))
    J = M.jaccard_matrix(stack)
    assert np.array_equal(M.jaccard_matrix(stack[order]), J[np.ix_(order, order)])
