"""Tests for sims.tinygpt.sft: the loss is the completion-token cross-entropy, SFT lowers it, precision modes, reruns."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sims.tinygpt.pretrain import PretrainConfig, pretrain
from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.sft import SFTConfig, demonstration_loss, train_sft
from sims.tinygpt.tasks import Tokenizer, encode_demonstrations, task_by_name
from theory.errors import InputError

from tests.conftest import RIGOROUS_IDS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demonstration_loss_is_cross_entropy_on_answer_and_eos_only(fast_base_model):
    tok = Tokenizer()
    examples = task_by_name("addition").sample(np.random.default_rng(0), 5)
    ids, attn, cmask = encode_demonstrations(tok, examples)
    with torch.no_grad():
        got = float(demonstration_loss(fast_base_model, ids, attn, cmask))
        logits = fast_base_model(ids, attn)
    # oracle: F.cross_entropy with every non-completion target ignored
    targets = torch.where(cmask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    expected = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=-100))
    assert got == pytest.approx(expected, rel=8 * torch.finfo(torch.float32).eps * ids.shape[1])
    n_answer_tokens = sum(len(e.answer) + 1 for e in examples)
    assert int(cmask.sum()) == n_answer_tokens


def test_sft_lowers_the_demonstration_loss(fast_base_model):
    res = train_sft(copy.deepcopy(fast_base_model), SFTConfig(task="addition", steps=15, lr=1e-3, seed=0))
    h = res.history
    assert h["eval_loss"].iloc[-1] < h["eval_loss"].iloc[0] - 0.05
    assert h["loss"].iloc[-5:].mean() < h["loss"].iloc[1:6].mean()


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_snapshots_hold_the_stored_weights_of_the_mode(fast_base_model, precision, dtype):
    res = train_sft(copy.deepcopy(fast_base_model), SFTConfig(task="modular", steps=2, lr=1e-3, precision=precision,
                                                         probe=ProbeConfig(steps=(0, 2), theory_checks=False,
                                                                           n_eval_prompts=8)))
    snap = res.snapshots[2]
    assert all(v.dtype == dtype for v in snap.values())
    if precision == "bf16":
        assert all(torch.equal(snap[k], res.master[k].to(torch.bfloat16)) for k in snap)
    else:
        assert all(torch.equal(snap[k], res.master[k]) for k in snap)


def test_same_seed_bit_identical(fast_base_model):
    cfg = SFTConfig(task="sorting", steps=3, lr=1e-3, seed=4, probe=ProbeConfig(steps=(0, 3), n_eval_prompts=8,
                                                                                n_fisher_rollouts=8))
    a, b = train_sft(copy.deepcopy(fast_base_model), cfg), train_sft(copy.deepcopy(fast_base_model), cfg)
    assert all(torch.equal(a.master[k], b.master[k]) for k in a.master)
    assert a.history.equals(b.history) and a.metrics.equals(b.metrics) and a.checks.equals(b.checks)


def test_rigorous_bounds_hold_on_real_sft_steps(fast_base_model):
    res = train_sft(copy.deepcopy(fast_base_model), SFTConfig(task="addition", steps=3, lr=1e-3, seed=1,
                                                         probe=ProbeConfig(steps=(2, 3), n_eval_prompts=8,
                                                                           n_fisher_rollouts=16)))
    chk = res.checks
    met = chk[chk["result_id"].isin(RIGOROUS_IDS) & chk["assumptions_hold"].astype(bool)]
    assert len(met) > 0 and met["holds"].astype(bool).all()
    assert "lemF.9" not in set(chk["result_id"])  # SFT has no clip band


def test_config_validation():
    with pytest.raises(InputError, match="steps"):
        SFTConfig(steps=0)
    with pytest.raises(InputError, match="precision"):
        SFTConfig(precision="int8")
    with pytest.raises(InputError, match="lr"):
        SFTConfig(lr=0.0)


@pytest.mark.slow
def test_sft_lowers_demonstration_loss_from_the_default_pretrained_model():
    # The default pretrained model is not bit-identical across machines (BLAS paths differ), so this asserts an
    # effect on every one of five seeds with a margin well under the smallest measured, not a number from one
    # machine. Measured here (fresh pretrain, lr 1e-3, 40 steps): training loss (mean of the first vs last 5 steps)
    # fell by 0.035 / 0.077 / 0.045 / 0.109 / 0.037 nats/token. The held-out loss (32 prompts) moved by +0.023,
    # +0.009, -0.011, -0.008, -0.010 (and at lr 3e-4 by +0.029, +0.029, -0.023, +0.012, -0.023): within noise at
    # this scale, so it is not asserted (an earlier version did, and failed in CI).
    model, _ = pretrain(PretrainConfig.default())
    train_drop = []
    for seed in range(5):
        res = train_sft(copy.deepcopy(model), SFTConfig(task="counting", steps=40, lr=1e-3, seed=seed,
                                                        probe=ProbeConfig(steps=(0, 40), theory_checks=False,
                                                                          n_eval_prompts=8)))
        loss = res.history["loss"].dropna()  # the step-0 probe row has no training loss
        assert len(loss) == 40 and np.isfinite(loss).all()
        train_drop.append(loss.iloc[:5].mean() - loss.iloc[-5:].mean())
    assert all(d > 0.01 for d in train_drop), train_drop  # the demonstrations are fit on every seed
