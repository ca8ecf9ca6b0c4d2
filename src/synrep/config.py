"""Typed dataclass configs: YAML files plus ``key=value`` overrides.

Every stage has a dataclass config. :func:`load_config` builds one from an optional YAML file and a
list of ``dotted.key=value`` strings, checks every key and type, and raises :class:`ConfigError`
naming the key and what is allowed. :func:`save_config` writes the resolved config next to a run's
outputs so that a run can always be repeated.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .atomic import atomic_write_text
from .errors import SynrepError

T = TypeVar("T")


class ConfigError(SynrepError, ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


class InvalidValue(ConfigError):
    """A config value of the right type but outside what is allowed (``key`` is the dotted key)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config key '{key}': {message}")


def read_yaml(path: Path, what: str, error: type[Exception]):
    """Parse the YAML file ``path`` (empty file -> ``{}``); ``error`` names it as ``what`` when it is missing,
    not UTF-8 text, or not valid YAML."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text (a binary file?)") from None
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {err}") from None


def require(ok: bool, key: str, message: str) -> None:
    """Raise :class:`InvalidValue` for ``key`` unless ``ok`` (for a config class's ``check()``)."""
    if not ok:
        raise InvalidValue(key, message)


def check_config(cfg: Any, prefix: str = "") -> None:
    """Run ``check()`` of ``cfg`` and of every nested config section; errors carry the full dotted key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, prefix + f.name + ".")
    check = getattr(cfg, "check", None)
    if callable(check):
        try:
            check()
        except InvalidValue as err:
            raise InvalidValue(prefix + err.key, err.message) from None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


BOOL_WORDS = {True: ("true", "yes", "1", "on"), False: ("false", "no", "0", "off")}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off as booleans: take back the word that was meant
            value = next((c for c in choices if isinstance(c, str) and c.lower() in (BOOL_WORDS[value])), value)
        if value in choices:
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not allowed; choose {_describe(tp)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': {value!r} is not {_describe(tp)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML reads 1 and 0 as integers
            return bool(value)
        if isinstance(value, str) and value.lower() in BOOL_WORDS[True]:
            return True
        if isinstance(value, str) and value.lower() in BOOL_WORDS[False]:
            return False
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _unknown_key(key: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(valid)}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in types_:
            raise _unknown_key(prefix + name, types_)
        kwargs[name] = _coerce(value, types_[name], prefix + name)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``1`` int, ``0.5`` float, ``[1,2]`` list, ``null``)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Return a copy of ``cfg`` with each ``dotted.key=value`` override applied and type-checked."""
    cfg = dataclasses.replace(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        parts = key.split(".")
        target = cfg
        for i, part in enumerate(parts[:-1]):
            types_ = _field_types(type(target))
            if part not in types_:
                raise _unknown_key(".".join(parts[: i + 1]), types_)
            child = getattr(target, part)
            if not dataclasses.is_dataclass(child):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section")
            child = dataclasses.replace(child)
            setattr(target, part, child)
            target = child
        types_ = _field_types(type(target))
        leaf = parts[-1]
        if leaf not in types_:
            raise _unknown_key(key, types_)
        value = _parse_scalar(raw)
        if types_[leaf] is str or (get_origin(types_[leaf]) in (Union, types.UnionType) and str in get_args(types_[leaf]) and value is not None):
            value = raw if not isinstance(value, (list, dict)) else value
        setattr(target, leaf, _coerce(value, types_[leaf], key))
    return cfg


def _nest(values: dict[str, Any]) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def set_values(cfg: T, values: dict[str, Any]) -> T:
    """A copy of ``cfg`` with each dotted key set to its (type-checked) value."""
    return _merge(cfg, _nest(values))


def preset_layers(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Values that presets set, as full dotted keys: every section of ``cfg`` (itself included) with a
    ``preset_values()`` method contributes the values of the preset it names."""
    found: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            found.update(preset_layers(value, prefix + f.name + "."))
    hook = getattr(cfg, "preset_values", None)
    if callable(hook):
        found.update({prefix + k: v for k, v in hook().items()})
    return found


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                profile: Iterable[str] = ()) -> T:
    """Build a ``cls`` config from defaults, an optional YAML file, then ``key=value`` overrides, and check its values.

    A section that names a preset (a ``preset`` key and a ``preset_values()`` method) gets the preset's values
    between the defaults and the file: keys given in the file or as overrides win over the preset. ``profile``
    (``key=value`` strings, e.g. ``synrep run --quick``) comes after the presets and before the file, so the
    file and the overrides win over it too.
    """
    overrides, profile = list(overrides), list(profile)
    cfg = _load(apply_overrides(cls(), profile), path, overrides)
    presets = preset_layers(cfg)
    if presets:
        cfg = _load(apply_overrides(set_values(cls(), presets), profile), path, overrides)
    check_config(cfg)
    return cfg


def _load(cfg: T, path: str | Path | None, overrides: list[str]) -> T:
    if path is not None:
        path = Path(path)
        data = read_yaml(path, "config file", ConfigError)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        try:
            cfg = _merge(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return apply_overrides(cfg, overrides)


def _merge(cfg: T, data: dict, prefix: str = "") -> T:
    types_ = _field_types(type(cfg))
    updates = {}
    for name, value in data.items():
        if name not in types_:
            raise _unknown_key(prefix + name, types_)
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[name] = _merge(current, value, prefix + name + ".")
        else:
            updates[name] = _coerce(value, types_[name], prefix + name)
    return dataclasses.replace(cfg, **updates)


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a config class's source: its one line of meaning."""
    import inspect
    import re

    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.MULTILINE):
            comments[match.group(1)] = match.group(2).strip()
    return comments


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type or choices, default, meaning)`` for every leaf key of a config class (for ``--help``).

    The meaning is the field's trailing comment, or the text the class's ``key_help()`` gives for that key."""
    rows = []
    defaults = cls()
    comments = field_comments(cls)
    key_help = getattr(cls, "key_help", None)
    comments.update(key_help() if callable(key_help) else {})  # longer help a class gives for some keys
    for name, tp in _field_types(cls).items():
        value = getattr(defaults, name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(type(value), prefix + name + ".")
        else:
            rows.append((prefix + name, _describe(tp), repr(value), comments.get(name, "")))
    return rows


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict view of a dataclass config (tuples become lists) for YAML/JSON."""
    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return convert(cfg)


def changed_settings(saved: dict, now: dict, may_change: Iterable[str] = ()) -> list[str]:
    """``"key: old -> new"`` for every dotted key whose value differs between two config dicts (keys that only
    one of them has are skipped: a key added by a newer synrep does not block a resume), except ``may_change``."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out
    before, after, allowed = flat(saved), flat(now), set(may_change)
    return [f"{k}: {before[k]!r} -> {after[k]!r}" for k in after if k in before and before[k] != after[k] and k not in allowed]


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML into ``out_dir`` (atomically) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
