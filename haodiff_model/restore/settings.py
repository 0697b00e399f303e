"""What a weights folder says about itself: `haodiff.json` beside the official files.

The official release's `img_encoder_weights.pth` already stores the DPG and prompt-embedder
architecture (`swinir_kwargs`, `performer_kwargs`); the LoRA file stores nothing but tensors, and
the timestep, CFG scale and latent sampling lived only in the training config. `haodiff.json`
records them next to the weights; a folder without it (the official release) gets the official
defaults. A stage-1 `dpg.pth` gets `dpg.json` beside it with its architecture, so stage 2 and the
converter never ask the user to retype it.

A value given on the command line overrides the file; a file that contradicts the weights (an
architecture key, the LoRA rank) is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETTINGS_FILE = "haodiff.json"
SETTINGS_FORMAT = "haodiff-restore-settings"
DPG_SIDECAR_SUFFIX = ".json"
DPG_FORMAT = "haodiff-dpg"
FORMAT_VERSION = 1
LATENT_MODES = ("sample", "mode")
OFFICIAL_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"
# UNet config keys recorded with trained weights and checked against the base folder at restore time
UNET_FINGERPRINT_KEYS = ("block_out_channels", "cross_attention_dim", "attention_head_dim", "in_channels",
                         "out_channels", "layers_per_block", "use_linear_projection")


class SettingsError(ValueError):
    """A settings file that cannot be used, or that contradicts the weights it sits beside."""


@dataclass(frozen=True)
class InferenceSettings:
    """The one-step inference of a weights folder; defaults are the official `run_inference.py` ones."""

    timestep: int = 199
    cfg_scale: float = 3.5
    latent: str = "sample"
    seed: int = 114
    base_model: str = OFFICIAL_BASE_MODEL
    lora_rank: int | None = None  # informational; the LoRA file itself is authoritative
    dpg: dict[str, Any] | None = None  # swinir_kwargs the prompt encoder was built with
    prompt_embedder: dict[str, Any] | None = None  # performer_kwargs
    unet: dict[str, Any] = field(default_factory=dict)  # base UNet config keys the LoRA was trained on

    def __post_init__(self) -> None:
        if not 0 <= self.timestep < 1000:
            raise SettingsError(f"timestep must be in 0..999, got {self.timestep}")
        if self.latent not in LATENT_MODES:
            raise SettingsError(f"latent must be one of {LATENT_MODES}, got {self.latent!r}")
        if self.seed < 0:
            raise SettingsError(f"seed must be >= 0, got {self.seed}")

    @property
    def sample_latent(self) -> bool:
        return self.latent == "sample"

    def to_dict(self) -> dict[str, Any]:
        return {"format": SETTINGS_FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> InferenceSettings:
        data = dict(data)
        if data.pop("format", None) != SETTINGS_FORMAT:
            raise SettingsError(f"{where}: not a {SETTINGS_FORMAT} file (format key missing or different)")
        version = data.pop("version", None)
        if version != FORMAT_VERSION:
            raise SettingsError(f"{where}: version {version!r} is unknown to this haodiff (knows {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, SettingsError) as exc:
            raise SettingsError(f"{where}: {exc}") from exc


def _write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def write_settings(folder: str | Path, settings: InferenceSettings) -> Path:
    return _write_json(Path(folder) / SETTINGS_FILE, settings.to_dict())


def read_settings(folder: str | Path) -> InferenceSettings | None:
    """The folder's settings, or None for a folder without `haodiff.json` (official release)."""
    path = Path(folder) / SETTINGS_FILE
    data = _read_json(path)
    return None if data is None else InferenceSettings.from_dict(data, str(path))


def _read_json(path: Path) -> Any:
    """The file's JSON, or None when there is no such file; an unreadable one is a SettingsError."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(f"{path}: unreadable ({exc})") from exc


def diff_keys(expected: Mapping[str, Any], actual: Mapping[str, Any], prefix: str) -> list[str]:
    """`prefix.key (file X, weights Y)` for every key of `expected` whose value `actual` contradicts."""
    out = []
    for key, value in expected.items():
        have = actual.get(key)
        if isinstance(value, (list, tuple)) and isinstance(have, (list, tuple)):
            same = list(value) == list(have)
        else:
            same = value == have
        if not same:
            out.append(f"{prefix}.{key} (settings {value!r}, weights {have!r})")
    return out


def dpg_sidecar(dpg_path: str | Path) -> Path:
    """`dpg.json` beside `dpg.pth`."""
    return Path(dpg_path).with_suffix(DPG_SIDECAR_SUFFIX)


def write_dpg_sidecar(dpg_path: str | Path, swinir_kwargs: Mapping[str, Any]) -> Path:
    return _write_json(dpg_sidecar(dpg_path), {"format": DPG_FORMAT, "version": FORMAT_VERSION,
                                               "swinir_kwargs": dict(swinir_kwargs)})


def read_dpg_sidecar(dpg_path: str | Path) -> dict[str, Any] | None:
    """The stage-1 architecture stored beside a DPG checkpoint, or None when there is none."""
    path = dpg_sidecar(dpg_path)
    data = _read_json(path)
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("format") != DPG_FORMAT or data.get("version") != FORMAT_VERSION:
        raise SettingsError(f"{path}: not a {DPG_FORMAT} v{FORMAT_VERSION} file")
    if not isinstance(data.get("swinir_kwargs"), dict):
        raise SettingsError(f"{path}: no swinir_kwargs mapping")
    return data["swinir_kwargs"]


__all__ = ["InferenceSettings", "LATENT_MODES", "OFFICIAL_BASE_MODEL", "SETTINGS_FILE", "SettingsError",
           "UNET_FINGERPRINT_KEYS", "diff_keys", "dpg_sidecar", "read_dpg_sidecar", "read_settings", "write_dpg_sidecar", "write_settings"]
