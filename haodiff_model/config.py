"""Training run configs: frozen dataclasses of sections, read from `pipelines/train_*.yaml`.

`haodiff_data.config` does the strict, typed loading (unknown keys and wrong types fail with their
dotted name). Here: the run-level pieces both trainers share. A section given as a file name
instead of a mapping (`dpg: dpg.yaml`) is that file's section of the same name, the path taken
relative to the config file: the DPG architecture is written once, in `pipelines/dpg.yaml`, and
both training configs refer to it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from haodiff_data.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict


def read_section(path: str | Path, section: str) -> Mapping[str, Any]:
    """Section `section` of YAML file `path` (a mapping)."""
    data = read_yaml(path)
    if section not in data:
        raise ConfigError(f"{path}: no '{section}' section")
    return data[section]


def resolve_section_files(data: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """`data` with every top-level `name: FILE.yaml` replaced by FILE.yaml's `name` section."""
    out = dict(data)
    for name, value in data.items():
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            path = folder / value
            if not path.is_file():
                raise ConfigError(f"{name}: {value} refers to {path}, which does not exist")
            out[name] = read_section(path, name)
    return out


class RunConfig:
    """Base of a whole-run config: a frozen dataclass whose fields are sections (one YAML mapping each)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> Any:
        try:
            return from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> Any:
        """Load `path` (section files resolved), then apply `section.key=value` overrides."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist")
        data = resolve_section_files(read_yaml(path), path.parent)
        return cls.from_dict(apply_overrides(data, overrides), str(path))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Any:
        """The YAML at args.config with the --set overrides, then --max-steps and --out."""
        overrides = list(args.set or [])
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        cfg = cls.from_yaml(args.config, overrides)
        if args.out is not None:
            cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(args.out)))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (tuples as lists); from_dict(to_dict()) == self."""
        return to_dict(self)


__all__ = ["ConfigError", "RunConfig", "read_section", "resolve_section_files"]
