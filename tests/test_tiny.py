"""Tests for sims.hf.tiny: the tiny local Llama + character tokenizer load offline, are seeded, and round-trip text.

Library facts pinned here hold for transformers 5.25 / tokenizers as installed with it."""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sims.hf.tiny import SPECIAL_TOKENS, char_tokenizer, save_tiny_llama, tiny_llama


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def test_folder_loads_offline_with_auto_classes(tiny_folder, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (tiny_folder / "model.safetensors").is_file() and not list(tiny_folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_folder, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert model.config.vocab_size == len(tok) == len(SPECIAL_TOKENS) + len(set(string.printable))
    # the saved weights are the in-memory model's, bit for bit
    ref = tiny_llama(0).state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name
    # and the model runs: a forward on a padded batch gives finite logits over the vocabulary
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, 4, len(tok)) and torch.isfinite(logits).all()


def test_weights_equal_the_hand_built_tiny_llama_of_the_hf_backend_tests():
    """tests/test_hf_backend.py builds the same model by hand: same config, torch.manual_seed(0) then the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(_TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        by_hand = LlamaForCausalLM(cfg).state_dict()
    ours = tiny_llama(0).state_dict()
    assert by_hand.keys() == ours.keys() and all(torch.equal(by_hand[k], ours[k]) for k in ours)


def test_weights_are_determined_by_the_seed_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = tiny_llama(0).state_dict(), tiny_llama(0).state_dict(), tiny_llama(1).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


@given(st.text(alphabet=string.printable, max_size=40))
@example("a\nb\n\nc")  # "." in a regex does not match a newline: the splitter must
@example("  two  spaces ")
@example("x . y , z")  # clean_up_tokenization_spaces would turn " ." into "."
def test_printable_text_round_trips_one_token_per_character(text):
    tok = _TOK
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert 3 not in ids  # no <unk>
    assert tok.decode(ids) == text


def test_unknown_characters_map_to_unk_and_specials_are_skipped_on_request():
    tok = _TOK
    ids = tok("é", add_special_tokens=False)["input_ids"]
    assert ids == [tok.unk_token_id]
    assert tok.decode([tok.bos_token_id, *tok("ok", add_special_tokens=False)["input_ids"], tok.eos_token_id],
                      skip_special_tokens=True) == "ok"


def test_chat_template_writes_turns_the_vocabulary_covers(tmp_path):
    from transformers import AutoTokenizer

    assert not _TOK.chat_template  # off by default: plain-text prompts
    tok = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path, chat_template=True), local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>1+1?</s><|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and ids.count(tok.eos_token_id) == 1


_TOK = char_tokenizer()
