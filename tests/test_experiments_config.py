"""Tests for sims.experiments.config: config files, sections as dataclasses, the experiment hash."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from sims.experiments.config import experiment_hash, load_config, section_config
from theory.errors import InputError


def test_load_config_toml_json_and_errors(tmp_path):
    (tmp_path / "c.toml").write_text('seed = 3\n[rlvr]\nsteps = 4\n[rlvr.probe]\nsteps = [1, 2]\n')
    assert load_config(tmp_path / "c.toml") == {"seed": 3, "rlvr": {"steps": 4, "probe": {"steps": [1, 2]}}}
    (tmp_path / "c.json").write_text('{"seed": 3}')
    assert load_config(tmp_path / "c.json") == {"seed": 3}
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("seed = = 3")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "c.yaml").write_text("seed: 3")
    with pytest.raises(InputError, match="unsupported extension"):
        load_config(tmp_path / "c.yaml")
    assert experiment_hash("rlvr", {"a": 1}) != experiment_hash("sft", {"a": 1})
    assert experiment_hash("rlvr", {"a": 1, "b": 2}) == experiment_hash("rlvr", {"b": 2, "a": 1})  # key order
    assert len(experiment_hash("rlvr", {})) == 12


@dataclass(frozen=True)
class _Cfg:
    steps: int = 3
    lrs: tuple[float, ...] = (1e-3,)

    @classmethod
    def fast(cls, **kw) -> "_Cfg":
        return replace(cls(steps=1), **kw)


def test_section_config_presets_overrides_and_errors():
    assert section_config(_Cfg, {"preset": "fast", "lrs": [1e-4, 1e-3]}, where="s", presets=("fast", "default"),
                          default="default") == _Cfg(steps=1, lrs=(1e-4, 1e-3))  # lists become tuples
    assert section_config(_Cfg, None, where="s", presets=("fast", "default"), default="default") == _Cfg()
    assert section_config(_Cfg, {"steps": 5}, where="s", steps=7) == _Cfg(steps=7)  # forced wins
    with pytest.raises(InputError, match=r"\[s\] unknown keys \['stepz'\]"):
        section_config(_Cfg, {"stepz": 5}, where="s")
    with pytest.raises(InputError, match=r"\[s\] preset must be one of"):
        section_config(_Cfg, {"preset": "huge"}, where="s", presets=("fast",), default="fast")
