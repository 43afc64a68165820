"""A tiny local Llama and a character-level tokenizer that transformers and TRL accept, offline and seeded.

The default-tier tests of the Hugging Face paths (``threegate.callback`` with TRL's ``GRPOTrainer`` /
``SFTTrainer``, ``sims.hf.backend``) need a real ``transformers`` causal LM that builds in milliseconds without the
hub. ``save_tiny_llama(path, seed)`` writes a local HF model folder (``config.json`` + ``model.safetensors`` +
tokenizer files) that ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``
load with ``HF_HUB_OFFLINE=1``.

The model is a ``LlamaForCausalLM`` with 2 layers, hidden size 32, 4 attention heads over 2 key/value heads (GQA)
and tied embeddings, initialised from ``seed`` inside ``torch.random.fork_rng`` (the caller's RNG is untouched), so
the same seed gives bit-identical weights. The tokenizer maps each printable ASCII character (``string.printable``)
to one token; ids 0-3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``. Any text over ``string.printable`` round-trips
through ``encode``/``decode`` exactly. ``chat_template=True`` adds a minimal chat template (``<|role|>content``
turns) for conversational datasets; without it (the default) prompts are plain text, and the folder is bit-identical
to the tiny model that ``tests/test_hf_backend.py`` builds by hand.

Examples
--------
>>> tok = char_tokenizer()
>>> ids = tok("2+2=4", add_special_tokens=False)["input_ids"]
>>> len(ids), tok.decode(ids)
(5, '2+2=4')
>>> tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
(0, 1, 2)
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "char_tokenizer", "tiny_llama_config", "tiny_llama", "save_tiny_llama"]

#: pad, bos, eos, unk: ids 0, 1, 2, 3 in this order.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")

#: Jinja chat template: each turn is ``<|role|>content`` followed by EOS; a generation prompt opens an assistant turn.
#: Every character it writes is in the vocabulary (the role markers are spelled out character by character).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer(*, chat_template: bool = False):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``string.printable`` (plus the specials).

    Built from a ``tokenizers`` WordLevel model whose pre-tokenizer splits every character (newlines included) and
    whose decoder fuses tokens without spaces, so ``decode(encode(s)) == s`` for printable ``s``. Characters outside
    ``string.printable`` map to ``<unk>``. ``encode`` adds no special tokens (no post-processor): TRL's trainers
    append EOS themselves. ``chat_template=True`` sets ``CHAT_TEMPLATE``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # heavy (tokenizers): only when a tiny model is built
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(SPECIAL_TOKENS + tuple(dict.fromkeys(string.printable)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE if chat_template else None,
        model_max_length=512,
    )


def tiny_llama_config(vocab_size: int | None = None, *, hidden_size: int = 32, num_hidden_layers: int = 2):
    """The ``LlamaConfig`` of the tiny model (vocabulary of ``char_tokenizer`` unless given)."""
    from transformers import LlamaConfig  # heavy (transformers): only when a tiny model is built

    if vocab_size is None:
        vocab_size = len(char_tokenizer())
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )


def tiny_llama(seed: int = 0, *, hidden_size: int = 32, num_hidden_layers: int = 2):
    """A float32 ``LlamaForCausalLM`` initialised from ``seed`` (the global torch RNG is forked, not changed)."""
    from transformers import LlamaForCausalLM  # heavy (transformers): only when a tiny model is built

    cfg = tiny_llama_config(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_tiny_llama(path: str | os.PathLike, seed: int = 0, *, hidden_size: int = 32, num_hidden_layers: int = 2,
                    chat_template: bool = False) -> Path:
    """Write the tiny Llama (``seed``) and ``char_tokenizer`` to the folder ``path`` (safetensors); return it.

    Examples
    --------
    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> with tempfile.TemporaryDirectory() as d:
    ...     folder = save_tiny_llama(d, seed=0)
    ...     model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ...     tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ...     (model.config.num_hidden_layers, tok.decode(tok("hi!")["input_ids"]))
    (2, 'hi!')
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers).save_pretrained(
        folder, safe_serialization=True)
    char_tokenizer(chat_template=chat_template).save_pretrained(folder)
    return folder
