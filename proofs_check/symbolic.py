"""Symbolic (sympy) proofs of the algebra behind Gate I and the App. D interventions, for small sizes.

``CHECKS`` lists zero-argument functions, each returning a ``ProofResult`` (method="sympy") that says what was
proved, or carries the counterexample when a claim as written is false (then ``expected=False``). Each runs in
well under a few seconds; ``threegate prove`` runs them all.
"""

from __future__ import annotations

import itertools

import sympy as sp

from proofs_check.common import ProofResult

__all__ = ["CHECKS"]


def _softmax(z: list[sp.Expr]) -> list[sp.Expr]:
    e = [sp.exp(zi) for zi in z]
    s = sum(e)
    return [ei / s for ei in e]


def _is_zero(expr: sp.Expr) -> bool:
    return sp.simplify(expr) == 0


# ---------------------------------------------------------------------------------------------------------------
def check_softmax_fisher() -> ProofResult:
    """F(theta) = E_pi[grad log pi grad log pi^T] = diag(p) - p p^T = -hess log pi(y) for every y (n = 3)."""
    n = 3
    th = sp.symbols(f"theta0:{n}", real=True)
    p = _softmax(list(th))
    logp = [sp.log(pi) for pi in p]
    score = [[sp.diff(logp[y], th[j]) for j in range(n)] for y in range(n)]
    F = sp.zeros(n, n)
    for y in range(n):
        s = sp.Matrix(score[y])
        F += p[y] * (s * s.T)
    target = sp.diag(*p) - sp.Matrix(p) * sp.Matrix(p).T
    ok_outer = all(_is_zero(e) for e in (F - target))
    ok_hess = all(all(_is_zero(e) for e in (sp.hessian(logp[y], th) + target)) for y in range(n))
    ok_null = all(_is_zero(e) for e in (target * sp.ones(n, 1)))
    ok = ok_outer and ok_hess and ok_null
    return ProofResult(
        "softmax_fisher", "softmax Fisher = diag(p) - p p^T = -hess log pi(y) for all y, and F 1 = 0 (n = 3)", ok,
        "E[s s^T], -hess log pi(y) for each y and the null vector 1 all reduce to 0 by simplify" if ok
        else f"outer={ok_outer} hess={ok_hess} null={ok_null}",
    )


def check_kl_second_order() -> ProofResult:
    """KL(pi_{theta+t v} || pi_theta) = t^2/2 v^T F v + O(t^3) (n = 3, symbolic theta and v)."""
    n = 3
    th = sp.symbols(f"theta0:{n}", real=True)
    v = sp.symbols(f"v0:{n}", real=True)
    t = sp.Symbol("t", real=True)
    p = _softmax(list(th))
    pt = _softmax([th[i] + t * v[i] for i in range(n)])
    # KL(p_t || p) = sum_i p_t,i (t v_i - (lse(theta + t v) - lse(theta)))
    lse_shift = sp.log(sum(sp.exp(th[i] + t * v[i]) for i in range(n))) - sp.log(sum(sp.exp(th[i]) for i in range(n)))
    kl = sum(pt[i] * (t * v[i] - lse_shift) for i in range(n))
    # Taylor coefficients by differentiation at t = 0 (faster than sp.series); theta_i -> log w_i keeps it rational
    w = sp.symbols(f"w0:{n}", positive=True)
    to_w = {th[i]: sp.log(w[i]) for i in range(n)}
    c0 = kl.subs(t, 0)
    c1 = sp.diff(kl, t).subs(t, 0)
    c2 = sp.diff(kl, t, 2).subs(t, 0) / 2
    c0, c1, c2 = (sp.expand_log(sp.simplify(c.subs(to_w)), force=True) for c in (c0, c1, c2))
    p = [pi.subs(to_w) for pi in p]
    F = sp.diag(*p) - sp.Matrix(p) * sp.Matrix(p).T
    quad = (sp.Matrix(v).T * F * sp.Matrix(v))[0, 0]
    ok = _is_zero(c0) and _is_zero(c1) and _is_zero(c2 - quad / 2)
    return ProofResult(
        "kl_second_order", "KL(pi_{theta+tv} || pi_theta) = (t^2/2) v^T F v + O(t^3) (Lemma F.5, n = 3)", ok,
        "series coefficients: t^0 = 0, t^1 = 0, t^2 = v^T F v / 2" if ok else f"coefficients {c0}, {c1}, {c2}",
    )


def check_gibbs_tilt() -> ProofResult:
    """E_pi[R] - beta KL(pi||q) = beta log Z - beta KL(pi||q~) on the simplex (n = 3), so q~ is the unique maximiser;
    also stationarity of the Lagrangian at q~ and a negative-definite Hessian (strict concavity)."""
    beta = sp.Symbol("beta", positive=True)
    q = sp.symbols("q0:3", positive=True)
    R = sp.symbols("R0:3", real=True)
    a, b = sp.symbols("a b", positive=True)
    pi = [a, b, 1 - a - b]
    qq = [q[0], q[1], 1 - q[0] - q[1]]
    Z = sum(qq[i] * sp.exp(R[i] / beta) for i in range(3))
    qt = [qq[i] * sp.exp(R[i] / beta) / Z for i in range(3)]
    obj = sum(pi[i] * R[i] for i in range(3)) - beta * sum(pi[i] * sp.log(pi[i] / qq[i]) for i in range(3))
    rhs = beta * sp.log(Z) - beta * sum(pi[i] * sp.log(pi[i] / qt[i]) for i in range(3))
    ok_identity = _is_zero(sp.expand_log(obj - rhs, force=True))
    # stationarity: d obj / d(a, b) vanishes at (a, b) = (q~0, q~1); Hessian there = -beta * (diag(1/pi) + 1/pi2)
    # stationarity: d obj/da = R0 - R2 - beta log((a/q0) / (c/q2)) with c = 1 - a - b (and the same for b); at
    # (a, b) = (q~0, q~1) the ratio (a/q0)/(c/q2) must equal exp((R0 - R2)/beta)
    c = 1 - a - b
    ok_stat = True
    for s_, i in ((a, 0), (b, 1)):
        g = sp.diff(obj, s_)
        form = R[i] - R[2] - beta * sp.log((s_ / qq[i]) / (c / qq[2]))
        ok_stat &= _is_zero(sp.expand_log(g - form, force=True))
        ratio = ((s_ / qq[i]) / (c / qq[2])).subs({a: qt[0], b: qt[1]})
        ok_stat &= _is_zero(ratio - sp.exp((R[i] - R[2]) / beta))
    H = sp.hessian(obj, (a, b))
    H_expected = -beta * sp.Matrix([[1 / a + 1 / (1 - a - b), 1 / (1 - a - b)], [1 / (1 - a - b), 1 / b + 1 / (1 - a - b)]])
    ok_hess = all(_is_zero(e) for e in (H - H_expected))
    # H_expected = -beta (diag(1/a, 1/b) + 1 1^T / c) with a, b, c > 0: negative definite
    ok = ok_identity and ok_stat and ok_hess
    return ProofResult(
        "gibbs_tilt", "q~ ∝ q exp(R/beta) uniquely maximises E_pi[R] - beta KL(pi||q) (Lemma F.2, n = 3)", ok,
        "identity E[R] - beta KL(pi||q) = beta log Z - beta KL(pi||q~) holds; gradient vanishes at q~; Hessian = "
        "-beta (diag(1/pi_1, 1/pi_2) + 11^T/pi_3) is negative definite" if ok
        else f"identity={ok_identity} stationary={ok_stat} hessian={ok_hess}",
    )


def check_pythagorean_log_linear() -> ProofResult:
    """For pi_theta ∝ exp(theta phi): KL(q||pi_theta) - KL(q||pi_+) - KL(pi_+||pi_theta)
    = (theta+ - theta)(E_q[phi] - E_pi+[phi]) identically; so it is 0 under moment matching (n = 3, d = 1)."""
    th, tp = sp.symbols("theta theta_plus", real=True)
    phi = sp.symbols("phi0:3", real=True)
    q0, q1 = sp.symbols("q0 q1", positive=True)
    q = [q0, q1, 1 - q0 - q1]

    def logpi(t):
        lz = sp.log(sum(sp.exp(t * f) for f in phi))
        return [t * f - lz for f in phi]

    lp, lpp = logpi(th), logpi(tp)
    pp = [sp.exp(x) for x in lpp]
    kl_q_pi = sum(q[i] * (sp.log(q[i]) - lp[i]) for i in range(3))
    kl_q_pp = sum(q[i] * (sp.log(q[i]) - lpp[i]) for i in range(3))
    kl_pp_pi = sum(pp[i] * (lpp[i] - lp[i]) for i in range(3))
    moment_gap = sum(q[i] * phi[i] for i in range(3)) - sum(pp[i] * phi[i] for i in range(3))
    defect = kl_q_pi - kl_q_pp - kl_pp_pi - (tp - th) * moment_gap
    ok = _is_zero(sp.expand(sp.expand_log(defect, force=True)))
    return ProofResult(
        "pythagorean_log_linear",
        "log-linear: KL(q~||pi) = KL(q~||pi+) + KL(pi+||pi) when E_q~[phi] = E_pi+[phi] (Prop 3.1 note)", ok,
        "defect = (theta+ - theta)(E_q[phi] - E_pi+[phi]) identically, zero under moment matching" if ok
        else "identity did not reduce to 0",
    )


def check_pinsker_constant() -> ProofResult:
    """2 L TV <= L sqrt(2 KL) <=> TV <= sqrt(KL/2) <=> 2 TV^2 <= KL (L > 0), and the Bernoulli case of Pinsker:
    d/dq [KL(p||q) - 2 (p - q)^2] = (q - p)(1/(q(1-q)) - 4) with q(1-q) <= 1/4, so the difference is minimised (= 0)
    at q = p. (The general case follows from the Bernoulli one by the data-processing inequality.)"""
    L, T, K = sp.symbols("L T K", positive=True)
    eq1 = _is_zero((2 * L * T) ** 2 - (L * sp.sqrt(2 * K)) ** 2 - 4 * L**2 * (T**2 - K / 2))
    eq2 = _is_zero(sp.sqrt(K / 2) ** 2 * 2 - K)
    p, q = sp.symbols("p q", positive=True)
    f = p * sp.log(p / q) + (1 - p) * sp.log((1 - p) / (1 - q)) - 2 * (p - q) ** 2
    df = sp.diff(f, q)
    ok_deriv = _is_zero(df - (q - p) * (1 / (q * (1 - q)) - 4))
    ok_quarter = _is_zero(sp.Rational(1, 4) - q * (1 - q) - (q - sp.Rational(1, 2)) ** 2)
    ok_zero = _is_zero(f.subs(q, p))
    ok = eq1 and eq2 and ok_deriv and ok_quarter and ok_zero
    return ProofResult(
        "pinsker_constant", "2L TV <= L sqrt(2 KL) is Pinsker TV <= sqrt(KL/2) (Lemma F.6's constant)", ok,
        "equivalence by squaring (L > 0); Bernoulli Pinsker: f(p) = 0, f' = (q-p)(1/(q(1-q)) - 4), "
        "1/4 - q(1-q) = (q - 1/2)^2 >= 0" if ok else f"{eq1=} {eq2=} {ok_deriv=} {ok_quarter=} {ok_zero=}",
    )


def check_k3_estimator() -> ProofResult:
    """k3(r) = r - 1 - log r >= 0 for r > 0 (k3(1) = 0, k3' = 1 - 1/r, k3'' = 1/r^2 > 0), and
    k3 = (r-1)^2/2 - (r-1)^3/3 + O((r-1)^4): the O(eps^2) small-step quantity of Lemma F.9."""
    r = sp.Symbol("r", positive=True)
    k3 = r - 1 - sp.log(r)
    ok_min = _is_zero(k3.subs(r, 1)) and _is_zero(sp.diff(k3, r) - (1 - 1 / r)) and _is_zero(sp.diff(k3, r, 2) - 1 / r**2)
    x = sp.Symbol("x")
    ser = sp.series(k3.subs(r, 1 + x), x, 0, 4).removeO()
    ok_series = _is_zero(ser - (x**2 / 2 - x**3 / 3))
    eps = sp.Symbol("epsilon", positive=True)
    # under the band the per-token k3 is at most its value at the lower edge: k3(1-eps) - k3(1+eps) >= 0
    gap = sp.series(k3.subs(r, 1 - eps) - k3.subs(r, 1 + eps), eps, 0, 5).removeO()
    ok_edge = _is_zero(gap - 2 * eps**3 / 3)
    ok = ok_min and ok_series and ok_edge
    return ProofResult(
        "k3_estimator", "k3 = r - 1 - log r >= 0 with expansion (r-1)^2/2 + O((r-1)^3) (Lemma F.9)", ok,
        "k3(1) = 0, k3' = 1 - 1/r, k3'' = 1/r^2 > 0 (convex, minimum 0 at r = 1); series (r-1)^2/2 - (r-1)^3/3; "
        "k3(1-eps) - k3(1+eps) = 2 eps^3/3 + O(eps^5)" if ok else f"{ok_min=} {ok_series=} {ok_edge=}",
    )


# ---- App. D: grouped-query attention, Rotate and Permute ---------------------------------------------------------
def _gqa(X: sp.Matrix, Wq, Wk, Wv, Wo, bv, H_q: int, H_kv: int, D: int) -> sp.Matrix:
    """Causal GQA block in the x @ W convention: q = X Wq, k = X Wk, v = X Wv + bv, head h uses kv head
    h // (H_q / H_kv); out = concat_h(softmax(q_h k_g^T / sqrt(D)) v_g) @ Wo."""
    T = X.shape[0]
    n_rep = H_q // H_kv
    Q, K, V = X * Wq, X * Wk, X * Wv + sp.ones(T, 1) * bv
    heads = []
    for h in range(H_q):
        g = h // n_rep
        qh, kg, vg = Q[:, h * D:(h + 1) * D], K[:, g * D:(g + 1) * D], V[:, g * D:(g + 1) * D]
        S = qh * kg.T / sp.sqrt(D)
        A = sp.zeros(T, T)
        for t in range(T):
            w = [sp.exp(S[t, s]) for s in range(t + 1)]
            tot = sum(w)
            for s in range(t + 1):
                A[t, s] = w[s] / tot
        heads.append(A * vg)
    return sp.Matrix.hstack(*heads) * Wo


def _rational_matrix(rows: int, cols: int, seed: int) -> sp.Matrix:
    vals = [sp.Rational(((seed * 7919 + i * 104729) % 17) - 8, 5) for i in range(rows * cols)]
    return sp.Matrix(rows, cols, vals)


def check_gqa_rotate() -> ProofResult:
    """Rotate (Prop D.1) for D = 2, H_q = 2, H_kv = 1, T = 2, symbolic angle: W_v' = W_v R_kv, b_v' = b_v R_kv and
    W_o' = R_q^T W_o in the x @ W convention (equivalently, for nn.Linear weights (out, in): W_v' = R_kv^T W_v and
    W_o' = W_o R_q) leave the output unchanged exactly."""
    D, H_q, H_kv, T, d_model = 2, 2, 1, 2, 3
    a = sp.Symbol("alpha", real=True)
    R = sp.Matrix([[sp.cos(a), -sp.sin(a)], [sp.sin(a), sp.cos(a)]])
    R_kv = sp.diag(*([R] * H_kv))
    R_q = sp.diag(*([R] * H_q))
    X = _rational_matrix(T, d_model, 1)
    Wq, Wk = _rational_matrix(d_model, H_q * D, 2), _rational_matrix(d_model, H_kv * D, 3)
    Wv, Wo = _rational_matrix(d_model, H_kv * D, 4), _rational_matrix(H_q * D, d_model, 5)
    bv = _rational_matrix(1, H_kv * D, 6)
    base = _gqa(X, Wq, Wk, Wv, Wo, bv, H_q, H_kv, D)
    rot = _gqa(X, Wq, Wk, Wv * R_kv, R_q.T * Wo, bv * R_kv, H_q, H_kv, D)
    # cos/sin -> symbols c, s; each output difference is a polynomial in (c, s) with exp-atom coefficients: it must
    # vanish modulo the circle relation s^2 + c^2 - 1 (polynomial remainder, exact and fast)
    c, s = sp.symbols("c s", real=True)
    diff = (rot - base).subs({sp.cos(a): c, sp.sin(a): s})
    circle = sp.Poly(s**2 + c**2 - 1, s)
    rem = [sp.expand(sp.rem(sp.Poly(sp.expand(e), s), circle).as_expr()) for e in diff]
    ok = all(_is_zero(e) for e in rem)
    return ProofResult(
        "gqa_rotate", "Rotate: W_v' = W_v R_kv, b_v' = b_v R_kv, W_o' = R_q^T W_o leaves GQA attention unchanged "
        "(x @ W convention; D=2, H_q=2, H_kv=1, T=2, symbolic angle)", ok,
        "output difference simplifies to 0 for every angle" if ok else "nonzero difference",
        counterexample=None if ok else rem,
    )


def check_gqa_rotate_mixed_convention() -> ProofResult:
    """The restatement 'W_v' = W_v R_kv and W_o' = W_o R_q' read in ONE convention (x @ W, with d_model = H_q D so
    that W_o R_q is defined) is not function-preserving: W_o must be multiplied by R_q^T on the left. The two formulas
    are each right in a different weight layout (W_v' = W_v R_kv for x @ W, W_o' = W_o R_q for nn.Linear's
    (out, in)). Expected False: the counterexample is the output difference at alpha = pi/2."""
    D, H_q, H_kv, T = 2, 2, 1, 2
    d_model = H_q * D
    a = sp.pi / 2
    R = sp.Matrix([[sp.cos(a), -sp.sin(a)], [sp.sin(a), sp.cos(a)]])
    R_kv, R_q = sp.diag(*([R] * H_kv)), sp.diag(*([R] * H_q))
    X = _rational_matrix(T, d_model, 1)
    Wq, Wk = _rational_matrix(d_model, H_q * D, 2), _rational_matrix(d_model, H_kv * D, 3)
    Wv, Wo = _rational_matrix(d_model, H_kv * D, 4), _rational_matrix(H_q * D, d_model, 5)
    bv = _rational_matrix(1, H_kv * D, 6)
    base = _gqa(X, Wq, Wk, Wv, Wo, bv, H_q, H_kv, D)
    literal = _gqa(X, Wq, Wk, Wv * R_kv, Wo * R_q, bv * R_kv, H_q, H_kv, D)
    diff = (literal - base).applyfunc(sp.simplify)
    proved = all(e == 0 for e in diff)
    return ProofResult(
        "gqa_rotate_mixed_convention",
        "literal 'W_v' = W_v R_kv, W_o' = W_o R_q' in one (x @ W) convention preserves the output", proved,
        "the output changes; only W_o' = R_q^T W_o (x @ W) / W_o' = W_o R_q (nn.Linear layout) preserve it",
        counterexample=None if proved else {"alpha": "pi/2", "output_difference_row0": [sp.N(e, 6) for e in diff[0, :]]},
        expected=False,
    )


def check_gqa_permute() -> ProofResult:
    """Permute: a permutation sigma of kv heads, expanded to q-head groups, applied to the head columns of W_q, W_k,
    W_v (and b_v) and to the head rows of W_o leaves the block unchanged (D = 1, H_q = 4, H_kv = 2, T = 2; every
    permutation of the 2 kv heads and of the q heads within each group)."""
    D, H_q, H_kv, T, d_model = 1, 4, 2, 2, 2
    n_rep = H_q // H_kv
    X = _rational_matrix(T, d_model, 11)
    Wq, Wk = _rational_matrix(d_model, H_q * D, 12), _rational_matrix(d_model, H_kv * D, 13)
    Wv, Wo = _rational_matrix(d_model, H_kv * D, 14), _rational_matrix(H_q * D, d_model, 15)
    bv = _rational_matrix(1, H_kv * D, 16)
    base = _gqa(X, Wq, Wk, Wv, Wo, bv, H_q, H_kv, D)
    n_tried, bad = 0, None
    for sigma in itertools.permutations(range(H_kv)):
        for within in itertools.product(*[list(itertools.permutations(range(n_rep)))] * H_kv):
            q_order = [sigma[g] * n_rep + within[g][j] for g in range(H_kv) for j in range(n_rep)]
            cols_q = [h * D + i for h in q_order for i in range(D)]
            cols_kv = [g * D + i for g in sigma for i in range(D)]
            out = _gqa(X, Wq[:, cols_q], Wk[:, cols_kv], Wv[:, cols_kv], Wo[cols_q, :], bv[:, cols_kv], H_q, H_kv, D)
            n_tried += 1
            d = (out - base).applyfunc(sp.simplify)
            if any(e != 0 for e in d):
                bad = {"sigma": sigma, "within": within}
                break
        if bad:
            break
    ok = bad is None
    return ProofResult(
        "gqa_permute", "Permute kv heads (with grouped q heads) leaves GQA attention unchanged (H_q=4, H_kv=2)", ok,
        f"{n_tried} head permutations, output difference 0 for each" if ok else "output changed", counterexample=bad,
    )


CHECKS = [
    check_softmax_fisher,
    check_kl_second_order,
    check_gibbs_tilt,
    check_pythagorean_log_linear,
    check_pinsker_constant,
    check_k3_estimator,
    check_gqa_rotate,
    check_gqa_rotate_mixed_convention,
    check_gqa_permute,
]
