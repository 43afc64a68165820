"""Experiment configuration: config files, config-file sections as dataclasses, and the experiment hash.

A config file is TOML or JSON (``load_config``); each experiment reads its sections through ``section_config``
(one dataclass per section, named presets, unknown keys refused). ``experiment_hash(name, cfg)`` names a run:
the default output folder ``runs/NAME-<hash>`` and a sweep cell's id.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Mapping

from theory.errors import InputError

__all__ = ["load_config", "section_config", "experiment_hash"]


def load_config(path: str | Path | None) -> dict:
    """Read a TOML or JSON config file (None: empty config, every default)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            cfg = json.loads(text)
            if not isinstance(cfg, dict):
                raise InputError(f"config file {path}: top level must be an object")
            return cfg
    except (ValueError, TypeError) as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise InputError(f"config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    raise InputError(f"config file {path}: unsupported extension {path.suffix!r} (use .toml or .json)")


def experiment_hash(name: str, cfg: Mapping) -> str:
    """12 hex digits of SHA-256 over the canonical JSON of (experiment name, config): the same experiment with the
    same config has the same hash in every process (run folders ``runs/NAME-<hash>``, sweep cell ids).

    Not the pretraining cache key (``sims.tinygpt.pretrain.config_hash``, which also hashes the code)."""
    payload = json.dumps({"experiment": name, "config": cfg}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def section_config(cls, section: Mapping | None, *, where: str, presets: tuple[str, ...] | None = None,
                   default: str | None = None, **forced):
    """A config dataclass ``cls`` from the config-file section ``[where]``.

    With ``presets``, the key ``preset`` (default ``default``) picks a named constructor: the classmethod of that
    name, or plain ``cls(...)`` when the class has none; the section's other keys override fields. ``forced`` keys
    (e.g. ``seed`` from the command line) override the section when not None. An unknown key or preset is an
    InputError naming the section. Lists (all a TOML / YAML file can give) become tuples: config dataclasses are
    frozen and hash into cache keys."""
    sec = {k: tuple(v) if isinstance(v, list) else v for k, v in (section or {}).items()}
    sec.update({k: v for k, v in forced.items() if v is not None})
    preset = sec.pop("preset", default) if presets is not None else None
    if presets is not None and preset not in presets:
        raise InputError(f"[{where}] preset must be one of {list(presets)}, got {preset!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(sec) - known)
    if unknown:
        raise InputError(f"[{where}] unknown keys {unknown}; known: {sorted(known)}")
    make = getattr(cls, preset, None) if preset is not None else None
    return make(**sec) if callable(make) else cls(**sec)
