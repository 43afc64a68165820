"""threegate.theory — every formal result of Zhu et al. (arXiv 2511.08567) as an executable check.

Where things live (one module per theorem family):

- Gate I, KL anchor (Prop 3.1, Lemma F.5, F.6, F.9): ``theory.kl_anchor``; Prop 3.2, Eq 7 / Lemma F.10:
  ``theory.fisher_bounds``; their linear algebra: ``theory.leash_linalg``; all re-exported by ``theory.kl_leash``
  (policies with exact KL and Fisher: ``theory.policies``)
- Gate II, model geometry (Thm 3.3 in three forms, Cor F.13, Cor 3.4, Cor 3.5): ``theory.spectral`` (the
  evaluators on one decomposed pair: ``theory.spectral_bounds``)
- Gate III, precision (Cor 3.6, Lemma E.1, E.2, Prop E.3): ``theory.precision``; the exact bf16 oracle:
  ``theory.bf16`` (scalars) and ``theory.bf16_array`` (arrays)
- Metrics of the paper (Def 2.1/2.2 sparsity, Jaccard, consensus, NSS, masks, overlaps): ``theory.metrics``
- Linear algebra in float64 (SVD, principal angles, projectors): ``theory.linalg``

``theory.RESULTS[id]`` gives each result's statement, assumptions and ``check`` function.
"""

from __future__ import annotations

from theory import kl_leash, precision, spectral  # noqa: F401  (importing the families fills RESULTS)
from theory.check import RESULTS, Check, Result, register  # noqa: F401

__all__ = ["RESULTS", "Check", "Result", "register"]
