"""Tests for theory.kl_leash: Gate I checks on the three policy classes, exact cases exactly, counterexamples to the
paper's loose statements, and one tightness test per bound."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import theory
from theory.errors import InputError, NonFiniteError, ShapeMismatchError, ZeroGapError
from theory.kl_leash import (
    beta_sweep,
    campaign_policies,
    count_band_violations,
    eq7,
    eq7_policy,
    fisher_norm,
    kl_budget_radius,
    kl_estimates,
    lemF5,
    lemF5_scaling,
    lemF6,
    lemF9,
    prop31,
    prop32,
    prop32_from_fisher,
    range_split,
    schur_complement,
    schur_complement_with_tol,
)
from theory.policies import LogLinear, MLPPolicy, TabularSoftmax, m_project, tilt

EPS = np.finfo(np.float64).eps
IDS = ("prop3.1", "lemF.5", "lemF.6", "lemF.9", "prop3.2", "eq7")


@pytest.fixture(scope="module")
def small_mlp():
    """Curved MLP class: 5 contexts, hidden 2 (logit rank <= 3 < 5), 12 outputs, d = 48."""
    pol = MLPPolicy(5, 2, 12, activation="tanh")
    return pol, pol.init_theta(11)


def _first_order_ratio(pol, th, R):
    """lim_{beta -> inf} KL(pi+||pi) / KL(q~||pi) = g^T F^+ g / E_rho Var_pi(R), g = grad E[R] (natural-gradient
    share of the tilt): the first-order prediction the measured Prop 3.1 factor must converge to."""
    p = pol.probs(th)
    Rc = R - (p * R).sum(1, keepdims=True)
    g = np.einsum("x,xy,xy,xyd->d", pol.rho, p, Rc, pol.logit_jacobian(th))
    F = pol.fisher(th)
    lam, U = np.linalg.eigh(F)
    keep = lam > lam.max() * 1e-10
    return float((U[:, keep].T @ g) ** 2 @ (1 / lam[keep]) / (pol.rho @ (p * Rc**2).sum(1)))


# ---- registry --------------------------------------------------------------------------------------------------
def test_all_gate1_ids_registered_with_campaigns():
    for rid in IDS:
        r = theory.RESULTS[rid]
        home = "theory.kl_anchor" if rid in ("prop3.1", "lemF.5", "lemF.6", "lemF.9") else "theory.fisher_bounds"
        assert r.gate == "I" and r.campaign is not None and r.module == home
    assert not theory.RESULTS["prop3.1"].exact and not theory.RESULTS["prop3.2"].exact
    assert all(theory.RESULTS[r].exact for r in ("lemF.5", "lemF.6", "lemF.9", "eq7"))


@pytest.mark.parametrize("rid", IDS)
def test_every_campaign_never_violates_an_exact_result(rid):
    for seed in (0, 1):
        checks = list(theory.RESULTS[rid].campaign(seed))
        assert checks and any(c.verdict == "holds" for c in checks)
        for c in checks:
            assert c.verdict != "violated" or not theory.RESULTS[rid].exact, (rid, seed, c)
            assert math.isfinite(c.tol) and c.tol >= 0, (rid, seed, c)


# ---- Prop 3.1 --------------------------------------------------------------------------------------------------
@given(st.integers(0, 2**32 - 1), st.floats(0.05, 1e4))
@example(0, 1e4)
@example(1, 0.05)
def test_prop31_tabular_both_sides_equal(seed, beta):
    g = np.random.default_rng(seed)
    pol = TabularSoftmax(7, n_contexts=2)
    th, R = g.standard_normal(14), g.uniform(-1, 1, (2, 7))
    c = prop31(pol, th, R, beta)
    # pi+ = q~ exactly: the sides are equal, so the error model cannot separate them -- indeterminate, never
    # "holds" -- and the computed sides agree within the tolerance (the error model is not too tight)
    assert c.verdict == "indeterminate" and abs(c.lhs - c.rhs) <= c.tol
    # pi+ = q~ up to rounding in the logits (|log q~| <= |theta| + |R|/beta + log Y): the tolerance is of that
    # order, eps * scale * sqrt(2 KL) (a KL from log-probability differences), times the size d of the sums
    scale = 1 + np.abs(th).max() + 2 / beta + math.log(7)
    assert c.tol <= 2 * pol.n_params * 64 * EPS * scale * (math.sqrt(2 * c.rhs) + c.rhs)


@given(st.integers(0, 2**32 - 1), st.floats(0.1, 1e3))
@example(0, 1e3)
def test_prop31_log_linear_pythagorean_identity(seed, beta):
    """KL(q~||pi) = KL(q~||pi+) + KL(pi+||pi) exactly (to float64 eps x size): constant 1 at every beta."""
    g = np.random.default_rng(seed)
    pol = LogLinear(g.standard_normal((2, 9, 3)))
    th, R = g.standard_normal(3), g.uniform(-1, 1, (2, 9))
    c = prop31(pol, th, R, beta)
    assert c.holds and c.lhs <= c.rhs
    size = pol.n_outputs * pol.n_params
    # rounding of each KL ~ eps * |log-ratio| * sqrt(2 KL) (Cauchy-Schwarz), times the size of the sums
    assert abs(c.details["pythagorean_defect"]) <= 64 * EPS * size * (1 + np.abs(th).max()) * math.sqrt(2 * c.rhs)


def test_prop31_mlp_factor_converges_to_first_order_prediction(small_mlp):
    """On the curved MLP class the factor does not tend to 1: it tends to the natural-gradient share c < 1 of the
    tilt, and the correction is O(1/beta) = O(sqrt(KL(q~||pi))) — the measured o(1)."""
    pol, th = small_mlp
    R = np.random.default_rng(4).uniform(-1, 1, pol.shape)
    c_pred = _first_order_ratio(pol, th, R)
    df = beta_sweep(pol, th, R, [1e4, 1e3, 1e2])
    assert df["converged"].all()
    err = (df["ratio_31"] - c_pred).abs().to_numpy()
    assert err[0] < 1e-3 * c_pred and err[0] < err[1] < err[2]
    # O(1/beta): successive errors shrink by ~10x per decade of beta
    assert 5 < err[2] / err[1] < 20 and 0 < c_pred < 1
    # the curved class breaks the Pythagorean identity, but only at third order: defect / KL(q~||pi) = O(1/beta)
    rel = (df["pythagorean_defect"].abs() / df["kl_qtilde_pi"]).to_numpy()
    assert rel[1] > 0 and 5 < rel[2] / rel[1] < 20


@pytest.mark.parametrize("n_outputs", [20, pytest.param(200, marks=pytest.mark.slow)])
def test_prop31_mlp_with_hidden_at_least_contexts_is_the_tabular_equality(n_outputs):
    """3 contexts, hidden 8: the net reaches every nearby policy (logit table rank <= 9 >= 3), so pi+ = q~ and the
    factor is exactly 1 up to the optimizer: such an MLP cannot show Prop 3.1's o(1)."""
    pol = MLPPolicy(3, 8, n_outputs, activation="gelu")
    th = pol.init_theta(0)
    R = np.random.default_rng(0).uniform(-1, 1, pol.shape)
    for beta in (10.0, 1.0):
        c = prop31(pol, th, R, beta)
        # equal sides: indeterminate within tol, never "holds" (nor violated)
        assert c.verdict == "indeterminate" and c.ratio == pytest.approx(1.0, abs=1e-9) and abs(c.lhs - c.rhs) <= c.tol
        assert c.details["kl_qtilde_plus"] <= 1e-18


def test_prop31_constant_one_fails_on_curved_class_at_finite_beta():
    """Counterexample (found by a seeded search over small MLPs): at beta = 1 (KL(q~||pi) = 0.145, not small) the
    converged M-projection moves the policy *further* than the tilt, KL(pi+||pi) = 1.05 KL(q~||pi). Only the
    (1 + o(1)) form of Prop 3.1 survives on nonlinear classes; tabular and log-linear classes never do this."""
    pol = MLPPolicy(5, 2, 12, activation="tanh")
    th = pol.init_theta(7, scale=2.0)
    R = np.random.default_rng(7).uniform(-1, 1, pol.shape)
    c = prop31(pol, th, R, 1.0)
    assert c.assumptions_hold and c.details["residual"] < 1e-11
    assert c.verdict == "violated" and 1.04 < c.ratio < 1.07
    q = tilt(pol.probs(th), R, 1.0)
    tp = m_project(pol, th, q).theta_plus
    G = pol.kl_from(q, tp)
    for k in range(4):  # a genuine local minimiser of KL(q~ || pi_theta')
        v = np.random.default_rng(k).standard_normal(pol.n_params)
        assert pol.kl_from(q, tp + 1e-4 * v / np.linalg.norm(v)) >= G - 1e-14


def test_prop31_log_linear_factor_converges_to_same_prediction(rng):
    pol = LogLinear(rng.standard_normal((3, 10, 4)))
    th, R = rng.standard_normal(4), rng.uniform(-1, 1, (3, 10))
    df = beta_sweep(pol, th, R, [1e5])
    assert df["ratio_31"][0] == pytest.approx(_first_order_ratio(pol, th, R), rel=1e-4)


def test_prop31_assumptions():
    pol = TabularSoftmax(3)
    th = np.zeros(3)
    assert prop31(pol, th, q_tilde=np.array([[0.5, 0.5, 0.0]])).failed_assumption.startswith("q~ has full support")
    assert prop31(pol, th, np.zeros((1, 3)), -1.0).failed_assumption.startswith("beta > 0")
    with pytest.raises(InputError):
        prop31(pol, th)


def test_beta_sweep_table(small_mlp):
    pol = TabularSoftmax(5)
    th = np.linspace(-1, 1, 5)
    df = beta_sweep(pol, th, np.arange(5.0)[None], [10.0, 1.0])
    assert isinstance(df, pd.DataFrame) and list(df["beta"]) == [10.0, 1.0]
    for col in ("kl_qtilde_pi", "kl_step", "ratio_31", "delta_norm", "radius", "ratio_32", "residual"):
        assert col in df
    assert np.allclose(df["ratio_31"], 1.0, rtol=0, atol=1e-12)
    assert (df["kl_qtilde_pi"].diff().dropna() > 0).all()  # smaller beta, larger tilt


# ---- Lemma F.5 -------------------------------------------------------------------------------------------------
@given(st.integers(0, 2**32 - 1), st.floats(1e-4, 2.0))
@example(0, 2.0)
@example(0, 0.015625)  # found by hypothesis: curvature term is rounding of z(theta + D) - z(theta), not 0
def test_lemF5_remainder_bound_holds_for_all_classes(seed, scale):
    g = np.random.default_rng(seed)
    for pol, th, _ in campaign_policies(seed % 7, mlp_outputs=10):
        v = g.standard_normal(pol.n_params)
        c = lemF5(pol, th, scale * v / np.linalg.norm(v))
        assert c.holds, c
        if pol.linear_in_theta:  # u = J D exactly: the curvature term vanishes (to rounding of z(theta + D) - z)
            zmax = 1 + np.abs(pol.logits(th)).max()
            assert c.details["curvature_term"] <= 64 * EPS * zmax * math.sqrt(c.details["quad"])


def test_lemF5_is_cubic_and_bound_has_the_right_order(small_mlp):
    """|KL - quad| / ||D||^3 converges (O(||D||^3)) and lhs/rhs stays bounded away from 0 (the bound's order is
    tight, not just valid)."""
    pol, th = small_mlp
    v = np.random.default_rng(2).standard_normal(pol.n_params)
    df = lemF5_scaling(pol, th, v / np.linalg.norm(v), [1e-2, 1e-3, 1e-4])
    assert df["holds"].all()
    r = df["cubic_ratio"].to_numpy()  # converges linearly in the scale (next term is O(||D||^4))
    assert abs(r[2] - r[1]) < 0.02 * r[1] and abs(r[2] - r[1]) < abs(r[1] - r[0]) / 3
    tight = (df["abs_remainder"] / df["bound"]).to_numpy()
    assert tight.min() > 1e-3 and abs(tight[2] - tight[1]) < 0.02 * tight[1]


def test_lemF5_bad_input(small_mlp):
    pol, th = small_mlp
    with pytest.raises(ShapeMismatchError):
        lemF5(pol, th, np.zeros(3))
    with pytest.raises(NonFiniteError):
        lemF5(pol, th, np.full(pol.n_params, np.nan))


# ---- Lemma F.6 -------------------------------------------------------------------------------------------------
def test_lemF6_trivial_for_linear_classes(rng):
    for pol, th, R in campaign_policies(5)[:2]:
        c = lemF6(pol, th, R=R, beta=0.5)
        F = pol.fisher(th)
        assert c.holds and c.lhs <= 64 * EPS * pol.n_params * np.abs(F).max()
        assert c.rhs > 1e-3  # the bound itself is far from 0: the lemma is slack, lhs is exactly 0


def test_lemF6_nontrivial_on_mlp(small_mlp):
    pol, th = small_mlp
    R = np.random.default_rng(1).uniform(-1, 1, pol.shape)
    for beta in (10.0, 1.0, 0.2):
        c = lemF6(pol, th, R=R, beta=beta)
        assert c.holds and c.details["lhs_le_middle"] and c.details["middle_le_rhs"]
        assert c.lhs > 1e-4 * c.rhs  # genuinely nonzero: the MLP's logits are curved


def test_lemF6_pinsker_step_tight_for_close_distributions():
    """2 L TV / (L sqrt(2 KL)) -> 1 for a symmetric two-point perturbation of the uniform distribution
    (Pinsker is tight to second order there)."""
    pol = TabularSoftmax(2)
    th = np.zeros(2)
    q = np.array([[0.5 + 1e-4, 0.5 - 1e-4]])
    c = lemF6(pol, th, q)
    assert c.details["middle_2L_TV"] / c.rhs == pytest.approx(1.0, abs=1e-6)


def test_lemF6_rejects_too_small_L(small_mlp):
    pol, th = small_mlp
    q = tilt(pol.probs(th), np.ones(pol.shape) * np.arange(12), 5.0)
    L = pol.max_hessian_logp_norm(th)
    c = lemF6(pol, th, q, L=0.5 * L)
    assert c.verdict == "assumption-failed" and "L" in c.failed_assumption
    assert lemF6(pol, th, q, L=2 * L).holds


# ---- Lemma F.9 -------------------------------------------------------------------------------------------------
def test_lemF9_counts_violations_in_ragged_batch():
    ratios = [np.array([1.0, 1.1, 0.79]), np.array([1.25]), np.array([0.95, 1.05, 1.2, 0.8, 1.0])]
    assert count_band_violations(ratios, 0.2) == 2  # 0.79 and 1.25; 1.2 and 0.8 are on the band's edge
    c = lemF9(ratios, 0.2)
    assert c.verdict == "assumption-failed" and c.details["n_violations"] == 2 and c.details["n_tokens"] == 9
    assert "2 of 9" in c.failed_assumption


def test_lemF9_tight_at_the_band_edge():
    """All ratios at 1 - eps: |k1| = E[T] (-log(1-eps)) = rhs exactly (the max is the lower edge), and k3 equals
    its band bound."""
    eps = 0.2
    ratios = [np.full(3, 1 - eps), np.full(7, 1 - eps)]
    c = lemF9(ratios, eps)
    # attained: lhs = rhs in exact arithmetic, so the verdict is indeterminate (never "holds") within tol
    assert c.verdict == "indeterminate" and c.ratio == pytest.approx(1.0, rel=4 * EPS) and abs(c.lhs - c.rhs) <= c.tol
    assert c.details["k3"] == pytest.approx(c.details["k3_band_bound"], rel=16 * EPS)


@given(st.integers(0, 2**32 - 1), st.floats(0.01, 0.5))
def test_lemF9_holds_inside_band(seed, eps):
    g = np.random.default_rng(seed)
    ratios = [g.uniform(1 - eps, 1 + eps, size=int(g.integers(1, 30))) for _ in range(int(g.integers(1, 8)))]
    c = lemF9(ratios, eps)
    assert c.holds and c.details["n_violations"] == 0
    assert c.details["small_step"] <= c.details["small_step_band_bound"] * (1 + 1e-12)


def test_lemF9_small_step_quantity_scales_as_eps_squared():
    """Ratios of an exact tabular step of size s (tokens sampled from pi): k3 and the (r-1)^2/2 quantity scale as
    s^2, while the lemma's bound is only O(eps)."""
    g = np.random.default_rng(0)
    n = 40
    pol, th, v = TabularSoftmax(n), g.standard_normal(n), g.standard_normal(n)
    idx = [g.choice(n, size=20, p=pol.probs(th)[0]) for _ in range(50)]

    def est(s):
        lr = (pol.log_probs(th + s * v) - pol.log_probs(th))[0]
        return kl_estimates([np.exp(lr[i]) for i in idx])

    e1, e2 = est(1e-3), est(5e-4)
    assert e1["k3"] / e2["k3"] == pytest.approx(4.0, rel=2e-3)
    assert e1["small_step"] / e2["small_step"] == pytest.approx(4.0, rel=2e-3)


def test_lemF9_eps_squared_holds_for_k3_per_batch_but_k1_only_in_expectation():
    """The paper's "O(eps^2) in the small-step regime": under the band, k3 <= E[T](-eps - log(1-eps)) ~ E[T] eps^2/2
    for every batch, but the per-token log-ratio sum of one batch can be E[T](-log(1-eps)) = O(eps) (all ratios at
    the band edge): k1 is O(eps^2) only in expectation over samples from pi_theta."""
    for eps in (1e-2, 1e-3, 1e-4):
        c = lemF9([np.full(10, 1 - eps)], eps)
        assert c.verdict == "indeterminate"  # every ratio at the band edge: the bound is attained
        assert c.details["k3"] / eps**2 == pytest.approx(10 / 2, rel=2 * eps)
        assert abs(c.details["k1"]) / eps == pytest.approx(10, rel=eps)  # first order, not eps^2


def test_lemF9_bad_inputs():
    with pytest.raises(InputError, match="eps"):
        lemF9([np.ones(3)], 1.5)
    with pytest.raises(InputError, match="non-positive"):
        lemF9([np.array([1.0, 0.0])], 0.2)
    with pytest.raises(NonFiniteError):
        lemF9([np.array([1.0, np.nan])], 0.2)
    with pytest.raises(InputError, match="empty"):
        lemF9([], 0.2)


# ---- Prop 3.2 --------------------------------------------------------------------------------------------------
def test_prop32_counterexample_uniform_logit_shift():
    """Paper's unrestricted form is false: a tabular softmax has F 1 = 0, so D = c 1 gives K = 0 while ||D||_2 > 0.
    Any positive mu (e.g. the smallest positive eigenvalue) then makes ||D||_2 <= sqrt(2K/mu) = 0 fail."""
    pol = TabularSoftmax(6)
    th = np.random.default_rng(0).standard_normal(6)
    D = 0.7 * np.ones(6)
    K = pol.kl(th + D, th)
    assert K <= 8 * EPS
    mu_pos = range_split(pol.fisher(th), D)[2]
    assert np.linalg.norm(D) > kl_budget_radius(K, mu_pos) + 1.0  # the naive statement is violated
    full = prop32(pol, th, th + D, subspace="full")
    assert full.verdict == "assumption-failed" and "singular" in full.failed_assumption
    assert prop32(pol, th, th + D, subspace="span").verdict == "assumption-failed"
    corrected = prop32(pol, th, th + D)  # D projected onto range(F): nothing left, and K = 0: 0 <= 0, attained
    assert corrected.verdict == "indeterminate" and corrected.lhs <= 8 * EPS and corrected.lhs <= corrected.tol
    assert corrected.details["off_subspace_norm"] > 1.7


@pytest.mark.parametrize("which", ["tabular", "loglinear", "mlp"])
def test_prop32_attained_along_smallest_eigenvector(which, small_mlp):
    """Tightness: D = s u_min (u_min the eigenvector of the smallest positive eigenvalue of F) gives
    ||D||_2 / sqrt(2K/mu) -> 1 as s -> 0."""
    g = np.random.default_rng(1)
    if which == "tabular":
        pol, th = TabularSoftmax(6), g.standard_normal(6)
    elif which == "loglinear":
        pol = LogLinear(g.standard_normal((2, 8, 3)))
        th = g.standard_normal(3)
    else:
        pol, th = small_mlp
    F = pol.fisher(th)
    lam, U = np.linalg.eigh(F)
    i = int(np.argmax(lam > lam.max() * 1e-9))
    ratios = [prop32(pol, th, th + s * U[:, i]).ratio for s in (1e-2, 1e-3)]
    assert abs(ratios[1] - 1) < 1e-2 and abs(ratios[1] - 1) < abs(ratios[0] - 1) + 1e-12


@given(st.integers(0, 2**32 - 1), st.floats(1e-4, 1e-2))
def test_prop32_first_order_holds_in_range(seed, s):
    """For a small step in range(F): ratio <= 1 + C s (the (1 + o(1)) measured), and ||D||_F/sqrt(2K) -> 1."""
    g = np.random.default_rng(seed)
    pol, th = TabularSoftmax(5, n_contexts=2), g.standard_normal(10)
    D = g.standard_normal(10)
    D = range_split(pol.fisher(th), D)[0]
    D *= s / np.linalg.norm(D)
    c = prop32(pol, th, th + D)
    assert c.ratio <= 1 + 10 * s
    assert c.details["fisher_factor"] == pytest.approx(1.0, abs=10 * s)


def test_prop32_explicit_subspace(rng):
    pol, th = TabularSoftmax(4), rng.standard_normal(4)
    B = np.eye(4)[:, :2]
    c = prop32(pol, th, th + 1e-3 * np.array([1.0, -1.0, 0, 0]), subspace=B)
    assert c.holds and c.details["subspace_dim"] == 2
    off = prop32(pol, th, th + 1e-3 * np.array([1.0, 0, 0, 1.0]), subspace=B)
    assert off.verdict == "assumption-failed" and "lies in the given subspace" in off.failed_assumption


def test_helpers_bad_input():
    with pytest.raises(ZeroGapError):
        kl_budget_radius(1.0, 0.0)
    with pytest.raises(InputError):
        kl_budget_radius(-1.0, 1.0)
    with pytest.raises(ShapeMismatchError):
        fisher_norm(np.eye(3), np.ones(2))
    with pytest.raises(NonFiniteError):
        fisher_norm(np.full((2, 2), np.inf), np.ones(2))
    with pytest.raises(ShapeMismatchError):
        prop32_from_fisher(np.ones((2, 3)), np.ones(2), 0.1)


# ---- Eq 7 ------------------------------------------------------------------------------------------------------
def test_schur_complement_exact_oracles():
    F = np.array([[4.0, 2.0, 0.0], [2.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    # block {0}: 4 - [2 0] [[3 1][1 2]]^{-1} [2 0]^T = 4 - 4 * 2/5 = 12/5
    assert schur_complement(F, [0])[0, 0] == pytest.approx(12 / 5, rel=4 * EPS)
    # both argument orders of a block-diagonal matrix: S_W = F_WW
    Fb = np.diag([1.0, 2.0, 3.0, 4.0])
    assert np.array_equal(schur_complement(Fb, slice(0, 2)), np.diag([1.0, 2.0]))
    assert np.array_equal(schur_complement(Fb, np.array([False, False, True, True])), np.diag([3.0, 4.0]))


@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(0, 3))
@example(1, 2, 1)  # found by hypothesis: needs the Schur rounding tolerance
@example(291, 2, 2)  # found by hypothesis: kappa(F_~W~W) = 2e7, S_W is rounding noise of size 1e-8
def test_schur_variational_identity_and_delta_W_le_half_quad(seed, w, null_rank):
    """x^T S_W x = min_z [x; z]^T F [x; z] (pseudo-inverse form, also for singular F_~W~W), hence
    delta_W <= 1/2 D^T F D for any D."""
    g = np.random.default_rng(seed)
    n = 7
    A = g.standard_normal((n, n - null_rank))
    F = A @ A.T
    idx = np.arange(w)
    S, s_tol = schur_complement_with_tol(F, idx)
    assert np.array_equal(S, schur_complement(F, idx))
    x = g.standard_normal(w)
    rest = np.arange(w, n)
    z = -np.linalg.lstsq(F[np.ix_(rest, rest)], F[np.ix_(rest, idx)] @ x, rcond=None)[0]
    full = np.r_[x, z]
    # S_W's rounding is n eps ||F|| kappa(F_~W~W) (s_tol), large when F_~W~W is ill conditioned
    assert x @ S @ x == pytest.approx(full @ F @ full, rel=1e-8, abs=s_tol * float(x @ x))
    D = np.r_[x, g.standard_normal(n - w)]
    c = eq7(F, D, idx)
    assert c.details["delta_W_le_half_quad"]
    # a rank-one S_W attains the Rayleigh bound (||P x||^2 mu = x^T S x): indeterminate there, never violated
    assert c.verdict in ("holds", "assumption-failed", "indeterminate")
    if c.details["subspace_dim"] == 1 and c.verdict == "indeterminate":
        assert abs(c.lhs - c.rhs) <= c.tol


@pytest.mark.parametrize("which", ["tabular", "mlp"])
def test_eq7_attained_by_min_eigvector_with_optimal_rest(which, small_mlp):
    """Tightness: x = s v_min(S_W) and the rest at its optimum z* = -F_rr^+ F_rW x give ||DW||_F = sqrt(2 delta_W /
    mu_W) and delta_W = 1/2 D^T F D exactly."""
    if which == "tabular":
        pol = TabularSoftmax(4, n_contexts=2)
        th = np.random.default_rng(3).standard_normal(8)
        idx = np.arange(4)
    else:
        pol, th = small_mlp
        idx = np.arange(pol.blocks["W2"].start, pol.blocks["W2"].stop)
    F = pol.fisher(th)
    S = schur_complement(F, idx)
    lam, V = np.linalg.eigh(S)
    i = int(np.argmax(lam > lam.max() * 1e-9))
    x = 0.01 * V[:, i]
    rest = np.setdiff1d(np.arange(F.shape[0]), idx)
    z = -np.linalg.pinv(F[np.ix_(rest, rest)], rcond=1e-12) @ F[np.ix_(rest, idx)] @ x
    D = np.zeros(F.shape[0])
    D[idx], D[rest] = x, z
    c = eq7(F, D, idx)
    assert c.verdict == "indeterminate" and c.ratio == pytest.approx(1.0, abs=1e-8) and abs(c.lhs - c.rhs) <= c.tol
    assert c.details["delta_W"] == pytest.approx(c.details["half_quad"], rel=1e-8)


def test_eq7_on_policy_blocks_and_redundant_bias(small_mlp):
    """With one-hot inputs b1 is redundant with W1's columns, so its Schur complement is 0: the block has no
    curvature of its own and the check reports that assumption instead of a bound."""
    pol, th = small_mlp
    R = np.random.default_rng(0).uniform(-1, 1, pol.shape)
    tp = m_project(pol, th, tilt(pol.probs(th), R, 20.0)).theta_plus
    for name in ("W1", "W2", "b2"):
        c = eq7_policy(pol, th, tp, name)
        assert c.holds, (name, c)
        if name in ("W1", "W2"):
            assert c.details["spectral"] <= c.details["frobenius"]
    b1 = eq7_policy(pol, th, tp, "b1")
    assert b1.verdict == "assumption-failed" and "no curvature" in b1.failed_assumption


def test_eq7_bad_input():
    F = np.eye(4)
    with pytest.raises(InputError, match="no parameters"):
        eq7(F, np.ones(4), [])
    with pytest.raises(ShapeMismatchError):
        eq7(F, np.ones(4), [0, 1], shape=(3, 1))
    with pytest.raises(InputError):
        eq7(F, np.ones(4), [0, 7])
    with pytest.raises(ShapeMismatchError):
        eq7(np.ones((4, 3)), np.ones(4), [0])
    with pytest.raises(InputError, match="unknown block"):
        eq7_policy(TabularSoftmax(3), np.zeros(3), np.ones(3), "W9")


# ---- issue 11: tolerances, assumptions, named errors -------------------------------------------------------------
def test_lemF5_exact_zero_step_holds_and_null_step_is_never_violated():
    """D = 0: both sides are exactly 0 (decided with tol 0: holds). D = c 1 for a tabular softmax: KL = quad = 0 and
    the remainder bound 0 in exact arithmetic; the old tolerance used the signed quadratic term, went negative and
    called this 0 <= 0 "violated". Now every tolerance is >= 0 and the verdict is indeterminate, never violated."""
    pol = TabularSoftmax(5, n_contexts=2)
    th = np.random.default_rng(0).standard_normal(10)
    zero = lemF5(pol, th, np.zeros(10))
    assert zero.verdict == "holds" and zero.lhs == zero.rhs == zero.tol == 0.0
    for c in (0.3, 1e-9, 7.0):
        chk = lemF5(pol, th, c * np.ones(10))
        assert chk.tol >= 0 and math.isfinite(chk.tol)
        assert chk.verdict in ("holds", "indeterminate"), chk


@pytest.mark.parametrize("s", [1e-9, 1e-7])
def test_lemF5_tiny_step_carries_the_kl_cancellation_error(s):
    """A KL computed from log-probability differences has relative error ~ eps / ||D||: at a 1e-9 step the old
    tolerance (relative eps) reported a violation that mpmath refutes (tests/test_mpmath_oracle.py pins it)."""
    g = np.random.default_rng(4)
    pol = LogLinear(g.standard_normal((2, 5, 3)))
    th, v = g.standard_normal(3), g.standard_normal(3)
    c = lemF5(pol, th, s * v / np.linalg.norm(v))
    assert c.verdict != "violated"
    assert c.details["err_kl"] >= 0.1 * EPS * c.details["kl"] / s  # relative error of order eps / ||D||


def test_eq7_tolerance_never_divides_by_a_vanishing_rhs():
    """Eq 7's tolerance divided by max(rhs, 1e-300) and reached ~1e284 for a tiny step; it is now a sum of finite
    terms that scale with the step."""
    pol = TabularSoftmax(4, n_contexts=2)
    th = np.random.default_rng(3).standard_normal(8)
    F = pol.fisher(th)
    v = np.random.default_rng(4).standard_normal(8)
    for s in (1e-150, 1e-300, 1.0):
        c = eq7(F, s * v, np.arange(4))
        assert math.isfinite(c.tol) and 0 <= c.tol <= 1e-10 * s * np.linalg.norm(v), (s, c.tol)
        assert c.verdict != "violated"


def test_indefinite_fisher_fails_the_assumption():
    F = np.diag([2.0, -1.0, 1.0])
    D = np.array([0.1, 0.2, 0.3])
    c = eq7(F, D, [0, 2])  # the block itself is PSD, the "Fisher" is not
    assert c.verdict == "assumption-failed" and "positive semidefinite" in c.failed_assumption
    c = prop32_from_fisher(F, D, 0.1)
    assert c.verdict == "assumption-failed" and "positive semidefinite" in c.failed_assumption
    rot = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    c = eq7(rot @ F @ rot.T, rot @ D, [0, 1])
    assert c.verdict == "assumption-failed" and "positive semidefinite" in c.failed_assumption
    assert eq7(np.diag([2.0, 1e-17, 1.0]), D, [0, 2]).verdict != "assumption-failed"  # PSD up to rounding is fine


def test_wrong_size_tables_and_bad_scalars_are_named():
    from theory.errors import ComplexInputError

    pol = TabularSoftmax(3, n_contexts=2)
    th = np.zeros(6)
    with pytest.raises(ShapeMismatchError, match="q_tilde has shape"):
        lemF6(pol, th, np.full(5, 0.2))
    with pytest.raises(ShapeMismatchError, match="R has shape"):
        lemF6(pol, th, R=np.ones(7), beta=1.0)
    with pytest.raises(ShapeMismatchError, match="R has shape"):
        prop31(pol, th, np.ones((3, 2)), 1.0)
    with pytest.raises(ShapeMismatchError, match="q_tilde"):
        prop31(pol, th, q_tilde=np.full((1, 6), 1 / 6))
    with pytest.raises(InputError, match="L must be"):
        lemF6(pol, th, R=np.ones((2, 3)), beta=1.0, L=math.nan)
    with pytest.raises(ComplexInputError, match="theta"):
        lemF5(pol, th + 0j, np.ones(6))
    with pytest.raises(ComplexInputError, match="F"):
        prop32_from_fisher(np.eye(2) * (1 + 1j), np.ones(2), 0.1)
    with pytest.raises(ComplexInputError, match="delta"):
        eq7(np.eye(2), np.ones(2) * 1j, [0])
    with pytest.raises(ComplexInputError, match="K"):
        prop32_from_fisher(np.eye(2), np.ones(2), 0.1 + 0j)
