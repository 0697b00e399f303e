"""Stage 2 trainer: the one-step diffusion restorer with dual prompts (paper Sec. 3.3, Eq. 8-11; Sec. 4.1).

Each step, on each rank's batch (LQ, HQ in [-1, 1]):
  generator      frozen DPG -> prompt embedders (trainable) -> p_pos, p_neg -> OneStepRestorer
                 (SD2.1-base UNet + LoRA r16, CFG 3.5 at t=199, one batched UNet call) -> I_H, z_H
                 L = MSE(I_H, HQ) + EA-DISTS(I_H, HQ) + 0.01 * softplus(-D(F(z_H, t)))
  discriminator  z_HQ = VAE(HQ); z_H (detached) and z_HQ noised to the same random t, one D call;
                 L_D = softplus(D(F(z_H, t))) + softplus(-D(F(z_HQ, t)))
D is a pretrained UNet's down path (SDXL base as in the paper; SD2.1 is the lighter option) with a
trainable head (and optional LoRA). With SDXL, the official embedding_changers, trained with D,
map the detached positive prompt to SDXL's conditioning (sdxl_cond.py). AdamW for both (lr 1e-5,
constant), gradient clipping, bf16 autocast with frozen weights stored in bf16 on CUDA, gradient
checkpointing, optional EMA of the generator's trainable weights (LoRA + prompt embedders).
The Performer projections are redrawn on performer-pytorch's schedule from a generator shared by
all ranks.

Outputs under output.dir: metrics.jsonl, tb/, val/step-*.png (LQ | restored | HQ rows), loss.png,
config.yaml, checkpoints/step-*/{state.pt, img_encoder_weights.pth, pytorch_lora_weights.safetensors}
and, at the end, the two official files in output.dir (EMA weights when EMA is on). The official
inference code loads them as they are (model_spec A.4, A.7).

Resume (`--resume`, from checkpoints/latest) restores the trainable weights (LoRA, prompt
embedders, D head/LoRA, embedding changers), both AdamW states, EMA, step, every rank's RNG
states (global ones and the VAE-sampling, GAN-timestep and Performer-redraw generators) and the
data position; frozen weights are re-read from their files. Same world size and data settings:
exact (bit-for-bit on CPU). Another world size: weights, optimizers and step exact, data streams
and per-rank generators re-derived.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haodiff_model.config import ConfigError, RunConfig
from haodiff_model.io.official import (
    IMG_ENCODER_FILE, LORA_FILE, CheckpointMismatchError, load_dpg_weights, load_img_encoder, load_lora_weights,
    lora_modules_in, read_lora_file, save_lora_weights,
)
from haodiff_model.losses.losses import EdgeAwareDISTS, stage2_loss
from haodiff_model.nets.discriminator import (
    LatentDiscriminator,
    discriminator_gan_loss,
    generator_gan_loss,
    noise_to_random_t,
)
from haodiff_model.nets.dpg import DPGConfig
from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig, prepare_dpg_input
from haodiff_model.nets.restorer import (
    ADAPTER, OneStepRestorer, RestorerOutput, cast_frozen_, lora_layers, lora_target_modules,
)
from haodiff_model.nets.sdxl_cond import SDXLConditioner, load_sdxl_conditioner, save_img_encoder_with_changers
from haodiff_model.restore.settings import (
    OFFICIAL_BASE_MODEL, SETTINGS_FILE, UNET_FINGERPRINT_KEYS, InferenceSettings, diff_keys, dpg_sidecar,
    read_dpg_sidecar, write_settings,
)
from haodiff_model.train.data import ShardStreamConfig
from haodiff_model.train.distributed import DistContext, init_distributed, wrap_ddp
from haodiff_model.train.loop import (
    PRECISIONS, OutputSettings, Trainer, ValSettings, autocast_dtype, run_from_args, split_holdout,
)
from haodiff_model.train.state import apply_state, derive_seed, image_grid, restore_rng, to_rgb_uint8

BACKBONES = ("sdxl", "sd21", "none")
PLACEHOLDER = "/path/to/"  # the shipped config's placeholder paths start with this
# seed-stream tags, apart from the data streams' and from each other
_VAE_STREAM, _GAN_STREAM, _REDRAW_STREAM, _INIT_STREAM, _VAL_STREAM = 201, 202, 203, 204, 205


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelSettings:
    pretrained_model: str = ""
    dpg_weights: str | None = None
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
    model: str | None = None
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
    vgg16_weights: str = ""
    dists_weights: str = ""
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
    precision: str = "bf16"
    ema_decay: float | None = None
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_steps": self.max_steps >= 1,
            "lr": self.lr > 0,
            "disc_lr": self.disc_lr > 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "precision": self.precision in PRECISIONS,
            "ema_decay": self.ema_decay is None or 0 < self.ema_decay < 1,
            "seed": self.seed >= 0,
            "device": self.device in (None, "cuda", "cpu"),
        }
        bad = [n for n, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad) +
                             f" (precision: {PRECISIONS}, ema_decay in (0, 1) or null, device: cuda|cpu|null)")


@dataclass(frozen=True)
class TrainOSDConfig(RunConfig):
    """The whole stage-2 run; YAML sections as the fields (see pipelines/train_osd.yaml)."""

    RUN_DEFAULTS = {"data": {"urls": ["shards/*.tar"], "batch_size": 2}, "val": {"samples": 2},
                    "output": {"dir": "runs/osd"}}

    dpg: DPGConfig = field(default_factory=DPGConfig)
    prompt_embedder: PromptEmbedderConfig = field(default_factory=PromptEmbedderConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    discriminator: DiscriminatorSettings = field(default_factory=DiscriminatorSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    data: ShardStreamConfig = field(default_factory=lambda: TrainOSDConfig.run_default("data"))
    train: TrainSettings = field(default_factory=TrainSettings)
    val: ValSettings = field(default_factory=lambda: TrainOSDConfig.run_default("val"))
    output: OutputSettings = field(default_factory=lambda: TrainOSDConfig.run_default("output"))


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


# ----------------------------------------------------------------------------- models


class Stage2Generator(nn.Module):
    """LQ -> frozen DPG -> prompt embedders -> one-step restorer. Returns (restorer output, p_pos)."""

    def __init__(self, encoder: DualPromptEncoder, restorer: OneStepRestorer):
        super().__init__()
        cross = restorer.unet.config.cross_attention_dim
        if encoder.prompt_config.embed_dim != cross:
            raise ConfigError(f"prompt_embedder.embed_dim={encoder.prompt_config.embed_dim} must equal the UNet's "
                              f"cross_attention_dim={cross}")
        self.encoder, self.restorer = encoder, restorer

    def forward(self, lq: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[RestorerOutput, torch.Tensor]:
        pos, neg = self.encoder(prepare_dpg_input(lq, self.encoder.dpg_config.img_size))
        return self.restorer(lq, pos, neg, generator), pos


class Stage2Discriminator(nn.Module):
    """Latent discriminator plus, for an SDXL backbone, the embedding changers that condition it."""

    def __init__(self, disc: LatentDiscriminator, conditioner: SDXLConditioner | None):
        super().__init__()
        self.disc, self.conditioner = disc, conditioner

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, pos: torch.Tensor,
                image_size: tuple[int, int]) -> torch.Tensor:
        """Logits for noised latents; `pos` is the (detached) positive prompt, `image_size` the size
        of the images behind the latents (SDXL time_ids)."""
        if self.conditioner is None:
            return self.disc(latents, pos.detach(), timesteps)
        ehs, added = self.conditioner(pos, image_size)
        return self.disc(latents, ehs, timesteps, added)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `module` that train (LoRA, heads), by name, detached."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    own = dict(module.named_parameters())
    expected = {n for n, p in own.items() if p.requires_grad}
    if set(state) != expected:
        raise ConfigError(f"checkpoint {what}: trainable parameters differ; missing {sorted(expected - set(state))[:6]}, "
                          f"unexpected {sorted(set(state) - expected)[:6]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


class EMA:
    """Exponential moving average of named parameters (float32 shadows on their device)."""

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float):
        self.decay = decay
        self.params = dict(params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        torch._foreach_lerp_([self.shadow[n] for n in names], [self.params[n].detach().float() for n in names],
                             1 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA values."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ConfigError("checkpoint EMA: parameter names differ from the model's")
        for n, v in state.items():
            self.shadow[n].copy_(v)


@dataclass
class Stage2Parts:
    """The built (not yet distributed) stage-2 models."""

    encoder: DualPromptEncoder
    restorer: OneStepRestorer
    discriminator: LatentDiscriminator | None
    conditioner: SDXLConditioner | None
    ea_dists: EdgeAwareDISTS
    notes: list[str] = field(default_factory=list)


def _check_same_arch(cfg: TrainOSDConfig, encoder: DualPromptEncoder, path: Path) -> None:
    ours = {k: v for k, v in cfg.to_dict()["dpg"].items() if k != "attention"}
    theirs = {k: v for k, v in encoder.dpg_config.to_swinir_kwargs().items()}
    diff = sorted(k for k in ours if ours[k] != theirs.get(k))
    pours, ptheirs = dataclasses.asdict(cfg.prompt_embedder), dataclasses.asdict(encoder.prompt_config)
    diff += sorted(f"prompt_embedder.{k}" for k in pours if pours[k] != ptheirs[k])
    if diff:
        raise ConfigError(f"model.init_img_encoder {path} was trained with another architecture; differing keys: "
                          f"{diff}. Set the dpg/prompt_embedder sections to the file's values")


def build_prompt_encoder(cfg: TrainOSDConfig, paths: Mapping[str, Path], notes: list[str]) -> DualPromptEncoder:
    """Prompt encoder with the stage-1 DPG (model.dpg_weights) or a whole img_encoder file (model.init_img_encoder)."""
    if "model.init_img_encoder" in paths:
        path = paths["model.init_img_encoder"]
        encoder, report = load_img_encoder(path, attention=cfg.dpg.attention)
        _check_same_arch(cfg, encoder, path)
        notes.append(str(report))
        return encoder
    path = paths["model.dpg_weights"]
    dpg = cfg.dpg
    stored = read_dpg_sidecar(path)
    if stored is not None:  # the stage-1 run recorded its architecture: no retyping
        dpg = DPGConfig.from_swinir_kwargs(stored, cfg.dpg.attention)
        differ = diff_keys(dpg.to_swinir_kwargs(), cfg.dpg.to_swinir_kwargs(), "dpg")
        if differ:
            notes.append(f"DPG architecture from {dpg_sidecar(path)}; the config's dpg section differs and is not "
                         f"used: {'; '.join(differ)}")
    encoder = DualPromptEncoder(dpg, cfg.prompt_embedder,
                                torch.Generator().manual_seed(derive_seed(cfg.train.seed, _INIT_STREAM, 0)))
    notes.append(str(load_dpg_weights(encoder.feature_extractor, path)))
    return encoder


def build_restorer(cfg: TrainOSDConfig, paths: Mapping[str, Path], notes: list[str]) -> OneStepRestorer:
    """SD2.1-base UNet (+ LoRA, from model.init_lora when given) and VAE from model.pretrained_model."""
    m = cfg.model
    targets, lora_file = None, paths.get("model.init_lora")
    if lora_file is not None:
        targets, rank = lora_modules_in(read_lora_file(lora_file))
        if rank != m.lora_rank:
            raise ConfigError(f"model.init_lora {lora_file} has LoRA rank {rank} but model.lora_rank is {m.lora_rank}")
    restorer = OneStepRestorer.from_pretrained(
        paths["model.pretrained_model"], m.lora_rank, m.lora_alpha, targets, torch.Generator().manual_seed(derive_seed(cfg.train.seed,
                                                                                              _INIT_STREAM, 1)),
        timestep=m.timestep, cfg_scale=m.cfg_scale, sample_latent=m.sample_latent)
    if lora_file is not None:
        if sorted(targets) != sorted(lora_target_modules(restorer.unet)):
            notes.append(f"model.init_lora: LoRA on the file's {len(targets)} modules (not the default rule)")
        notes.append(str(load_lora_weights(restorer.unet, lora_file)))
    return restorer


def discriminator_from_unet(unet: nn.Module, d: DiscriminatorSettings, p: PromptEmbedderConfig, seed: int,
                            gradient_checkpointing: bool = True
                            ) -> tuple[LatentDiscriminator, SDXLConditioner | None]:
    """D on a diffusers UNet (SDXL: plus fresh embedding changers); checks it matches `d.backbone`."""
    sdxl = unet.config.addition_embed_type == "text_time"
    if sdxl != (d.backbone == "sdxl"):
        raise ConfigError(f"discriminator.backbone={d.backbone!r} but the discriminator UNet is "
                          f"{'an SDXL' if sdxl else 'not an SDXL'} UNet")
    if not sdxl and unet.config.cross_attention_dim != p.embed_dim:
        raise ConfigError(f"discriminator UNet cross_attention_dim={unet.config.cross_attention_dim} must equal "
                          f"prompt_embedder.embed_dim={p.embed_dim} (it is conditioned on the positive prompt)")
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # the down/mid blocks D keeps recompute in backward
    # The head (and D LoRA, via peft) draw their initial weights from the global RNG.
    torch.manual_seed(derive_seed(seed, _INIT_STREAM, 2))
    disc = LatentDiscriminator(unet, d.head_channels, d.head_layers, d.head_norm_groups, d.lora_rank)
    conditioner = None
    if sdxl:
        gen = torch.Generator().manual_seed(derive_seed(seed, _INIT_STREAM, 3))
        conditioner = SDXLConditioner.for_unet(unet.config, p.embed_dim, p.out_tokens, p.light_changer, gen)
    return disc, conditioner


def build_discriminator(cfg: TrainOSDConfig, paths: Mapping[str, Path], notes: list[str]
                        ) -> tuple[LatentDiscriminator | None, SDXLConditioner | None]:
    """D on the UNet in discriminator.model (none for backbone none); SDXL changers from
    model.init_img_encoder when that file has them."""
    from diffusers import UNet2DConditionModel

    d = cfg.discriminator
    if d.backbone == "none":
        return None, None
    folder = paths["discriminator.model"]
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"discriminator.model: {folder} has no unet/ folder")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    disc, conditioner = discriminator_from_unet(unet, d, cfg.prompt_embedder, cfg.train.seed,
                                                cfg.model.gradient_checkpointing)
    if conditioner is not None and "model.init_img_encoder" in paths:
        try:
            loaded, report = load_sdxl_conditioner(paths["model.init_img_encoder"])
        except CheckpointMismatchError as exc:  # an inference-only file has no changers: start them fresh
            notes.append(f"embedding changers start fresh: {exc}")
        else:
            conditioner.load_state_dict(loaded.state_dict())
            notes.append(str(report))
    return disc, conditioner


def build_parts(cfg: TrainOSDConfig) -> Stage2Parts:
    """Every stage-2 model from the files the config names (CPU, float32)."""
    notes: list[str] = []
    paths = resolve_paths(cfg)
    ea_dists = EdgeAwareDISTS.from_files(paths["loss.vgg16_weights"], paths["loss.dists_weights"])
    encoder = build_prompt_encoder(cfg, paths, notes)
    restorer = build_restorer(cfg, paths, notes)
    disc, conditioner = build_discriminator(cfg, paths, notes)
    return Stage2Parts(encoder, restorer, disc, conditioner, ea_dists, notes)


# ----------------------------------------------------------------------------- one training step


class Stage2Step:
    """Generator update then discriminator update on one batch; the unit the trainer loops and
    bench.osd times. Models are moved to `ctx.device`, the frozen UNet/VAE/D-backbone weights cast
    to bf16 under bf16 precision on CUDA, then wrapped in DDP when distributed."""

    def __init__(self, parts: Stage2Parts, train: TrainSettings, disc: DiscriminatorSettings, loss: LossSettings,
                 ctx: DistContext, gradient_checkpointing: bool = True):
        self.train_cfg, self.disc_cfg, self.loss_cfg, self.ctx = train, disc, loss, ctx
        dev = ctx.device
        self.amp_dtype = autocast_dtype(train.precision, dev)
        self.generator_module = Stage2Generator(parts.encoder, parts.restorer)
        self.restorer = parts.restorer
        self.restorer.enable_gradient_checkpointing(gradient_checkpointing)
        self.ea_dists = parts.ea_dists.to(dev)
        self.disc_module = None
        if parts.discriminator is not None:
            self.disc_module = Stage2Discriminator(parts.discriminator, parts.conditioner)
        # Frozen diffusion weights go to bf16 (memory); the frozen DPG stays float32, as it is exported.
        for module in (self.restorer, self.disc_module):
            if module is not None and self.amp_dtype is not None:
                cast_frozen_(module, self.amp_dtype)
        self.generator_module.to(dev)
        if self.disc_module is not None:
            self.disc_module.to(dev)
        fused = True if dev.type == "cuda" else None
        self.g_params = {n: p for n, p in self.generator_module.named_parameters() if p.requires_grad}
        self.opt_g = torch.optim.AdamW(self.g_params.values(), lr=train.lr, betas=train.betas, eps=train.eps,
                                       weight_decay=train.weight_decay, fused=fused)
        self.opt_d = None
        if self.disc_module is not None:
            d_params = [p for p in self.disc_module.parameters() if p.requires_grad]
            self.opt_d = torch.optim.AdamW(d_params, lr=train.disc_lr, betas=train.betas, eps=train.eps,
                                           weight_decay=train.weight_decay, fused=fused)
        self.ema = EMA(self.g_params, train.ema_decay) if train.ema_decay is not None else None
        self.vae_gen = torch.Generator(device=dev)
        self.gan_gen = torch.Generator(device=dev)
        self.redraw_gen = torch.Generator()  # the same on every rank, as the projection matrices must be
        self.seed_generators(0)
        self.generator = wrap_ddp(self.generator_module, ctx)
        self.disc = wrap_ddp(self.disc_module, ctx) if self.disc_module is not None else None

    def seed_generators(self, step: int) -> None:
        seed, rank = self.train_cfg.seed, self.ctx.rank
        self.vae_gen.manual_seed(derive_seed(seed, _VAE_STREAM, rank, step))
        self.gan_gen.manual_seed(derive_seed(seed, _GAN_STREAM, rank, step))
        self.redraw_gen.manual_seed(derive_seed(seed, _REDRAW_STREAM, step))

    def generators(self) -> dict[str, torch.Generator]:
        return {"vae": self.vae_gen, "gan": self.gan_gen, "redraw": self.redraw_gen}

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.disc_cfg.start_step

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA under bf16 precision, else a no-op."""
        dev = self.ctx.device.type
        return torch.autocast(dev, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def _clip(self, params: Sequence[nn.Parameter]) -> torch.Tensor:
        clip = self.train_cfg.grad_clip
        return torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)

    def __call__(self, batch: Mapping[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One generator and one discriminator update; returns detached scalars (no host sync)."""
        dev = self.ctx.device
        lq = batch["lq"].to(dev, non_blocking=True)
        hq = batch["hq"].to(dev, non_blocking=True)
        gan = self.gan_active(step)
        size = (hq.shape[-2], hq.shape[-1])
        abar = self.restorer.alphas_cumprod
        t_range = (self.disc_cfg.t_min, self.disc_cfg.t_max)
        for performer in self.generator_module.encoder.performers():
            performer.step_redraw(self.redraw_gen)

        # generator: D is called unwrapped; the grads it gets here are dropped before its own update
        with self.autocast():
            out, pos = self.generator(lq, self.vae_gen)
            gan_g = None
            if gan:
                (fake_t,), t = noise_to_random_t([out.latent], abar, self.gan_gen, t_range)
                gan_g = generator_gan_loss(self.disc_module(fake_t, t, pos, size).float())
            loss, parts = stage2_loss(out.image.float(), hq, self.ea_dists, gan_g, self.loss_cfg.gan_weight)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        norm = self._clip(list(self.g_params.values()))
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update()
        zero = torch.zeros((), device=dev)
        result = {"loss": loss.detach(), "mse": parts["mse"], "ea_dists": parts["ea_dists"],
                  "gan": parts.get("gan", zero), "grad_norm": norm.detach(), "d_loss": zero, "d_real": zero,
                  "d_fake": zero, "d_grad_norm": zero}
        if not gan:
            return result

        # discriminator: real and fake latents at the same random t, in one call
        with self.autocast():
            z_hq = self.restorer.encode(hq, self.vae_gen)
            (real_t, fake_t), t = noise_to_random_t([z_hq, out.latent.detach()], abar, self.gan_gen, t_range)
            logits = self.disc(torch.cat([real_t, fake_t]), torch.cat([t, t]), torch.cat([pos, pos]).detach(), size)
            real, fake = logits.float().chunk(2)
            d_loss = discriminator_gan_loss(real, fake)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        d_norm = self._clip([p for g in self.opt_d.param_groups for p in g["params"]])
        self.opt_d.step()
        result.update(d_loss=d_loss.detach(), d_real=real.mean().detach(), d_fake=fake.mean().detach(),
                      d_grad_norm=d_norm.detach())
        return result

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The generator holds its EMA weights within the block (no-op without EMA)."""
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            yield

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, generator: torch.Generator) -> RestorerOutput:
        """Inference with the current (or, inside ema_weights, EMA) weights, eval mode."""
        module = self.generator_module
        was_training = module.training
        module.eval()
        try:
            with self.autocast():
                out, _ = module(lq.to(self.ctx.device), generator)
        finally:
            module.train(was_training)
        return RestorerOutput(out.image.float(), out.latent.float())


# ----------------------------------------------------------------------------- the run


def export_official(step: Stage2Step, folder: Path) -> tuple[Path, Path]:
    """Write img_encoder_weights.pth (with the embedding changers when D is SDXL) and
    pytorch_lora_weights.safetensors into `folder`, from the EMA weights when EMA is on."""
    with step.ema_weights():
        encoder_file = save_img_encoder_with_changers(step.generator_module.encoder,
                                                      step.disc_module.conditioner if step.disc_module else None,
                                                      folder)
        lora_file = save_lora_weights(step.restorer.unet, folder)
    write_settings(folder, inference_settings(step))
    return encoder_file, lora_file


def inference_settings(step: Stage2Step) -> InferenceSettings:
    """What haodiff-restore needs beside the two official files (written as haodiff.json)."""
    r, encoder = step.restorer, step.generator_module.encoder
    ranks = {layer.r[ADAPTER] for _, layer in lora_layers(r.unet)}
    return InferenceSettings(timestep=r.timestep, cfg_scale=r.cfg_scale,
                             latent="sample" if r.sample_latent else "mode",
                             base_model=str(r.unet.config.get("_name_or_path", "")) or OFFICIAL_BASE_MODEL,
                             lora_rank=ranks.pop() if len(ranks) == 1 else None, dpg=encoder.swinir_kwargs,
                             prompt_embedder=encoder.performer_kwargs,
                             unet={k: _plain(r.unet.config[k]) for k in UNET_FINGERPRINT_KEYS if k in r.unet.config})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class OSDTrainer(Trainer):
    """Stage-2 training loop; build it on every rank, then `run()`."""

    LOG_NAMES = ("loss", "mse", "ea_dists", "gan", "d_loss", "d_real", "d_fake", "grad_norm", "d_grad_norm")
    PLOT_KEYS = ("train/loss", "train/mse", "train/ea_dists", "train/gan", "train/d_loss", "val/loss")
    OUTPUT_FILES = (IMG_ENCODER_FILE, LORA_FILE, SETTINGS_FILE)

    def __init__(self, cfg: TrainOSDConfig, ctx: DistContext, resume: bool = False,
                 log: Callable[[str], None] = print):
        super().__init__(cfg, ctx, log)
        resolve_paths(cfg)  # name every missing file before anything slow happens
        state = self._initial_state(resume)
        self.train_urls, self.val_urls = split_holdout(cfg)
        parts = build_parts(cfg)
        for note in parts.notes:
            self.say(note)
        self.step_fn = Stage2Step(parts, cfg.train, cfg.discriminator, cfg.loss, ctx, cfg.model.gradient_checkpointing)
        if state is None:
            self.step_fn.seed_generators(0)
        else:
            self._restore(state)
        self._start_run(resumed=state is not None)

    def models(self) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {"prompt_encoder": self.step_fn.generator_module.encoder}
        conditioner = self.step_fn.disc_module.conditioner if self.step_fn.disc_module is not None else None
        if conditioner is not None:
            models["conditioner"] = conditioner
        return models

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        s = self.step_fn
        return {"generator": s.opt_g, **({"discriminator": s.opt_d} if s.opt_d is not None else {})}

    def generators(self) -> dict[str, torch.Generator]:
        return self.step_fn.generators()

    def extra_state(self) -> dict[str, Any]:
        s = self.step_fn
        return {"unet_lora": trainable_state(s.restorer.unet),
                "discriminator": trainable_state(s.disc_module.disc) if s.disc_module is not None else None,
                "ema": s.ema.state_dict() if s.ema is not None else None}

    def _restore(self, state: Mapping[str, Any]) -> None:
        saved = state["config"]
        current = self.cfg.to_dict()
        arch = [("dpg", k) for k in current["dpg"] if k != "attention"]
        arch += [("prompt_embedder", k) for k in current["prompt_embedder"]]
        arch += [("model", k) for k in ("lora_rank", "lora_alpha")]
        arch += [("discriminator", k) for k in ("backbone", "lora_rank", "head_channels", "head_layers",
                                                "head_norm_groups")]
        diff = [f"{s}.{k}" for s, k in arch if saved[s].get(k) != current[s][k]]
        if diff:
            raise ConfigError(f"the checkpoint's architecture differs in {diff}")
        s = self.step_fn
        self.step = apply_state(state, self.models(), self.optimizers(), {})
        load_trainable_state(s.restorer.unet, state["unet_lora"], "unet_lora")
        if s.disc_module is not None:
            load_trainable_state(s.disc_module.disc, state["discriminator"], "discriminator")
        if s.ema is not None:
            if state.get("ema") is None:
                raise ConfigError("train.ema_decay is set but the checkpoint has no EMA; resume without EMA")
            s.ema.load_state_dict(state["ema"])
        rank, world = self.ctx.rank, self.ctx.world_size
        if state["world_size"] == world:
            restore_rng(state["rng"][rank], s.generators())
        else:
            s.seed_generators(self.step)
            self.say(f"world size {state['world_size']} -> {world}: weights, optimizers and step restored exactly; "
                     "data streams and per-rank generators re-derived for the new world (not an exact resume)")
        self._check_data_settings(state)

    def run(self) -> tuple[Path, Path]:
        """Train to `train.max_steps`; returns the final official files (img_encoder, LoRA)."""
        s = self.step_fn
        n_train = sum(p.numel() for p in s.g_params.values())
        n_disc = sum(p.numel() for g in s.opt_d.param_groups for p in g["params"]) if s.opt_d else 0
        self.say(f"stage 2: {n_train:,} trainable generator parameters, {n_disc:,} discriminator, "
                 f"D backbone {self.cfg.discriminator.backbone}, {len(self.train_urls)} training shard(s), "
                 f"world size {self.ctx.world_size}, device {self.ctx.device}, "
                 f"{'bf16' if s.amp_dtype else 'fp32'}, step {self.step} -> {self.cfg.train.max_steps}")
        s.generator.train()
        if s.disc is not None:
            s.disc.train()
        self._train_loop()
        return self.finish()

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scalars = self.step_fn(batch, self.step)
        return torch.stack([scalars[k] for k in self.LOG_NAMES])

    def train_summary(self, metrics: Mapping[str, float]) -> str:
        m = {k.removeprefix("train/"): v for k, v in metrics.items()}
        return (f"step {self.step}/{self.cfg.train.max_steps}  loss {m['loss']:.4f} (mse {m['mse']:.4f} "
                f"ea {m['ea_dists']:.4f} gan {m['gan']:.4f})  D {m['d_loss']:.4f} (real {m['d_real']:+.2f} "
                f"fake {m['d_fake']:+.2f})  |g| {m['grad_norm']:.3f}  {m['it_per_s']:.2f} it/s  "
                f"data wait {100 * m['data_wait_frac']:.0f}%")

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Losses and an LQ | restored | HQ grid on the fixed held-out batch (rank 0, EMA weights if on)."""
        if not self.ctx.is_main or self.val_batch is None:
            return None
        s = self.step_fn
        gen = torch.Generator(device=self.ctx.device).manual_seed(derive_seed(self.cfg.train.seed, _VAL_STREAM))
        with s.ema_weights():
            out = s.restore(self.val_batch["lq"], gen)
        hq = self.val_batch["hq"].to(self.ctx.device)
        with s.autocast():
            _, parts = stage2_loss(out.image, hq, s.ea_dists)
        metrics = {"val/loss": float(sum(v.item() for v in parts.values())),
                   **{f"val/{k}": v.item() for k, v in parts.items()}}
        rows = [[to_rgb_uint8(self.val_batch["lq"][i]), to_rgb_uint8(out.image[i]), to_rgb_uint8(self.val_batch["hq"][i])]
                for i in range(out.image.shape[0])]
        self._log_validation(metrics, image_grid(rows))
        return metrics

    def write_outputs(self, folder: Path) -> None:
        export_official(self.step_fn, folder)

    def finish(self) -> tuple[Path, Path]:
        encoder_file, lora_file, _ = self._finish()
        return encoder_file, lora_file


def train(cfg: TrainOSDConfig, resume: bool = False, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Run stage 2 in this process (joins the launcher's process group if there is one)."""
    ctx = init_distributed(cfg.train.device)
    return OSDTrainer(cfg, ctx, resume, log).run()


def main_osd(args: argparse.Namespace) -> int:
    """`haodiff-train osd` (arguments from haodiff_model.cli)."""
    return run_from_args(TrainOSDConfig, train, args)


__all__ = ["EMA", "DiscriminatorSettings", "LossSettings", "ModelSettings", "OSDTrainer", "Stage2Discriminator",
           "Stage2Generator", "Stage2Parts", "Stage2Step", "TrainOSDConfig", "TrainSettings", "build_discriminator",
           "build_parts", "build_prompt_encoder", "build_restorer", "discriminator_from_unet", "export_official",
           "load_trainable_state", "main_osd", "resolve_paths", "train", "trainable_state"]
