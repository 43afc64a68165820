"""``threegate run``: per-step progress of RL runs (TinyGPT and HF) on stderr, ``--quiet``, the end-of-run warnings
(zero-gradient steps counted, stored weights unchanged), ``--list`` and ``--version`` (issue 12, point 6)."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

import threegate
from sims.experiments.registry import EXPERIMENTS
from sims.tinygpt.progress import equal_reward_groups, stored_unchanged
from sims.tinygpt.storage import load_snapshot
from sims.tinygpt.tasks import Task
from threegate.cli import main

from tests.test_hf_backend import tiny_dir  # noqa: F401  (the tiny local Llama folder fixture)

CACHE = ".cache/threegate"
STEP = re.compile(r"^(\w+) step (\d+)/(\d+): reward ([+-]\d\.\d{3}), (KL_step|KL_ref) (\S+)")


def _rlvr_config(tmp_path, **rlvr) -> str:
    cfg = {"seed": 0, "pretrain": {"preset": "fast", "cache_dir": CACHE},
           "rlvr": {"task": "counting", "steps": 3, "lr": 3e-4, "prompts_per_step": 4, "group_size": 4,
                    "probe": {"n_eval_prompts": 4, "n_fisher_rollouts": 4, "theory_checks": False}, **rlvr}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _step_lines(err: str) -> list[re.Match]:
    return [m for m in map(STEP.match, err.splitlines()) if m]


def test_tinygpt_rl_prints_one_line_per_step_matching_the_history(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "rlvr", "--config", _rlvr_config(tmp_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    steps = _step_lines(err)
    hist = pd.read_parquet(out / "history.parquet")
    assert [int(m.group(2)) for m in steps] == [1, 2, 3] and {m.group(3) for m in steps} == {"3"}
    assert [m.group(4) for m in steps] == [f"{r:+.3f}" for r in hist["reward_mean"]]
    assert [m.group(5) for m in steps] == ["KL_step"] * 3  # beta = 0: the step's own KL(pi_old || pi_new)
    assert [m.group(6) for m in steps] == [f"{v:.3g}" for v in hist["kl_step"]]  # printed to 3 significant digits
    assert (hist["kl_step"] >= 0).all() and (hist["kl_step"] > 0).any()
    assert "the run left the stored" not in err  # lr 3e-4 moves bf16 weights
    zero = int(hist["equal_reward_groups"].sum())
    assert (f"{zero} of 3 steps had zero policy gradient" in err) == (zero > 0)
    assert main(["run", "rlvr", "--config", _rlvr_config(tmp_path), "--out", str(out), "--quiet"]) == 0
    assert _step_lines(capsys.readouterr().err) == []


def test_zero_gradient_steps_are_counted_and_unchanged_weights_warned_once(tmp_path, capsys, monkeypatch):
    """Every completion rewarded +1: every group's rewards are equal, the advantages and (beta = 0) the gradients
    are exactly 0, and AdamW with zero gradients and no weight decay does not move a weight."""
    monkeypatch.setattr(Task, "reward", lambda self, prompt, completion: 1.0)
    out = tmp_path / "o"
    assert main(["run", "rlvr", "--config", _rlvr_config(tmp_path), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [ln for ln in err if ln.startswith("warning:")]
    assert warnings == ["warning: rlvr: 3 of 3 steps had zero policy gradient: every group's rewards were equal "
                        "(steps 1, 2, 3)",
                        "warning: rlvr: the run left the stored bf16 weights unchanged (no entry moved in 3 steps)"]
    hist = pd.read_parquet(out / "history.parquet")
    assert hist["equal_reward_groups"].all() and (hist["grad_norm"] == 0).all()
    a = load_snapshot(out / "snapshots" / "rlvr_step00000.safetensors")
    b = load_snapshot(out / "snapshots" / "rlvr_step00003.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the warning is true


def test_hf_rl_progress_and_warnings(tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """TRL's GRPO through threegate run: one progress line per optimizer step with TRL's logged reward and KL (beta
    > 0 so TRL logs one); with every reward -1 the zero-gradient and unchanged-weights warnings."""
    import sims.hf.trl_runs as trl_runs

    cfg = tmp_path / "hf.toml"
    cfg.write_text(f'[hf_rlvr]\npreset = "default"\nmodel = "{tiny_dir}"\nsteps = 2\nprompts_per_step = 1\n'
                   'num_generations = 2\nmicro_batch = 2\nmax_completion_length = 4\nlr = 1e-3\nbeta = 0.1\n')
    monkeypatch.setattr(trl_runs, "reward", lambda text, answer: 1.0 if len(text) % 2 else -1.0)
    assert main(["run", "hf_rlvr", "--config", str(cfg), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    steps = _step_lines(err)
    hist = pd.read_parquet(tmp_path / "a" / "history.parquet")
    assert [(m.group(1), int(m.group(2)), m.group(5)) for m in steps] == [("hf_rlvr", 1, "KL_ref"), ("hf_rlvr", 2, "KL_ref")]
    assert [m.group(4) for m in steps] == [f"{v:+.3f}" for v in hist["reward"]]
    assert [m.group(6) for m in steps] == [f"{v:.3g}" for v in hist["kl"]]
    monkeypatch.setattr(trl_runs, "reward", lambda text, answer: -1.0)
    assert main(["run", "hf_rlvr", "--config", str(cfg), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert _step_lines(err) == []
    assert err.count("warning: hf_rlvr: 2 of 2 steps had zero policy gradient") == 1


def test_helpers_decide_on_exact_equality():
    assert equal_reward_groups(torch.tensor([1.0, 1.0, -1.0, -1.0]), 2)
    assert not equal_reward_groups(torch.tensor([1.0, 1.0, -1.0, 1.0]), 2)
    a = {"w": torch.tensor([0.0, 1.0])}
    assert stored_unchanged(a, {"w": torch.tensor([-0.0, 1.0])})  # +0 == -0: the same stored value
    assert not stored_unchanged(a, {"w": torch.tensor([0.0, 1.0 + 2.0**-23])})


def test_list_prints_whole_descriptions(capsys):
    assert main(["run", "--list"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for e in EXPERIMENTS.values():
        assert f"{e.name} {e.doc}" in text, e.name
    assert "bf16 vs fp32 storage, an RL lr sweep, the Def 2.1 probe" in text  # past the old first-line cut


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"threegate {threegate.__version__}\n"
