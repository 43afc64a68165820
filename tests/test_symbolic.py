"""Tests for proofs_check.symbolic: every symbolic proof reaches its expected outcome, and the GQA checks are not
vacuous (a broken intervention is caught)."""

from __future__ import annotations

import pytest
import sympy as sp

from proofs_check import symbolic
from proofs_check.common import ProofResult


@pytest.fixture(scope="module")
def results():
    """Each proof runs once per test session (they take ~0.1-3 s each)."""
    return {c.__name__: c() for c in symbolic.CHECKS}


@pytest.mark.parametrize("name", [c.__name__ for c in symbolic.CHECKS])
def test_each_proof_check_matches_expectation(results, name):
    res = results[name]
    assert isinstance(res, ProofResult) and res.method == "sympy"
    assert res.ok, res.line()
    if res.expected:
        assert res.proved and res.counterexample is None
    else:  # a claim the suite refutes must carry its counterexample
        assert not res.proved and res.counterexample is not None


def test_expected_refutations_are_exactly_the_mixed_convention_rotate(results):
    assert [n for n, r in results.items() if not r.expected] == ["check_gqa_rotate_mixed_convention"]


def test_gqa_equality_test_detects_a_broken_rotation():
    """Non-vacuity: rotating W_v but not W_o changes the output (for alpha = pi/3)."""
    D, H_q, H_kv, T, d_model = 2, 2, 1, 2, 3
    a = sp.pi / 3
    R = sp.Matrix([[sp.cos(a), -sp.sin(a)], [sp.sin(a), sp.cos(a)]])
    m = symbolic._rational_matrix
    X, Wq, Wk = m(T, d_model, 1), m(d_model, H_q * D, 2), m(d_model, H_kv * D, 3)
    Wv, Wo, bv = m(d_model, H_kv * D, 4), m(H_q * D, d_model, 5), m(1, H_kv * D, 6)
    base = symbolic._gqa(X, Wq, Wk, Wv, Wo, bv, H_q, H_kv, D)
    broken = symbolic._gqa(X, Wq, Wk, Wv * R, Wo, bv * R, H_q, H_kv, D)
    assert any(sp.simplify(e) != 0 for e in (broken - base))


def test_rational_test_matrices_are_not_degenerate():
    M = symbolic._rational_matrix(3, 3, 2)
    assert M.rank() >= 2 and len(set(M)) > 3
