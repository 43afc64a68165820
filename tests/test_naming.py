"""Tests for theory.naming: the one vocabulary of matrix types and layer indices (TinyGPT and HF names alike)."""

from __future__ import annotations

import pytest

from theory.naming import MATRIX_TYPES, layer_index, matrix_type


@pytest.mark.parametrize("t", MATRIX_TYPES)
@pytest.mark.parametrize("layer", [0, 7, 31])
def test_hf_and_own_names_agree(t, layer):
    own = f"blocks.{layer}.{'attn' if t in 'qkvo' else 'mlp'}.{t}.weight"
    hf = f"model.layers.{layer}.{'self_attn' if t in 'qkvo' else 'mlp'}.{t}_proj.weight"
    moe = f"model.layers.{layer}.mlp.experts.3.{t}_proj.weight"
    assert matrix_type(own) == matrix_type(hf) == t
    assert layer_index(own) == layer_index(hf) == layer
    if t not in "qkvo":
        assert matrix_type(moe) == t and layer_index(moe) == layer


@pytest.mark.parametrize(
    "name", ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.2.input_layernorm.weight",
             "model.layers.2.self_attn.q_proj.bias", "blocks.0.attn.q", "blocks.0.mlp.qq.weight"],
)
def test_everything_else_is_other(name):
    assert matrix_type(name) == "other"


def test_layer_index_absent_is_none():
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("transformer.h.5.attn.c_attn.weight") == 5
