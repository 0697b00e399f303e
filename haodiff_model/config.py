"""Run configs: the strict dataclass loader, YAML sections and "section.key=value" overrides."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A config mapping or file that does not describe a valid model config."""


def config_from_mapping(cls: type, data: Mapping[str, Any], where: str, ignore: frozenset[str] = frozenset()):
    """Build dataclass `cls` from `data`, rejecting unknown keys by name (keys in `ignore` are skipped)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - ignore)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name in ignore:
            continue
        hint = hints[name]
        origin = typing.get_origin(hint)
        if origin is tuple and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif origin in (typing.Union, types.UnionType) and float in typing.get_args(hint) and \
                isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def read_yaml_section(path: str | Path, section: str) -> Mapping[str, Any]:
    path = Path(path)
    with path.open() as f:
        data = yaml.safe_load(f)
    if not isinstance(data, Mapping) or section not in data:
        raise ConfigError(f"{path}: no '{section}' section")
    return data[section]


def _scalar_ok(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int to isinstance, but true/false is no step count
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def check_scalar_types(obj: Any) -> None:
    """Reject dataclass fields holding a scalar of the wrong type, by field name (YAML typos such as lr: abc)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if not all(k in (int, float, str, bool, type(None)) for k in kinds):
            continue  # containers are checked by the owner's own validation
        if not any(_scalar_ok(value, k) for k in kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{f.name} must be {names}, got {value!r}")


_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)  # PyYAML reads "2e-3" as a string (YAML 1.1 floats need a dot)
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each "section.key=value" applied; unknown names surface in from_dict."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-3")
        current = out.get(section)
        if current is None:
            current = out[section] = {}
        elif not isinstance(current, dict):
            raise ConfigError(f"override {item!r}: section {section!r} is not a mapping")
        current[key] = _parse_value(text)
    return out


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


class RunConfig:
    """Base of a whole-run config: a frozen dataclass whose fields are sections (one YAML mapping each).

    RUN_DEFAULTS holds, per section, the values this run uses where they differ from the section
    class's own defaults (stage 2's smaller batch, each stage's output folder). They fill the keys a
    config leaves out; the section fields' default factories use them too, via `run_default`.
    Subclasses need `data`, `train` (with max_steps), `val` and `output` sections.
    """

    RUN_DEFAULTS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    @classmethod
    def run_default(cls, name: str) -> Any:
        """The default of section `name` for this run."""
        return typing.get_type_hints(cls)[name](**copy.deepcopy(dict(cls.RUN_DEFAULTS.get(name, {}))))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> Any:
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        sections = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(sections)}")
        kwargs = {}
        for name, value in data.items():
            value = {} if value is None else value
            if isinstance(value, Mapping):
                value = {**copy.deepcopy(dict(cls.RUN_DEFAULTS.get(name, {}))), **value}
            kwargs[name] = config_from_mapping(hints[name], value, f"{where}:{name}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> Any:
        """Load `path`, then apply "section.key=value" overrides (values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist")
        with path.open() as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        return cls.from_dict(apply_overrides(data, overrides), str(path))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Any:
        """The YAML at args.config with --set overrides, then --max-steps and --out."""
        cfg = cls.from_yaml(args.config, list(args.set or []))
        if args.max_steps is not None:
            cfg = dataclasses.replace(cfg, train=config_from_mapping(
                type(cfg.train), {**dataclasses.asdict(cfg.train), "max_steps": args.max_steps}, "--max-steps"))
        if args.out is not None:
            cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(args.out)))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (tuples as lists); from_dict(to_dict()) == self."""
        return {f.name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                for f in dataclasses.fields(self)}


__all__ = ["ConfigError", "RunConfig", "apply_overrides", "check_scalar_types", "config_from_mapping",
           "read_yaml_section"]
