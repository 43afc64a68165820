"""Tests for theory.policies: exact Fisher / KL / Hessians of the three policy classes, the tilt, the M-projection."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from theory.errors import InputError, NonFiniteError, ShapeMismatchError
from theory.policies import (
    LogLinear,
    MLPPolicy,
    TabularSoftmax,
    _phi_kl,
    kl_rows,
    m_project,
    tilt,
)

EPS = np.finfo(np.float64).eps


def _policies(rng):
    tab = TabularSoftmax(6, n_contexts=2, rho=[0.3, 0.7])
    ll = LogLinear(rng.standard_normal((3, 7, 4)), rho=[0.2, 0.5, 0.3])
    mlp = MLPPolicy(5, 2, 12, activation="tanh")
    gelu = MLPPolicy(4, 3, 9, activation="gelu")
    out = []
    for pol in (tab, ll, mlp, gelu):
        th = pol.init_theta(7) if isinstance(pol, MLPPolicy) else rng.standard_normal(pol.n_params)
        out.append((pol, th))
    return out


def test_fisher_equals_enumerated_score_outer_products(rng):
    """F = sum_x rho(x) sum_y pi(y|x) s s^T by explicit enumeration, for all classes (s from the score method)."""
    for pol, th in _policies(rng):
        S, p = pol.score(th), pol.probs(th)
        F_enum = sum(pol.rho[x] * p[x, y] * np.outer(S[x, y], S[x, y])
                     for x in range(pol.n_contexts) for y in range(pol.n_outputs))
        F = pol.fisher(th)
        assert np.allclose(F, F_enum, rtol=0, atol=64 * EPS * np.abs(F_enum).max())
        assert np.allclose(F, F.T, rtol=0, atol=0)
        assert np.linalg.eigvalsh(F).min() >= -64 * EPS * pol.n_params * np.abs(F).max()


def test_fisher_is_autograd_hessian_of_kl(rng):
    """Independent cross-check: F(theta) = hess_D KL(pi_theta || pi_{theta+D}) at D = 0, by torch autograd."""
    for pol, th in _policies(rng):
        t = torch.as_tensor(th)
        lp0 = torch.log_softmax(pol._logits(t), -1)
        rho = torch.as_tensor(pol.rho)

        def kl(D):
            lp = torch.log_softmax(pol._logits(t + D), -1)
            return (rho[:, None] * lp0.exp() * (lp0 - lp)).sum()

        H = torch.func.hessian(kl)(torch.zeros_like(t)).numpy()
        F = pol.fisher(th)
        assert np.allclose(F, H, rtol=0, atol=1e3 * EPS * max(np.abs(F).max(), 1))


def test_fisher_finite_difference_of_score_mean(rng):
    """d/dtheta E_pi[score] = 0 identity's partner: grad of E_rho E_pi[log pi_theta'] at theta' = theta is 0 and its
    central finite difference along v gives -F v (checked to the finite-difference error O(h^2))."""
    pol, th = _policies(rng)[2]
    v = rng.standard_normal(pol.n_params)
    p = pol.probs(th)
    h = 1e-5

    def grad_ce(tp):
        # grad_theta' of -E_rho E_pi_theta[log pi_theta'] equals sum_x rho J^T (pi_theta' - pi_theta)
        return pol.cross_entropy_grad(p, tp)

    fd = (grad_ce(th + h * v) - grad_ce(th - h * v)) / (2 * h)
    assert np.allclose(fd, pol.fisher(th) @ v, rtol=0, atol=1e-8 * np.linalg.norm(v))


def test_closed_form_oracles_for_linear_classes(rng):
    """Tabular: F = blockdiag(rho_x (diag p_x - p_x p_x^T)); log-linear: F = sum rho_x Phi_x^T C_x Phi_x."""
    pol, th = _policies(rng)[0]
    p = pol.probs(th)
    F = pol.fisher(th)
    for x in range(2):
        blk = slice(6 * x, 6 * x + 6)
        C = np.diag(p[x]) - np.outer(p[x], p[x])
        assert np.allclose(F[blk, blk], pol.rho[x] * C, rtol=0, atol=4 * EPS)
    assert np.all(F[0:6, 6:12] == 0)
    ll, th2 = _policies(rng)[1]
    p2 = ll.probs(th2)
    F2 = sum(ll.rho[x] * ll.Phi[x].T @ (np.diag(p2[x]) - np.outer(p2[x], p2[x])) @ ll.Phi[x] for x in range(3))
    assert np.allclose(ll.fisher(th2), F2, rtol=0, atol=64 * EPS * np.abs(F2).max())


def test_tabular_fisher_annihilates_per_context_shift(rng):
    """Shifting all logits of one context changes nothing: F 1_x = 0 and KL(pi_{theta + c 1_x} || pi_theta) = 0."""
    pol, th = _policies(rng)[0]
    F = pol.fisher(th)
    one = np.zeros(pol.n_params)
    one[:6] = 1.0
    assert np.abs(F @ one).max() <= 16 * EPS
    assert pol.kl(th + 3.0 * one, th) <= 16 * EPS


def test_mlp_analytic_jacobian_and_curvature_match_autograd():
    for act in ("tanh", "gelu"):
        pol = MLPPolicy(4, 3, 7, activation=act, inputs=np.random.default_rng(1).standard_normal((4, 5)))
        th = pol.init_theta(3)
        t = torch.as_tensor(th)
        J_auto = torch.func.jacrev(pol._logits)(t).numpy()
        assert np.allclose(pol.logit_jacobian(th), J_auto, rtol=0, atol=64 * EPS)
        c = np.random.default_rng(2).standard_normal(pol.shape)
        Hz = pol.logit_hessians(th)
        assert np.allclose(pol.curvature(th, c), np.einsum("xy,xyde->de", c, Hz), rtol=0, atol=256 * EPS)


def test_hessian_logp_linear_classes_is_minus_context_fisher(rng):
    """For logits linear in theta, hess log pi(y|x) = -F_x for every y (so Lemma F.6's lhs vanishes)."""
    for pol, th in _policies(rng)[:2]:
        H = pol.hessian_logp(th)
        Fx = pol.fisher_per_context(th)
        for x in range(pol.n_contexts):
            for y in range(pol.n_outputs):
                assert np.array_equal(H[x, y], -Fx[x])


def test_hessian_logp_mlp_matches_autograd(rng):
    pol, th = _policies(rng)[2]
    H = pol.hessian_logp(th)
    t = torch.as_tensor(th)
    x, y = 3, 5
    H_auto = torch.func.hessian(lambda a: torch.log_softmax(pol._logits(a), -1)[x, y])(t).numpy()
    assert np.allclose(H[x, y], H_auto, rtol=0, atol=256 * EPS)
    w = rng.standard_normal(pol.shape)
    assert np.allclose(pol.weighted_hessian_logp(th, w), np.einsum("xy,xyde->de", w, H), rtol=0, atol=1e-13)


def test_hessian_size_guard():
    pol = MLPPolicy(6, 8, 200)
    with pytest.raises(InputError, match="Hessians would need"):
        pol.logit_hessians(pol.init_theta(0))


def test_blocks_partition_theta_and_reshape_to_weights():
    pol = MLPPolicy(5, 3, 11)
    covered = np.zeros(pol.n_params, bool)
    for name, sl in pol.blocks.items():
        assert not covered[sl].any()
        covered[sl] = True
        assert sl.stop - sl.start == int(np.prod(pol.block_shapes[name]))
    assert covered.all()
    th = pol.init_theta(0)
    W2 = th[pol.blocks["W2"]].reshape(pol.block_shapes["W2"])
    hid = np.tanh(np.eye(5) @ th[pol.blocks["W1"]].reshape(3, 5).T + th[pol.blocks["b1"]])
    assert np.allclose(pol.logits(th), hid @ W2.T + th[pol.blocks["b2"]], rtol=0, atol=16 * EPS)


@given(st.lists(st.floats(-30, 30), min_size=1, max_size=20))
@example([1e-9, -1e-9, 0.049999, -0.05, 0.05, 0.4999, -0.5, 0.5, -1.0, 1e-300])
@example([1.0145922700867154e-78])  # found by hypothesis: the reference needs > 50 digits
def test_phi_kl_matches_high_precision(ds):
    """phi(d) = e^d (d - 1) + 1 to <= 16 ulp against mpmath at 700 digits, including tiny d (no cancellation)."""
    got = _phi_kl(np.array(ds))
    mpmath.mp.dps = 700  # d down to 1e-308: the cancellation in e^d (d-1) + 1 needs ~2|log10 d| digits
    for d, g in zip(ds, got):
        md = mpmath.mpf(d)
        ref = float(mpmath.exp(md) * (md - 1) + 1)
        assert g >= 0
        assert abs(g - ref) <= 16 * EPS * abs(ref) + 1e-300


def test_kl_rows_underflowed_reference_probability():
    """q = exp(-800) underflows to 0 while p does not: the term is p (d - 1) + q, finite, not 0 * inf = NaN."""
    lp = np.log(np.array([[0.5, 0.5]]))
    lq = np.array([[-800.0, math.log(1 - 1e-300)]])
    assert kl_rows(lp, lq)[0] == pytest.approx(0.5 * (math.log(0.5) + 800) + 0.5 * math.log(0.5), rel=4 * EPS)


def test_kl_rows_zero_probability_conventions():
    lp = np.log(np.array([[0.5, 0.5, 0.0]]))
    lq = np.log(np.array([[0.25, 0.25, 0.5]]))
    assert kl_rows(lp, lq)[0] == pytest.approx(math.log(2), rel=4 * EPS)
    assert kl_rows(lq, lp)[0] == math.inf


@given(st.integers(0, 2**32 - 1), st.floats(1e-3, 1e3))
@example(0, 0.0078125)  # found by hypothesis: entries underflow to 0
@example(0, 0.00390625)  # found by hypothesis: log-space normalisation was off by 1.4e-14
@example(1, 0.001)  # found by hypothesis: shift invariance limited by eps * |R / beta|
def test_tilt_is_normalised_gibbs_form(seed, beta):
    g = np.random.default_rng(seed)
    q = g.dirichlet(np.ones(7), size=2)
    R = g.uniform(-1, 1, size=(2, 7))
    qt = tilt(q, R, beta)
    assert np.abs(qt.sum(1) - 1).max() <= 4 * 7 * EPS
    # log-ratio log(q~/q) - R/beta is a constant per row (the log partition function); skip underflowed entries
    for x in range(2):
        ok = qt[x] > 1e-290
        c = np.log(qt[x, ok]) - np.log(q[x, ok]) - R[x, ok] / beta
        assert np.ptp(c) <= 64 * EPS * (1 + np.abs(np.log(q[x])).max() + np.abs(R / beta).max())
    # shift invariance; relative error of exp(a) is eps * |a| with a = log q + R / beta
    scale = 1 + np.abs(np.log(q)).max() + (np.abs(R).max() + 5.0) / beta
    assert np.allclose(tilt(q, R + 5.0, beta), qt, rtol=64 * EPS * scale, atol=0)


def test_tilt_extreme_beta_is_stable():
    q = np.full(4, 0.25)
    R = np.array([0.0, 1.0, 0.5, 1.0])
    qt = tilt(q, R, 1e-300)  # exp(R/beta) overflows naively
    assert np.all(np.isfinite(qt)) and qt[1] == qt[3] == 0.5
    assert np.allclose(tilt(q, R, 1e300), q, rtol=0, atol=EPS)


def test_tilt_bad_inputs():
    q = np.full(3, 1 / 3)
    with pytest.raises(InputError, match="beta"):
        tilt(q, np.zeros(3), 0.0)
    with pytest.raises(NonFiniteError, match="R"):
        tilt(q, np.array([0, np.nan, 0]), 1.0)
    with pytest.raises(ShapeMismatchError):
        tilt(q, np.zeros(4), 1.0)
    with pytest.raises(InputError, match="sum to 1"):
        tilt(np.array([0.5, 0.6, 0.1]), np.zeros(3), 1.0)


def test_theta_validation(rng):
    pol, th = _policies(rng)[0]
    with pytest.raises(ShapeMismatchError, match="parameters"):
        pol.fisher(th[:-1])
    bad = th.copy()
    bad[2] = np.inf
    with pytest.raises(NonFiniteError, match="theta"):
        pol.log_probs(bad)


def test_m_projection_tabular_reaches_target_exactly(rng):
    pol, th = _policies(rng)[0]
    q = tilt(pol.probs(th), rng.uniform(-1, 1, pol.shape), 0.7)
    mp = m_project(pol, th, q)
    assert np.allclose(pol.probs(mp.theta_plus), q, rtol=8 * EPS * pol.n_outputs, atol=0)
    step = (mp.theta_plus - th).reshape(pol.shape)
    assert np.abs(step.sum(1)).max() <= 64 * EPS * np.abs(step).max()  # orthogonal to null(F)


def test_m_projection_log_linear_matches_moments(rng):
    pol, th = _policies(rng)[1]
    q = tilt(pol.probs(th), rng.uniform(-1, 1, pol.shape), 0.5)
    mp = m_project(pol, th, q)
    assert mp.converged
    p = pol.probs(mp.theta_plus)
    m_q = np.einsum("x,xy,xyd->d", pol.rho, q, pol.Phi)
    m_p = np.einsum("x,xy,xyd->d", pol.rho, p, pol.Phi)
    assert np.allclose(m_q, m_p, rtol=0, atol=256 * EPS)


def test_m_projection_mlp_converges_and_is_a_local_minimum(rng):
    pol, th = _policies(rng)[2]
    q = tilt(pol.probs(th), rng.uniform(-1, 1, pol.shape), 2.0)
    mp = m_project(pol, th, q)
    assert mp.converged and mp.residual <= 1e-12
    G = pol.kl_from(q, mp.theta_plus)
    for s in range(5):  # random small perturbations do not lower the objective
        v = np.random.default_rng(s).standard_normal(pol.n_params)
        assert pol.kl_from(q, mp.theta_plus + 1e-4 * v / np.linalg.norm(v)) >= G - 1e-15
    assert pol.kl_from(q, mp.theta_plus) < pol.kl_from(q, th)


def test_m_projection_needs_full_support(rng):
    pol, th = _policies(rng)[0]
    q = pol.probs(th)
    q[0] = np.r_[1.0, np.zeros(5)]
    with pytest.raises(InputError, match="zero-probability"):
        m_project(pol, th, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():  # pragma: no cover - runs only with a GPU
    cpu, gpu = MLPPolicy(5, 2, 12), MLPPolicy(5, 2, 12, device="cuda")
    th = cpu.init_theta(0)
    assert np.allclose(cpu.fisher(th), gpu.fisher(th), rtol=0, atol=1e-12)


def test_complex_parameters_and_tables_are_refused_by_name():
    """numpy/torch complex inputs were cast to their real part (with a ComplexWarning at best)."""
    import torch as _torch

    from theory.errors import ComplexInputError

    pol = TabularSoftmax(3, n_contexts=2)
    for bad in (np.zeros(6) + 0j, _torch.zeros(6, dtype=_torch.complex128)):
        with pytest.raises(ComplexInputError, match="theta"):
            pol.probs(bad)
    with pytest.raises(ComplexInputError, match="features"):
        LogLinear(np.ones((2, 3, 2)) * 1j)
    with pytest.raises(ComplexInputError, match="R"):
        tilt(np.full(3, 1 / 3), np.ones(3) * 1j, 1.0)
    with pytest.raises(ComplexInputError, match="q"):
        pol.kl_from(np.full((2, 3), 1 / 3) + 0j, np.zeros(6))
