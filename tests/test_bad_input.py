"""Bad input through the real CLI (``threegate.cli.main``): a non-zero exit, exactly one stderr line naming the
file / section / key / tensor and the problem, no traceback, never advice to unpickle, and nothing already computed
lost (issue 12, point 4)."""

from __future__ import annotations

import json
import math
import pathlib
import re

import pytest
import torch
from safetensors.torch import save_file

from sims.sweep.store import load_store, store_cells
from threegate.cli import main

CACHE = ".cache/threegate"  # the project's pretraining cache: the fast base model is trained once per machine


def one_error_line(capsys, rc: int) -> str:
    """The single stderr line of a failed command (and the checks every bad-input failure must pass)."""
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc != 0, cap
    assert len(lines) == 1, cap.err
    assert "Traceback" not in cap.err and "weights_only" not in cap.err + cap.out, cap.err
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# Config files


@pytest.mark.parametrize("name, text, expected", [
    ("c.toml", '[rlvr]\nsteps = "four"\n',
     "config file {path}: [rlvr] steps: expected an integer, got the string 'four'"),
    ("c.toml", '[rlvr]\nlr = "1e-3"\n',
     "config file {path}: [rlvr] lr: expected a number, got the string '1e-3' (YAML 1.1 reads 1e-3 as a string; "
     "write 1.0e-3)"),
    ("c.yaml", "rlvr:\n  lr: 1e-4\n",
     "config file {path}: [rlvr] lr: expected a number, got the string '1e-4' (YAML 1.1 reads 1e-4 as a string; "
     "write 1.0e-4)"),
    ("c.toml", "seedd = 0\n", "config file {path}: top level: unknown key 'seedd' (did you mean 'seed'?)"),
    ("c.toml", "[rlvr.probe]\ntheory_checks = 1\n",
     "config file {path}: [rlvr] probe.theory_checks: expected a boolean (true or false), got the integer 1"),
    ("c.json", '{"rlvr": {"betas": [0.9, "0.99"]}}',
     "config file {path}: [rlvr] betas[1]: expected a number, got the string '0.99' (write the number without "
     "quotes)"),
    ("c.toml", '[pretrain]\npreset = "fats"\n',
     "config file {path}: [pretrain] preset: expected one of ['fast', 'default'], got the string 'fats' (did you "
     "mean 'fast'?)"),
])
def test_run_refuses_a_config_of_the_wrong_type_before_any_work(tmp_path, capsys, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "runs" / "out"
    line = one_error_line(capsys, main(["run", "rlvr", "--config", str(path), "--out", str(out)]))
    assert line == "threegate run: error: " + expected.format(path=path)
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_sweep_refuses_a_bad_cell_before_any_cell_runs(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    store = tmp_path / "s.sqlite"
    spec.write_text(f"sweep: {{experiment: theory, workers: 0, store: {store}}}\nbase: {{m: 6, n: 5}}\n"
                    "grid:\n  k: [1, 2, '3']\n")
    line = one_error_line(capsys, main(["sweep", str(spec), "--quiet"]))
    assert line == (f"threegate sweep: error: sweep spec {spec}: cell (k=3): [theory cell] k: expected an integer, "
                    "got the string '3' (write the number without quotes)")
    assert not store.exists()  # no cell ran


# ----------------------------------------------------------------------------------------------------------------
# HF model folders: refused before transformers sees them, nothing unpickled


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was (never) loaded."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(16, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g),
            "model.norm.weight": torch.ones(8, dtype=torch.bfloat16)}


def _folder(tmp_path, name: str) -> pathlib.Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def _hf_config(tmp_path, folder, kind: str = "hf_rlvr") -> pathlib.Path:
    path = tmp_path / f"{folder.name}-{kind}.toml"
    path.write_text(f'[{kind}]\npreset = "default"\nmodel = "{folder}"\nsteps = 1\n')
    return path


def _run_hf(tmp_path, capsys, folder, kind: str = "hf_rlvr") -> str:
    rc = main(["run", kind, "--config", str(_hf_config(tmp_path, folder, kind)), "--out", str(tmp_path / "o" / kind)])
    line = one_error_line(capsys, rc)
    assert not (tmp_path / "o").exists()  # a failed run leaves no folder, nor the parent it made
    return line


@pytest.mark.parametrize("kind", ["hf_rlvr", "hf_sft"])
def test_pickle_weights_are_refused_without_unpickling(tmp_path, capsys, kind):
    marker = tmp_path / "UNPICKLED"
    zipped = _folder(tmp_path, "zip")
    torch.save({"w": torch.zeros(2), "payload": _Payload(marker)}, zipped / "pytorch_model.bin")
    raw = _folder(tmp_path, "raw")
    torch.save({"w": torch.zeros(2), "payload": _Payload(marker)}, raw / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    line = _run_hf(tmp_path, capsys, zipped, kind)
    assert line == (f"threegate run: error: {zipped / 'pytorch_model.bin'}: the model's weights are a PyTorch zip "
                    "archive holding a pickle; threegate loads weights only from safetensors (or GGUF) and never "
                    "unpickles")
    line = _run_hf(tmp_path, capsys, raw, kind)
    assert line.startswith(f"threegate run: error: {raw / 'pytorch_model.bin'}: the model's weights are a raw pickle")
    assert not marker.exists()


def test_truncated_safetensors_names_the_file_and_the_first_missing_tensor(tmp_path, capsys):
    d = _folder(tmp_path, "trunc")
    save_file(_tensors(), d / "model.safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-20])  # cuts into the last tensor (model.norm.weight, 16 bytes)
    line = _run_hf(tmp_path, capsys, d)
    assert f"{d / 'model.safetensors'}: truncated: tensor " in line and "data section, which holds" in line
    (d / "model.safetensors").write_bytes(data[:5])
    assert "shorter than its 8-byte header length" in _run_hf(tmp_path, capsys, d)
    (d / "model.safetensors").write_bytes(data[:100])
    assert "truncated or not a safetensors file" in _run_hf(tmp_path, capsys, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_nan_and_inf_weights_name_the_file_and_the_tensor(tmp_path, capsys, dtype):
    d = _folder(tmp_path, "nan")
    t = _tensors()
    bad = t["model.layers.0.mlp.up_proj.weight"].to(dtype)
    bad.view(-1)[[5, 9, 40]] = torch.tensor([math.nan, -math.inf, math.nan], dtype=dtype)
    t["model.layers.0.mlp.up_proj.weight"] = bad
    save_file(t, d / "model.safetensors")
    line = _run_hf(tmp_path, capsys, d, "hf_sft")
    assert line == (f"threegate run: error: {d / 'model.safetensors'}: tensor 'model.layers.0.mlp.up_proj.weight' "
                    "has 2 NaN and 1 Inf entries (first at flat index 5)")


def test_nan_and_inf_in_a_gguf_model_name_the_file_and_the_tensor(tmp_path, capsys):
    """Issue 12: ``threegate run hf_rlvr`` on a GGUF whose ``blk.0.ffn_up.weight`` holds a NaN and an Inf: one
    line naming the file and the tensor as loaded, exit 1, no folder left."""
    from tests.test_hf_loading import write_tiny_llama_gguf

    d = tmp_path / "g"
    d.mkdir()
    bad = write_tiny_llama_gguf(d / "bad.gguf", {"blk.0.ffn_up.weight": {3: math.nan, 7: math.inf}})
    assert _run_hf(tmp_path, capsys, bad) == (f"threegate run: error: {bad}: tensor "
                                              "'model.layers.0.mlp.up_proj.weight' (as loaded) has 1 NaN and 1 Inf "
                                              "entries (first at flat index 3)")


def test_folder_structure_errors(tmp_path, capsys):
    d = _folder(tmp_path, "empty")
    assert _run_hf(tmp_path, capsys, d).endswith(f"{d}: no model weights (no .safetensors file)")
    (d / "config.json").write_text("{not json")
    assert _run_hf(tmp_path, capsys, d).endswith(f"{d / 'config.json'}: not valid JSON")
    idx = _folder(tmp_path, "sharded")
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    assert _run_hf(tmp_path, capsys, idx).endswith(
        f"{idx / 'model-00001.safetensors'}: shard listed in model.safetensors.index.json is missing")


def test_a_gguf_with_wrong_magic_and_a_transformers_failure_are_our_own_one_line_errors(tmp_path, capsys):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert _run_hf(tmp_path, capsys, fake).endswith(f"{fake}: not a GGUF file (magic bytes b'PK\\x03\\x04', "
                                                    "expected b'GGUF')")
    # structure and weights pass, transformers fails (no tokenizer files): its message is not passed on
    d = _folder(tmp_path, "notok")
    save_file(_tensors(), d / "model.safetensors")
    line = _run_hf(tmp_path, capsys, d)
    assert re.fullmatch(rf"threegate run: error: {re.escape(str(d))}: transformers \S+ cannot load this model "
                        r"offline \(\w+; config.json and the weights passed threegate's structure and finite checks: "
                        r"look at the tokenizer files\)", line), line


def test_a_failed_run_keeps_an_earlier_result_and_never_writes_into_a_foreign_folder(tmp_path, capsys):
    d = _folder(tmp_path, "nan")
    t = _tensors()
    t["model.norm.weight"][0] = math.inf
    save_file(t, d / "model.safetensors")
    cfg = _hf_config(tmp_path, d)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "run.json").write_text("{}")
    (earlier / "history.csv").write_text("step\n1\n")
    line = one_error_line(capsys, main(["run", "hf_rlvr", "--config", str(cfg), "--out", str(earlier)]))
    assert "tensor 'model.norm.weight' has 0 NaN and 1 Inf entries" in line
    assert sorted(p.name for p in earlier.iterdir()) == ["history.csv", "run.json"]  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    line = one_error_line(capsys, main(["run", "hf_rlvr", "--config", str(cfg), "--out", str(foreign)]))
    assert line == (f"threegate run: error: output folder {foreign} exists and is not an earlier run's results "
                    "folder (no run.json); choose another --out")


# ----------------------------------------------------------------------------------------------------------------
# Sweeps: non-zero exit whenever a cell failed, one summary line, the finished cells kept


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_sweep_with_a_failed_cell_exits_nonzero_with_one_summary_line(tmp_path, capsys, fmt):
    store = tmp_path / "s.sqlite"
    spec = tmp_path / f"s.{fmt}"
    if fmt == "toml":
        spec.write_text(f'[sweep]\nexperiment = "theory"\nstore = "{store}"\nworkers = 0\n'
                        '[base]\nm = 6\nn = 5\nids = ["cor3.4-weyl"]\n[grid]\nk = [1, 9, 2]\n')
    else:
        spec.write_text(f"sweep: {{experiment: theory, store: '{store}', workers: 0}}\n"
                        "base: {m: 6, n: 5, ids: [cor3.4-weyl]}\ngrid: {k: [1, 9, 2]}\n")
    rc = main(["sweep", str(spec), "--quiet"])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in cap.err
    cells = store_cells(store)
    bad = cells.loc[cells["status"] == "failed", "cell_id"].item()
    assert lines[0] == (f"threegate sweep s: 1 of 3 cells failed: {bad} (k=9): InputError: spectrum: k=9 outside "
                        "1..5 (errors in the store's 'cells' table; rerun them with --retry-failed)")
    assert sorted(load_store(store)["checks"]["k"].unique()) == [1, 2]  # the finished cells stay in the store
    # a rerun runs nothing and still fails, naming the same cell
    assert main(["sweep", str(spec), "--quiet"]) == 1
    assert bad in capsys.readouterr().err
