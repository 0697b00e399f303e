"""One stage-2 update (generator, then discriminator), the EMA of the trainable weights, and the
export of the official files."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haodiff_model.losses.losses import stage2_loss
from haodiff_model.nets.discriminator import discriminator_gan_loss, generator_gan_loss, noise_to_random_t
from haodiff_model.nets.restorer import ADAPTER, RestorerOutput, cast_frozen_, lora_layers
from haodiff_model.nets.sdxl_cond import save_img_encoder_with_changers
from haodiff_model.restore.settings import (
    OFFICIAL_BASE_MODEL, UNET_FINGERPRINT_KEYS, InferenceSettings, write_settings,
)
from haodiff_model.train.distributed import DistContext, wrap_ddp
from haodiff_model.train.ema import EMA, maybe_swapped
from haodiff_model.train.loop import autocast_dtype
from haodiff_model.train.osd_build import Stage2Discriminator, Stage2Generator, Stage2Parts
from haodiff_model.train.osd_config import (
    GAN_STREAM, REDRAW_STREAM, VAE_STREAM, DiscriminatorSettings, LossSettings, TrainSettings,
)
from haodiff_model.train.state import derive_seed


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
        self.vae_rng = torch.Generator(device=dev)
        self.gan_rng = torch.Generator(device=dev)
        self.redraw_rng = torch.Generator()  # the same on every rank, as the projection matrices must be
        self.seed_rngs(0)
        self.generator = wrap_ddp(self.generator_module, ctx)
        self.disc = wrap_ddp(self.disc_module, ctx) if self.disc_module is not None else None

    def seed_rngs(self, step: int) -> None:
        seed, rank = self.train_cfg.seed, self.ctx.rank
        self.vae_rng.manual_seed(derive_seed(seed, VAE_STREAM, rank, step))
        self.gan_rng.manual_seed(derive_seed(seed, GAN_STREAM, rank, step))
        self.redraw_rng.manual_seed(derive_seed(seed, REDRAW_STREAM, step))

    def rngs(self) -> dict[str, torch.Generator]:
        return {"vae": self.vae_rng, "gan": self.gan_rng, "redraw": self.redraw_rng}

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
            performer.step_redraw(self.redraw_rng)

        # generator: D is called unwrapped; the grads it gets here are dropped before its own update
        with self.autocast():
            out, pos = self.generator(lq, self.vae_rng)
            gan_g = None
            if gan:
                (fake_t,), t = noise_to_random_t([out.latent], abar, self.gan_rng, t_range)
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
            z_hq = self.restorer.encode(hq, self.vae_rng)
            (real_t, fake_t), t = noise_to_random_t([z_hq, out.latent.detach()], abar, self.gan_rng, t_range)
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

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """The generator holds its EMA weights within the block (no-op without EMA)."""
        return maybe_swapped(self.ema)

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


def export_official(step: Stage2Step, folder: Path) -> tuple[Path, Path]:
    """Write img_encoder_weights.pth (with the embedding changers when D is SDXL) and
    pytorch_lora_weights.safetensors into `folder`, from the EMA weights when EMA is on."""
    with step.ema_weights():
        encoder_file = save_img_encoder_with_changers(step.generator_module.encoder,
                                                      step.disc_module.conditioner if step.disc_module else None,
                                                      folder)
        lora_file = step.restorer.save_lora_weights(folder)
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


__all__ = ["EMA", "Stage2Step", "export_official", "inference_settings"]
