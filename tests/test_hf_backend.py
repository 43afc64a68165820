"""Tests for sims.hf.backend: RLVR / SFT loops on a tiny random Llama built offline from a config (default tier),
and on SmolLM2-135M (GGUF, offline) in the slow tier.

The tiny model (hidden 32, 2 layers, a character-level tokenizer built with ``tokenizers``) never answers a word
problem right, so the RL tests that need a moving policy replace the checker's reward by a deterministic function
of the completion text (even length -> +1): the loop mechanics, not the task, are under test there."""

from __future__ import annotations

import math
import string

import numpy as np
import pandas as pd
import pytest
import torch

import sims.hf.backend as hb
from sims.hf.backend import (
    HFRLConfig,
    HFSFTConfig,
    completion_logprobs,
    run_cell,
    sample_completions,
    train_hf_rlvr,
    train_hf_sft,
)
from sims.hf.loading import load_causal_lm, smollm2_gguf_path
from sims.hf.recorder import probe_matrix_names
from sims.experiments.config import load_config, resolve_section
from sims.experiments.registry import check_config
from sims.tinygpt.storage import save_snapshot
from theory.errors import CheckpointError, InputError

RIGOROUS = ("cor3.4-weyl", "cor3.4-mirsky", "thm3.3-rigorous", "thm3.3-wedin", "cor3.5", "corF.13")


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {c: i for i, c in enumerate(specials + list(dict.fromkeys(string.printable)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local HF model folder: a random tiny Llama (tied embeddings, GQA) and its character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def even_length_reward(monkeypatch):
    monkeypatch.setattr(hb, "reward", lambda text, answer: 1.0 if len(text) % 2 == 0 else -1.0)


def tiny_rl(tiny_dir, **kw) -> HFRLConfig:
    base = dict(model=str(tiny_dir), steps=3, prompts_per_step=2, group_size=4, max_new_tokens=8, lr=1e-3,
                minibatches=2, snapshot_steps=(1,), k=2, micro_batch=3)
    return HFRLConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------- loading


def test_local_folder_loads_with_hf_names(tiny_dir):
    lm = load_causal_lm(tiny_dir)
    names = [n for n, _ in lm.model.named_parameters()]
    assert names[0] == "model.embed_tokens.weight" and "lm_head.weight" not in names  # tied: stored once
    assert lm.note == "" and lm.tokenizer.eos_token_id == 2


# ----------------------------------------------------------------------------------------------- sampling


def test_cached_sampling_matches_the_full_forward_and_left_padding(tiny_dir):
    """The KV-cache sampler's tokens re-scored by one full forward: greedy tokens are the argmax of the full
    forward's logits, and a short prompt padded on the left scores exactly as when alone (up to fp32 noise)."""
    lm = load_causal_lm(tiny_dir)
    tok = lm.tokenizer
    prompts = [tok("Question: 12 + 5", add_special_tokens=False)["input_ids"],
               tok("Hi", add_special_tokens=False)["input_ids"]]
    r = sample_completions(lm.model, prompts, 6, temperature=0.0, generator=None, eos_id=2, pad_id=0, device="cpu")
    with torch.no_grad():
        out = lm.model(input_ids=r.sequences, attention_mask=r.attention_mask.long(),
                       position_ids=hb._positions(r.attention_mask)).logits
    N = r.completion_mask.shape[1]
    pred = out[:, r.prompt_len - 1:-1].argmax(-1)
    assert torch.equal(pred[r.completion_mask], r.sequences[:, -N:][r.completion_mask])
    alone = sample_completions(lm.model, prompts[1:], 6, temperature=0.0, generator=None, eos_id=2, pad_id=0,
                               device="cpu")
    lp_batch = completion_logprobs(lm.model, r.sequences, r.attention_mask, r.completion_mask)[1]
    lp_alone = completion_logprobs(lm.model, alone.sequences, alone.attention_mask, alone.completion_mask)[0]
    m = alone.completion_mask.shape[1]
    torch.testing.assert_close(lp_batch[:m], lp_alone, rtol=0, atol=64 * torch.finfo(torch.float32).eps)


def test_sampling_is_seeded():
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    prompts = [[1, 5, 6], [1, 7]]

    def draw(seed):
        return sample_completions(model, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                                  eos_id=2, pad_id=0, device="cpu").sequences

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


# ----------------------------------------------------------------------------------------------- RLVR


@pytest.fixture(scope="module")
def tiny_rl_runs(tiny_dir):
    """Two identical GRPO runs and one DAPO run on the tiny model (even-length reward)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(hb, "reward", lambda text, answer: 1.0 if len(text) % 2 == 0 else -1.0)
    try:
        runs = []
        for kw in ({}, {}, {"algorithm": "dapo", "eps_low": 0.1, "eps_high": 0.2}):
            lm = load_causal_lm(tiny_dir)
            runs.append(train_hf_rlvr(lm.model, lm.tokenizer, tiny_rl(tiny_dir, **kw)))
    finally:
        mp.undo()
    return runs


def test_rl_steps_run_and_record_every_table(tiny_rl_runs):
    res = tiny_rl_runs[0]
    h = res.history
    assert list(h["step"]) == [1, 2, 3]
    assert h["reward_mean"].between(-1, 1).all() and h["accuracy"].between(0, 1).all()
    assert (h["kl_ref"] >= 0).all() and h["kl_ref"].iloc[0] == 0.0  # step 1 samples from the base itself
    assert (h["kl_ref"].iloc[1:] > 0).all()  # after an update the policy has left the base
    assert sorted(res.snapshots) == [0, 1, 3]
    sp = res.tables["hf_sparsity"]
    assert set(sp["matrix_type"]) == {"q", "k", "v", "o", "gate", "up", "down", "all"}
    assert (sp[sp["step"] == 0]["sparsity"] == 1.0).all()
    assert (sp[sp["step"] == 3]["sparsity"] < 1.0).all()  # lr 1e-3 moves the tiny model's stored weights
    # bf16 sparsity so far: exactly 1 - (stored entries that differ from the base) / n, from the snapshots
    base, last = res.snapshots[0], res.snapshots[3]
    changed = sum(int((base[n] != last[n]).sum()) for n in base)
    assert h["bf16_sparsity_so_far"].iloc[-1] == 1 - changed / sum(v.numel() for v in base.values())


def test_stored_weights_are_exactly_bf16_of_the_master(tiny_rl_runs):
    res = tiny_rl_runs[0]
    final = res.snapshots[3]
    assert set(final) == set(res.master)
    for name, w in final.items():
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, res.master[name].to(torch.bfloat16)), name


def test_gate2_checks_on_real_steps_never_violate_the_rigorous_forms(tiny_rl_runs, tiny_dir):
    ck = tiny_rl_runs[0].checks
    g2 = ck[ck["reference"] == "base"]
    assert set(g2["step"]) == {1, 3}
    assert set(g2["matrix"]) == set(probe_matrix_names(load_causal_lm(tiny_dir).model))
    rig = g2[g2["result_id"].isin(RIGOROUS) & g2["assumptions_hold"].astype(bool)]
    assert len(rig) > 0 and rig["holds"].astype(bool).all()
    assert {"cor3.4-weyl", "cor3.4-mirsky", "cor3.5"} <= set(rig["result_id"])  # hypothesis-free: always evaluated


def test_lemma_f9_is_checked_on_clipped_runs_at_snapshot_steps(tiny_rl_runs):
    ck = tiny_rl_runs[2].checks
    f9 = ck[ck["result_id"] == "lemF.9"]
    assert list(f9["step"]) == [1, 3]
    assert (f9["d_eps"] == 0.2).all()  # the widest band the run's clipping allows


def test_same_seed_is_bit_identical(tiny_rl_runs):
    a, b = tiny_rl_runs[0], tiny_rl_runs[1]
    pd.testing.assert_frame_equal(a.history.drop(columns="wall_seconds"), b.history.drop(columns="wall_seconds"))
    for t in a.snapshots:
        for n in a.snapshots[t]:
            assert torch.equal(a.snapshots[t][n], b.snapshots[t][n]), (t, n)
    pd.testing.assert_frame_equal(a.checks, b.checks)


def test_snapshots_load_back_with_hf_names_and_go_through_compare(tiny_rl_runs, tiny_dir, tmp_path, capsys):
    from threegate.compare import compare_checkpoints
    from threegate.cli import main

    res = tiny_rl_runs[0]
    paths = {t: save_snapshot(sd, tmp_path / f"step_{t:05d}.safetensors") for t, sd in res.snapshots.items()}
    df = compare_checkpoints(paths[0], [paths[3]], k=2)
    lm = load_causal_lm(tiny_dir)
    two_d = [n for n, p in lm.model.named_parameters() if p.ndim == 2]
    assert sorted(df["name"]) == sorted(two_d)  # safetensors stores names sorted
    sd0, sd3 = res.snapshots[0], res.snapshots[3]
    for row in df.itertuples():
        assert row.changed == int((sd0[row.name] != sd3[row.name]).sum())
    rc = main(["compare", str(paths[0]), str(paths[3]), "--k", "2", "--no-progress", "--no-figures"])
    assert rc == 0 and "compared" in capsys.readouterr().out


def test_probe_matrix_names_default_regex_and_errors(tiny_dir):
    model = load_causal_lm(tiny_dir).model
    assert probe_matrix_names(model) == [f"model.layers.{i}.{m}_proj.weight" for i in (0, 1)
                                         for m in ("self_attn.q", "self_attn.v", "self_attn.o", "mlp.down")]
    assert probe_matrix_names(model, r"layers\.1\..*k_proj") == ["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(InputError, match="matches no block matrix"):
        probe_matrix_names(model, "nothing_like_this")
    with pytest.raises(InputError, match="not 2-D parameters"):
        probe_matrix_names(model, ["model.norm.weight"])


def test_zero_advantage_step_leaves_the_weights_alone(tiny_dir, monkeypatch):
    """Every completion wrong (the tiny model never solves a problem): GRPO advantages are 0, so the gradient is
    exactly 0 and AdamW (no momentum yet, no weight decay) leaves master and stored weights bit-identical."""
    lm = load_causal_lm(tiny_dir)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = train_hf_rlvr(lm.model, lm.tokenizer, tiny_rl(tiny_dir, steps=1, snapshot_steps=()))
    assert res.history["accuracy"].iloc[0] == 0.0 and res.history["grad_norm"].iloc[0] == 0.0
    for n, w in res.snapshots[1].items():
        assert torch.equal(w, before[n].to(torch.bfloat16)), n


def test_bad_configs_name_the_problem(tiny_dir):
    with pytest.raises(InputError, match="algorithm"):
        HFRLConfig(algorithm="ppo")
    with pytest.raises(InputError, match="clip-only"):
        HFRLConfig(algorithm="dapo", beta=0.1)
    with pytest.raises(InputError, match="beta > 0"):
        HFRLConfig(algorithm="reinforce_kl", beta=0.0)
    with pytest.raises(InputError, match="group_size"):
        HFRLConfig(group_size=1)
    with pytest.raises(InputError, match="snapshot_steps"):
        HFRLConfig(steps=5, snapshot_steps=(9,))
    with pytest.raises(InputError, match="precision"):
        HFSFTConfig(precision="fp16")
    with pytest.raises(InputError, match="unknown key '"):
        run_cell({"model": str(tiny_dir), "nonsense": 1})


def test_presets():
    smoke, paper = HFRLConfig.cpu_smoke(), HFRLConfig.paper()
    assert smoke.device == "cpu" and 10 <= smoke.steps <= 99 and smoke.snapshot_steps[0] == 0
    assert (paper.algorithm, paper.beta, paper.lr, paper.betas) == ("dapo", 0.0, 1e-6, (0.9, 0.999))
    assert (paper.prompts_per_step, paper.group_size, paper.minibatches) == (256, 16, 4)
    assert (paper.eps_low, paper.eps_high, paper.precision) == (0.2, 0.28, "bf16")


# ----------------------------------------------------------------------------------------------- SFT


def test_sft_lowers_the_demonstration_loss_and_keeps_bf16_storage(tiny_dir):
    lm = load_causal_lm(tiny_dir)
    cfg = HFSFTConfig(model=str(tiny_dir), steps=6, batch_size=4, micro_batch=2, lr=3e-3, snapshot_steps=(3,), k=2,
                      n_eval=4)
    res = train_hf_sft(lm.model, lm.tokenizer, cfg)
    h = res.history
    ev = h.dropna(subset=["eval_loss"])
    assert list(ev["step"]) == [0, 3, 6]
    assert ev["eval_loss"].iloc[-1] < ev["eval_loss"].iloc[0]  # 6 steps at 3e-3 learn the character statistics
    for n, w in res.snapshots[6].items():
        assert torch.equal(w, res.master[n].to(torch.bfloat16)), n
    assert res.kind == "sft" and (res.tables["hf_sparsity"]["method"] == "SFT").all()


def test_one_minibatch_is_on_policy_with_ratio_exactly_one(tiny_dir, even_length_reward):
    """With one mini-batch the behaviour log-probs are the training forward's own: no token can be clipped even by
    a tiny band; with two mini-batches the second one sees the updated policy and the tiny band clips."""
    def clip_fracs(minibatches):
        lm = load_causal_lm(tiny_dir)
        cfg = tiny_rl(tiny_dir, algorithm="dapo", eps_low=1e-4, eps_high=2e-4, minibatches=minibatches,
                      snapshot_steps=())
        h = train_hf_rlvr(lm.model, lm.tokenizer, cfg).history
        assert h["grad_norm"].max() > 0
        return h["clip_frac"]

    assert (clip_fracs(1) == 0).all()
    assert (clip_fracs(2) > 0).any()


def test_fp32_precision_stores_the_master(tiny_dir, even_length_reward):
    lm = load_causal_lm(tiny_dir)
    res = train_hf_rlvr(lm.model, lm.tokenizer, tiny_rl(tiny_dir, steps=2, precision="fp32", snapshot_steps=()))
    for n, w in res.snapshots[2].items():
        assert w.dtype == torch.float32 and torch.equal(w, res.master[n])


def test_bf16_compute_rounds_the_log_probs_and_keeps_storage_and_determinism(tiny_dir, even_length_reward):
    """compute_dtype="bf16": forwards under autocast. The log-probs of the same weights on the same tokens move by
    bf16 rounding (nonzero, far below a nat), the stored weights are still exactly bf16 of the master, and the run
    is bit-identical to itself."""
    lm = load_causal_lm(tiny_dir)
    cfg = tiny_rl(tiny_dir, steps=2, snapshot_steps=(), compute_dtype="bf16")
    r = sample_completions(lm.model, [[5, 6, 7, 8], [9, 10]], 6, temperature=1.0,
                           generator=torch.Generator().manual_seed(0), eos_id=2, pad_id=0, device="cpu")
    with torch.no_grad():
        lp32 = completion_logprobs(lm.model, r.sequences, r.attention_mask, r.completion_mask)
        with hb._compute(cfg, torch.device("cpu")):
            lp16 = completion_logprobs(lm.model, r.sequences, r.attention_mask, r.completion_mask)
    assert lp16.dtype == torch.float32  # log-softmax in fp32 from bf16 logits
    gap = (lp16 - lp32).abs()[r.completion_mask]
    assert 0 < float(gap.max()) < 0.1
    runs = []
    for _ in range(2):
        lm = load_causal_lm(tiny_dir)
        runs.append(train_hf_rlvr(lm.model, lm.tokenizer, cfg))
    a, b = runs
    for n, w in a.snapshots[2].items():
        assert torch.equal(w, a.master[n].to(torch.bfloat16)) and torch.equal(w, b.snapshots[2][n]), n
    assert a.history.drop(columns="wall_seconds").equals(b.history.drop(columns="wall_seconds"))
    eval0 = {}  # the SFT loop's step-0 held-out loss: same weights and demonstrations, only the compute differs
    for dt in ("fp32", "bf16"):
        lm = load_causal_lm(tiny_dir)
        sft = train_hf_sft(lm.model, lm.tokenizer, HFSFTConfig(model=str(tiny_dir), steps=1, batch_size=2,
                                                               micro_batch=2, lr=1e-3, k=2, n_eval=2, compute_dtype=dt))
        eval0[dt] = float(sft.history["eval_loss"].iloc[0])
    assert 0 < abs(eval0["bf16"] - eval0["fp32"]) < 0.1
    with pytest.raises(InputError, match="compute_dtype"):
        HFRLConfig(compute_dtype="fp16")
    assert HFRLConfig.paper().compute_dtype == "bf16" and HFSFTConfig.paper().compute_dtype == "bf16"


# ----------------------------------------------------------------------------------------------- sweep / CLI


def test_run_cell_returns_the_sweep_tables(tiny_dir, even_length_reward):
    out = run_cell({"model": str(tiny_dir), "algorithm": "dapo", "eps": 0.1, "lr": 1e-3, "steps": 2, "seed": 1,
                    "precision": "bf16", "device": "cpu", "prompts_per_step": 2, "group_size": 2,
                    "max_new_tokens": 6, "k": 2})
    assert set(out) >= {"history", "checks", "sparsity"}
    assert len(out["history"]) == 2
    assert set(out["sparsity"]["step"]) == {0, 1, 2}  # cpu_smoke preset: snapshots at 0, steps // 2, steps
    f9 = out["checks"][out["checks"]["result_id"] == "lemF.9"]
    assert math.isclose(f9["d_eps"].iloc[0], 0.14)  # dapo: eps_high = 1.4 eps


def test_threegate_run_hf_rlvr_writes_snapshots_that_compare(tiny_dir, tmp_path, even_length_reward, capsys):
    from threegate.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f'seed = 2\n[hf_rlvr]\npreset = "default"\nmodel = "{tiny_dir}"\nsteps = 2\nprompts_per_step = 2\n'
                   'group_size = 2\nmax_new_tokens = 6\nlr = 1e-3\nk = 2\n')
    out = tmp_path / "out"
    assert main(["run", "hf_rlvr", "--config", str(cfg), "--out", str(out)]) == 0
    snaps = sorted((out / "snapshots").glob("*.safetensors"))
    assert [p.name for p in snaps] == ["hf_rlvr_step00000.safetensors", "hf_rlvr_step00002.safetensors"]
    assert pd.read_parquet(out / "hf_sparsity.parquet")["step"].max() == 2
    capsys.readouterr()
    assert main(["compare", str(snaps[0]), str(snaps[1]), "--k", "2", "--no-progress", "--no-figures"]) == 0


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_keeps_bf16_storage(tiny_dir, even_length_reward):
    lm = load_causal_lm(tiny_dir, device="cuda")
    res = train_hf_rlvr(lm.model, lm.tokenizer, tiny_rl(tiny_dir, device="cuda"))
    assert next(lm.model.parameters()).device.type == "cuda"
    for n, w in res.snapshots[3].items():
        assert w.device.type == "cpu" and torch.equal(w, res.master[n].to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------- SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_cpu_smoke_rlvr_run_goes_through_threegate_compare(tmp_path, capsys):
    from threegate.cli import main

    try:
        smollm2_gguf_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    lm = load_causal_lm(None)
    assert "Q4_1" in lm.note  # the offline SmolLM2 was 4-bit quantized: every report says so
    cfg = HFRLConfig.cpu_smoke()
    res = train_hf_rlvr(lm.model, lm.tokenizer, cfg, model_note=lm.note)
    assert list(res.history["step"]) == list(range(1, cfg.steps + 1))
    assert np.isfinite(res.history[["reward_mean", "loss", "kl_ref", "grad_norm"]].to_numpy()).all()
    for t, sd in res.snapshots.items():
        for n, w in sd.items():
            assert w.dtype == torch.bfloat16, (t, n)
    for n, w in res.snapshots[cfg.steps].items():
        assert torch.equal(w, res.master[n].to(torch.bfloat16)), n
    base = save_snapshot(res.snapshots[0], tmp_path / "base.safetensors")
    final = save_snapshot(res.snapshots[cfg.steps], tmp_path / f"step_{cfg.steps:05d}.safetensors")
    out = tmp_path / "cmp"
    rc = main(["compare", str(base), str(final), "--k", "8", "--out", str(out), "--no-progress", "--no-figures"])
    assert rc == 0
    m = pd.read_parquet(out / "matrices.parquet")
    two_d = [n for n, w in res.snapshots[0].items() if w.ndim == 2]
    assert sorted(m["name"]) == sorted(two_d)  # every 2-D block matrix (and the embedding)
    print("\nSmolLM2 cpu_smoke history:\n" + res.history.to_string())
    print(res.tables["hf_sparsity"].to_string())


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("examples/hf/*.toml")),
                         ids=lambda p: p.name)
def test_example_configs_build_valid_run_configs(path):
    cfg = load_config(path)
    section = "hf_rlvr" if "hf_rlvr" in cfg else "hf_sft"
    check_config(section, cfg, source=str(path))  # the whole file, as threegate run checks it
    c = resolve_section(hb.SECTIONS[section], cfg, section)[0]
    assert isinstance(c, HFRLConfig if section == "hf_rlvr" else HFSFTConfig)
    assert c.snapshot_steps[0] == 0 and c.snapshot_steps[-1] == c.steps
    assert c.device == cfg["device"]
    if "paper" in path.name:
        assert c.lr == 1e-6 and c.steps == 320
