"""Degradation recipes: plain dataclasses loaded from ``pipelines/*.yaml``.

A recipe holds every knob of a synthesis run. Loading is strict: an unknown or mistyped key
fails with its dotted name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from haodiff_data.segment.goliath import GROUPS

PIPELINES_DIR = Path(__file__).resolve().parent.parent / "pipelines"


class RecipeError(ValueError):
    """A recipe file or mapping that does not describe a valid recipe."""


@dataclass(frozen=True)
class IntakeConfig:
    min_side: int = 256
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class CropConfig:
    size: int = 512
    mode: str = "person"
    square_downsample: bool = True


@dataclass(frozen=True)
class FirstOrderConfig:
    p_none: float = 1 / 3
    p_hmb: float = 1 / 3
    p_generic: float = 1 / 3
    require_person: bool = False
    p_hmb_over: str = "person"  # person: p_hmb among samples with a person | all: share of all samples
    person_share: float = 1.0  # with p_hmb_over all: the expected share of samples with a person


@dataclass(frozen=True)
class HMBConfig:
    groups: tuple[str, ...] = GROUPS
    group_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    min_group_fraction: float = 0.005
    erode_range: tuple[int, int] = (1, 7)
    dilate_range: tuple[int, int] = (9, 31)
    feather_sigma_range: tuple[float, float] = (2.0, 8.0)
    psf_canvas: int = 64
    psf_iters: int = 2000
    psf_max_len: float = 60.0
    psf_expl_choices: tuple[float, ...] = (0.01, 0.009, 0.008, 0.007, 0.005, 0.003)
    psf_fraction_choices: tuple[float, ...] = (0.1, 0.5, 1.0)
    mask_threshold: float = 0.5


@dataclass(frozen=True)
class BlurConfig:
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[str, ...] = (
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
    )
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1


@dataclass(frozen=True)
class ResizeConfig:
    probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    range: tuple[float, float] = (0.15, 1.5)
    modes: tuple[str, ...] = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class NoiseConfig:
    gaussian_prob: float = 0.5
    sigma_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_prob: float = 0.4


@dataclass(frozen=True)
class OrderConfig:
    blur_prob: float = 1.0
    blur: BlurConfig = field(default_factory=BlurConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    jpeg_range: tuple[float, float] | None = (30.0, 95.0)


@dataclass(frozen=True)
class FinalConfig:
    sinc_prob: float = 0.8
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    jpeg_first_prob: float = 0.5
    resize_back: bool = True
    resize_back_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")


def _second_order() -> OrderConfig:
    return OrderConfig(
        blur_prob=0.8,
        blur=BlurConfig(sigma_range=(0.2, 1.5)),
        resize=ResizeConfig(probs=(0.3, 0.4, 0.3), range=(0.3, 1.2)),
        noise=NoiseConfig(sigma_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5)),
        jpeg_range=None,
    )


@dataclass(frozen=True)
class GenericConfig:
    scale: int = 4
    first: OrderConfig = field(default_factory=OrderConfig)
    second: OrderConfig = field(default_factory=_second_order)
    final: FinalConfig = field(default_factory=FinalConfig)


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 1000
    png_compression: int = 1


@dataclass(frozen=True)
class Recipe:
    name: str = "haodiff"
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    first_order: FirstOrderConfig = field(default_factory=FirstOrderConfig)
    hmb: HMBConfig = field(default_factory=HMBConfig)
    generic: GenericConfig = field(default_factory=GenericConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def sha256(self) -> str:
        """Hash of what shapes a sample: not the name, not how samples are grouped into shards."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("name", "shards")}
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the field's annotated type, or raise naming ``where``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{where}: unsupported type {hint}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise with their dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            dotted = f"{where}.{key}" if where else str(key)
            raise RecipeError(f"unknown recipe key '{dotted}' (known here: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def validate(recipe: Recipe) -> Recipe:
    """Check cross-field constraints that types alone cannot express."""
    fo = recipe.first_order
    if min(fo.p_none, fo.p_hmb, fo.p_generic) < 0 or fo.p_none + fo.p_hmb + fo.p_generic <= 0:
        raise RecipeError("first_order: probabilities must be >= 0 and not all zero")
    if fo.p_hmb_over not in ("person", "all"):
        raise RecipeError(f"first_order.p_hmb_over: expected person or all, got {fo.p_hmb_over!r}")
    if not 0 < fo.person_share <= 1:
        raise RecipeError(f"first_order.person_share: expected a value in (0, 1], got {fo.person_share}")
    if recipe.crop.mode not in ("person", "random", "center"):
        raise RecipeError(f"crop.mode: expected person, random or center, got {recipe.crop.mode!r}")
    unknown = [g for g in recipe.hmb.groups if g not in GROUPS]
    if unknown:
        raise RecipeError(f"hmb.groups: unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
    if len(recipe.hmb.groups) != len(recipe.hmb.group_weights):
        raise RecipeError("hmb.groups and hmb.group_weights must have the same length")
    for order in ("first", "second"):
        blur = getattr(recipe.generic, order).blur
        if len(blur.kernel_types) != len(blur.kernel_probs):
            raise RecipeError(f"generic.{order}.blur: kernel_types and kernel_probs differ in length")
    if recipe.generic.scale < 1:
        raise RecipeError("generic.scale must be >= 1")
    if recipe.generic.scale > 1 and not recipe.generic.final.resize_back:
        raise RecipeError("generic.final.resize_back must be true when generic.scale > 1 (LQ and HQ share a size)")
    return recipe


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a recipe by name (``haodiff`` -> ``pipelines/haodiff.yaml``) or by file path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PIPELINES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a mapping")
    data.setdefault("name", path.stem)
    try:
        return validate(from_dict(Recipe, data))
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from exc
