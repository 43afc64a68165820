"""The pretrained TinyGPT an experiment starts from: the ``[pretrain]`` section of its config, trained or cached.

Every TinyGPT experiment (the ``threegate run`` experiments and the claim experiments) starts from the model
``base_model(cfg)`` returns: ``sims.tinygpt.pretrain.pretrain`` with the ``[pretrain]`` section (``PRETRAIN``:
``preset = "fast" | "default"``, other keys override ``PretrainConfig`` fields; ``cache_dir`` says where the cache
lives, default ``.cache/threegate``) on the config's ``device``.
"""

from __future__ import annotations

from typing import Mapping

from sims.experiments.config import Section, resolve_section
from sims.tinygpt.model import TinyGPT
from sims.tinygpt.pretrain import PretrainConfig, pretrain

__all__ = ["DEFAULT_CACHE_DIR", "PRETRAIN", "pretrain_config", "base_model"]

DEFAULT_CACHE_DIR = ".cache/threegate"
#: The ``[pretrain]`` section every TinyGPT experiment reads (``cache_dir`` is where the cache lives, not what).
PRETRAIN = Section(PretrainConfig, presets=("fast", "default"), default="default", extra={"cache_dir": str})


def pretrain_config(cfg: Mapping) -> PretrainConfig:
    """The ``PretrainConfig`` of the config's ``[pretrain]`` section."""
    return resolve_section(PRETRAIN, cfg, "pretrain")[0]


def base_model(cfg: Mapping) -> tuple[TinyGPT, dict]:
    """The pretrained model of ``cfg`` (from the cache when it holds it) and its info dict."""
    pcfg, extra = resolve_section(PRETRAIN, cfg, "pretrain")
    return pretrain(pcfg, cache_dir=extra.get("cache_dir", DEFAULT_CACHE_DIR), device=cfg.get("device", "cpu"))
