"""Gate II — spectral perturbation: Thm 3.3 (three forms), Cor F.13, Cor 3.4 (Weyl, Mirsky), Cor 3.5 (Ky Fan).

Every check takes ``(W0, W1, k)`` with ``W1 = W0 + dW`` (numpy or torch, any float dtype, bf16 included; upcast to
float64 before any decomposition) and returns a ``theory.check.Check``. Notation: sigma_i descending,
``r = min(m, n)``, ``gamma_k = sigma_k(W0) - sigma_{k+1}(W0)`` with ``sigma_{r+1} := 0``, ``U_k, V_k`` the top-k
left/right singular subspaces, ``sin_k = max(||sin Theta(U_k(W0), U_k(W1))||_2, ||sin Theta(V_k(W0), V_k(W1))||_2)``.

Results (id: statement):

- ``thm3.3``          sin_k <= ||dW||_2 / gamma_k                          (as stated; first order, NOT a theorem;
                      it fails by at most a factor 2: sin_k <= 2 ||dW||_2 / gamma_k always, ``rhs_factor2``)
- ``thm3.3-wedin``    sin_k <= max(||dW V_k(W1)||_2, ||dW^T U_k(W1)||_2) / delta,
                      delta = sigma_k(W1) - alpha > 0, alpha = sigma_{k+1}(W0)   (Wedin 1972; Stewart & Sun V.4.4)
- ``thm3.3-rigorous`` sin_k <= ||dW||_2 / (gamma_k - ||dW||_2)            (needs ||dW||_2 < gamma_k)
- ``corF.13``         ||P_{U_k(W0)} - P_{U_k(W1)}||_2 = ||sin Theta(U)||_2 (same for V; identity) and the
                      projector distance <= ||dW||_2 / delta (the Wedin gap; the as-stated chain is in details)
- ``cor3.4-weyl``     max_i |sigma_i(W1) - sigma_i(W0)| <= ||dW||_2
- ``cor3.4-mirsky``   ||sigma(W1) - sigma(W0)||_2 <= ||dW||_F             (the paper squares both sides)
- ``cor3.5``          |‖W1‖_(k) - ‖W0‖_(k)| <= sum_{i<=k} |dsigma_i| <= ||dW||_(k) <= k ||dW||_2  (whole chain)

Wedin's hypotheses, exactly. Stewart & Sun Thm V.4.4 needs alpha >= 0 and delta > 0 with
sigma_min(Sigma~_1) >= alpha + delta and sigma_max(Sigma_2) <= alpha, where Sigma_2 is the complement block of W0,
an (m-k) x (n-k) matrix that carries |m - n| structural zero singular values. For k < r this is
Wedin's usual delta = sigma_k(W1) - sigma_{k+1}(W0) (and sigma_k(W1) >= delta follows from alpha >= 0, so the zeros
never bind). At k = r < max(m, n) there is no sigma_{k+1}(W0) but the complement is not empty: its singular values
are the zeros, so alpha = 0 and delta = sigma_r(W1). Reading "no sigma_{k+1}" as "no constraint" (delta = inf,
bound 0) is wrong: W0 = [[1], [0]], W1 = [[1], [1]] rotates U_1 by 45 degrees (see ``wedin_gap``).

Optional ``delta_W``, ``mu_W`` (Lemma F.10: 1/2 vec(dW)^T S_W vec(dW) = delta_W, lambda_min(S_W) = mu_W) add the
KL-form right side sqrt(2 delta_W / mu_W) (divided by gamma_k for Thm 3.3, times k for Cor 3.5) to ``details``,
with ``kl_chain_holds`` (whether the weight-space quantity is <= that bound).

Scale. Both matrices are first multiplied by one power of two ``2**-e`` (exact) that puts the largest entry in
[1/2, 1): W1 - W0, the norms and the SVDs then neither overflow nor underflow at any input scale (1e-300 .. 1e300),
and inputs that differ by a factor 2**j give bit-identical verdicts. Degree-one quantities (singular values,
||dW||) are reported back in the inputs' units.

Error model and tolerances (``theory.check``: holds iff rhs - lhs >= tol, violated iff lhs - rhs > tol, else
indeterminate). A float64 SVD is backward stable: the computed factors are exact for W + E with
||E||_2 <= p(m, n) eps ||W||_2. We allow every matrix to move by
``eps_s = 8 * max(m, n) * eps64 * max(||W0||_2, ||W1||_2)`` (this also covers the rounding of W1 - W0), so
a singular value moves by <= eps_s (Weyl). Weyl: 3 eps_s; Mirsky: (2 sqrt(r) + 1) eps_s; Ky Fan chain: 3k eps_s (plus
the rounding of the sums). A bound num/den moves by at most ``(num + e_num) / (den - e_den) - num / den``; the
denominators (gamma_k, delta, gamma_k - ||dW||_2) must exceed twice their own rounding (``RESOLVED``), else the
hypothesis "> 0" is not resolved and the check fails that assumption (so an exactly repeated singular value at k
fails it in every form, and no tolerance is ever infinite). The subspace left sides move with the computed bases:
by eps_s / (g - 3 eps_s) per matrix, g the gap that determines its top-k subspace, plus 8 max(m, n) eps64 for
bases orthonormal only to rounding (``_lhs_error``); when a g is not resolved the lhs is not a function of the
inputs and the check fails "the top-k singular subspaces ... are determined". F.13's identity is checked to
``16 * max(m, n) * eps64``.

``gate2_all(W0, W1, k)`` evaluates all of them from one SVD of W0, one of W1 and the singular values of dW
(``spectral_pair`` builds that once; pass ``svd0=`` to reuse W0's SVD across tuned checkpoints).

Where the code lives: the pair and the seven evaluators with their tolerances in ``theory.spectral_bounds``;
this module registers the results, runs them on seeded synthetic pairs (one, a grid, the sweep table) and holds
the campaigns.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from theory.check import RESULTS, Check, assumption_failed, register
from theory.errors import ComplexInputError, InputError, NonFiniteError, ShapeMismatchError
from theory import spectral_bounds
from theory.spectral_bounds import GATE2_IDS, gate2_all, gate2_checks, spectral_pair
from theory.spectral_bounds import (  # noqa: F401  (re-exported for one release)
    SpectralPair, projector_distance_lowrank, wedin_gap,
)
from theory.synthetic import PERTURBATION_FAMILIES, SPECTRUM_FAMILIES, synthetic_pair

__all__ = [
    *spectral_bounds.__all__,
    "counterexample_as_stated",
    "thm33_as_stated",
    "thm33_wedin",
    "thm33_rigorous",
    "corF13",
    "cor34_weyl",
    "cor34_mirsky",
    "cor35_kyfan",
    "gate2_synthetic",
    "gate2_grid",
    "synthetic_sweep",
]


def _one(result_id: str) -> Callable[..., Check]:
    def check(W0: Any, W1: Any, k: int, *, delta_W: float | None = None, mu_W: float | None = None,
              device: Any = None) -> Check:
        try:
            pair = spectral_pair(W0, W1, device=device)
        except ComplexInputError:
            raise
        except NonFiniteError as e:
            return assumption_failed(result_id, f"W0 and W1 finite: {e}")
        except ShapeMismatchError as e:
            return assumption_failed(result_id, f"W0 and W1 of the same shape: {e}")
        except InputError as e:
            return assumption_failed(result_id, f"W0, W1 real 2-d matrices: {e}")
        return gate2_checks(pair, k, delta_W=delta_W, mu_W=mu_W, ids=(result_id,))[result_id]

    check.__name__ = check.__qualname__ = "check_" + result_id.replace(".", "").replace("-", "_")
    check.__doc__ = f"Evaluate ``{result_id}`` on (W0, W1, k); see the module docstring."
    return check


# ----------------------------------------------------------------------------------------------------------------
# Gate II on seeded synthetic pairs (``theory.synthetic``): one instance, a grid, the sweep table
# ----------------------------------------------------------------------------------------------------------------


def gate2_synthetic(seed: int, spectrum: str, perturbation: str, m: int, n: int, k: int, ratio: float, *,
                    device: Any = None, **spectrum_params) -> tuple[float, dict[str, Check]]:
    """Every Gate II check on one seeded synthetic pair (``theory.synthetic.synthetic_pair``; a ``kl_budget``
    pair also gets its KL-form bound); returns (||W1 - W0||_2 / gamma_k(W0) measured on the float64 matrices,
    the checks).
    """
    pair = synthetic_pair(seed, spectrum, perturbation, m, n, k, ratio, **spectrum_params)
    kl = {key: pair[key] for key in ("delta_W", "mu_W") if key in pair}
    checks = gate2_all(pair["W0"], pair["W1"], k, device=device, **kl)
    return float(checks["thm3.3"].details.get("dW_over_gap", np.nan)), checks


def gate2_grid(seed: int, ratios: Iterable[float], *, spectra: Iterable[str], perturbations: Iterable[str],
               shapes: Iterable[tuple[int, int]], k: int) -> Iterator[tuple[dict[str, Any], dict[str, Check]]]:
    """Yield ``(instance, checks)`` over spectra x perturbations x shapes x ratios (last varies fastest).

    ``instance`` = {"instance", "seed", "spectrum", "perturbation", "m", "n", "k", "target_ratio",
    "dW_over_gap"}; instance i is seeded by the i-th word of ``SeedSequence(seed)`` (the same grid and seed give
    the same bits).
    """
    grid = [(s, p, sh, float(r)) for s in spectra for p in perturbations for sh in shapes for r in ratios]
    child_seeds = np.random.SeedSequence(seed).generate_state(len(grid), dtype=np.uint32)
    for i, ((sfam, pfam, (m, n), target), cs) in enumerate(zip(grid, child_seeds)):
        dW_over_gap, checks = gate2_synthetic(int(cs), sfam, pfam, m, n, k, target)
        yield ({"instance": i, "seed": int(cs), "spectrum": sfam, "perturbation": pfam, "m": m, "n": n, "k": k,
                "target_ratio": target, "dW_over_gap": dW_over_gap}, checks)


def synthetic_sweep(
    seed: int = 0,
    ratios: Iterable[float] = tuple(np.logspace(-4, 0.5, 19)),
    *,
    spectra: Sequence[str] = SPECTRUM_FAMILIES,
    perturbations: Sequence[str] = PERTURBATION_FAMILIES,
    shapes: Sequence[tuple[int, int]] = ((12, 8), (8, 12)),
    k: int = 3,
) -> pd.DataFrame:
    """Evaluate every Gate II check over ||dW||_2 / gamma_k = ``ratios`` (by default 1e-4 to 10^0.5 ~ 3.16, four
    per decade) on every spectrum x perturbation family x shape; keep every row (7 checks per instance).

    Columns: ``instance`` (id), ``seed``, ``spectrum``, ``perturbation``, ``m``, ``n``, ``k``, ``target_ratio``,
    ``dW_over_gap`` (||W1 - W0||_2 / gamma_k(W0), both measured from the float64 matrices; it differs from
    ``target_ratio`` by the rounding of W0 + dW, visible when gamma_k is tiny), then ``Check.as_row()``:
    ``result_id``, ``lhs``, ``rhs``, ``ratio`` (= lhs / rhs), ``slack``, ``holds``, ``assumptions_hold``,
    ``failed_assumption`` ("" if none), ``verdict``, and the scalar details as ``d_*``. Each instance has its own
    seed derived from ``seed``. ``df.attrs["regime"] = "dW_over_gap"`` (the x axis of the figures).
    """
    rows = []
    with threadpool_limits(1):  # tiny matrices: a multi-threaded BLAS only oversubscribes the cores
        for inst, checks in gate2_grid(seed, ratios, spectra=spectra, perturbations=perturbations, shapes=shapes,
                                       k=k):
            for c in checks.values():
                row = {**inst, **c.as_row()}
                row["failed_assumption"] = row["failed_assumption"] or ""
                rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["regime"] = "dW_over_gap"
    return df


# ----------------------------------------------------------------------------------------------------------------
# Registration and campaigns
# ----------------------------------------------------------------------------------------------------------------

_COMMON = ("W0, W1 finite real matrices of the same shape", "1 <= k <= min(m, n)")

thm33_as_stated = register(
    "thm3.3",
    statement="max(||sin Theta(U_k)||_2, ||sin Theta(V_k)||_2) <= ||dW||_2 / gamma_k (as stated; first order)",
    gate="II", assumptions=(*_COMMON, "gamma_k > 0"), exact=False, paper_ref="Thm 3.3",
)(_one("thm3.3"))

thm33_wedin = register(
    "thm3.3-wedin",
    statement="max(||sin Theta(U_k)||_2, ||sin Theta(V_k)||_2) <= max(||dW V_k(W1)||_2, ||dW^T U_k(W1)||_2) / delta,"
              " delta = sigma_k(W1) - sigma_{k+1}(W0) (sigma_{r+1} := 0)",
    gate="II", assumptions=(*_COMMON, "delta > 0"), paper_ref="Thm 3.3 (Wedin 1972; Stewart & Sun Thm V.4.4)",
)(_one("thm3.3-wedin"))

thm33_rigorous = register(
    "thm3.3-rigorous",
    statement="max(||sin Theta(U_k)||_2, ||sin Theta(V_k)||_2) <= ||dW||_2 / (gamma_k - ||dW||_2)",
    gate="II", assumptions=(*_COMMON, "gamma_k > 0", "||dW||_2 < gamma_k"), paper_ref="Thm 3.3 (Wedin + Weyl)",
)(_one("thm3.3-rigorous"))

corF13 = register(
    "corF.13",
    statement="||U_kU_k^T(W0) - U_kU_k^T(W1)||_2 = ||sin Theta(U_k)||_2 (same for V) and <= ||dW||_2 / delta",
    gate="II", assumptions=(*_COMMON, "delta > 0 (for the bound)"), paper_ref="Cor F.13",
)(_one("corF.13"))

cor34_weyl = register(
    "cor3.4-weyl",
    statement="|sigma_i(W1) - sigma_i(W0)| <= ||dW||_2 for every i",
    gate="II", assumptions=_COMMON, paper_ref="Cor 3.4 (Weyl)",
)(_one("cor3.4-weyl"))

cor34_mirsky = register(
    "cor3.4-mirsky",
    statement="||sigma(W1) - sigma(W0)||_2 <= ||dW||_F",
    gate="II", assumptions=_COMMON, paper_ref="Cor 3.4 (Mirsky)",
)(_one("cor3.4-mirsky"))

cor35_kyfan = register(
    "cor3.5",
    statement="| ||W1||_(k) - ||W0||_(k) | <= sum_{i<=k} |dsigma_i| <= ||dW||_(k) <= k ||dW||_2",
    gate="II", assumptions=_COMMON, paper_ref="Cor 3.5 (Ky Fan)",
)(_one("cor3.5"))


def counterexample_as_stated() -> tuple[np.ndarray, np.ndarray, int]:
    """W0 = diag(1, 0), W1 = diag(0.4, 0.6), k = 1: the top singular pair swaps, sin Theta = 1 > 0.6 = ||dW||_2/gamma_1.

    Wedin holds with equality (residual 0.6, delta = 0.6 - 0 = 0.6); the rigorous bound is 0.6 / 0.4 = 1.5.
    """
    return np.diag([1.0, 0.0]), np.diag([0.4, 0.6]), 1


@functools.lru_cache(maxsize=8)
def _campaign_checks(seed: int) -> tuple[dict[str, Check], ...]:
    """Every Gate II check on a seeded family: 5 spectra x 5 perturbations x 2 shapes x 4 ratios, plus the
    structured counterexample to the as-stated form."""
    with threadpool_limits(1):  # tiny matrices: a multi-threaded BLAS only oversubscribes the cores
        return _campaign_instances(seed)


def _campaign_instances(seed: int) -> tuple[dict[str, Check], ...]:
    grid = gate2_grid(seed, (1e-3, 0.1, 0.7, 2.0), spectra=SPECTRUM_FAMILIES, perturbations=PERTURBATION_FAMILIES,
                      shapes=((10, 6), (6, 10)), k=2)
    return (gate2_all(*counterexample_as_stated()), *(checks for _, checks in grid))


def _attach_campaign(fn: Callable[..., Check], rid: str) -> None:
    def campaign(seed: int) -> list[Check]:
        return [checks[rid] for checks in _campaign_checks(int(seed))]

    campaign.__name__ = f"campaign_{rid}"
    fn.campaign(campaign)  # type: ignore[attr-defined]


for _fn in (thm33_as_stated, thm33_wedin, thm33_rigorous, corF13, cor34_weyl, cor34_mirsky, cor35_kyfan):
    _attach_campaign(_fn, _fn.result_id)  # type: ignore[attr-defined]


_GATE2_DOC = """Check {rid} on the pair (W0, W1 = W0 + dW) at k: {statement} ({paper_ref}).

Parameters
----------
W0, W1 : array_like, shape (m, n)
    The matrix before and after the update (numpy or torch, any float dtype, bf16 included; upcast to float64).
k : int
    Number of top singular values / vectors compared, 1 <= k <= min(m, n).
delta_W, mu_W : float, optional
    Lemma F.10's KL budget of the block and the smallest eigenvalue of its curvature: the KL-form right side
    sqrt(2 delta_W / mu_W) goes into ``details``.
device : str or torch.device, optional
    Where the SVDs run (torch, float64); None or "cpu" uses LAPACK.

Returns
-------
Check
    ``lhs``, ``rhs``, ``verdict`` and ``details``; bad inputs give an assumption failure naming the problem (see
    the module docstring for the tolerances).

Examples
--------
{example}
"""
_SMALL_PAIR = """>>> import numpy as np
>>> W0 = np.diag([3.0, 1.0])
>>> W1 = W0 + 0.1 * np.array([[0.0, 1.0], [1.0, 0.0]])  # ||dW||_2 = 0.1, gamma_1 = 2
"""
_GATE2_EXAMPLES = {
    thm33_as_stated: """The top singular pair swaps while ||dW||_2 / gamma_1 = 0.6 < 1 (``counterexample_as_stated``):

>>> W0, W1, k = counterexample_as_stated()
>>> c = thm33_as_stated(W0, W1, k)
>>> c.verdict, round(c.lhs, 9), round(c.rhs, 9)
('violated', 1.0, 0.6)""",
    thm33_wedin: _SMALL_PAIR + """>>> c = thm33_wedin(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.049814, 0.049876)""",
    thm33_rigorous: _SMALL_PAIR + """>>> c = thm33_rigorous(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.049814, 0.052632)
>>> thm33_rigorous(W0, W0 + np.array([[0.0, 2.5], [2.5, 0.0]]), 1).verdict  # ||dW||_2 >= gamma_1
'assumption-failed'""",
    corF13: _SMALL_PAIR + """>>> c = corF13(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.049814, 0.049876)""",
    cor34_weyl: _SMALL_PAIR + """>>> c = cor34_weyl(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.004988, 0.1)""",
    cor34_mirsky: _SMALL_PAIR + """>>> c = cor34_mirsky(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.007053, 0.141421)""",
    cor35_kyfan: _SMALL_PAIR + """>>> c = cor35_kyfan(W0, W1, 1)
>>> c.verdict, round(c.lhs, 6), round(c.rhs, 6)
('holds', 0.004988, 0.1)""",
}
for _fn, _example in _GATE2_EXAMPLES.items():  # one numpydoc docstring per registered Gate II check
    _res = RESULTS[_fn.result_id]  # type: ignore[attr-defined]
    _fn.__doc__ = _GATE2_DOC.format(rid=_res.id, statement=_res.statement, paper_ref=_res.paper_ref,
                                    example=_example)
