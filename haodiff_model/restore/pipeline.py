"""HAODiff restoration of whole images: the official `run_inference.py` per image, batched.

For a batch of same-size RGB uint8 images (model_spec A.7):

1. LQ in [-1, 1] at native size (reflect-padded to a multiple of 8, cropped back at the end; the
   official script needs multiples of 8 and fails otherwise).
2. Prompts: the unpadded LQ bilinearly resized to the DPG size (512) without antialias -> DPG ->
   prompt embedders -> positive / negative contexts.
3. z_L = VAE posterior sample (noise from a CPU generator seeded with the seed alone, so an image's
   noise depends neither on the other images nor on the batch size nor on the device) or its mode,
   x scaling factor; tiled VAE encoder above 1088 px.
4. CFG noise prediction at t = 199 (cfg 3.5, one UNet call with [neg, pos]); latent tiling (64,
   overlap 5, Gaussian blend) when the latent area exceeds 64 x 64.
5. x0 in float64; tiled VAE decoder above 246 latents; clamp(-1, 1) * 0.5 + 0.5, clamp(0, 1).
6. uint8 as the official script converts it: torchvision's to_pil_image, i.e. x * 255 truncated
   (not rounded); colour fix (wavelet / adain / none) against the LQ on these uint8 values / 255,
   clamp(0, 1), truncated to uint8 again.

Precision: fp32 everything; bf16 casts UNet and VAE to bf16; fp16 casts the UNet to fp16 and keeps
the VAE in fp32 when its config says force_upcast (SD2.1's does: the fp16 VAE overflows). The prompt
encoder keeps fp32 weights and runs under autocast in bf16/fp16. x0 and the colour fix are float32/64
in every mode.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from haodiff_model.io.official import (
    IMG_ENCODER_FILE, LORA_FILE, lora_modules_in, merge_lora_into_unet, read_lora_file,
)
from haodiff_model.nets.prompt import DualPromptEncoder, prepare_dpg_input
from haodiff_model.nets.restorer import OneStepRestorer, alphas_cumprod_from_config
from haodiff_model.restore.colorfix import COLOR_FIXES, color_fix
from haodiff_model.restore.settings import InferenceSettings, SettingsError, diff_keys, read_settings
from haodiff_model.restore.tiling import (
    DECODER_PAD, DECODER_TILE, ENCODER_PAD, ENCODER_TILE, LATENT_OVERLAP, LATENT_TILE, LatentTiling, decode_latent,
    encode_moments,
)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RestoreOptions:
    """Runtime choices that do not change what the weights mean."""

    precision: str = "fp32"
    color_fix: str = "wavelet"
    latent_tile: int = LATENT_TILE
    latent_overlap: int = LATENT_OVERLAP
    encoder_tile: int = ENCODER_TILE
    encoder_pad: int = ENCODER_PAD
    decoder_tile: int = DECODER_TILE
    decoder_pad: int = DECODER_PAD
    unet_batch: int = 8  # UNet inputs (tiles or images) per call, before CFG doubles them

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"colour fix must be one of {COLOR_FIXES}, got {self.color_fix!r}")
        if min(self.latent_tile, self.encoder_tile, self.decoder_tile, self.unet_batch) < 1 or \
                min(self.latent_overlap, self.encoder_pad, self.decoder_pad) < 0:
            raise ValueError(f"tile sizes and batches must be positive, overlaps >= 0: {self}")
        if self.encoder_pad % 8 or self.encoder_tile % 8:
            raise ValueError(f"VAE encoder tile {self.encoder_tile} and margin {self.encoder_pad} must be multiples of 8")


class StageTimer:
    """Wall time per named stage (device-synchronised), summed over calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _null_timer(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def check_base_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"base model folder {path} does not exist; give the local path of a diffusers copy "
                                "of stabilityai/stable-diffusion-2-1-base (unet/, vae/, scheduler/)")
    missing = [sub for sub in ("unet", "vae", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"base model folder {path} lacks {missing}; expected a diffusers folder with unet/, "
                                "vae/ and scheduler/")


def check_weights_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"weights folder {path} does not exist")
    missing = [name for name in (IMG_ENCODER_FILE, LORA_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"weights folder {path} lacks {missing}: it must hold the official release's "
                                f"{IMG_ENCODER_FILE} and {LORA_FILE}, or what haodiff-train osd writes")


def resolve_settings(weights: Path, encoder: DualPromptEncoder, lora_rank: int, unet_config: Mapping[str, Any],
                     overrides: Mapping[str, Any]) -> tuple[InferenceSettings, list[str]]:
    """The weights folder's settings (official defaults without haodiff.json) checked against the
    weights, then the command line's overrides."""
    stored = read_settings(weights)
    notes = []
    if stored is None:
        settings = InferenceSettings()
        notes.append(f"{weights}: no haodiff.json, official inference defaults (t={settings.timestep}, "
                     f"cfg {settings.cfg_scale}, latent {settings.latent})")
    else:
        settings = stored
        where = f"{weights}/haodiff.json"
        problems = []
        if stored.dpg is not None:
            problems += diff_keys(stored.dpg, encoder.swinir_kwargs, "dpg")
        if stored.prompt_embedder is not None:
            problems += diff_keys(stored.prompt_embedder, encoder.performer_kwargs, "prompt_embedder")
        if stored.lora_rank is not None and stored.lora_rank != lora_rank:
            problems.append(f"lora_rank (settings {stored.lora_rank}, {LORA_FILE} {lora_rank})")
        problems += diff_keys(stored.unet, unet_config, "unet")
        if problems:
            raise SettingsError(f"{where} contradicts the weights it describes or the base model: " + "; ".join(problems))
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        try:
            settings = InferenceSettings(**{**settings.__dict__, **changes})
        except SettingsError as exc:
            raise SettingsError(f"command line: {exc}") from exc
    return settings, notes


class HAODiffRestorer:
    """Prompt encoder + one-step restorer (LoRA merged into the UNet) + the inference steps above."""

    def __init__(self, encoder: DualPromptEncoder, restorer: OneStepRestorer, settings: InferenceSettings,
                 options: RestoreOptions, device: torch.device):
        cross = restorer.unet.config.cross_attention_dim
        if encoder.prompt_config.embed_dim != cross:
            raise SettingsError(f"prompt_embedder.embed_dim {encoder.prompt_config.embed_dim} does not match the "
                                f"UNet's cross_attention_dim {cross}: the weights do not belong to this base model")
        self.settings, self.options, self.device = settings, options, torch.device(device)
        self.dtype = PRECISIONS[options.precision]
        force_upcast = bool(getattr(restorer.vae.config, "force_upcast", False))
        self.vae_dtype = torch.float32 if self.dtype == torch.float16 and force_upcast else self.dtype
        self.encoder = encoder.to(self.device).eval()
        self.restorer = restorer.eval()
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its note on casting loaded models with .to() does not apply
        try:
            for model, dtype in ((self.restorer.unet, self.dtype), (self.restorer.vae, self.vae_dtype)):
                model.to(self.device, dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        self.restorer.alphas_cumprod = self.restorer.alphas_cumprod.to(self.device)

    @classmethod
    def from_folders(cls, base: str | Path, weights: str | Path, device: str | torch.device = "cpu",
                     options: RestoreOptions = RestoreOptions(), overrides: Mapping[str, Any] | None = None,
                     ) -> tuple[HAODiffRestorer, list[str]]:
        """Load SD2.1-base from `base` and HAODiff weights (official or ours) from `weights`; returns
        the restorer and notes on what was loaded. `overrides`: timestep, cfg_scale, latent, seed."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        base, weights = Path(base), Path(weights)
        check_base_folder(base)
        check_weights_folder(weights)
        encoder, report = DualPromptEncoder.from_pretrained(weights, output_loading_info=True)
        lora = read_lora_file(weights)
        _, rank = lora_modules_in(lora)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(base, subfolder="scheduler", local_files_only=True)
        settings, notes = resolve_settings(weights, encoder, rank, unet.config, overrides or {})
        merged = merge_lora_into_unet(unet, lora, lora_rank=rank, lora_alpha=rank)  # files mean scale 1
        notes = [str(report), f"{weights / LORA_FILE}: rank {rank}, merged into {len(merged)} UNet weights", *notes]
        restorer = OneStepRestorer(unet, vae, alphas_cumprod_from_config(scheduler.config), settings.timestep,
                                   settings.cfg_scale, settings.sample_latent)
        return cls(encoder, restorer, settings, options, torch.device(device)), notes

    # ------------------------------------------------------------------ stages

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prompts(self, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos, neg) contexts in the UNet dtype from unpadded LQ images in [-1, 1]."""
        with self._autocast():
            pos, neg = self.encoder(prepare_dpg_input(lq, self.encoder.dpg_config.img_size))
        return pos.to(self.dtype), neg.to(self.dtype)

    def latent_noise(self, shape: Sequence[int]) -> torch.Tensor:
        """Posterior-sampling noise for one image: CPU generator seeded with the seed alone."""
        g = torch.Generator().manual_seed(self.settings.seed)
        return torch.randn(tuple(shape), generator=g, dtype=torch.float32)

    def encode(self, lq: torch.Tensor) -> torch.Tensor:
        """Scaled latent z_L (float32) of padded LQ images in [-1, 1]."""
        o = self.options
        vae = self.restorer.vae
        moments = encode_moments(vae, lq.to(self.vae_dtype), o.encoder_tile, o.encoder_pad).float()
        mean, logvar = moments.chunk(2, dim=1)
        if self.settings.sample_latent:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = self.latent_noise((1, *mean.shape[1:])).to(self.device)
            mean = mean + std * noise
        return mean * self.restorer.scaling_factor

    def predict_eps(self, z: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """CFG noise prediction (float32) over the whole latent, tiled when its area exceeds tile^2."""
        o = self.options
        b, _, h, w = z.shape
        tiling = LatentTiling.plan(h, w, o.latent_tile, o.latent_overlap)
        zin = z.to(self.dtype)
        if tiling is None:
            inputs, p, n = zin, pos, neg
        else:
            k = len(tiling.origins)
            inputs, p, n = tiling.split(zin), pos.repeat_interleave(k, 0), neg.repeat_interleave(k, 0)
        eps = torch.cat([self.restorer.predict_eps(inputs[i:i + o.unet_batch], p[i:i + o.unet_batch],
                                                   n[i:i + o.unet_batch]).float()
                         for i in range(0, inputs.shape[0], o.unet_batch)])
        return eps if tiling is None else tiling.blend(eps, b, h, w)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (float32) from the predicted scaled latent."""
        o = self.options
        latent = (x0 / self.restorer.scaling_factor).to(self.vae_dtype)
        image = decode_latent(self.restorer.vae, latent, o.decoder_tile, o.decoder_pad).float()
        return (image.clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1)

    def finish(self, image: torch.Tensor, lq_u8: torch.Tensor) -> torch.Tensor:
        """Official uint8 conversion, colour fix against the LQ, uint8 again: (B, 3, H, W) uint8."""
        out_u8 = to_uint8_truncated(image)
        if self.options.color_fix == "none":
            return out_u8
        fixed = color_fix(out_u8.float() / 255, lq_u8.float() / 255, self.options.color_fix)
        return to_uint8_truncated(fixed.clamp(0, 1))

    @torch.no_grad()
    def restore(self, images: Sequence[np.ndarray], timer=_null_timer) -> list[np.ndarray]:
        """Restore same-size RGB uint8 (H, W, 3) images; returns uint8 arrays of the same size."""
        if not images:
            return []
        shape = images[0].shape
        if any(im.shape != shape or im.dtype != np.uint8 for im in images) or len(shape) != 3 or shape[2] != 3:
            raise ValueError("restore() takes RGB uint8 (H, W, 3) images of one size")
        h, w = shape[:2]
        if min(h, w) < 8:
            raise ValueError(f"image {w}x{h} is too small (sides of at least 8 pixels)")
        lq_u8 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        lq = lq_u8.float() / 255 * 2 - 1
        with timer("prompt"):
            pos, neg = self.prompts(lq)
        padded = F.pad(lq, (0, (-w) % 8, 0, (-h) % 8), mode="reflect") if (h % 8 or w % 8) else lq
        with timer("vae_encode"):
            z = self.encode(padded)
        with timer("unet"):
            eps = self.predict_eps(z, pos, neg)
            x0 = self.restorer.x0_from_eps(z, eps)
        with timer("vae_decode"):
            image = self.decode(x0)[:, :, :h, :w]
        with timer("color_fix"):
            out = self.finish(image, lq_u8).permute(0, 2, 3, 1).cpu().numpy()
        return [np.ascontiguousarray(o) for o in out]


def to_uint8_truncated(image: torch.Tensor) -> torch.Tensor:
    """torchvision to_pil_image's float conversion: x * 255, truncated towards zero (x in [0, 1])."""
    return image.float().mul(255).to(torch.uint8)


__all__ = ["HAODiffRestorer", "PRECISIONS", "RestoreOptions", "StageTimer",
           "check_base_folder", "check_weights_folder", "resolve_settings", "to_uint8_truncated"]
