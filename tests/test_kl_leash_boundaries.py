"""Gate I verdicts at their boundaries (mutation audit of theory.kl_anchor / theory.fisher_bounds): hypotheses that
must fail by name (beta = 0, an M-projection that did not converge) and the M-projection's own error, which must
keep an attained Prop 3.1 "indeterminate" when the projection is only converged to a loose tolerance.

Oracle for the attained case: for a log-linear policy and a reward in the span of its features, R = Phi w, the tilt
q~ = pi_theta exp(R / beta) / Z is again in the family (q~ = pi_{theta + w / beta}), so the M-projection is q~ itself,
KL(q~ || pi+) = 0 and Prop 3.1 holds with equality: lhs = rhs exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from theory.kl_anchor import lemF6, prop31
from theory.policies import LogLinear, TabularSoftmax


def _in_family_tilt(seed: int):
    rng = np.random.default_rng(seed)
    pol = LogLinear(rng.standard_normal((3, 12, 4)))
    theta, w = rng.standard_normal(4), rng.standard_normal(4)
    return pol, theta, np.einsum("xyd,d->xy", pol.Phi, w)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tol", [None, 1e-4, 1e-6])
def test_prop31_attained_in_family_reads_indeterminate_at_any_projection_tolerance(seed, tol):
    """lhs = rhs exactly (see the module docstring). A projection stopped at gradient norm ``tol`` moves lhs by up to
    residual * step * kappa (lhs - rhs ~ 1e-5 at tol = 1e-4): that error belongs to the tolerance, else the
    equality reads "violated" (or "holds")."""
    pol, theta, R = _in_family_tilt(seed)
    kw = {} if tol is None else {"tol": tol}
    c = prop31(pol, theta, R, 0.5, **kw)
    assert c.verdict == "indeterminate" and not c.holds, (c.verdict, c.lhs - c.rhs, c.tol)
    assert abs(c.lhs - c.rhs) <= c.tol


def test_prop31_with_an_unconverged_projection_fails_that_assumption():
    pol, theta, R = _in_family_tilt(0)
    c = prop31(pol, theta, R, 0.5, max_iter=1)
    assert c.verdict == "assumption-failed" and c.failed_assumption.startswith("the M-projection converged")


def test_prop31_at_beta_zero_fails_the_beta_assumption():
    """beta > 0 is strict: beta = 0 is not a tilt (exp(R / 0)); it is a failed hypothesis, never a decided check."""
    c = prop31(TabularSoftmax(4), np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), 0.0)
    assert c.verdict == "assumption-failed" and c.failed_assumption.startswith("beta > 0")


@pytest.mark.parametrize("shrink", [1e-3, 1e-6, 1e-9])
def test_lemF6_refuses_an_L_below_the_true_maximum_by_any_resolvable_margin(shrink):
    """L must bound ||hess log pi||_op at theta; an L short of the computed maximum by a relative 1e-9 or more (far
    above the 1e-12 rounding allowance) fails that hypothesis, and L = the maximum is accepted."""
    pol = TabularSoftmax(5, n_contexts=2)
    theta = np.random.default_rng(3).standard_normal(pol.n_params)
    R = np.random.default_rng(4).uniform(-1.0, 1.0, size=pol.shape)
    L_true = pol.max_hessian_logp_norm(theta)
    c = lemF6(pol, theta, R=R, beta=0.5, L=L_true * (1 - shrink))
    assert c.verdict == "assumption-failed" and c.failed_assumption.startswith("||hess log pi||_op <= L")
    assert lemF6(pol, theta, R=R, beta=0.5, L=L_true).verdict != "assumption-failed"


@pytest.mark.parametrize("scale", [0.3, 0.03])
def test_lemF5_right_side_is_the_stated_remainder_computed_independently(scale):
    """Lemma F.5's rhs is E_rho[range_y(u)^3] / 12 + 1/2 |E_rho(Var_pi u - Var_pi JD)| with u = z(theta + D) - z(theta)
    and JD the directional derivative of the logits. Recomputed here from the policy's logits alone (JD by
    torch.func.jvp, not the policy's Jacobian) on a curved MLP, where the curvature term is not 0."""
    import torch

    from theory.kl_anchor import lemF5
    from theory.policies import MLPPolicy

    pol = MLPPolicy(6, 3, 7, activation="tanh")
    theta = pol.init_theta(5)
    D = scale * np.random.default_rng(6).standard_normal(pol.n_params)
    t0, tD = torch.tensor(theta, dtype=torch.float64), torch.tensor(D, dtype=torch.float64)
    z0, JD = (x.detach().numpy() for x in torch.func.jvp(pol._logits, (t0,), (tD,)))
    u = pol.logits(theta + D) - z0
    p = pol.probs(theta)

    def var(w):
        return np.sum(p * (w - np.sum(p * w, axis=1, keepdims=True)) ** 2, axis=1)

    rng_u = u.max(axis=1) - u.min(axis=1)
    range_term = float(pol.rho @ rng_u**3) / 12
    curvature = 0.5 * abs(float(pol.rho @ (var(u) - var(JD))))
    c = lemF5(pol, theta, D)
    assert curvature > 1e-3 * range_term  # the MLP's second term is not negligible here
    assert c.details["curvature_term"] == pytest.approx(curvature, rel=1e-9)
    assert c.rhs == pytest.approx(range_term + curvature, rel=1e-9)
    assert c.verdict == "holds"


@pytest.mark.parametrize("n_tokens", [1, 4, 32])
def test_lemF9_ratios_on_the_lower_band_edge_attain_both_bounds(n_tokens):
    """Every token ratio r = 1 - eps (eps = 1/4, dyadic: r = 0.75 exactly) is inside the closed band and attains
    |k1| = T (-log(1 - eps)) = E[T] max(-log(1 - eps), log(1 + eps)) (the max is the lower edge's) and
    k3 = T (r - 1 - log r) = E[T] (-eps - log(1 - eps)): both read undecided (indeterminate / an undecided link),
    neither "violated"."""
    from theory.kl_anchor import count_band_violations, lemF9

    eps = 0.25
    seqs = [np.full(n_tokens, 1 - eps), np.full(n_tokens, 1 - eps)]
    assert count_band_violations(seqs, eps) == 0
    assert count_band_violations([np.array([1 - eps, 1 + eps])], eps) == 0  # both edges belong to the band
    assert count_band_violations([np.array([np.nextafter(1 - eps, 0.0), np.nextafter(1 + eps, 2.0)])], eps) == 2
    c = lemF9(seqs, eps)
    assert c.verdict == "indeterminate", (c.verdict, c.lhs, c.rhs, c.tol)
    assert c.rhs == pytest.approx(-n_tokens * np.log1p(-eps), rel=1e-15)
    k3 = lemF9([np.full(n_tokens, 1 + eps)], eps)  # the upper edge: |k1| = T log(1 + eps) < rhs
    assert k3.verdict == "holds" and "failed_link" not in k3.details
    # one token on each edge: k3 = (-eps - log(1 - eps)) + (eps - log(1 + eps)) = 0.0646 <= 2 (-eps - log(1 - eps))
    # = 0.0754, the band bound of k3 (its per-token maximum is at the lower edge, not the upper one: 0.0538)
    both = lemF9([np.array([1 - eps, 1 + eps])], eps)
    assert both.verdict == "holds" and "failed_link" not in both.details


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5])
def test_lemF9_eps_outside_the_open_unit_interval_is_refused(eps):
    from theory.errors import InputError
    from theory.kl_anchor import lemF9

    with pytest.raises(InputError, match="eps must be in"):
        lemF9([np.array([1.0])], eps)


@pytest.mark.parametrize("j", [0, 1, 2])
def test_prop32_and_eq7_attained_along_the_smallest_curvature_direction(j):
    """F = diag(2, 8, 32) * 4^j (dyadic), D = e1 (the eigenvector of lambda_min = mu), K = 1/2 D^T F D: the radius
    sqrt(2K / mu) equals ||D|| = 1 exactly, so Prop 3.2 is attained; so is Eq 7 on the block {0, 1} (S_W = diag(2, 8)
    * 4^j, delta_W = 1/2 x^T S_W x = mu_W / 2) and its link delta_W <= 1/2 D^T F D (the rest of D is 0)."""
    from theory.fisher_bounds import eq7, prop32_from_fisher

    F = np.diag([2.0, 8.0, 32.0]) * 4.0**j
    D = np.array([1.0, 0.0, 0.0])
    K = 0.5 * float(D @ F @ D)
    p = prop32_from_fisher(F, D, K)
    assert p.verdict == "indeterminate" and p.lhs == 1.0 and p.rhs == pytest.approx(1.0, rel=1e-15), (p.verdict, p.lhs, p.rhs)
    e = eq7(F, D, [0, 1], shape=(1, 2))
    assert e.verdict == "indeterminate" and e.lhs == 1.0 and e.rhs == pytest.approx(1.0, rel=1e-15), (e.verdict, e.lhs, e.rhs)
    # a budget a hair below the attained one makes the bound false (violated), one above makes it hold
    assert prop32_from_fisher(F, D, K * 0.98).verdict == "violated"
    assert prop32_from_fisher(F, D, K * 1.02).verdict == "holds"
    assert eq7(F, np.array([1.0, 0.0, 0.0]), [0, 1]).details["delta_W_le_half_quad"]


def test_prop32_accepts_a_zero_budget_for_a_zero_step():
    from theory.fisher_bounds import prop32_from_fisher

    c = prop32_from_fisher(np.diag([1.0, 2.0]), np.zeros(2), 0.0)
    assert c.verdict == "holds" and c.lhs == 0.0 and c.rhs == 0.0


def test_eq7_attained_links_are_listed_undecided_and_half_quad_against_K_is_reported():
    """F = diag(2, 8, 32), D = (1, 1, 0), block {0, 1} of shape (1, 2): delta_W = 1/2 x^T S_W x = 5 = 1/2 D^T F D (the
    rest of D is 0) and ||DW||_2 = ||DW||_F = sqrt 2 (rank one): both links are attained, so they are listed as
    undecided, while the main bound (sqrt 2 <= sqrt(2 * 5 / 2) = sqrt 5) holds. With K = 4 < 1/2 D^T F D = 5 the
    paper's first-order 'delta_W <= K' is reported false."""
    from theory.fisher_bounds import eq7

    c = eq7(np.diag([2.0, 8.0, 32.0]), np.array([1.0, 1.0, 0.0]), [0, 1], shape=(1, 2), K=4.0)
    assert c.verdict == "holds"
    assert set(c.details["undecided_links"].split(", ")) == {"delta_W <= 1/2 D^T F D", "||DW||_2 <= ||DW||_F"}
    assert c.details["half_quad"] == 5.0 and c.details["half_quad_le_K"] is False
    assert eq7(np.diag([2.0, 8.0, 32.0]), np.array([1.0, 1.0, 0.0]), [0, 1], K=5.0).details["half_quad_le_K"] is True
