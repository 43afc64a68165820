"""Tests for sims.tables: the one table writer, the pooled sparsity count, the summary tables of probed runs."""

from __future__ import annotations

import json

import pandas as pd
import torch
from hypothesis import given
from hypothesis import strategies as st

from sims.tables import concat_tables, pooled_sparsity, summary_tables, write_tables
from sims.tinygpt.probe import RunResult


def test_write_tables_writes_both_formats_with_the_prefix_and_meta(tmp_path):
    a = pd.DataFrame({"x": [1.5, float("nan")], "s": ["u", "v"]})
    paths = write_tables({"a": a, "empty": pd.DataFrame()}, tmp_path / "out", prefix="run_", meta={"model": "m"},
                         skip_empty=True)
    assert [p.name for p in paths] == ["run_a.csv", "run_a.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(paths[1]), a)
    pd.testing.assert_frame_equal(pd.read_csv(paths[0]), a)
    assert json.loads((tmp_path / "out" / "run_a.parquet.meta.json").read_text()) == {"model": "m"}
    assert not (tmp_path / "out" / "run_empty.csv").exists()


def test_concat_tables_skips_frames_without_columns():
    assert concat_tables([None, pd.DataFrame()]).empty
    assert concat_tables([pd.DataFrame({"a": [1]}), None, pd.DataFrame({"a": [2]})])["a"].tolist() == [1, 2]


@given(st.lists(st.tuples(st.sampled_from(["q", "k", "down"]), st.integers(0, 50), st.integers(50, 100)),
                min_size=1, max_size=12))
def test_pooled_sparsity_adds_counts_per_type_and_over_all(counts):
    rows = {r["matrix_type"]: r for r in pooled_sparsity(counts)}
    assert list(rows)[:2] == [counts[0][0], "all"]  # first type, then all, then the others as they appear
    for mt in {c[0] for c in counts}:
        ch, n = sum(c[1] for c in counts if c[0] == mt), sum(c[2] for c in counts if c[0] == mt)
        assert (rows[mt]["changed"], rows[mt]["total"]) == (ch, n) and rows[mt]["sparsity"] == 1 - ch / n
    assert rows["all"]["changed"] == sum(c[1] for c in counts) and rows["all"]["total"] == sum(c[2] for c in counts)


def test_summary_tables_read_hf_names_with_exact_sparsity():
    """A run of a Hugging Face model (HF parameter names) gets the same sparsity / spectrum / angles tables as
    TinyGPT's: here exactly 3 of 32 q entries and 0 of the others change, norms and embeddings are left out."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
            "model.layers.0.mlp.down_proj.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
            "model.layers.0.input_layernorm.weight": torch.ones(8, dtype=torch.bfloat16),
            "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16)}
    final = {n: w.clone() for n, w in base.items()}
    q = final["model.layers.0.self_attn.q_proj.weight"].view(-1)
    q[[0, 5, 9]] = q[[0, 5, 9]] * 2  # three entries change (none is zero: randn)
    final["model.layers.0.input_layernorm.weight"] += 1  # not a block matrix: must not count
    metrics = pd.DataFrame(columns=["run", "kind", "step", "matrix", "metric", "value"])
    res = RunResult("rlvr", "hf-run", {"steps": 2, "seed": 0, "model": "some/hf-dir"}, pd.DataFrame(),
                    metrics, pd.DataFrame(), {0: base, 2: final}, {}, 0.0)
    t = summary_tables([res], k=2)
    sp = t["sparsity"].set_index("matrix_type")
    assert sp.loc["q", "changed"] == 3 and sp.loc["q", "total"] == 32
    assert sp.loc["down", "changed"] == 0 and sp.loc["all", "total"] == 64
    assert sp.loc["all", "sparsity"] == 1 - 3 / 64 and set(sp["model"]) == {"some/hf-dir"}
    assert set(t["spectrum"]["matrix_type"]) == {"q", "down"} and set(t["angles"]["layer"]) == {0}
