"""Stage-2 run config: the sections of pipelines/train_osd.yaml, and the local files it names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from haodiff_model.config import ConfigError, RunConfig
from haodiff_model.nets.dpg import DPGConfig
from haodiff_model.nets.prompt import PromptEmbedderConfig
from haodiff_model.train.data import ShardStreamConfig
from haodiff_model.train.loop import OutputSettings, ValSettings


BACKBONES = ("sdxl", "sd21", "none")
PLACEHOLDER = "/path/to/"  # the shipped config's placeholder paths start with this
# seed-stream tags of stage 2, apart from the data streams' and from each other
VAE_STREAM, GAN_STREAM, REDRAW_STREAM, INIT_STREAM, VAL_STREAM = 201, 202, 203, 204, 205


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelSettings:
    pretrained_model: str = PLACEHOLDER + "stable-diffusion-2-1-base"
    dpg_weights: str | None = PLACEHOLDER + "dpg.pth"
    init_img_encoder: str | None = None
    init_lora: str | None = None
    lora_rank: int = 16
    lora_alpha: float = 16.0
    timestep: int = 199
    cfg_scale: float = 3.5
    sample_latent: bool = True
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.timestep < 1000:
            raise ValueError(f"invalid lora_rank={self.lora_rank} (>= 1), lora_alpha={self.lora_alpha} (> 0) or "
                             f"timestep={self.timestep} (0..999)")


@dataclass(frozen=True)
class DiscriminatorSettings:
    backbone: str = "sdxl"
    model: str | None = PLACEHOLDER + "stable-diffusion-xl-base-1.0"
    lora_rank: int = 0
    head_channels: int = 256
    head_layers: int = 2
    head_norm_groups: int = 32
    t_min: int = 0
    t_max: int = 1000
    start_step: int = 0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.lora_rank < 0 or self.start_step < 0 or not 0 <= self.t_min < self.t_max <= 1000:
            raise ValueError(f"invalid lora_rank={self.lora_rank} (>= 0), start_step={self.start_step} (>= 0) or "
                             f"t range [{self.t_min}, {self.t_max}) (0 <= t_min < t_max <= 1000)")


@dataclass(frozen=True)
class LossSettings:
    vgg16_weights: str = PLACEHOLDER + "vgg16.pth"
    dists_weights: str = PLACEHOLDER + "dists_weights.pt"
    gan_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.gan_weight < 0:
            raise ValueError(f"gan_weight must be >= 0, got {self.gan_weight}")


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 120_000
    lr: float = 1e-5
    disc_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    grad_clip: float | None = 1.0
    precision: Literal["bf16", "fp32"] = "bf16"
    ema_decay: float | None = None
    seed: int = 0
    device: Literal["cuda", "cpu"] | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_steps": self.max_steps >= 1,
            "lr": self.lr > 0,
            "disc_lr": self.disc_lr > 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "ema_decay": self.ema_decay is None or 0 < self.ema_decay < 1,
            "seed": self.seed >= 0,
        }
        bad = [n for n, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad) +
                             " (ema_decay in (0, 1) or null)")


@dataclass(frozen=True)
class TrainOSDConfig(RunConfig):
    """The whole stage-2 run; YAML sections as the fields (see pipelines/train_osd.yaml)."""


    dpg: DPGConfig = field(default_factory=DPGConfig)
    prompt_embedder: PromptEmbedderConfig = field(default_factory=PromptEmbedderConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    discriminator: DiscriminatorSettings = field(default_factory=DiscriminatorSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    data: ShardStreamConfig = field(default_factory=lambda: ShardStreamConfig(batch_size=2))
    train: TrainSettings = field(default_factory=TrainSettings)
    val: ValSettings = field(default_factory=lambda: ValSettings(samples=6, best_metric="val/lpips"))
    output: OutputSettings = field(default_factory=lambda: OutputSettings(dir="runs/osd"))


_PATH_KEYS = {
    "model.pretrained_model": "a diffusers folder of stabilityai/stable-diffusion-2-1-base (unet/, vae/, scheduler/)",
    "model.dpg_weights": "the stage-1 DPG weights (haodiff-train dpg output or an official stage-1 file)",
    "model.init_img_encoder": "an img_encoder_weights.pth",
    "model.init_lora": "a pytorch_lora_weights.safetensors",
    "discriminator.model": "a diffusers folder with unet/ (SDXL base for backbone sdxl)",
    "loss.vgg16_weights": "torchvision VGG16 ImageNet weights (vgg16-397923af.pth)",
    "loss.dists_weights": "the DISTS alpha/beta weights.pt",
}


def resolve_paths(cfg: TrainOSDConfig) -> dict[str, Path]:
    """Every local file or folder the run reads, checked at once. Unset or placeholder values raise
    ConfigError, absent ones FileNotFoundError; both name every offending key."""
    m, d, loss = cfg.model, cfg.discriminator, cfg.loss
    wanted = {"model.pretrained_model": m.pretrained_model}
    if m.init_img_encoder:
        wanted["model.init_img_encoder"] = m.init_img_encoder
    else:
        wanted["model.dpg_weights"] = m.dpg_weights
    if m.init_lora:
        wanted["model.init_lora"] = m.init_lora
    if d.backbone != "none":
        wanted["discriminator.model"] = d.model or (m.pretrained_model if d.backbone == "sd21" else None)
    wanted["loss.vgg16_weights"] = loss.vgg16_weights
    wanted["loss.dists_weights"] = loss.dists_weights
    unset = [k for k, v in wanted.items() if not v or v.startswith(PLACEHOLDER)]
    if unset:
        raise ConfigError("set these to local paths: " + "; ".join(f"{k} = {wanted[k]!r} ({_PATH_KEYS[k]})"
                                                                   for k in unset))
    absent = [f"{k}: {v}" for k, v in wanted.items() if not Path(v).exists()]
    if absent:
        raise FileNotFoundError("these paths do not exist: " + "; ".join(absent))
    return {k: Path(v) for k, v in wanted.items()}


__all__ = ["BACKBONES", "DiscriminatorSettings", "GAN_STREAM", "INIT_STREAM", "LossSettings", "ModelSettings",
           "PLACEHOLDER", "REDRAW_STREAM", "TrainOSDConfig", "TrainSettings", "VAE_STREAM", "VAL_STREAM",
           "resolve_paths"]
