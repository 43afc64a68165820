"""An independent high-precision oracle: mpmath at 60 significant digits recomputes lhs and rhs of every Gate II result
(matrices up to 4 x 4) and of the Gate I results on tabular and log-linear policies, from the exact float64 inputs.

For every instance the suite's check must

1. never be wrong: "holds" only where the exact margin rhs - lhs >= 0, "violated" only where it is < 0, and a
   decided verdict only where the exact hypotheses hold;
2. have an error model that is true: |(rhs - lhs)_suite - (rhs - lhs)_exact| <= tol;
3. be decided wherever the exact margin exceeds twice the tolerance, and be "indeterminate" (not "holds") where
   the exact margin is 0 (an attained bound).

The ``@example`` pins are the classes of issue 11: near-zero and exactly zero gaps, matrices at 1e-300 and 1e300,
an exactly repeated singular value, W1 == W0, the attained swap, tiny KL budgets (Eq 7), a null-space step and a
1e-9 step (Lemma F.5), a tabular M-projection (equal sides).
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.instances import GATE2_KINDS, gate2_pair, loglinear_instance, tabular_instance
from theory.kl_leash import eq7, lemF5, lemF6, lemF9, prop31, prop32
from theory.policies import LogLinear, TabularSoftmax, m_project, tilt
from theory.spectral import GATE2_IDS, gate2_all

DPS = 60


def mpf(x) -> mp.mpf:
    return mp.mpf(float(x))  # float64 -> mpf is exact


def mat(A: np.ndarray) -> mp.matrix:
    A = np.atleast_2d(np.asarray(A, dtype=np.float64))
    return mp.matrix([[mpf(x) for x in row] for row in A])


def svd_desc(A: mp.matrix):
    """Thin SVD with singular values sorted descending: (U (m, r), S list, V (n, r))."""
    U, S, Vh = mp.svd_r(A)
    order = sorted(range(len(S)), key=lambda i: -S[i])
    r = len(S)
    Us = mp.matrix(A.rows, r)
    Vs = mp.matrix(A.cols, r)
    for j, i in enumerate(order):
        for a in range(A.rows):
            Us[a, j] = U[a, i]
        for b in range(A.cols):
            Vs[b, j] = Vh[i, b]
    return Us, [S[i] for i in order], Vs


def norm2(A: mp.matrix) -> mp.mpf:
    if A.rows == 0 or A.cols == 0:
        return mp.mpf(0)
    return max(mp.svd_r(A, compute_uv=False))


def cols(A: mp.matrix, k: int) -> mp.matrix:
    B = mp.matrix(A.rows, k)
    for i in range(A.rows):
        for j in range(k):
            B[i, j] = A[i, j]
    return B


def sin_theta(A: mp.matrix, B: mp.matrix) -> mp.mpf:
    return norm2(B - A * (A.T * B))


def verdict_exact(margin: mp.mpf) -> str:
    return "holds" if margin >= 0 else "violated"


def assert_oracle(c, lhs: mp.mpf | None, rhs: mp.mpf | None, hypotheses_hold: bool, where: str = "",
                  scale: mp.mpf | None = None) -> None:
    """The three properties of the module docstring for one check against the exact (lhs, rhs); ``scale``: the
    size of the quantities compared (mpmath's own rounding relative to it counts as an exact 0 margin)."""
    v = c.verdict
    if not hypotheses_hold or lhs is None:
        assert v in ("assumption-failed", "indeterminate"), (where, c)
        return
    m = rhs - lhs
    if abs(m) <= mp.mpf(10) ** (15 - DPS) * (scale if scale is not None else max(abs(lhs), abs(rhs))):
        m = mp.mpf(0)  # equal to mpmath's own rounding: an exact equality (e.g. sin Theta = 0 for W1 == W0)
    if v in ("holds", "violated"):
        assert v == verdict_exact(m), (where, c, float(m))  # 1. never wrong
    if v in ("holds", "violated", "indeterminate"):
        lhs_s, rhs_s, tol = mpf(c.lhs), mpf(c.rhs), mpf(c.tol)
        if "scale_exponent" in c.details:  # decided on inputs scaled by 2^-e: compare there (exact in mpmath)
            e = c.details["scale_exponent"]
            lhs_s, rhs_s, tol = mpf(c.details["lhs_scaled"]), mpf(c.details["rhs_scaled"]), mpf(c.details["tol_scaled"])
            m = mp.ldexp(m, -e)
        m_suite = rhs_s - lhs_s
        assert abs(m_suite - m) <= tol * (1 + mp.mpf(2) ** -40), (where, c, float(m), float(m_suite - m))  # 2.
        if abs(m) > 2 * tol:
            assert v == verdict_exact(m), (where, c, float(m))  # 3. decided where the margin is clear
        if m == 0 and tol > 0:
            assert v == "indeterminate", (where, c)  # an attained bound never reads "holds" (unless exact, tol 0)


# ---------------------------------------------------------------------------------------------------------------
# Gate II, matrices up to 4 x 4
# ---------------------------------------------------------------------------------------------------------------


def gate2_exact(W0: np.ndarray, W1: np.ndarray, k: int) -> dict[str, tuple]:
    """{id: (lhs, rhs, hypotheses_hold)} at DPS digits."""
    m, n = W0.shape
    r = min(m, n)
    A, B = mat(W0), mat(W1)
    D = B - A
    U0, S0, V0 = svd_desc(A)
    U1, S1, V1 = svd_desc(B)
    sd = sorted(mp.svd_r(D, compute_uv=False), reverse=True)
    dW2 = sd[0]
    dWF = mp.sqrt(sum(x**2 for x in sd))
    nxt0 = S0[k] if k < r else mp.mpf(0)
    gamma = S0[k - 1] - nxt0
    g1 = (S1[k - 1] - S1[k]) if k < r else (mp.inf if m == n else S1[k - 1])
    g0 = gamma if k < r else (mp.inf if m == n else S0[k - 1])
    determined = g0 > 0 and g1 > 0
    alpha = nxt0 if (k < r or m != n) else mp.mpf(0)
    delta = S1[k - 1] - alpha
    if determined:
        sU = sin_theta(cols(U0, k), cols(U1, k))
        sV = sin_theta(cols(V0, k), cols(V1, k))
        sin_k = max(sU, sV)
        R = norm2(D * cols(V1, k))
        S = norm2(D.T * cols(U1, k))
    else:
        sin_k = R = S = None
    out = {}
    out["thm3.3"] = (sin_k, dW2 / gamma if gamma > 0 else None, determined and gamma > 0)
    out["thm3.3-wedin"] = (sin_k, max(R, S) / delta if (determined and delta > 0) else None, determined and delta > 0)
    ok_rig = determined and gamma > 0 and dW2 < gamma
    out["thm3.3-rigorous"] = (sin_k, dW2 / (gamma - dW2) if ok_rig else None, ok_rig)
    out["corF.13"] = (sin_k, dW2 / delta if (determined and delta > 0) else None, determined and delta > 0)
    diffs = [abs(a - b) for a, b in zip(S1, S0)]
    out["cor3.4-weyl"] = (max(diffs), dW2, True)
    out["cor3.4-mirsky"] = (mp.sqrt(sum(x**2 for x in diffs)), dWF, True)
    out["cor3.5"] = (abs(sum(S1[:k]) - sum(S0[:k])), k * dW2, True)
    return out


gate2_small = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4),
    st.sampled_from(GATE2_KINDS), st.sampled_from([1e-9, 1e-3, 0.3, 0.5, 0.6, 1.0, 2.0]), st.sampled_from([0, -996, 990]),
).map(lambda t: (t[0], t[1], t[2], min(t[3], t[1], t[2]), t[4], t[5], t[6]))


@given(gate2_small)
@example((0, 2, 2, 1, "swap", 0.6, 0))  # Thm 3.3 as stated violated, Wedin attained
@example((1, 3, 3, 1, "repeated_at_k", 0.3, 0))  # gamma_k = 0 exactly: every form fails the assumption
@example((2, 4, 4, 2, "identical", 0.3, 0))  # W1 == W0: 0 <= 0 decided exactly
@example((3, 3, 2, 2, "rank_deficient", 1e-3, 0))  # k = min(m, n), rank deficient: the left subspace is not unique
@example((4, 4, 3, 2, "clustered", 1e-9, -996))  # near-zero gap at 1e-300
@example((5, 2, 4, 2, "gap_at_k", 0.3, 990))  # 1e298: W1 - W0 would overflow without the power-of-two scaling
@example((6, 4, 4, 3, "swap", 0.5, 0))  # ratio exactly 1/2: the swap's two singular values tie in W1
@example((7, 3, 4, 3, "repeated_at_k", 1.0, 0))  # k = r with sigma_r = 0
def test_gate2_verdicts_agree_with_mpmath(inst):
    *args, j = inst
    W0, W1 = gate2_pair(*args)
    W0, W1 = np.ldexp(W0, j), np.ldexp(W1, j)
    k = args[3]
    with mp.workdps(DPS):
        exact = gate2_exact(W0, W1, k)
        got = gate2_all(W0, W1, k)
        size = max(abs(mat(W0)[i, j]) for i in range(W0.shape[0]) for j in range(W0.shape[1])) + \
            max(abs(mat(W1)[i, j]) for i in range(W1.shape[0]) for j in range(W1.shape[1]))
        for rid in GATE2_IDS:
            lhs, rhs, hyp = exact[rid]  # mpmath works in the inputs' units, like the reported lhs / rhs
            degree_one = rid in ("cor3.4-weyl", "cor3.4-mirsky", "cor3.5")
            assert_oracle(got[rid], lhs, rhs, hyp, rid, scale=size if degree_one else mp.mpf(1))


def test_a_near_zero_gap_never_gives_an_infinite_tolerance_or_holds_wrongly():
    """The issue's first class: a gap just above 0 made the as-stated tolerance inf and a violation read "holds"."""
    W0 = np.diag([1.0, 1.0 - 2.0**-50, 0.25])
    W1 = W0.copy()
    W1[0, 1] = W1[1, 0] = 2.0**-40  # rotates the top pair by ~45 degrees; ||dW|| / gamma = 1024
    checks = gate2_all(W0, W1, 1)
    for rid, c in checks.items():
        assert math.isfinite(c.tol) and c.tol >= 0
    with mp.workdps(DPS):
        exact = gate2_exact(W0, W1, 1)
    for rid in GATE2_IDS:
        assert_oracle(checks[rid], *exact[rid], rid)
    assert checks["thm3.3"].verdict != "holds" or exact["thm3.3"][1] >= exact["thm3.3"][0]


# ---------------------------------------------------------------------------------------------------------------
# Gate I, tabular and log-linear policies
# ---------------------------------------------------------------------------------------------------------------


def mp_softmax_rows(Z):
    out = []
    for row in Z:
        mx = max(row)
        e = [mp.exp(z - mx) for z in row]
        s = sum(e)
        out.append([x / s for x in e])
    return out


def mp_logits(pol, theta):
    th = [mpf(t) for t in theta]
    if isinstance(pol, TabularSoftmax):
        X, Y = pol.shape
        return [[th[x * Y + y] for y in range(Y)] for x in range(X)]
    Phi = pol.Phi
    return [[sum(mpf(Phi[x, y, d]) * th[d] for d in range(Phi.shape[2])) for y in range(Phi.shape[1])]
            for x in range(Phi.shape[0])]


def mp_jacobian(pol):
    X, Y = pol.shape
    if isinstance(pol, TabularSoftmax):
        return [[[mp.mpf(1) if d == x * Y + y else mp.mpf(0) for d in range(pol.n_params)] for y in range(Y)]
                for x in range(X)]
    return [[[mpf(pol.Phi[x, y, d]) for d in range(pol.n_params)] for y in range(Y)] for x in range(X)]


def mp_kl(pol, za, zb):
    """E_rho KL(softmax(za) || softmax(zb)) from exact logits."""
    pa, pb = mp_softmax_rows(za), mp_softmax_rows(zb)
    return sum(mpf(pol.rho[x]) * sum(a * (mp.log(a) - mp.log(b)) for a, b in zip(pa[x], pb[x]))
               for x in range(len(pa)))


def mp_fisher(pol, theta) -> mp.matrix:
    p = mp_softmax_rows(mp_logits(pol, theta))
    J = mp_jacobian(pol)
    d = pol.n_params
    F = mp.matrix(d, d)
    for x, row in enumerate(p):
        mean = [sum(row[y] * J[x][y][i] for y in range(len(row))) for i in range(d)]
        for y, py in enumerate(row):
            c = [J[x][y][i] - mean[i] for i in range(d)]
            for i in range(d):
                for jj in range(d):
                    F[i, jj] += mpf(pol.rho[x]) * py * c[i] * c[jj]
    return F


def lemF5_exact(pol, theta, delta):
    th_plus = [mpf(a) + mpf(b) for a, b in zip(theta, delta)]
    z0 = mp_logits(pol, theta)
    z1 = mp_logits(pol, [0.0] * pol.n_params) if False else None
    # logits at theta + D exactly (mp arithmetic on the exact sum)
    if isinstance(pol, TabularSoftmax):
        X, Y = pol.shape
        z1 = [[th_plus[x * Y + y] for y in range(Y)] for x in range(X)]
    else:
        Phi = pol.Phi
        z1 = [[sum(mpf(Phi[x, y, d]) * th_plus[d] for d in range(Phi.shape[2])) for y in range(Phi.shape[1])]
              for x in range(Phi.shape[0])]
    kl = mp_kl(pol, z1, z0)
    D = mat(np.asarray(delta)[:, None])
    quad = (D.T * mp_fisher(pol, theta) * D)[0, 0] / 2
    rng = sum(mpf(pol.rho[x]) * (max(a - b for a, b in zip(z1[x], z0[x])) - min(a - b for a, b in zip(z1[x], z0[x])))**3
              for x in range(len(z0))) / 12
    return abs(kl - quad), rng  # linear classes: u = J D exactly, the curvature term is 0


policy_kind = st.sampled_from(["tabular", "loglinear"])


def small_policy(seed: int, kind: str):
    if kind == "tabular":
        th, R, v = tabular_instance(seed, 3, 2)
        return TabularSoftmax(3, n_contexts=2), th, R, v
    Phi, th, R, v = loglinear_instance(seed, 2, 3, 2)
    return LogLinear(Phi), th, R, v


@given(st.integers(0, 2**32 - 1), policy_kind, st.sampled_from([1e-9, 1e-5, 1e-2, 0.3, 1.0, 2.0]), st.booleans())
@example(0, "tabular", 1e-9, False)  # a 1e-9 step: the KL's cancellation error (relative eps / ||D||) decides
@example(1, "tabular", 0.3, True)  # a null-space step D = c 1: KL = 0 and quad = 0 exactly, 0 <= 0
@example(2, "loglinear", 1e-9, False)
def test_lemF5_agrees_with_mpmath(seed, kind, s, null_step):
    pol, th, _, v = small_policy(seed, kind)
    D = s * (np.ones(pol.n_params) if (null_step and kind == "tabular") else v)
    c = lemF5(pol, th, D)
    assert math.isfinite(c.tol) and c.tol >= 0
    with mp.workdps(DPS):
        lhs, rhs = lemF5_exact(pol, th, D)
        assert_oracle(c, lhs, rhs, True, "lemF.5")


def mp_tilt(pol, theta, R, beta):
    z = mp_logits(pol, theta)
    return mp_softmax_rows([[zz + mpf(r) / mpf(beta) for zz, r in zip(z[x], R[x])] for x in range(len(z))])


def mp_mproject_loglinear(pol, q, theta0):
    """Newton in mpmath from the suite's theta+: moments E_rho E_q[Phi] = E_rho E_pi[Phi]."""
    th = [mpf(t) for t in theta0]
    d = pol.n_params
    for _ in range(8):
        z = [[sum(mpf(pol.Phi[x, y, i]) * th[i] for i in range(d)) for y in range(pol.n_outputs)]
             for x in range(pol.n_contexts)]
        p = mp_softmax_rows(z)
        g = mp.matrix(d, 1)
        for x in range(pol.n_contexts):
            for y in range(pol.n_outputs):
                for i in range(d):
                    g[i] += mpf(pol.rho[x]) * (p[x][y] - q[x][y]) * mpf(pol.Phi[x, y, i])
        th_mp = th
        F = mp_fisher_at(pol, th_mp)
        step = mp.lu_solve(F, g)
        th = [th[i] - step[i] for i in range(d)]
    return th


def mp_fisher_at(pol, th):
    d = pol.n_params
    z = [[sum(mpf(pol.Phi[x, y, i]) * th[i] for i in range(d)) for y in range(pol.n_outputs)]
         for x in range(pol.n_contexts)]
    p = mp_softmax_rows(z)
    F = mp.matrix(d, d)
    for x in range(pol.n_contexts):
        mean = [sum(p[x][y] * mpf(pol.Phi[x, y, i]) for y in range(pol.n_outputs)) for i in range(d)]
        for y in range(pol.n_outputs):
            c = [mpf(pol.Phi[x, y, i]) - mean[i] for i in range(d)]
            for i in range(d):
                for jj in range(d):
                    F[i, jj] += mpf(pol.rho[x]) * p[x][y] * c[i] * c[jj]
    return F


@given(st.integers(0, 2**32 - 1), policy_kind, st.sampled_from([0.5, 3.0, 30.0, 1e3]))
@example(0, "tabular", 0.5)  # pi+ = q~ exactly: equal sides, indeterminate
@example(1, "loglinear", 30.0)
def test_prop31_agrees_with_mpmath(seed, kind, beta):
    pol, th, R, _ = small_policy(seed, kind)
    c = prop31(pol, th, R, beta)
    with mp.workdps(DPS):
        q = mp_tilt(pol, th, R, beta)
        z0 = mp_logits(pol, th)
        rhs = sum(mpf(pol.rho[x]) * sum(a * (mp.log(a) - mp.log(b)) for a, b in zip(q[x], mp_softmax_rows(z0)[x]))
                  for x in range(len(q)))
        if kind == "tabular":
            lhs = rhs  # the tabular class reaches q~ exactly
        else:
            tp = mp_mproject_loglinear(pol, q, m_project(pol, th, tilt(pol.probs(th), R, beta)).theta_plus)
            zp = [[sum(mpf(pol.Phi[x, y, i]) * tp[i] for i in range(pol.n_params)) for y in range(pol.n_outputs)]
                  for x in range(pol.n_contexts)]
            lhs = mp_kl(pol, zp, z0)
        assert_oracle(c, lhs, rhs, True, "prop3.1")


def psd_range(F: mp.matrix, tol: mp.mpf):
    E, Q = mp.eigsy(F)
    keep = [i for i in range(len(E)) if E[i] > tol]
    return E, Q, keep


@given(st.integers(0, 2**32 - 1), policy_kind, st.sampled_from([1.0, 10.0, 1e3]))
@example(0, "tabular", 1e3)
def test_prop32_policy_form_agrees_with_mpmath(seed, kind, beta):
    pol, th, R, _ = small_policy(seed, kind)
    tp = m_project(pol, th, tilt(pol.probs(th), R, beta)).theta_plus
    c = prop32(pol, th, tp)
    with mp.workdps(DPS):
        K = mp_kl(pol, mp_logits(pol, tp), mp_logits(pol, th))
        F = mp_fisher(pol, th)
        E, Q, keep = psd_range(F, mp.mpf(10) ** (-DPS // 2))
        D = [mpf(a) - mpf(b) for a, b in zip(tp, th)]
        proj = [sum(Q[i, j] * sum(Q[l, j] * D[l] for l in range(len(D))) for j in keep) for i in range(len(D))]
        lhs = mp.sqrt(sum(x**2 for x in proj))
        rhs = mp.sqrt(2 * K / min(E[i] for i in keep))
        assert_oracle(c, lhs, rhs, True, "prop3.2")


def eq7_exact(Fm: mp.matrix, D: np.ndarray, block: np.ndarray):
    """Eq 7 on the exact Fisher (true null directions are exact zeros, ~1e-60 in mpmath)."""
    n = Fm.rows
    rest = [i for i in range(n) if i not in set(block.tolist())]
    x = mp.matrix([mpf(D[i]) for i in block])
    Fww = mp.matrix([[Fm[i, j] for j in block] for i in block])
    if rest:
        Fwr = mp.matrix([[Fm[i, j] for j in rest] for i in block])
        Frr = mp.matrix([[Fm[i, j] for j in rest] for i in rest])
        E, Q, keep = psd_range(Frr, mp.mpf(10) ** (-DPS // 2))
        pinv = mp.matrix(len(rest), len(rest))
        for t in keep:
            for i in range(len(rest)):
                for j in range(len(rest)):
                    pinv[i, j] += Q[i, t] * Q[j, t] / E[t]
        S = Fww - Fwr * pinv * Fwr.T
    else:
        S = Fww
    E, Q, keep = psd_range(S, mp.mpf(10) ** (-DPS // 2))
    if not keep:
        return None, None
    proj = [sum(Q[i, j] * sum(Q[l, j] * x[l] for l in range(len(x))) for j in keep) for i in range(len(x))]
    lhs = mp.sqrt(sum(v**2 for v in proj))
    dW = (x.T * S * x)[0, 0] / 2
    return lhs, mp.sqrt(2 * dW / min(E[i] for i in keep))


@given(st.integers(0, 2**32 - 1), policy_kind, st.sampled_from([1e-150, 1e-6, 1.0]), st.integers(0, 2))
@example(0, "tabular", 1e-150, 0)  # a tiny step: delta_W ~ 1e-300 (the old tolerance divided by max(rhs, 1e-300))
@example(1, "loglinear", 1.0, 1)
@example(8334, "loglinear", 1e-150, 0)  # found by the thorough search: F's own rounding (A^T A - B^T B cancels)
def test_eq7_agrees_with_mpmath(seed, kind, s, which):
    """The instance is the policy: F is computed (with its error bound, ``Policy.fisher_with_error``), the oracle
    uses the exact Fisher, whose null directions are exact zeros."""
    pol, th, _, v = small_policy(seed, kind)
    F, F_err = pol.fisher_with_error(th)
    D = s * v
    blocks = [np.arange(min(2, pol.n_params)), np.arange(pol.n_params), np.array([pol.n_params - 1])]
    block = blocks[which]
    c = eq7(F, D, block, F_err=F_err)
    with mp.workdps(DPS):
        lhs, rhs = eq7_exact(mp_fisher(pol, th), D, block)
        assert_oracle(c, lhs, rhs, lhs is not None, "eq7")


@given(st.integers(0, 2**32 - 1), policy_kind, st.sampled_from([0.2, 1.0, 10.0, 1e6]))
@example(0, "loglinear", 1e6)  # a tiny tilt: KL(q~ || pi) ~ 1e-13 carries relative error ~ eps / sqrt(KL)
def test_lemF6_agrees_with_mpmath(seed, kind, beta):
    """Linear classes: H_q~ = F exactly, so lhs = 0; rhs = L sqrt(2 KL(q~ || pi)), L = max_x ||F_x||."""
    pol, th, R, _ = small_policy(seed, kind)
    c = lemF6(pol, th, R=R, beta=beta)
    with mp.workdps(DPS):
        q = mp_tilt(pol, th, R, beta)
        p = mp_softmax_rows(mp_logits(pol, th))
        kl = sum(mpf(pol.rho[x]) * sum(a * (mp.log(a) - mp.log(b)) for a, b in zip(q[x], p[x])) for x in range(len(q)))
        J = mp_jacobian(pol)
        L = mp.mpf(0)
        for x in range(len(p)):
            d = pol.n_params
            Fx = mp.matrix(d, d)
            mean = [sum(p[x][y] * J[x][y][i] for y in range(len(p[x]))) for i in range(d)]
            for y in range(len(p[x])):
                cc = [J[x][y][i] - mean[i] for i in range(d)]
                for i in range(d):
                    for jj in range(d):
                        Fx[i, jj] += p[x][y] * cc[i] * cc[jj]
            L = max(L, max(abs(e) for e in mp.eigsy(Fx)[0]))
        assert_oracle(c, mp.mpf(0), L * mp.sqrt(2 * kl), True, "lemF.6")


@given(st.integers(0, 2**32 - 1), st.floats(0.01, 0.5), st.booleans())
@example(0, 0.2, True)  # every ratio at the band edge: lhs = rhs exactly
def test_lemF9_agrees_with_mpmath(seed, eps, edge):
    g = np.random.default_rng(seed)
    seqs = [(np.full(n, 1 - eps) if edge else g.uniform(1 - eps, 1 + eps, n)) for n in g.integers(1, 8, 3)]
    c = lemF9(seqs, eps)
    with mp.workdps(DPS):
        k1 = sum(sum(-mp.log(mpf(r)) for r in s) for s in seqs) / len(seqs)
        T = mp.mpf(sum(s.size for s in seqs)) / len(seqs)
        rhs = T * max(-mp.log(1 - mpf(eps)), mp.log(1 + mpf(eps)))
        assert_oracle(c, abs(k1), rhs, True, "lemF.9")


@pytest.mark.slow
@given(gate2_small)
def test_gate2_agrees_with_mpmath_thorough(inst):  # pragma: no cover - the slow tier's larger search
    test_gate2_verdicts_agree_with_mpmath.hypothesis.inner_test(inst)
