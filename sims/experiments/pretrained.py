"""The pretrained TinyGPT an experiment starts from: the ``[pretrain]`` section of its config, trained or cached.

Every TinyGPT experiment (the ``threegate run`` experiments and the claim experiments) starts from the model
``base_model(cfg)`` returns: ``sims.tinygpt.pretrain.pretrain`` with the ``[pretrain]`` section (``preset =
"fast" | "default"``, other keys override ``PretrainConfig`` fields; ``cache_dir`` says where the cache lives,
default ``.cache/threegate``) on the config's ``device``.
"""

from __future__ import annotations

from typing import Mapping

from sims.experiments.config import section_config
from sims.tinygpt.model import TinyGPT
from sims.tinygpt.pretrain import PretrainConfig, pretrain

__all__ = ["DEFAULT_CACHE_DIR", "pretrain_config", "base_model"]

DEFAULT_CACHE_DIR = ".cache/threegate"


def pretrain_config(cfg: Mapping) -> PretrainConfig:
    """The ``PretrainConfig`` of the config's ``[pretrain]`` section (``cache_dir`` is where, not what: left out)."""
    sec = dict(cfg.get("pretrain", {}))
    sec.pop("cache_dir", None)
    return section_config(PretrainConfig, sec, where="pretrain", presets=("fast", "default"), default="default")


def base_model(cfg: Mapping) -> tuple[TinyGPT, dict]:
    """The pretrained model of ``cfg`` (from the cache when it holds it) and its info dict."""
    cache = cfg.get("pretrain", {}).get("cache_dir", DEFAULT_CACHE_DIR)
    return pretrain(pretrain_config(cfg), cache_dir=cache, device=cfg.get("device", "cpu"))
