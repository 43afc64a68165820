"""sims.experiments.config: every field of every config section type-checked before any work (``threegate run`` and
``threegate sweep`` alike); the schema is the config dataclasses' type hints."""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import pytest
import yaml
from hypothesis import example, given, strategies as st

from sims.experiments.config import (
    Section,
    check_value,
    config_schema,
    experiment_hash,
    load_config,
    section_config,
    validate_config,
)
from sims.experiments.registry import EXPERIMENTS, check_config
from sims.sweep.cells import TheoryCellConfig
from sims.sweep.spec import SweepTable, parse_spec
from theory.errors import ConfigError, InputError

#: (experiment, section name, Section) for every section any experiment reads
SECTIONS = sorted({(name, sec_name): spec for name, e in EXPERIMENTS.items()
                   for sec_name, spec in e.sections.items()}.items(), key=lambda kv: kv[0])


def _fields(cls, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted key path, type hint) of every field of ``cls``, nested config dataclasses expanded."""
    out = []
    for name, hint in config_schema(cls).items():
        if dataclasses.is_dataclass(hint):
            out.extend(_fields(hint, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", hint))
    return out


#: (an experiment reading the section, section name, Section, dotted field path, type hint): every field once
FIELDS = list({(sec, path): (exp, sec, spec, path, hint) for (exp, sec), spec in SECTIONS
               for path, hint in _fields(spec.cls)}.values())


# ----------------------------------------------------------------------------------------------------------------
# The test's own statement of the type rules (independent of the checker): which Python values a hint admits


def _admits(hint, value) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_admits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) in (int, float) and value == value and abs(value) != float("inf")
    if hint is str:
        return type(value) is str
    if origin is tuple:
        if type(value) not in (list, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_admits(args[0], v) for v in value)
        return len(value) == len(args) and all(_admits(a, v) for a, v in zip(args, value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    raise AssertionError(f"the test does not know the hint {hint!r}")


#: Values a config file can hold (TOML / YAML / JSON), of every kind
CANDIDATES = ["four", "1e-4", "0.001", "", 3, 0, -2, 2.5, float("nan"), float("inf"), True, False, None,
              [1, "a"], [0.5, 0.25], ["x", "y"], [1, 2], [[1, "rotate"]], {"a": 1}, [], [True]]


def _nest(path: str, value) -> dict:
    out: dict = {}
    node = out
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _assert_refused_naming_the_field(field, value) -> None:
    exp, sec, spec, path, hint = field
    with pytest.raises(ConfigError) as err:
        check_config(exp, {sec: _nest(path, value)}, source="config file c.toml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config file c.toml: "), msg
    assert f"[{sec}] {path}" in msg and "expected" in msg, msg


def test_every_field_refuses_every_wrong_kind_of_value():
    """Exhaustive over the fields of every section of every experiment x the kinds of value a file can hold."""
    refused = 0
    for field in FIELDS:
        for value in CANDIDATES:
            if not _admits(field[-1], value):
                _assert_refused_naming_the_field(field, value)
                refused += 1
    assert refused > 10 * len(FIELDS)


_file_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
              st.from_regex(r"[0-9]e-[0-9]", fullmatch=True)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=5)


@given(st.sampled_from(FIELDS), _file_values)
@example(next(f for f in FIELDS if f[1:4:2] == ("rlvr", "steps")), "four")
@example(next(f for f in FIELDS if f[1:4:2] == ("rlvr", "lr")), "1e-4")
@example(next(f for f in FIELDS if f[1:4:2] == ("rlvr", "grad_clip")), True)
@example(next(f for f in FIELDS if f[1:4:2] == ("rlvr", "probe.steps")), [1, "a"])
def test_random_values_of_the_wrong_type_are_refused_naming_the_field(field, value):
    if _admits(field[-1], value):
        return  # the right type: not this test's business (the section's range checks may still refuse it)
    _assert_refused_naming_the_field(field, value)


def test_the_messages_of_the_issue():
    def err(exp, cfg):
        with pytest.raises(InputError) as e:  # ConfigError for types and keys; the sections' own range checks
            check_config(exp, cfg, source="config file c.toml")
        return str(e.value)

    assert err("rlvr", {"rlvr": {"steps": "four"}}) == \
        "config file c.toml: [rlvr] steps: expected an integer, got the string 'four'"
    assert err("rlvr", {"rlvr": {"lr": "1e-4"}}) == (
        "config file c.toml: [rlvr] lr: expected a number, got the string '1e-4' (YAML 1.1 reads 1e-4 as a string; "
        "write 1.0e-4)")
    assert err("rlvr", {"rlvr": {"lr": "1e-3"}}).endswith("(YAML 1.1 reads 1e-3 as a string; write 1.0e-3)")
    assert err("rlvr", {"seedd": 0}) == \
        "config file c.toml: top level: unknown key 'seedd' (did you mean 'seed'?)"
    assert err("rlvr", {"rlvr": {"probe": {"stpes": [1]}}}) == \
        "config file c.toml: [rlvr] probe: unknown key 'stpes' (did you mean 'steps'?)"
    assert "unknown key 'sft' (experiment rlvr reads: device, pretrain, rlvr, seed)" in err("rlvr", {"sft": {}})
    # bool vs int both ways, float is not an int, numbers are finite
    assert "steps: expected an integer, got the boolean true" in err("rlvr", {"rlvr": {"steps": True}})
    assert "expected a boolean (true or false), got the integer 1" in err("sft", {"sft": {"probe": {"theory_checks": 1}}})
    assert "steps: expected an integer, got the float 3.0" in err("rlvr", {"rlvr": {"steps": 3.0}})
    assert "lr: expected a finite number, got the float nan" in err("rlvr", {"rlvr": {"lr": float("nan")}})
    assert "betas: expected a list of 2 numbers, got the list [0.9]" in err("rlvr", {"rlvr": {"betas": [0.9]}})
    assert "[pretrain] preset: expected one of ['fast', 'default'], got the string 'fats' (did you mean 'fast'?)" in \
        err("rlvr", {"pretrain": {"preset": "fats"}})
    assert "[pretrain] model.d_model: expected an integer" in err("rlvr", {"pretrain": {"model": {"d_model": "64"}}})
    assert "seed: expected an integer, got the string '0' (write the number without quotes)" in err("rlvr", {"seed": "0"})
    assert "[hf_rlvr] target_modules[1]: expected a string" in err("hf_rlvr", {"hf_rlvr": {"target_modules": ["a", 3]}})
    # a section's own range checks run too, before any work, with the section named
    assert err("rlvr", {"rlvr": {"steps": 0}}) == "config file c.toml: [rlvr] RLConfig.steps must be positive, got 0"


def test_normalisation_lists_become_tuples_ints_become_floats_nested_tables_override_defaults():
    from sims.tinygpt.pretrain import PretrainConfig
    from sims.tinygpt.rlvr import RLConfig

    c = section_config(RLConfig, {"lr": 1, "betas": [0.9, 0.99], "probe": {"steps": [3, 0]}}, where="rlvr")
    assert c.lr == 1.0 and type(c.lr) is float and c.betas == (0.9, 0.99) and c.probe.steps == (0, 3)
    assert c.probe.k == RLConfig().probe.k  # keys the table does not give keep their defaults
    p = section_config(PretrainConfig, {"preset": "fast", "model": {"d_model": 32}}, where="pretrain",
                       presets=("fast", "default"), default="default")
    default_model = PretrainConfig.fast().model
    assert p.steps == PretrainConfig.fast().steps and p.model.d_model == 32
    assert p.model.max_seq_len == default_model.max_seq_len and p.model.vocab_size == default_model.vocab_size
    assert p.model.d_ff == 88  # derived again from the new d_model (SwiGLU 8/3 * 32 rounded up to 8), not kept
    hash(p)


def _as_file_values(obj):
    """A config object as a config file holds it: tables, lists, numbers, strings, booleans (null for None)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


@pytest.mark.parametrize("exp_sec", [kv[0] for kv in SECTIONS], ids=lambda kv: f"{kv[0]}-{kv[1]}")
def test_every_preset_written_out_in_full_passes_and_resolves_to_itself(exp_sec):
    """Each preset of each section, written out field by field (JSON and YAML round trips), validates and resolves
    to the preset's own object: the schema accepts everything the code's own configs hold."""
    exp, sec = exp_sec
    spec: Section = EXPERIMENTS[exp].sections[sec]
    for preset in spec.presets or (None,):
        make = getattr(spec.cls, preset, spec.cls) if preset else spec.cls  # no classmethod: the plain defaults
        obj = make()
        values = _as_file_values(obj)
        for table in (json.loads(json.dumps(values)), yaml.safe_load(yaml.safe_dump(values))):
            if preset:
                table["preset"] = preset
            resolved = validate_config({sec: table}, {sec: spec}, source="c")[sec]
            assert resolved == obj, (exp, sec, preset)
        assert validate_config({sec: {"preset": preset}} if preset else {}, {sec: spec})[sec] == obj


def test_every_experiment_accepts_its_sections_and_nothing_else():
    """A config of the experiment's declared sections (all defaults) validates; any other top-level key is refused."""
    for name, e in EXPERIMENTS.items():
        check_config(name, {k: {} for k in e.sections} | {"seed": 1, "device": "cpu"})
        with pytest.raises(ConfigError, match="top level: unknown key 'nope'"):
            check_config(name, {"nope": 1})


def test_sweep_cells_are_validated_before_any_cell_runs(tmp_path):
    """The third cell's value is a string: the spec is refused, naming the cell, the section and the key."""
    with pytest.raises(ConfigError, match=r"cell \(rlvr.lr=1e-4\): \[rlvr\] lr: expected a number, got the string "
                                          r"'1e-4' \(YAML 1.1"):
        parse_spec(yaml.safe_load("sweep: {experiment: rlvr}\ngrid:\n  rlvr.lr: [0.001, 0.01, 1e-4]\n"))
    with pytest.raises(ConfigError, match=r"\[theory cell\] m: expected an integer, got the string 'x'"):
        parse_spec({"sweep": {"experiment": "theory"}, "grid": {"m": [4, "x"]}})
    with pytest.raises(ConfigError, match=r"\[cell\] steps: expected an integer"):
        parse_spec({"sweep": {"experiment": "hf_sft"}, "grid": {"steps": [2, 2.5]}})
    with pytest.raises(ConfigError, match=r"\[sweep\] workers: expected an integer, got the string '2'"):
        parse_spec({"sweep": {"experiment": "theory", "workers": "2"}, "grid": {"m": [4]}})


def test_check_value_knows_every_hint_the_config_classes_use():
    """A hint outside the checker's vocabulary is a loud error, not a silent pass."""
    hints = {h for *_, h in FIELDS} | set(config_schema(TheoryCellConfig).values()) | set(
        config_schema(SweepTable).values())
    for h in hints:
        try:
            check_value(object(), h, "k")
        except ConfigError as e:
            assert "does not know" not in str(e), h
    with pytest.raises(ConfigError, match="does not know"):
        check_value(1, set[int], "k")
    assert issubclass(ConfigError, InputError)


# ----------------------------------------------------------------------------------------------------------------
# Config files and the experiment hash


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
    (tmp_path / "c.yaml").write_text("seed: 3\nrlvr: {lr: 1e-4}\n")
    assert load_config(tmp_path / "c.yaml") == {"seed": 3, "rlvr": {"lr": "1e-4"}}  # YAML 1.1: 1e-4 is a string
    (tmp_path / "c.ini").write_text("seed = 3")
    with pytest.raises(InputError, match="unsupported extension"):
        load_config(tmp_path / "c.ini")
    assert experiment_hash("rlvr", {"a": 1}) != experiment_hash("sft", {"a": 1})
    assert experiment_hash("rlvr", {"a": 1, "b": 2}) == experiment_hash("rlvr", {"b": 2, "a": 1})  # key order
    assert len(experiment_hash("rlvr", {})) == 12
