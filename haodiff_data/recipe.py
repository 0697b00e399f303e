"""Degradation recipes: plain dataclasses loaded from ``pipelines/*.yaml``.

A recipe holds every knob of a synthesis run. Loading is strict: an unknown or mistyped key
fails with its dotted name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haodiff_data.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from haodiff_data.segment.goliath import GROUPS

# A link to the top-level pipelines/ in a checkout, a folder of copies in an installed wheel; a
# checkout without links (Windows) falls back to the top-level folder.
_PACKAGED = Path(__file__).resolve().parent / "pipelines"
PIPELINES_DIR = _PACKAGED if _PACKAGED.is_dir() else _PACKAGED.parent.parent / "pipelines"


class RecipeError(ConfigError):
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
    psf_units: str = "lq"  # lq: PSF sizes are LQ pixels (trajectory magnified by generic.scale) | hq
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
    png_compression: int = 2


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
        return to_dict(self)

    def psf_scale(self) -> int:
        """Magnification of the HMB trajectory: generic.scale when PSF sizes are in LQ pixels."""
        return self.generic.scale if self.hmb.psf_units == "lq" else 1

    def sha256(self) -> str:
        """Hash of what shapes a sample: not the name, not how samples are grouped into shards."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("name", "shards")}
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _fail(where: str, expected: str, value: Any) -> None:
    raise RecipeError(f"{where}: expected {expected}, got {to_dict(value)!r}")


def _probability(value: float, where: str) -> None:
    if not 0.0 <= value <= 1.0:
        _fail(where, "a probability in [0, 1]", value)


def _weights(values: tuple[float, ...], where: str) -> None:
    if not values or min(values) < 0 or sum(values) <= 0:
        _fail(where, "weights >= 0, not all 0", values)


def _range(bounds: tuple[float, float], where: str, low: float, high: float = float("inf"), strict_low: bool = False) -> None:
    lo, hi = bounds
    ok = (lo > low if strict_low else lo >= low) and lo <= hi <= high
    if not ok:
        sign = "<" if strict_low else "<="
        upper = "" if high == float("inf") else f" <= {high:g}"
        _fail(where, f"a range [low, high] with {low:g} {sign} low <= high{upper}", bounds)


def _kernel_sizes(sizes: tuple[int, ...], where: str) -> None:
    if not sizes or any(k < 3 or k % 2 == 0 for k in sizes):
        _fail(where, "odd kernel sizes >= 3 (a kernel has a centre pixel)", sizes)


def _at_least(value: int, low: int, where: str) -> None:
    if value < low:
        _fail(where, f"an integer >= {low}", value)


def _modes(modes: tuple[str, ...], where: str) -> None:
    from haodiff_data.degrade.generic import RESIZE_MODES  # degrade imports this module

    if not modes or any(m not in RESIZE_MODES for m in modes):
        _fail(where, f"resize modes among {', '.join(RESIZE_MODES)}", modes)


def _check_order(order: OrderConfig, where: str) -> None:
    _probability(order.blur_prob, f"{where}.blur_prob")
    blur = order.blur
    _kernel_sizes(blur.kernel_sizes, f"{where}.blur.kernel_sizes")
    from haodiff_data.degrade.kernels import MIXED_TYPES  # degrade imports this module

    if not set(blur.kernel_types) <= set(MIXED_TYPES):
        _fail(f"{where}.blur.kernel_types", f"kernel types among {', '.join(MIXED_TYPES)}", blur.kernel_types)
    if len(blur.kernel_types) != len(blur.kernel_probs):
        raise RecipeError(f"{where}.blur: kernel_types and kernel_probs differ in length")
    _weights(blur.kernel_probs, f"{where}.blur.kernel_probs")
    _range(blur.sigma_range, f"{where}.blur.sigma_range", 0, strict_low=True)
    for name in ("betag_range", "betap_range"):
        bounds = getattr(blur, name)
        if not 0 < bounds[0] <= 1 <= bounds[1]:
            _fail(f"{where}.blur.{name}", "0 < low <= 1 <= high (half the draws on each side of 1)", bounds)
    _probability(blur.sinc_prob, f"{where}.blur.sinc_prob")
    resize = order.resize
    _weights(resize.probs, f"{where}.resize.probs")
    if not 0 < resize.range[0] <= 1 <= resize.range[1]:
        _fail(f"{where}.resize.range", "0 < low <= 1 <= high (down draws below 1, up above)", resize.range)
    _modes(resize.modes, f"{where}.resize.modes")
    noise = order.noise
    for name in ("gaussian_prob", "gray_prob"):
        _probability(getattr(noise, name), f"{where}.noise.{name}")
    _range(noise.sigma_range, f"{where}.noise.sigma_range", 0)
    _range(noise.poisson_scale_range, f"{where}.noise.poisson_scale_range", 0)
    if order.jpeg_range is not None:
        _range(order.jpeg_range, f"{where}.jpeg_range", 1, 100)


def validate(recipe: Recipe) -> Recipe:
    """Check every value against what the pipeline can use, naming the dotted key; run before any
    work so a bad recipe stops a run at once, not one sample at a time."""
    _at_least(recipe.intake.min_side, 1, "intake.min_side")
    _at_least(recipe.intake.max_pixels, 1, "intake.max_pixels")
    crop, scale = recipe.crop, recipe.generic.scale
    fo = recipe.first_order
    if fo.p_hmb_over not in ("person", "all"):
        raise RecipeError(f"first_order.p_hmb_over: expected person or all, got {fo.p_hmb_over!r}")
    if not 0 < fo.person_share <= 1:
        raise RecipeError(f"first_order.person_share: expected a value in (0, 1], got {fo.person_share}")
    if recipe.crop.mode not in ("person", "random", "center"):
        raise RecipeError(f"crop.mode: expected person, random or center, got {recipe.crop.mode!r}")
    _at_least(scale, 1, "generic.scale")
    # The LQ is made at size / scale, and the stage-2 trainer encodes crops with SD's VAE (8x).
    if crop.size < 64 or crop.size % 8 or crop.size % scale:
        _fail("crop.size", f"a multiple of 8 and of generic.scale ({scale}), at least 64", crop.size)
    fo = recipe.first_order
    for name in ("p_none", "p_hmb", "p_generic"):
        _probability(getattr(fo, name), f"first_order.{name}")
    if fo.p_none + fo.p_hmb + fo.p_generic <= 0:
        raise RecipeError("first_order: probabilities must not all be 0")
    hmb = recipe.hmb
    unknown = [g for g in hmb.groups if g not in GROUPS]
    if unknown:
        raise RecipeError(f"hmb.groups: unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
    if len(hmb.groups) != len(hmb.group_weights):
        raise RecipeError("hmb.groups and hmb.group_weights must have the same length")
    _weights(hmb.group_weights, "hmb.group_weights")
    _probability(hmb.min_group_fraction, "hmb.min_group_fraction")
    _probability(hmb.mask_threshold, "hmb.mask_threshold")
    for name in ("erode_range", "dilate_range"):
        bounds = getattr(hmb, name)
        _range(bounds, f"hmb.{name}", 1)
        if bounds[0] == bounds[1] and bounds[0] % 2 == 0:
            _fail(f"hmb.{name}", "a range containing an odd size", bounds)
    _range(hmb.feather_sigma_range, "hmb.feather_sigma_range", 0, strict_low=True)
    _at_least(hmb.psf_canvas, 3, "hmb.psf_canvas")
    _at_least(hmb.psf_iters, 1, "hmb.psf_iters")
    if hmb.psf_max_len <= 0:
        _fail("hmb.psf_max_len", "a length > 0", hmb.psf_max_len)
    if not hmb.psf_expl_choices or min(hmb.psf_expl_choices) < 0:
        _fail("hmb.psf_expl_choices", "values >= 0, at least one", hmb.psf_expl_choices)
    if not hmb.psf_fraction_choices or not all(0 < f <= 1 for f in hmb.psf_fraction_choices):
        _fail("hmb.psf_fraction_choices", "fractions in (0, 1], at least one", hmb.psf_fraction_choices)
    if hmb.psf_units not in ("lq", "hq"):
        _fail("hmb.psf_units", "lq or hq", hmb.psf_units)
    _check_order(recipe.generic.first, "generic.first")
    _check_order(recipe.generic.second, "generic.second")
    final = recipe.generic.final
    _probability(final.sinc_prob, "generic.final.sinc_prob")
    _probability(final.jpeg_first_prob, "generic.final.jpeg_first_prob")
    _kernel_sizes(final.kernel_sizes, "generic.final.kernel_sizes")
    _range(final.jpeg_range, "generic.final.jpeg_range", 1, 100)
    _modes(final.resize_modes, "generic.final.resize_modes")
    _modes(final.resize_back_modes, "generic.final.resize_back_modes")
    if scale > 1 and not final.resize_back:
        raise RecipeError("generic.final.resize_back must be true when generic.scale > 1 (LQ and HQ share a size)")
    _at_least(recipe.shards.samples_per_shard, 1, "shards.samples_per_shard")
    if not 0 <= recipe.shards.png_compression <= 3:
        _fail("shards.png_compression", "an ISA-L deflate level in [0, 3]", recipe.shards.png_compression)
    return recipe


def read_pipeline_yaml(name_or_path: str | Path, what: str) -> tuple[Path, dict[str, Any]]:
    """(path, mapping) of a pipelines/ YAML by name (``haodiff`` -> ``pipelines/haodiff.yaml``) or by
    file path; `what` names the file in the error when it is missing."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PIPELINES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeError(f"{what} not found: {path}")
    try:
        return path, read_yaml(path)
    except ConfigError as exc:  # already names the file
        raise RecipeError(str(exc)) from exc


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe by name (``haodiff`` -> ``pipelines/haodiff.yaml``) or by file path, then apply
    ``dotted.key=value`` overrides (values parsed as YAML), e.g. ``hmb.psf_iters=500``."""
    path, raw = read_pipeline_yaml(name_or_path, "recipe file")
    try:
        data = apply_overrides(raw, overrides)
        data.setdefault("name", path.stem)
        return validate(from_dict(Recipe, data))
    except ConfigError as exc:
        raise RecipeError(f"{path}: {exc}") from exc
