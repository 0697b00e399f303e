"""Configs as plain frozen dataclasses, loaded strictly from YAML mappings.

One loader for degradation recipes and training configs. Every value is checked against its
field's annotation (int, float, bool, str, None, Literal, tuples, sequences, nested dataclasses)
and a wrong one fails with its dotted key: `train.batch_size: expected an integer, got 2.5`.
Unknown keys fail the same way. A key left out keeps the default of the dataclass it belongs to,
or of the enclosing field's default instance (a stage-2 `data:` section without `batch_size`
keeps stage 2's default, not the loader class's). `section.key=value` overrides reach any depth.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config mapping, file or override that does not describe a valid config."""


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any, where: str, base: Any = None) -> Any:
    """`value` as the annotated type `hint`, or a ConfigError naming `where`.

    `base`: for a dataclass hint, the instance whose values fill the keys `value` leaves out.
    """
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where, base)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed here")
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], where, base)
        for candidate in inner:
            try:
                return coerce(value, candidate, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) or value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, Sequence, typing.Sequence):
        (arg,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def from_dict(cls: type, data: Any, where: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise with their dotted name.

    Keys `data` leaves out take their value from `base` (an instance of `cls`) when given, else
    the field default. Errors raised by `cls` itself (its `__post_init__` checks) are re-raised as
    ConfigError prefixed with `where`.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key '{_dotted(where, str(unknown[0]))}' (known here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            inner_base = getattr(base, name) if base is not None else None
            if inner_base is None and dataclasses.is_dataclass(hints[name]):
                default = _field_default(f)
                inner_base = None if default is dataclasses.MISSING else default
            kwargs[name] = coerce(data[name], hints[name], _dotted(where, name), inner_base)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif _field_default(f) is dataclasses.MISSING:
            raise ConfigError(f"missing key '{_dotted(where, name)}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-ready data (tuples as lists); from_dict(type(obj), to_dict(obj)) == obj."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_value(text: str) -> Any:
    """An override's value as YAML; `2e-3` is a float (YAML 1.1 wants `2.0e-3`)."""
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each `dotted.key=value` applied (values parsed as YAML).

    Names are not checked here: an unknown one fails in `from_dict` with its dotted name.
    """
    out = _copy(data)
    for item in overrides:
        name, sep, text = item.partition("=")
        keys = name.strip().split(".")
        if not sep or not all(keys):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-3")
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[:i + 1])} is not a mapping")
            node = child
        node[keys[-1]] = parse_value(text)
    return out


def _copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _copy(v) for k, v in data.items()}
    return data


class _KeyGivenTwice(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _KeyGivenTwice(f"line {key_node.start_mark.line + 1}: key {key!r} given twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Any) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError naming the file otherwise (also for a key
    given twice)."""
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except _KeyGivenTwice as exc:
        raise ConfigError(f"{path}, {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


__all__ = ["ConfigError", "apply_overrides", "coerce", "from_dict", "parse_value", "read_yaml", "to_dict"]
