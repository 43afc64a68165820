"""Gate I — the KL anchor (Zhu et al., arXiv 2511.08567, Sec. 3.1 and App. F): an index of where its checks live,
re-exporting their names for one release.

- ``theory.kl_anchor``: Prop 3.1 (``"prop3.1"``), Lemmas F.5, F.6, F.9 (``"lemF.5"``, ``"lemF.6"``, ``"lemF.9"``).
- ``theory.fisher_bounds``: Prop 3.2 (``"prop3.2"``, on the update subspace: F is singular for softmax policies),
  Eq 7 / Lemma F.10 (``"eq7"``), and ``beta_sweep``.
- ``theory.leash_linalg``: the plain helpers (``fisher_norm``, ``kl_budget_radius``, ``schur_complement``,
  ``range_split``, ...), which work with a transformer's Fisher as well.
- ``theory.policies``: the policies with exact KL and Fisher, and ``campaign_policies`` (the seeded campaigns' instances).

This module imports ``kl_anchor`` before ``fisher_bounds``: the order the results are registered in.
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
