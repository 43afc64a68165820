"""Tests for threegate.checkpoints: formats, lazy streaming, name helpers, and one clear error per bad input."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from theory.naming import layer_index, matrix_type
from threegate.checkpoints import (
    as_checkpoint,
    iter_matched,
    model_order,
    open_checkpoint,
    save_safetensors,
    select_names,
    smollm2_gguf_path,
)
from theory.errors import CheckpointError, InputError, NonFiniteError, ShapeMismatchError


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.q.weight": torch.randn(8, 6, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.up.weight": torch.randn(12, 6, generator=g).to(torch.float16),
        "blocks.1.attn.o.weight": torch.randn(6, 6, generator=g, dtype=torch.float64),
        "ln.weight": torch.randn(6, generator=g),
    }


# ----------------------------------------------------------------------------------------------- formats


def test_single_file_roundtrip_is_bit_exact_and_keeps_dtypes(tmp_path):
    sd = small_state()
    p = save_safetensors(sd, tmp_path / "m.safetensors")
    ck = open_checkpoint(p)
    assert ck.names() == list(sd)
    for name, t in sd.items():
        assert ck.shape(name) == tuple(t.shape)
        assert ck.dtype(name) == t.dtype
        got = ck.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert not list(tmp_path.glob("*.tmp")), "atomic save left a temp file"


def test_sharded_folder_with_index_maps_each_tensor_to_its_shard(tmp_path):
    sd = small_state()
    names = list(sd)
    save_safetensors({n: sd[n] for n in names[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_safetensors({n: sd[n] for n in names[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ck = open_checkpoint(tmp_path)
    assert ck.format == "safetensors-sharded"
    assert set(ck.names()) == set(names)
    for n in names:
        assert ck.file_of(n).name == weight_map[n]
        assert torch.equal(ck.get(n), sd[n])


def test_folder_with_one_safetensors_file(tmp_path):
    sd = small_state()
    save_safetensors(sd, tmp_path / "model.safetensors")
    ck = open_checkpoint(tmp_path)
    assert ck.names() == list(sd)


def test_torch_zip_archive_loads_with_weights_only(tmp_path):
    sd = small_state()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ck = open_checkpoint(tmp_path / "pytorch_model.bin")
    assert ck.format == "torch"
    for n, t in sd.items():
        assert torch.equal(ck.get(n), t)


def test_save_clones_tied_weights(tmp_path):
    w = torch.randn(5, 3)
    p = save_safetensors({"embed.weight": w, "lm_head.weight": w}, tmp_path / "tied.safetensors")
    ck = open_checkpoint(p)
    assert torch.equal(ck.get("embed.weight"), ck.get("lm_head.weight"))


# ----------------------------------------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path):
    p = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: file not found"):
        open_checkpoint(p)


@pytest.mark.parametrize("keep", [20, -10], ids=["header-cut", "data-cut"])
def test_truncated_safetensors_is_refused_naming_the_file(tmp_path, keep):
    p = save_safetensors(small_state(), tmp_path / "m.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"m\.safetensors: not a readable safetensors file"):
        open_checkpoint(p)


def test_garbage_safetensors_is_refused(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x07" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        open_checkpoint(p)


@pytest.mark.parametrize("fname", ["state.pkl", "weights.bin", "weights.safetensors", "model.ckpt"])
def test_pickle_files_are_refused_by_magic_or_extension(tmp_path, fname):
    p = tmp_path / fname
    p.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with pytest.raises(CheckpointError, match=rf"{fname}: pickle file refused"):
        open_checkpoint(p)


def test_legacy_torch_save_is_a_raw_pickle_and_is_refused(tmp_path):
    p = tmp_path / "legacy.pt"
    torch.save(small_state(), p, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt: pickle file refused"):
        open_checkpoint(p)


class NotATensor:  # a global that weights_only=True refuses to rebuild
    pass


def test_pt_with_arbitrary_objects_is_refused_by_weights_only(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": NotATensor()}, p)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused by torch\.load\(weights_only=True\).*NotATensor"):
        open_checkpoint(p)


def test_unknown_extension_is_refused(tmp_path):
    p = tmp_path / "weights.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(CheckpointError, match=r"weights\.h5: unsupported checkpoint format '\.h5'"):
        open_checkpoint(p)


def test_gguf_extension_without_magic_is_refused(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 60)
    with pytest.raises(CheckpointError, match=r"fake\.gguf: not a GGUF file"):
        open_checkpoint(p)


def test_corrupt_gguf_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "broken.gguf"
    p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 56)  # magic and version, then garbage counts
    with pytest.raises(CheckpointError, match=r"broken\.gguf: transformers cannot load this GGUF file"):
        open_checkpoint(p)


def test_empty_folder_says_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors, .gguf or .bin/.pt weights"):
        open_checkpoint(tmp_path)


def test_index_listing_a_missing_shard_names_the_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-9.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard-9\.safetensors: shard listed in model\.safetensors\.index\.json"):
        open_checkpoint(tmp_path)


def test_index_pointing_at_the_wrong_shard_names_the_tensor(tmp_path):
    save_safetensors({"a": torch.ones(2, 2)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index lists tensor 'b' in s1\.safetensors"):
        open_checkpoint(tmp_path)


def test_non_float_dtype_is_refused_naming_file_tensor_and_dtype(tmp_path):
    p = save_safetensors({"qweight": torch.zeros(4, 4, dtype=torch.int8)}, tmp_path / "q.safetensors")
    ck = open_checkpoint(p)
    with pytest.raises(InputError, match=r"q\.safetensors: tensor 'qweight' has unsupported dtype int8"):
        ck.get("qweight")
    assert ck.get("qweight", float_only=False).dtype == torch.int8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused_with_count(tmp_path, bad):
    w = torch.ones(3, 4, dtype=torch.bfloat16)
    w[1, 2] = bad
    w[2, 0] = bad
    ck = open_checkpoint(save_safetensors({"blocks.0.attn.q.weight": w}, tmp_path / "nan.safetensors"))
    with pytest.raises(NonFiniteError, match=r"nan\.safetensors: tensor 'blocks\.0\.attn\.q\.weight' has 2 non-finite"):
        ck.get("blocks.0.attn.q.weight")


def test_a_gguf_with_nan_and_inf_is_one_line_naming_the_tensor(tmp_path, capsys):
    """Issue 12: a GGUF with a NaN and an Inf in ``blk.0.ffn_up.weight`` (written with the ``gguf`` package) opens,
    its finite tensors read, and the poisoned one is refused naming the file and the tensor (HF name, as compare
    lists it); ``threegate compare`` ends with that one line, exit 1, no traceback."""
    import math

    from tests.test_hf_loading import write_tiny_llama_gguf
    from threegate.cli import main

    good = write_tiny_llama_gguf(tmp_path / "good.gguf")
    bad = write_tiny_llama_gguf(tmp_path / "bad.gguf", {"blk.0.ffn_up.weight": {3: math.nan, 7: math.inf}})
    ck = open_checkpoint(bad)
    assert ck.format == "gguf" and torch.isfinite(ck.get("model.layers.0.mlp.down_proj.weight")).all()
    message = f"{bad}: tensor 'model.layers.0.mlp.up_proj.weight' has 2 non-finite entries (NaN or Inf)"
    with pytest.raises(NonFiniteError) as e:
        ck.get("model.layers.0.mlp.up_proj.weight")
    assert str(e.value) == message
    capsys.readouterr()
    assert main(["compare", str(good), str(bad), "--out", str(tmp_path / "cmp")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"threegate compare: error: {message}"
    assert "Traceback" not in err and "weights_only" not in err


def test_unknown_tensor_name_is_named(tmp_path):
    ck = open_checkpoint(save_safetensors(small_state(), tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"m\.safetensors: no tensor named 'missing\.weight'"):
        ck.get("missing.weight")


# ----------------------------------------------------------------------------------------------- matching


def test_mismatched_names_list_a_few_on_each_side(tmp_path):
    a = small_state()
    b = dict(a)
    b.pop("ln.weight")
    b["extra.weight"] = torch.zeros(2, 2)
    ca = open_checkpoint(save_safetensors(a, tmp_path / "a.safetensors"))
    cb = open_checkpoint(save_safetensors(b, tmp_path / "b.safetensors"))
    with pytest.raises(ShapeMismatchError) as ei:
        select_names([ca, cb], matrices_only=False)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "1 selected tensor(s) missing in" in msg and "b.safetensors (ln.weight)" in msg
    assert "1 only in" in msg and "b.safetensors (extra.weight)" in msg and "--shared-only" in msg
    with pytest.raises(ShapeMismatchError, match=r"missing in \S*a\.safetensors \(extra\.weight\)"):
        select_names([cb, ca], matrices_only=False)  # both argument orders name the right side
    # outside the selection a missing tensor does not matter; --shared-only drops the missing ones with a note
    assert select_names([ca, cb], only="blocks") == ["blocks.0.attn.q.weight", "blocks.0.mlp.up.weight",
                                                     "blocks.1.attn.o.weight"]
    notes: list[str] = []
    assert "ln.weight" not in select_names([ca, cb], matrices_only=False, shared_only=True, notes=notes)
    assert any("1 selected tensor(s) absent" in n and "ln.weight" in n for n in notes)
    assert any("not in the base" in n and "extra.weight" in n for n in notes)


def test_mismatched_shape_names_tensor_and_both_files(tmp_path):
    a = small_state()
    b = dict(a, **{"blocks.0.mlp.up.weight": torch.zeros(12, 7, dtype=torch.float16)})
    ca = open_checkpoint(save_safetensors(a, tmp_path / "a.safetensors"))
    cb = open_checkpoint(save_safetensors(b, tmp_path / "b.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"'blocks\.0\.mlp\.up\.weight': shape \(12, 6\) in .*a\.safetensors but \(12, 7\) in .*b\.safetensors"):
        select_names([ca, cb])
    assert select_names([ca, cb], only="attn") == ["blocks.0.attn.q.weight", "blocks.1.attn.o.weight"]


def test_iter_matched_streams_one_name_at_a_time(tmp_path):
    sd = small_state()
    cks = [open_checkpoint(save_safetensors(sd, tmp_path / f"{i}.safetensors")) for i in range(3)]
    reads: list[str] = []
    for ck in cks:
        real = ck._read
        ck._read = lambda name, real=real: (reads.append(name), real(name))[1]
    it = iter_matched(cks)
    name, tensors = next(it)
    assert name == "blocks.0.attn.q.weight" and len(tensors) == 3
    assert reads == [name] * 3, "the next matrix must not be read before it is asked for"
    rest = [n for n, _ in it]
    assert rest == ["blocks.0.mlp.up.weight", "blocks.1.attn.o.weight"]  # 1-D ln.weight skipped


def test_select_names_filters(tmp_path):
    sd = small_state()
    cks = [open_checkpoint(save_safetensors(sd, tmp_path / f"{i}.safetensors")) for i in range(2)]
    assert select_names(cks, only=r"attn") == ["blocks.0.attn.q.weight", "blocks.1.attn.o.weight"]
    assert select_names(cks, max_matrices=1) == ["blocks.0.attn.q.weight"]
    assert "ln.weight" in select_names(cks, matrices_only=False)
    with pytest.raises(InputError, match="not a valid regular expression"):
        select_names(cks, only="(")


# ----------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, mtype, layer",
    [
        ("model.layers.0.self_attn.q_proj.weight", "q", 0),
        ("model.layers.11.self_attn.k_proj.weight", "k", 11),
        ("model.layers.3.self_attn.v_proj.weight", "v", 3),
        ("model.layers.29.self_attn.o_proj.weight", "o", 29),
        ("model.layers.2.mlp.up_proj.weight", "up", 2),
        ("model.layers.2.mlp.gate_proj.weight", "gate", 2),
        ("model.layers.2.mlp.down_proj.weight", "down", 2),
        ("model.layers.5.mlp.experts.17.down_proj.weight", "down", 5),
        ("blocks.4.attn.q.weight", "q", 4),
        ("blocks.4.attn.o.weight", "o", 4),
        ("blocks.0.mlp.gate.weight", "gate", 0),
        ("blocks.0.mlp.down.weight", "down", 0),
        ("model.layers.0.self_attn.q_proj.bias", "other", 0),
        ("model.layers.0.input_layernorm.weight", "other", 0),
        ("model.embed_tokens.weight", "other", None),
        ("lm_head.weight", "other", None),
        ("blocks.1.attn.qk_norm.weight", "other", 1),
    ],
)
def test_matrix_type_and_layer_index(name, mtype, layer):
    assert matrix_type(name) == mtype
    assert layer_index(name) == layer


# ----------------------------------------------------------------------------------------------- real model (GGUF)


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_gguf_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    return open_checkpoint(path)


def test_smollm2_gguf_loads_with_hf_names_and_a_quantization_note(smollm2):
    assert smollm2.format == "gguf"
    assert "Q4_1" in smollm2.note and "dequantized" in smollm2.note
    names = smollm2.names()
    assert len(names) == 30 * 9 + 2  # 30 blocks x (7 matrices + 2 norms) + embeddings + final norm; lm_head tied
    assert smollm2.shape("model.layers.0.self_attn.q_proj.weight") == (576, 576)
    assert smollm2.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert smollm2.shape("model.layers.29.mlp.down_proj.weight") == (576, 1536)
    counts = {t: sum(matrix_type(n) == t for n in names) for t in ("q", "k", "v", "o", "up", "gate", "down")}
    assert counts == dict.fromkeys(counts, 30)
    w = smollm2.get("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    # Q4_1 stores 16 levels per block of 32: a dequantized row holds far fewer distinct values than entries
    assert torch.unique(w[0]).numel() <= w.shape[1] // 32 * 16


def test_safetensors_whose_header_length_looks_like_a_pickle_is_still_read(tmp_path):
    """Header length 640 = 0x0280 makes the file start with b'\\x80\\x02', the opening of a protocol-2 pickle.

    (Found on SmolLM2's perturbed copy: the magic-byte check alone refused a valid safetensors file.)
    """
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    header = header.ljust(640, b" ")
    p = tmp_path / "looks_pickled.safetensors"
    p.write_bytes((640).to_bytes(8, "little") + header + data)
    assert p.read_bytes()[:2] == b"\x80\x02"
    ck = open_checkpoint(p)
    assert torch.equal(ck.get("w"), torch.arange(4, dtype=torch.float32).reshape(2, 2))


# ----------------------------------------------------------------------------------------------- as users have them


def test_model_order_is_numeric_by_layer_then_matrix_type():
    names = [f"model.layers.{i}.{p}" for i in (10, 2, 0, 1, 11) for p in
             ("mlp.down_proj.weight", "self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")]
    names += ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    got = model_order(names)
    assert got[0] == "model.embed_tokens.weight" and got[-2:] == ["lm_head.weight", "model.norm.weight"]
    layers = [layer_index(n) for n in got[1:-2]]
    assert layers == sorted(layers) and layers[::4] == [0, 1, 2, 10, 11]
    assert [matrix_type(n) for n in got[1:5]] == ["q", "up", "down", "other"]
    assert model_order(["blocks.0.mlp.experts.10.up_proj.weight", "blocks.0.mlp.experts.9.up_proj.weight"])[0] \
        == "blocks.0.mlp.experts.9.up_proj.weight"


def test_max_matrices_follows_model_order(tmp_path):
    sd = {f"model.layers.{i}.self_attn.q_proj.weight": torch.zeros(2, 2) for i in (0, 1, 2, 10, 11)}
    cks = [open_checkpoint(save_safetensors(sd, tmp_path / f"{i}.safetensors")) for i in range(2)]
    assert [layer_index(n) for n in select_names(cks, max_matrices=3)] == [0, 1, 2]  # not 0, 1, 10


def test_trainer_checkpoint_folder_never_reads_the_trainer_pickles(tmp_path):
    sd = small_state()
    ck_dir = tmp_path / "run" / "checkpoint-500"
    save_safetensors(sd, ck_dir / "model.safetensors")
    for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (ck_dir / f).write_bytes(pickle.dumps({"would": "run code"}, protocol=4))
    (ck_dir / "trainer_state.json").write_text("{}")
    ck = open_checkpoint(ck_dir)
    assert ck.names() == list(sd) and torch.equal(ck.get("blocks.0.attn.q.weight"), sd["blocks.0.attn.q.weight"])
    # an older Trainer folder: pytorch_model.bin (a zip archive) beside the same pickles
    old = tmp_path / "run" / "checkpoint-20"
    old.mkdir()
    torch.save(sd, old / "pytorch_model.bin")
    for f in ("optimizer.pt", "rng_state_1.pth", "training_args.bin"):
        (old / f).write_bytes(pickle.dumps([1], protocol=4))
    assert open_checkpoint(old).format == "torch"
    with pytest.raises(CheckpointError, match=r"run: a training run folder with 2 checkpoint folders "
                                              r"\(checkpoint-20 \.\.\. checkpoint-500\); name one of them"):
        open_checkpoint(tmp_path / "run")


def test_state_dict_and_module_are_checkpoints_with_tied_weights_once():
    lin = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7, bias=False))
    lin[1].weight = lin[0].weight  # tied
    ck = as_checkpoint(lin)
    assert ck.names() == ["0.weight"] and ck.format == "memory"
    sd = {"a.weight": torch.ones(3, 2), "b": torch.zeros(2)}
    ck2 = as_checkpoint(sd, label="mine")
    assert ck2.names() == ["a.weight", "b"] and str(ck2.path) == "mine"
    assert torch.equal(ck2.get("a.weight"), sd["a.weight"])
    with pytest.raises(InputError, match="expected a path, a Checkpoint, a state dict or an nn.Module, got int"):
        as_checkpoint(3)
    with pytest.raises(InputError, match="entry 'x' is not a"):
        as_checkpoint({"x": [1.0]})


def test_dtype_difference_is_a_note(tmp_path):
    a = {"blocks.0.attn.q.weight": torch.ones(3, 3, dtype=torch.bfloat16)}
    b = {"blocks.0.attn.q.weight": torch.ones(3, 3, dtype=torch.float32)}
    cks = [open_checkpoint(save_safetensors(d, tmp_path / f"{i}.safetensors")) for i, d in enumerate((a, b))]
    notes: list[str] = []
    select_names(cks, notes=notes)
    assert notes == ["dtypes differ on 1 tensor(s): bfloat16 in 0.safetensors, float32 in 1.safetensors "
                     "(the update mask compares both rounded to bf16)"]


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    """A tiny Llama saved as safetensors and a LoRA adapter (r=2 on q_proj, v_proj, random A and B) for it."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    model = LlamaForCausalLM.from_pretrained(root / "base")
    lcfg = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, lcfg)
    pm.save_pretrained(root / "adapter")
    lora = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    return root / "base", root / "adapter", lora


def test_peft_adapter_is_merged_onto_its_base(lora_folders):
    base_dir, adapter_dir, lora = lora_folders
    base = open_checkpoint(base_dir)
    merged = open_checkpoint(adapter_dir)
    assert merged.format == "peft-merged" and "LORA adapter (r=2)" in merged.note
    assert sorted(merged.names()) == sorted(base.names())
    eps32 = float(torch.finfo(torch.float32).eps)
    for name in base.names():
        W0, W1 = base.get(name).double(), merged.get(name).double()
        if matrix_type(name) in ("q", "v"):
            stem = "base_model.model." + name.rsplit(".weight", 1)[0]
            A, B = lora[f"{stem}.lora_A.default.weight"].double(), lora[f"{stem}.lora_B.default.weight"].double()
            delta = (8 / 2) * B @ A  # scaling = lora_alpha / r
            # float32 merge: one rounding of the product entries (k = 2 terms) and one of the sum
            bound = 4 * eps32 * ((8 / 2) * B.abs() @ A.abs() + W0.abs() + delta.abs())
            assert ((W1 - (W0 + delta)).abs() <= bound).all(), name
            assert int((W1 != W0).sum()) > 0.9 * W1.numel()
        else:
            assert torch.equal(W0, W1), name  # not adapted: bit for bit the base


def test_peft_adapter_errors_are_one_line(lora_folders, tmp_path):
    import json
    import shutil

    base_dir, adapter_dir, _ = lora_folders
    hub = tmp_path / "hub_adapter"
    shutil.copytree(adapter_dir, hub)
    cfg = json.loads((hub / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (hub / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"base_model_name_or_path 'HuggingFaceTB/SmolLM2-135M' is not a local "
                                              r"folder; name the base model folder with --adapter-base"):
        open_checkpoint(hub)
    assert open_checkpoint(hub, adapter_base=base_dir).format == "peft-merged"
    pickled = tmp_path / "pickled_adapter"
    pickled.mkdir()
    shutil.copy(hub / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: pickled adapter weights are refused"):
        open_checkpoint(pickled, adapter_base=base_dir)
    cut = tmp_path / "cut_adapter"
    shutil.copytree(hub, cut)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        open_checkpoint(cut, adapter_base=base_dir)
