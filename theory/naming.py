"""The naming vocabulary of transformer weight matrices: one home for matrix types and layer indices.

The paper pools its metrics by matrix type (Table 1: Q, K, V, O, Up, Gate, Down) and by layer. Every table the
project writes and every figure it draws uses the names defined here, for the project's own small transformer
(``blocks.3.attn.q.weight``) and for Hugging Face Llama/Qwen checkpoints (``model.layers.3.self_attn.q_proj.weight``,
MoE experts ``model.layers.3.mlp.experts.7.down_proj.weight``).

Examples
--------
>>> matrix_type("model.layers.3.self_attn.q_proj.weight"), layer_index("model.layers.3.self_attn.q_proj.weight")
('q', 3)
>>> matrix_type("blocks.0.mlp.gate.weight"), layer_index("blocks.0.mlp.gate.weight")
('gate', 0)
>>> matrix_type("model.embed_tokens.weight"), layer_index("model.embed_tokens.weight")
('other', None)
"""

from __future__ import annotations

import re

__all__ = ["MATRIX_TYPES", "matrix_type", "layer_index"]

#: The seven matrix types of a Llama-style block, in the order tables and figures list them.
MATRIX_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "up", "gate", "down")

_HF_TYPE = re.compile(r"(?:^|\.)(?:self_attn|attention|attn)\.(q|k|v|o)_proj\.weight$|(?:^|\.)(up|gate|down)_proj\.weight$")
_OWN_TYPE = re.compile(r"(?:^|\.)attn\.(q|k|v|o)\.weight$|(?:^|\.)mlp\.(up|gate|down)\.weight$")
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")


def matrix_type(name: str) -> str:
    """The matrix type of a weight name: one of ``MATRIX_TYPES``, else ``"other"``.

    Biases, norms, embeddings and the LM head are ``"other"``.
    """
    for pattern in (_HF_TYPE, _OWN_TYPE):
        m = pattern.search(name)
        if m:
            return m.group(1) or m.group(2)
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer block index in a weight name (``model.layers.{i}.``, ``blocks.{i}.``, ``h.{i}.``), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
