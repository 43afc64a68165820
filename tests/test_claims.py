"""Tests for sims.claims.base: the Verdict and Claim records, the seed rule, what every claim experiment shares."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import sims.claims.consistency as cc
from sims.claims.base import (
    VERDICT_COLUMNS,
    Claim,
    ClaimRun,
    Verdict,
    block_matrix_index,
    effect_verdict,
    only_rows,
    require_columns,
    verdicts_frame,
    write_claim_run,
)
from theory.errors import InputError

CLAIMS_DIR = Path(__file__).resolve().parents[1] / "sims" / "claims"


# ----------------------------------------------------------------------------------------------------------------
# The seed rule


def test_verdict_rejects_unknown_verdict():
    with pytest.raises(InputError, match="verdict must be one of"):
        Verdict("c_claim", "Fig. 0: c", "probably", "why")


@pytest.mark.parametrize("effects, expected", [
    ({0: 0.30, 1: 0.32, 2: 0.31}, "reproduced"),            # far above min effect, tiny spread
    ({0: -0.20, 1: -0.22}, "not reproduced"),               # opposite direction
    ({0: 0.001, 1: 0.002}, "not reproduced"),               # no effect, tiny spread
    ({0: 0.40, 1: -0.05}, "inconclusive"),                  # spread swamps the effect
    ({0: 0.06, 1: 0.50}, "inconclusive"),                   # every seed above min but mean < spread
    ({0: 0.90}, "inconclusive"),                            # one seed: no spread known
    ({}, "inconclusive"),
    ({0: float("nan"), 1: 0.3}, "inconclusive"),
])
def test_effect_verdict_cases(effects, expected):
    v = effect_verdict("claim", effects, min_effect=0.05, what="effect")
    assert v.verdict == expected, v.reason


@given(st.lists(st.floats(-1, 1), min_size=2, max_size=5), st.floats(0, 2))
@example([0.06, 0.5], 0.0)
@example([0.0, 0.04], 0.0)
def test_effect_verdict_is_monotone_in_the_effect(effects, shift):
    """Raising every seed's effect never turns 'reproduced' into something else; lowering never rescues a
    'not reproduced'."""
    e = dict(enumerate(effects))
    up = {k: v + shift for k, v in e.items()}
    down = {k: v - shift for k, v in e.items()}
    v0 = effect_verdict("c", e, min_effect=0.05, what="x").verdict
    if v0 == "reproduced":
        assert effect_verdict("c", up, min_effect=0.05, what="x").verdict == "reproduced"
    if v0 == "not reproduced":
        assert effect_verdict("c", down, min_effect=0.05, what="x").verdict == "not reproduced"


# ----------------------------------------------------------------------------------------------------------------
# Records


def test_a_claim_makes_verdicts_that_carry_its_id_and_statement():
    claim = Claim("toy_claim", "Fig. 0: toy")
    v = claim.verdict("reproduced", "because", {"x": 1.5})
    assert v == Verdict("toy_claim", "Fig. 0: toy", "reproduced", "because", {"x": 1.5})
    assert str(claim) == "toy_claim"
    assert effect_verdict(claim, {0: 0.3, 1: 0.31}, min_effect=0.05, what="e").statement == "Fig. 0: toy"
    with pytest.raises(InputError, match="toy_claim: table lacks column"):
        require_columns(pd.DataFrame({"a": [1]}), ("a", "b"), claim)


def test_verdicts_table_and_json_have_the_same_fields(tmp_path):
    v = [Verdict("a_claim", "Table 9: a", "inconclusive", "one seed", {"seeds": ["0"], "effects": [0.25]})]
    df = verdicts_frame(v)
    assert list(df.columns) == VERDICT_COLUMNS
    assert json.loads(df.loc[0, "numbers"]) == {"effects": [0.25], "seeds": ["0"]}
    out = write_claim_run(ClaimRun([], {"t": pd.DataFrame({"x": [1]})}, v, {"preset": "fast"}), tmp_path / "run")
    saved = json.loads((out / "verdicts.json").read_text())
    assert saved == [{"claim": "a_claim", "statement": "Table 9: a", "verdict": "inconclusive", "reason": "one seed",
                      "numbers": {"seeds": ["0"], "effects": [0.25]}}]
    assert pd.read_parquet(out / "t.parquet")["x"].tolist() == [1]
    assert json.loads((out / "claims_config.json").read_text()) == {"preset": "fast"}


def _literal_claims() -> list[tuple[str, str]]:
    """(id, statement) of every ``Claim("id", "statement")`` written out in the claim modules."""
    found = []
    for path in sorted(CLAIMS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Claim" and len(node.args) == 2:
                cid, statement = node.args
                if isinstance(cid, ast.Constant):
                    found.append((cid.value, ast.literal_eval(statement) if isinstance(statement, ast.Constant)
                                  else "<f-string>"))
    return found


def test_every_claim_has_a_stable_snake_case_id_and_a_statement():
    empty = pd.DataFrame(columns=["run_a", "run_b", "group", "matrix_type", "jaccard", "density_a", "density_b",
                                  "baseline", "baseline_exponent"])
    dynamic = [cc.consistency_above_baseline(empty, g, b) for g in ("seed", "task", "algorithm")
               for b in ("baseline", "baseline_exponent")]
    claims = _literal_claims() + [(v.id, v.statement) for v in dynamic]
    assert len(claims) >= 25
    ids = [cid for cid, _ in claims]
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)+", cid) for cid in ids), ids
    assert len(set(ids)) == len(ids), sorted(ids)
    assert all(st and not re.search(r"\([a-z]+_[a-z0-9_]+\)", st) for _, st in claims)  # the id is not in the text
    assert "jaccard_above_magnitude_task" in ids and "rl_overlap_princ_below_binade" in ids


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def test_block_matrix_index_keeps_block_matrices_only():
    state = {"tok.weight": torch.zeros(3, 2), "blocks.0.attn.q.weight": torch.zeros(2, 2),
             "blocks.1.mlp.down.weight": torch.zeros(2, 4), "blocks.1.ln1.weight": torch.zeros(2),
             "lm_head.weight": torch.zeros(3, 2)}
    assert block_matrix_index(state) == {"blocks.0.attn.q.weight": (0, "q"), "blocks.1.mlp.down.weight": (1, "down")}


def test_only_rows_filters_the_columns_the_table_has():
    t = pd.DataFrame({"a": [1, 1, 2], "b": ["x", "y", "x"]})
    assert only_rows(t, a=1, b="x", c="ignored").index.tolist() == [0]
