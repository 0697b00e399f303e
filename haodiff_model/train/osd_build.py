"""Stage-2 models built from the files a config names: the prompt encoder on the frozen DPG, the
one-step restorer with LoRA, the latent discriminator (and SDXL embedding changers), EA-DISTS."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from haodiff_model.config import ConfigError
from haodiff_model.io.official import (
    CheckpointMismatchError, load_dpg_weights, lora_modules_in, read_lora_file,
)
from haodiff_model.losses.losses import EdgeAwareDISTS
from haodiff_model.nets.discriminator import LatentDiscriminator
from haodiff_model.nets.dpg import DPGConfig
from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig, prepare_dpg_input
from haodiff_model.nets.restorer import OneStepRestorer, RestorerOutput, lora_target_modules
from haodiff_model.nets.sdxl_cond import SDXLConditioner, load_sdxl_conditioner
from haodiff_model.restore.settings import diff_keys, dpg_sidecar, read_dpg_sidecar
from haodiff_model.train.osd_config import INIT_STREAM, DiscriminatorSettings, TrainOSDConfig, resolve_paths
from haodiff_model.train.state import derive_seed


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
        raise CheckpointMismatchError(f"checkpoint {what}: trainable parameters differ; missing {sorted(expected - set(state))[:6]}, "
                          f"unexpected {sorted(set(state) - expected)[:6]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


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
        encoder, report = DualPromptEncoder.from_pretrained(path, attention=cfg.dpg.attention, output_loading_info=True)
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
                                torch.Generator().manual_seed(derive_seed(cfg.train.seed, INIT_STREAM, 0)))
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
                                                                                              INIT_STREAM, 1)),
        timestep=m.timestep, cfg_scale=m.cfg_scale, sample_latent=m.sample_latent)
    if lora_file is not None:
        if sorted(targets) != sorted(lora_target_modules(restorer.unet)):
            notes.append(f"model.init_lora: LoRA on the file's {len(targets)} modules (not the default rule)")
        notes.append(str(restorer.load_lora_weights(lora_file)))
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
    disc = LatentDiscriminator(unet, d.head_channels, d.head_layers, d.head_norm_groups, d.lora_rank,
                               generator=torch.Generator().manual_seed(derive_seed(seed, INIT_STREAM, 2)))
    conditioner = None
    if sdxl:
        gen = torch.Generator().manual_seed(derive_seed(seed, INIT_STREAM, 3))
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
    try:
        ea_dists = EdgeAwareDISTS.from_files(paths["loss.vgg16_weights"], paths["loss.dists_weights"])
    except ValueError as exc:
        raise CheckpointMismatchError(f"loss.vgg16_weights / loss.dists_weights: {exc}") from exc
    encoder = build_prompt_encoder(cfg, paths, notes)
    restorer = build_restorer(cfg, paths, notes)
    disc, conditioner = build_discriminator(cfg, paths, notes)
    return Stage2Parts(encoder, restorer, disc, conditioner, ea_dists, notes)


__all__ = ["Stage2Discriminator", "Stage2Generator", "Stage2Parts", "build_discriminator", "build_parts",
           "build_prompt_encoder", "build_restorer", "discriminator_from_unet", "load_trainable_state",
           "trainable_state"]
