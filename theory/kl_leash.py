"""Gate I — the KL anchor (Zhu et al., arXiv 2511.08567, Sec. 3.1 and App. F) as executable checks.

Registered ids (``theory.RESULTS[id]``), each with a seeded ``campaign(seed)`` over tabular, log-linear and MLP
policies (``theory.policies``):

- ``"prop3.1"``  one-step leash KL(pi+ || pi) <= (1 + o(1)) KL(q~ || pi), pi+ the M-projection of the Gibbs tilt.
                 Tabular: equality. Log-linear: the Pythagorean identity KL(q~||pi) = KL(q~||pi+) + KL(pi+||pi)
                 makes it hold with constant 1 at every beta. MLP (curved class): the factor is measured
                 (``exact=False``).
- ``"lemF.5"``   KL(pi_{theta+D} || pi_theta) = 1/2 D^T F D + O(||D||^3), with a rigorous, computable remainder bound.
- ``"lemF.6"``   ||H_q~ - F||_op <= 2 L TV(q~, pi) <= L sqrt(2 KL(q~ || pi)).
- ``"lemF.9"``   clip band => batch KL estimate <= E[T] max(-log(1-eps), log(1+eps)); counts band violations.
- ``"prop3.2"``  K = KL(pi+ || pi) => ||D||_{F(theta)} <= sqrt(2K)(1+o(1)), ||D||_2 <= sqrt(2K/mu)(1+o(1)) on the
                 update subspace (corrected: F is singular for softmax policies).
- ``"eq7"``      per-block Schur complement S_W, delta_W = 1/2 vec(DW)^T S_W vec(DW) <= 1/2 D^T F D,
                 ||DW||_2 <= ||DW||_F <= sqrt(2 delta_W / mu_W).

Plain helpers for other modules (a transformer's Fisher works as well): ``fisher_norm(F, delta)``,
``kl_budget_radius(K, mu)``, ``schur_complement(F, idx)``, ``range_split(M, v)``, ``beta_sweep(...)``.

"Update subspace", precisely. F(theta) of a softmax policy is singular (shifting all logits of a context changes
nothing: F 1 = 0), so "F >= mu I" fails on R^d and the unrestricted Prop 3.2 is false: D = c 1 has K = 0 and
||D||_2 > 0. We use the subspace U = range(F) (eigenvectors with eigenvalue > d * eps * lambda_max), bound the
component P_U D, and report the null component ||D - P_U D|| separately (it does not move the policy to first
order). Callers may instead pass an explicit basis of U (then D must lie in it) or ``"span"`` (U = span(D)).

Where the code lives: the checks of Prop 3.1 and Lemmas F.5, F.6, F.9 in ``theory.kl_anchor``, of Prop 3.2 and
Eq 7 (and the beta sweep) in ``theory.fisher_bounds``, the plain helpers in ``theory.leash_linalg``, the seeded
policy families in ``theory.policies``. This module imports the first two in that order (which registers the results
in that order) and re-exports their names for one release.
"""

from __future__ import annotations

# kl_anchor before fisher_bounds: the order the results are registered in (theory.RESULTS)
from theory import kl_anchor, fisher_bounds, leash_linalg  # noqa: I001
from theory.kl_anchor import (  # noqa: F401  (re-exported for one release)
    count_band_violations, kl_estimates, lemF5, lemF5_scaling, lemF6, lemF9, prop31,
)
from theory.fisher_bounds import (  # noqa: F401,I001  (re-exported for one release)
    beta_sweep, eq7, eq7_policy, prop32, prop32_from_fisher,
)
from theory.leash_linalg import (  # noqa: F401  (re-exported for one release)
    EPS, fisher_norm, kl_budget_radius, psd_rank_tol, range_split, schur_complement, schur_complement_with_tol,
)
from theory.policies import campaign_policies  # noqa: F401  (re-exported for one release)

__all__ = [*leash_linalg.__all__, *kl_anchor.__all__, *fisher_bounds.__all__, "campaign_policies"]
