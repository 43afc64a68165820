"""Tests for sims.tinygpt.pretrain: spectral-decay fits on exact spectra, pretraining on the fast config, the config-hash
cache (bit-identical reload, no retraining, corrupt files rejected), bit-identical reruns. The default config's
reported numbers are checked in the slow tier."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

import sims.tinygpt.pretrain as pretrain_mod
from sims.tinygpt.model import GPTConfig, matrix_params
from sims.tinygpt.pretrain import (
    PretrainConfig,
    _lr_at,
    config_hash,
    load_pretrained,
    power_law_exponent,
    pretrain,
    spectral_summary,
    stable_rank,
)
from sims.tinygpt.tasks import Tokenizer
from theory.errors import CheckpointError, InputError, NonFiniteError

EPS = np.finfo(np.float64).eps


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matrices: one intra-op thread (two threads on a busy 2-core box were ~30x slower per step, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # and numpy's OpenBLAS (the float64 SVDs)
        yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
# spectral summaries on exact spectra


@given(a=st.floats(0.0, 3.0), c=st.floats(1e-3, 1e3), r=st.integers(2, 200), frac=st.floats(0.05, 1.0))
@example(a=0.0, c=1.0, r=2, frac=1.0)
@example(a=3.0, c=1e-3, r=200, frac=0.05)
def test_power_law_exponent_is_exact_on_a_pure_power_law(a, c, r, frac):
    i = np.arange(1, r + 1, dtype=np.float64)
    sigmas = c * i ** (-a)
    # least squares on exact log-log data: error ~ eps * (|log c| + a log r) / spread of log i
    tol = 64 * EPS * (abs(math.log(c)) + a * math.log(r) + 1) / math.log(2)
    assert abs(power_law_exponent(sigmas, frac) - a) <= tol


def test_power_law_exponent_uses_only_the_top_fraction():
    """A spectrum steep at the top (a = 1 for the top half) and flat below: the top-half fit sees only a = 1."""
    r = 40
    i = np.arange(1, r + 1, dtype=np.float64)
    top = i[:20] ** -1.0
    sigmas = np.concatenate([top, np.full(20, top[-1])])
    assert abs(power_law_exponent(sigmas, 0.5) - 1.0) < 1e-12
    assert power_law_exponent(sigmas, 1.0) < 0.9  # the flat tail pulls the full fit down
    # order of the input does not matter (singular values are sorted descending first)
    assert power_law_exponent(np.random.default_rng(0).permutation(sigmas), 0.5) == pytest.approx(1.0, abs=1e-12)


def test_power_law_exponent_rejects_bad_input():
    with pytest.raises(InputError, match="at least 2"):
        power_law_exponent(np.array([1.0]))
    with pytest.raises(InputError, match="zero singular value"):
        power_law_exponent(np.array([1.0, 0.0]), 1.0)
    with pytest.raises(NonFiniteError):
        power_law_exponent(np.array([1.0, np.nan]))
    with pytest.raises(InputError, match="top_fraction"):
        power_law_exponent(np.array([2.0, 1.0]), 0.0)


def test_stable_rank_exact_cases():
    assert stable_rank(np.ones(7)) == 7.0
    assert stable_rank(np.array([3.0, 0.0, 0.0])) == 1.0
    assert stable_rank(np.array([2.0, 1.0])) == 1.25
    with pytest.raises(InputError):
        stable_rank(np.zeros(3))


def test_spectral_summary_on_a_matrix_with_known_spectrum(rng):
    sig = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])  # geometric, not a power law: compare with the formulas
    U, _ = np.linalg.qr(rng.standard_normal((10, 6)))
    V, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    W = U @ np.diag(sig) @ V.T
    s = spectral_summary(W, top_fraction=1.0)
    assert s["sigma_1"] == pytest.approx(8.0, rel=64 * EPS)
    assert s["stable_rank"] == pytest.approx(np.sum(sig**2) / 64.0, rel=64 * EPS)
    assert s["top_over_median"] == pytest.approx(8.0 / np.median(sig), rel=64 * EPS)
    assert s["power_law_exponent"] == pytest.approx(power_law_exponent(sig, 1.0), rel=1e-12)


def test_gaussian_matrix_has_a_flat_top_spectrum(rng):
    """Control for the 'pretraining steepens the spectrum' claim: an i.i.d. Gaussian (Marchenko-Pastur) matrix of
    the model's sizes has a small fitted exponent (< 0.35 for the top half) and a stable rank far above 1."""
    for shape in [(64, 64), (32, 64), (176, 64)]:
        s = spectral_summary(rng.standard_normal(shape))
        assert s["power_law_exponent"] < 0.35
        assert s["stable_rank"] > 0.15 * min(shape)


# ---------------------------------------------------------------------------------------------------------------
# config, schedule, hash


def test_config_validation():
    with pytest.raises(InputError, match="dtype"):
        PretrainConfig.fast(dtype="float16")
    with pytest.raises(InputError, match="unknown task"):
        PretrainConfig.fast(tasks=("division",))
    with pytest.raises(InputError, match="vocab"):
        PretrainConfig.fast(model=GPTConfig(vocab_size=10))


def test_config_hash_changes_with_the_code_that_trains_the_model(monkeypatch):
    import sims.tinygpt.pretrain as sp

    cfg = PretrainConfig.fast()
    before = config_hash(cfg)
    monkeypatch.setattr(sp, "code_digest", lambda: "0" * 16)  # as if model.py / pretrain.py / tasks.py changed
    assert config_hash(cfg) != before


def test_code_digest_covers_the_bytes_of_the_training_modules(tmp_path, monkeypatch):
    import hashlib
    import shutil

    import sims.tinygpt.pretrain as sp

    src = Path(sp.__file__).parent
    h = hashlib.sha256()
    for name in ("pretrain.py", "model.py", "tasks.py"):
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    assert sp.code_digest() == h.hexdigest()[:16]
    for name in ("pretrain.py", "model.py", "tasks.py"):  # one changed byte in any of them changes the digest
        for f in ("pretrain.py", "model.py", "tasks.py"):
            shutil.copy(src / f, tmp_path / f)
        (tmp_path / name).write_bytes((src / name).read_bytes() + b"#")
        monkeypatch.setattr(sp, "__file__", str(tmp_path / "pretrain.py"))
        assert sp.code_digest() != h.hexdigest()[:16], name


def test_config_hash_is_stable_and_sensitive():
    cfg = PretrainConfig.fast()
    assert config_hash(cfg) == config_hash(PretrainConfig.fast())
    assert len(config_hash(cfg)) == 64
    changed = [replace(cfg, seed=1), replace(cfg, lr=1e-3), replace(cfg, p_correct=0.5),
               replace(cfg, model=replace(cfg.model, n_layer=3)), replace(cfg, tasks=("addition",))]
    hashes = {config_hash(c) for c in changed}
    assert len(hashes) == len(changed) and config_hash(cfg) not in hashes
    assert config_hash(cfg, "cuda") != config_hash(cfg, "cpu")


def test_lr_schedule_warmup_and_cosine_floor():
    cfg = PretrainConfig.fast(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert _lr_at(cfg, 0) == pytest.approx(0.1)
    assert _lr_at(cfg, 9) == pytest.approx(1.0)
    assert _lr_at(cfg, 10) == pytest.approx(1.0)
    assert _lr_at(cfg, 60) == pytest.approx(0.55)
    assert _lr_at(cfg, 110) == pytest.approx(0.1)
    lrs = [_lr_at(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ---------------------------------------------------------------------------------------------------------------
# pretraining on the fast config (two short trainings shared by the tests below)


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model, info = pretrain(PretrainConfig.fast(), cache_dir=cache)
    return cache, model, info


@pytest.fixture(scope="module")
def uncached_rerun():
    return pretrain(PretrainConfig.fast(), cache_dir=None)


def test_pretraining_lowers_the_loss(cached_run):
    _, _, info = cached_run
    V = Tokenizer().vocab_size
    # the init is near uniform (logits ~ 0.02 * N(0, 1) scale), so the held-out NLL starts at about log V
    assert abs(info["loss_before"] - math.log(V)) < 0.1
    assert info["loss_after"] < 0.6 * info["loss_before"]
    curve = [l for _, l in info["eval_loss_curve"]]
    assert curve[-1] < curve[0] and len(curve) == PretrainConfig.fast().steps // 10 + 1


def test_info_has_the_reported_fields(cached_run):
    _, model, info = cached_run
    names = set(matrix_params(model))
    assert set(info["spectra_init"]) == names == set(info["spectra_pretrained"])
    for key in ("accuracy_greedy_before", "accuracy_greedy_after", "accuracy_sampled_before",
                "accuracy_sampled_after"):
        assert set(info[key]) == {"addition", "modular", "sorting", "counting"}
        assert all(0.0 <= v <= 1.0 for v in info[key].values())
    assert info["from_cache"] is False and info["config_hash"] == config_hash(PretrainConfig.fast())
    json.dumps(info)  # JSON-serialisable


def test_init_spectra_in_info_match_a_fresh_model(cached_run):
    from sims.tinygpt.model import TinyGPT

    _, _, info = cached_run
    fresh = TinyGPT(PretrainConfig.fast().model)
    for name, p in matrix_params(fresh).items():
        assert info["spectra_init"][name] == spectral_summary(p.detach())


def test_same_seed_gives_bit_identical_weights(cached_run, uncached_rerun):
    _, model_a, info_a = cached_run
    model_b, info_b = uncached_rerun
    for (n, p), (_, q) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(p, q), n
    assert info_a["loss_curve"] == info_b["loss_curve"]


def test_other_seed_gives_other_weights():
    model_c, _ = pretrain(PretrainConfig.fast(steps=3, seed=1, eval_n=2), cache_dir=None)
    model_d, _ = pretrain(PretrainConfig.fast(steps=3, seed=0, eval_n=2), cache_dir=None)
    # same init (model seed) but different data order => different weights after 3 steps
    assert not torch.equal(model_c.blocks[0].attn.q.weight, model_d.blocks[0].attn.q.weight)


def test_cache_hit_is_bit_identical_and_does_not_retrain(cached_run, monkeypatch):
    cache, model, info = cached_run

    def no_training(*a, **k):
        raise AssertionError("pretrain retrained although the cache holds this config")

    monkeypatch.setattr(pretrain_mod, "_train", no_training)
    again, info2 = pretrain(PretrainConfig.fast(), cache_dir=cache)
    assert info2["from_cache"] is True
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
    assert {k: v for k, v in info2.items() if k != "from_cache"} == {
        k: v for k, v in info.items() if k != "from_cache"}
    # a different config misses the cache (and so would train)
    with pytest.raises(AssertionError, match="retrained"):
        pretrain(PretrainConfig.fast(seed=7), cache_dir=cache)


def test_cache_files_are_safetensors_and_json_only(cached_run):
    cache, _, _ = cached_run
    suffixes = sorted(p.suffix for p in cache.iterdir())
    assert suffixes == [".json", ".safetensors"]


def test_corrupt_or_pickled_cache_is_rejected(cached_run, tmp_path):
    cache, model, _ = cached_run
    cfg = PretrainConfig.fast()
    wpath = next(cache.glob("*.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(wpath.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_pretrained(bad, cfg)
    pickled = tmp_path / "model.safetensors"
    torch.save(model.state_dict(), pickled)  # a pickle under a safetensors name
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_pretrained(pickled, cfg)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_pretrained(tmp_path / "missing.safetensors", cfg)
    other = replace(cfg, model=replace(cfg.model, d_model=32))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_pretrained(wpath, other)
    with pytest.raises(CheckpointError, match="not float64"):
        load_pretrained(wpath, replace(cfg, dtype="float64"))


def test_float64_pretraining_keeps_float64_weights(tmp_path):
    model, info = pretrain(PretrainConfig.fast(steps=3, eval_n=2, dtype="float64"), cache_dir=tmp_path)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    again, info2 = pretrain(PretrainConfig.fast(steps=3, eval_n=2, dtype="float64"), cache_dir=tmp_path)
    assert info2["from_cache"] and all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_cache_info_with_wrong_hash_is_rejected(cached_run, tmp_path):
    cache, _, _ = cached_run
    for p in cache.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    ipath = next(tmp_path.glob("*.json"))
    info = json.loads(ipath.read_text())
    info["config_hash"] = "0" * 64
    ipath.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="config hash"):
        pretrain(PretrainConfig.fast(), cache_dir=tmp_path)


def test_training_restores_global_torch_settings():
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)  # differs from the config's num_threads=1
    try:
        pretrain(PretrainConfig.fast(steps=2, eval_n=2), cache_dir=None)
        assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled() == det
    finally:
        torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# slow tier: the default config's reported numbers


@pytest.mark.slow
def test_default_config_numbers(tmp_path):
    """The numbers in the report: loss, accuracy before/after, spectral decay init vs pretrained."""
    model, info = pretrain(PretrainConfig.default(), cache_dir=tmp_path)
    assert info["loss_before"] > 3.8 and info["loss_after"] < 1.5
    before, after = info["accuracy_greedy_before"], info["accuracy_greedy_after"]
    assert max(before.values()) <= 0.05  # random init: essentially never right
    assert min(after.values()) >= 0.15, after  # pretraining teaches every task something (greedy)
    # weak but not zero when sampling at temperature 1 (what RLVR rollouts do): room for RL on every task.
    # (Greedy sorting is near perfect, ~0.98: sorting is the easy task; its sampled accuracy is not.)
    sampled = info["accuracy_sampled_after"]
    assert all(0.05 <= v <= 0.8 for v in sampled.values()), sampled
    a0 = np.array([s["power_law_exponent"] for s in info["spectra_init"].values()])
    a1 = np.array([s["power_law_exponent"] for s in info["spectra_pretrained"].values()])
    assert a0.max() < 0.35  # flat Marchenko-Pastur-like top spectrum at init
    assert np.all(a1 > a0) and np.median(a1) > 1.8 * np.median(a0)  # pretraining steepens every matrix
    sr0 = np.array([s["stable_rank"] for s in info["spectra_init"].values()])
    sr1 = np.array([s["stable_rank"] for s in info["spectra_pretrained"].values()])
    assert np.all(sr1 < sr0)
