"""Config sections of ``threegate run`` and the cells of ``threegate sweep``: parsed and type-checked before any work.

The schema is the config dataclasses themselves: every field's type hint (``int``, ``float``, ``bool``, ``str``,
``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``Literal[...]``, a nested config dataclass, ``dict``) says what
a config file may give for it. One mechanism checks them all (``check_value``); there is no per-field code. A value
of the wrong type, an unknown key (at any level) or an unknown preset is a ``ConfigError``: one line naming the
section, the key, the expected type and the value, e.g.::

    [rlvr] steps: expected an integer, got the string 'four'
    [rlvr] lr: expected a number, got the string '1e-4' (YAML 1.1 reads 1e-4 as a string; write 1.0e-4)
    top level: unknown key 'seedd' (did you mean 'seed'?)

Type rules: ``bool`` is not an integer and an integer is not a ``bool``; an integer is a number (``float`` fields
take ``1``, stored as ``1.0``), a float is not an integer (``steps = 3.0`` is refused); numbers must be finite;
numbers in quotes are strings (refused, with the fix); lists become tuples (config dataclasses are frozen and hash
into cache keys). The dataclass's own ``__post_init__`` checks (ranges, cross-field rules) run when the section is
built, so ``validate_config`` also surfaces those before anything is trained.

An experiment declares the sections it reads as ``{name: Section(...)}``; ``validate_config`` checks a whole config
(top-level keys ``seed``, ``device`` and those sections; nothing else) by building every section, which is cheap.

A config file is TOML, JSON or YAML (``load_config``). ``experiment_hash(name, cfg)`` names a run: the default output
folder ``runs/NAME-<hash>`` and a sweep cell's id.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import tomllib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from theory.errors import ConfigError, InputError

__all__ = ["load_config", "experiment_hash", "Section", "TOP_LEVEL", "check_value", "describe_type", "describe_value", "unknown_keys_message",
           "section_config", "resolve_section", "validate_config", "config_schema", "check_fields"]

#: Keys every ``threegate run`` config may have at its top level besides the experiment's sections.
TOP_LEVEL: dict[str, Any] = {"seed": int, "device": str}

_YAML11_FLOAT = re.compile(r"^([+-]?\d+)([eE][+-]?\d+)$")  # 1e-4: a float in YAML 1.2 / TOML, a string in YAML 1.1


# ----------------------------------------------------------------------------------------------------------------
# Describing types and values (for the one-line messages)


def _union_args(hint: Any) -> tuple | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def describe_type(hint: Any, *, plural: bool = False) -> str:
    """``int`` -> 'an integer' ('integers' with ``plural``), ``tuple[float, ...]`` -> 'a list of numbers', ..."""
    args = _union_args(hint)
    if args is not None:
        parts = [describe_type(a, plural=plural) for a in args if a is not type(None)]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
        return text + (" or null" if type(None) in args else "")
    origin = typing.get_origin(hint)
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin is tuple:
        elems = typing.get_args(hint)
        if len(elems) == 2 and elems[1] is Ellipsis:
            inner = f"of {describe_type(elems[0], plural=True)}"
        elif len(set(elems)) == 1:
            inner = f"of {len(elems)} {describe_type(elems[0], plural=True)}"
        else:
            inner = "[" + ", ".join(describe_type(a) for a in elems) + "]"
        return f"lists {inner}" if plural else f"a list {inner}"
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
             bool: ("a boolean (true or false)", "booleans"), type(None): ("null", "nulls")}
    if hint in names:
        return names[hint][plural]
    if is_dataclass(hint) or hint in (dict, Mapping) or origin in (dict, Mapping, typing.Mapping):
        return "tables" if plural else "a table"
    return "values" if plural else "a value"


def describe_value(value: Any) -> str:
    """'the string 'four'', 'the integer 3', 'the float nan', 'the boolean true', 'null', 'the list [1, 2]'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) <= 80 else f"the string {value[:77]!r}..."
    text = repr(list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value)
    text = text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, (list, tuple)):
        return f"the list {text}"
    if isinstance(value, Mapping):
        return f"the table {text}"
    return f"{type(value).__name__} {text}"


def _string_hint(value: str, hint: Any) -> str:
    """The fix for a number written in quotes (or one YAML 1.1 reads as a string); '' when there is none."""
    m = _YAML11_FLOAT.match(value.strip())
    if m and hint is float:
        return f" (YAML 1.1 reads {value} as a string; write {m.group(1)}.0{m.group(2)})"
    try:
        number = int(value) if hint is int else float(value)
    except ValueError:
        return ""
    return " (write the number without quotes)" if math.isfinite(number) else ""


def unknown_keys_message(unknown: list[str], known: list[str], *, what: str = "known keys") -> str:
    """"unknown key 'seedd' (did you mean 'seed'?)", one clause per key; without a close match, the known keys
    (introduced by ``what``)."""
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
        parts.append(f"unknown key {key!r} " + (f"(did you mean {close[0]!r}?)" if close else
                                                 f"({what}: {', '.join(sorted(map(str, known)))})"))
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Checking one value against one type hint


def _fail(where: str, hint: Any, value: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"{where}: expected {describe_type(hint)}, got {describe_value(value)}{extra}")


@functools.lru_cache(maxsize=None)
def config_schema(cls: type) -> dict[str, Any]:
    """{field name: resolved type hint} of the init fields of config dataclass ``cls`` (resolved once per class;
    treat the returned dict as read-only)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type hint ``hint``; returns it normalised (lists -> tuples, int -> float for
    a number, a table -> the nested config dataclass). ``where`` names the key in the error
    (``[rlvr] probe.steps[1]``).

    Examples
    --------
    >>> check_value([1, 2], tuple[int, ...], "[rlvr] probe.steps")
    (1, 2)
    >>> check_value("four", int, "[rlvr] steps")
    Traceback (most recent call last):
    ...
    theory.errors.ConfigError: [rlvr] steps: expected an integer, got the string 'four'
    """
    if hint is Any or hint is object:
        return value
    args = _union_args(hint)
    if args is not None:
        if value is None:
            if type(None) in args:
                return None
            raise _fail(where, hint, value)
        arms = [a for a in args if a is not type(None)]
        errors = []
        for arm in arms:
            try:
                return check_value(value, arm, where)
            except ConfigError as e:
                errors.append((arm, e))
        # the one arm of the value's own shape (a list for a tuple arm, ...) gives the most precise message
        shaped = [e for arm, e in errors if _same_shape(value, arm)]
        if len(shaped) == 1:
            raise shaped[0]
        raise _fail(where, hint, value, _string_hint(value, float) if isinstance(value, str) else "")
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value in typing.get_args(hint) and type(value) in {type(a) for a in typing.get_args(hint)}:
            return value
        raise _fail(where, hint, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, hint, value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(where, hint, value, _string_hint(value, int) if isinstance(value, str) else "")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {describe_value(value)}")
            return float(value)
        raise _fail(where, hint, value, _string_hint(value, float) if isinstance(value, str) else "")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _fail(where, hint, value)
    if hint is type(None):
        if value is None:
            return None
        raise _fail(where, hint, value)
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _fail(where, hint, value)
        elems = typing.get_args(hint)
        if len(elems) == 2 and elems[1] is Ellipsis:
            elems = (elems[0],) * len(value)
        elif len(elems) != len(value):
            raise _fail(where, hint, value)
        return tuple(check_value(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, elems)))
    if is_dataclass(hint):
        return _nested(value, hint, where)
    if hint in (dict, Mapping) or origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise _fail(where, hint, value)
        return dict(value)
    raise ConfigError(f"{where}: the config schema has a type this checker does not know ({hint!r})")


def _same_shape(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the container shape of ``hint`` (a list for a tuple hint, a table for a dataclass)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if is_dataclass(hint) or hint in (dict, Mapping) or origin in (dict, Mapping, typing.Mapping):
        return isinstance(value, Mapping)
    return False


def _nested(value: Any, cls: type, where: str, default: Any = None) -> Any:
    """A nested config table -> ``cls``: ``default`` (an instance, or None for the class defaults) with the table's
    keys overridden. Fields whose class default is ``None`` are not carried over from ``default``: in this
    project's config classes ``None`` means "derived from the other fields" (``GPTConfig.d_ff``), so they are
    derived again from the new values."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _fail(where, cls, value)
    checked = check_fields(cls, value, where)
    kept = {} if default is None else {f.name: getattr(default, f.name) for f in fields(cls)
                                      if f.init and f.name not in checked and f.default is not None}
    try:
        return cls(**{**kept, **checked})
    except InputError as e:
        raise type(e)(f"{where}: {e}") from None
    except TypeError as e:  # a required field without a default
        raise ConfigError(f"{where}: {e}") from None


def check_fields(cls: type, values: Mapping, where: str, *, base: Any = None) -> dict[str, Any]:
    """The keys of ``values`` checked against the fields of config dataclass ``cls`` (an unknown key is refused,
    with the closest known one). A nested table overrides the nested config of ``base`` (an instance of ``cls``;
    None: the field's default) key by key. ``where`` is a section label (``[rlvr]``) or a key path in one."""
    schema = config_schema(cls)
    unknown = [k for k in values if k not in schema]
    if unknown:
        raise ConfigError(f"{where}: {unknown_keys_message(unknown, list(schema))}")
    out = {}
    for key, val in values.items():
        sub = f"{where} {key}" if where.endswith("]") else f"{where}.{key}"
        arm = _dataclass_arm(schema[key])
        if isinstance(val, Mapping) and arm is not None:
            default = getattr(base, key) if base is not None else _field_default(cls, key)
            out[key] = _nested(val, arm, sub, default if isinstance(default, arm) else None)
        else:
            out[key] = check_value(val, schema[key], sub)
    return out


def _dataclass_arm(hint: Any) -> type | None:
    """The one config dataclass of a hint (``ProbeConfig``, ``ProbeConfig | None``), else None."""
    arms = [a for a in (_union_args(hint) or (hint,)) if is_dataclass(a)]
    return arms[0] if len(arms) == 1 else None


def _field_default(cls: type, key: str) -> Any:
    f = {f.name: f for f in fields(cls)}[key]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# ----------------------------------------------------------------------------------------------------------------
# Sections


def section_config(cls, section: Mapping | None, *, where: str, presets: tuple[str, ...] | None = None,
                   default: str | None = None, **forced):
    """A config dataclass ``cls`` from the config-file section ``[where]``, every key type-checked first.

    With ``presets``, the key ``preset`` (default ``default``) picks a named constructor: the classmethod of that
    name, or plain ``cls(...)`` when the class has none; the section's other keys override fields. ``forced`` keys
    (e.g. ``seed`` from the command line) override the section when not None. A value of the wrong type, an
    unknown key or preset is a ``ConfigError`` naming ``[where]`` and the key; an error of the class's own checks
    is re-raised with ``[where]`` in front. Lists (all a TOML / YAML file can give) become tuples.

    Examples
    --------
    >>> from sims.tinygpt.rlvr import RLConfig
    >>> section_config(RLConfig, {"steps": 4, "betas": [0.9, 0.99]}, where="rlvr").betas
    (0.9, 0.99)
    >>> section_config(RLConfig, {"steps": "four"}, where="rlvr")
    Traceback (most recent call last):
    ...
    theory.errors.ConfigError: [rlvr] steps: expected an integer, got the string 'four'
    """
    label = f"[{where}]"
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{label}: expected a table, got {describe_value(section)}")
    sec = dict(section)
    sec.update({k: v for k, v in forced.items() if v is not None})
    preset = None
    if presets is not None:
        preset = sec.pop("preset", default)
        if preset not in presets:
            close = difflib.get_close_matches(str(preset), presets, n=1) if isinstance(preset, str) else []
            raise ConfigError(f"{label} preset: expected one of {list(presets)}, got {describe_value(preset)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    make = getattr(cls, preset, None) if preset is not None else None
    if not callable(make):
        make = cls
    checked = check_fields(cls, sec, label, base=_preset_instance(make, cls, sec, label))
    try:
        return make(**checked)
    except InputError as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith("[") else f"{label} {msg}") from None


def _preset_instance(make, cls, sec: Mapping, label: str) -> Any:
    """The preset's instance (only needed when a nested table overrides a nested config field)."""
    schema = config_schema(cls)
    if not any(isinstance(v, Mapping) and _dataclass_arm(schema.get(k)) is not None for k, v in sec.items()):
        return None
    try:
        return make()
    except InputError:
        return None


@dataclass(frozen=True)
class Section:
    """How an experiment reads one config section: the config dataclass ``cls``, its presets (``preset`` key;
    ``default`` when absent), ``extra`` keys the section takes besides ``cls``'s fields ({name: type hint}, e.g. the
    pretraining cache folder), and ``forced``: top-level keys (``seed``, ``device``) that override the section's."""

    cls: type
    presets: tuple[str, ...] | None = None
    default: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    forced: tuple[str, ...] = ()


def resolve_section(spec: Section, cfg: Mapping, name: str) -> tuple[Any, dict[str, Any]]:
    """``(config object, {extra key: value})`` of section ``[name]`` of the config ``cfg``, read as ``spec`` says."""
    raw = cfg.get(name)
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"[{name}]: expected a table, got {describe_value(raw)}")
    sec = dict(raw or {})
    extras = {k: check_value(sec.pop(k), hint, f"[{name}] {k}") for k, hint in spec.extra.items() if k in sec}
    obj = section_config(spec.cls, sec, where=name, presets=spec.presets, default=spec.default,
                         **{k: cfg.get(k) for k in spec.forced})
    return obj, extras


def validate_config(cfg: Any, sections: Mapping[str, Section], *, source: str = "config",
                    experiment: str | None = None) -> dict[str, Any]:
    """Check a whole config before any work: the top-level keys (``TOP_LEVEL`` and ``sections``; anything else is
    an unknown key), their types, and every section (built, so the classes' own checks run too). Returns
    ``{section: config object}``. Every error is one line starting with ``source`` (e.g. ``config file x.toml``);
    ``experiment`` names whose sections these are in the unknown-key message.

    Examples
    --------
    >>> from sims.tinygpt.rlvr import RLConfig
    >>> validate_config({"seedd": 0}, {"rlvr": Section(RLConfig)}, source="config file x.toml")
    Traceback (most recent call last):
    ...
    theory.errors.ConfigError: config file x.toml: top level: unknown key 'seedd' (did you mean 'seed'?)
    """
    try:
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"top level: expected a table, got {describe_value(cfg)}")
        known = [*TOP_LEVEL, *sections]
        unknown = [k for k in cfg if k not in known]
        if unknown:
            what = f"experiment {experiment} reads" if experiment else "known keys"
            raise ConfigError(f"top level: {unknown_keys_message(unknown, known, what=what)}")
        for key, hint in TOP_LEVEL.items():
            if key in cfg:
                check_value(cfg[key], hint, key)
        return {name: resolve_section(spec, cfg, name)[0] for name, spec in sections.items()}
    except InputError as e:
        raise type(e)(f"{source}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Config files and the experiment hash


def load_config(path: str | Path | None) -> dict:
    """Read a TOML, JSON or YAML config file (None: empty config, every default); checked by ``validate_config``."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    kind = {".toml": "TOML", ".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}.get(suffix)
    if kind is None:
        raise InputError(f"config file {path}: unsupported extension {path.suffix!r} (use .toml, .json or .yaml)")
    try:
        if kind == "TOML":
            cfg = tomllib.loads(text)
        elif kind == "JSON":
            cfg = json.loads(text)
        else:
            cfg = yaml.safe_load(text)
    except (ValueError, TypeError, yaml.YAMLError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"config file {path} is not valid {kind}: {' '.join(str(e).split())}") from None
    if cfg is None and kind == "YAML":
        return {}
    if not isinstance(cfg, dict):
        raise InputError(f"config file {path}: the top level must be a table / mapping")
    return cfg


def experiment_hash(name: str, cfg: Mapping) -> str:
    """12 hex digits of SHA-256 over the canonical JSON of (experiment name, config): the same experiment with the
    same config has the same hash in every process (run folders ``runs/NAME-<hash>``, sweep cell ids).

    Not the pretraining cache key (``sims.tinygpt.pretrain.config_hash``, which also hashes the code)."""
    payload = json.dumps({"experiment": name, "config": cfg}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
