"""The one-step diffusion restorer of stage 2 (paper Sec. 3.3, Eq. 8; official `run_inference.py`).

    z_L = VAE.encode(LQ) * scaling_factor            (latent_dist.sample(), or its mode)
    eps_neg, eps_pos = UNet([z_L, z_L], t=199, [p_neg, p_pos])     one batched call
    eps = eps_neg + cfg * (eps_pos - eps_neg)                        cfg = 3.5
    z_H = (z_L - sqrt(1 - abar_t) eps) / sqrt(abar_t)                float64, then float32
    I_H = clamp(VAE.decode(z_H / scaling_factor), -1, 1)

The UNet is SD2.1-base with LoRA (rank 16, alpha 16) on the OSEDiff module set; the VAE and the
UNet's base weights are frozen. Base models come from a local diffusers folder
(`OneStepRestorer.from_pretrained`) or from config dicts (`from_configs`, used by tests and the
benchmark); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from haodiff_model.io.official import LoraLoadReport

# stabilityai/stable-diffusion-2-1-base (model_spec C.1): unet/config.json, core fields.
SD21_BASE_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
# vae/config.json
SD21_BASE_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}
# scheduler/scheduler_config.json (only the noise schedule matters here)
SD21_BASE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

# OSEDiff's UNet LoRA rule (model_spec B.1): every Linear/Conv2d whose name ends in one of these.
# On SD2.1-base that is all attention projections, transformer proj_in/out and feed-forwards, and
# every ResNet/down/up-sampler conv plus conv_in/conv_out: 258 modules (192 Linear, 66 Conv2d),
# 16,222,848 parameters at rank 16. Left out: the time-embedding MLP and the ResNets'
# time_emb_proj (timestep conditioning stays as pretrained; t is fixed at 199 anyway).
LORA_TARGET_SUFFIXES: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv", "conv1", "conv2", "conv_shortcut", "conv_in", "conv_out",
)
ADAPTER = "default"


def lora_target_modules(unet: nn.Module) -> list[str]:
    """Names of the UNet modules that get LoRA (the rule of `LORA_TARGET_SUFFIXES`), in module order."""
    out = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(name == s or name.endswith("." + s) for s in LORA_TARGET_SUFFIXES):
            out.append(name)
    return out


def lora_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, peft LoRA layer) pairs of `unet`, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def init_lora_(unet: nn.Module, generator: torch.Generator) -> None:
    """peft's "gaussian" LoRA init drawn from `generator` (CPU): A ~ N(0, 1/r), B = 0, so the
    adapted UNet starts equal to the base one."""
    for _, layer in lora_layers(unet):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        r = layer.r[ADAPTER]
        a.copy_(torch.randn(a.shape, generator=generator, device=generator.device) / r)
        b.zero_()


def add_unet_lora(unet: nn.Module, rank: int = 16, alpha: float = 16.0, targets: Sequence[str] | None = None,
                  generator: torch.Generator | None = None) -> list[str]:
    """Freeze `unet` and add trainable LoRA (peft, adapter "default") on `targets` (default: the
    OSEDiff rule). alpha / rank is the LoRA scale; the official release assumes 16 / 16 = 1."""
    from peft import LoraConfig

    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA rank must be >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
    names = list(targets) if targets is not None else lora_target_modules(unet)
    if not names:
        raise ValueError("no LoRA target modules found in the UNet")
    unknown = sorted(set(names) - {n for n, _ in unet.named_modules()})
    if unknown:
        raise ValueError(f"LoRA targets not in the UNet: {unknown[:8]}")
    unet.requires_grad_(False)
    # Full names only: peft would also match a bare name like "conv" as a suffix anywhere.
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=names),
                     adapter_name=ADAPTER)
    injected = {n for n, _ in lora_layers(unet)}
    if injected != set(names):
        raise ValueError(f"peft put LoRA on {len(injected)} modules, asked for {len(names)}: "
                         f"not adapted {sorted(set(names) - injected)[:8]}, unasked {sorted(injected - set(names))[:8]}")
    init_lora_(unet, generator if generator is not None else torch.Generator().manual_seed(0))
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name)
    return names


def cast_frozen_(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of `module` that do not require grad to `dtype` (memory); trainable ones
    keep their dtype. Half-precision frozen weights need autocast around the forward."""
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def alphas_cumprod_from_config(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """abar_t (float32, as the official code's DDIMScheduler holds it) for an epsilon-prediction schedule."""
    from diffusers import DDIMScheduler

    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"scheduler prediction_type={prediction!r}: the one-step x0 formula needs an epsilon "
                         "model (SD2.1-base); SD2.1-768 (v_prediction) is not supported")
    return DDIMScheduler.from_config(dict(scheduler_config)).alphas_cumprod.float().clone()


def _check_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"base model folder {path} does not exist; give the local path of a diffusers "
                                "copy of stabilityai/stable-diffusion-2-1-base (unet/, vae/, scheduler/)")
    missing = [sub for sub in ("unet", "vae", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"base model folder {path} lacks {missing}; expected a diffusers folder with "
                                "unet/, vae/ and scheduler/")


class RestorerOutput(NamedTuple):
    image: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    latent: torch.Tensor  # (B, 4, H/8, W/8) predicted z_H, scaled latent space (x scaling_factor)


class OneStepRestorer(nn.Module):
    """SD2.1 UNet (+ LoRA) and VAE running the official one-step CFG restoration.

    `forward(lq, pos, neg)` takes LQ images in [-1, 1] and the two prompts (B, 77, 1024) and
    returns the restored image and its latent. Gradients reach the LoRA weights and the prompts;
    the VAE encoding of the LQ runs without gradients (nothing trainable precedes it).
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, alphas_cumprod: torch.Tensor, timestep: int = 199,
                 cfg_scale: float = 3.5, sample_latent: bool = True):
        super().__init__()
        if not 0 <= timestep < alphas_cumprod.shape[0]:
            raise ValueError(f"timestep {timestep} is outside the schedule's 0..{alphas_cumprod.shape[0] - 1}")
        self.unet, self.vae = unet, vae
        self.vae.requires_grad_(False)
        self.timestep, self.cfg_scale, self.sample_latent = timestep, cfg_scale, sample_latent
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)
        self.scaling_factor = float(vae.config.scaling_factor)

    @classmethod
    def from_pretrained(cls, path: str | Path, lora_rank: int | None = 16, lora_alpha: float = 16.0,
                        lora_targets: Sequence[str] | None = None, generator: torch.Generator | None = None,
                        **kwargs: Any) -> OneStepRestorer:
        """Load unet/, vae/ and scheduler/ from a local diffusers folder (never the Hub) and add LoRA
        (`lora_rank=None` for the plain base model)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        path = Path(path)
        _check_model_folder(path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        alphas = alphas_cumprod_from_config(scheduler.config)
        if lora_rank is not None:
            add_unet_lora(unet, lora_rank, lora_alpha, lora_targets, generator)
        return cls(unet, vae, alphas, **kwargs)

    @classmethod
    def from_configs(cls, unet_config: Mapping[str, Any] = SD21_BASE_UNET_CONFIG,
                     vae_config: Mapping[str, Any] = SD21_BASE_VAE_CONFIG,
                     scheduler_config: Mapping[str, Any] = SD21_BASE_SCHEDULER_CONFIG,
                     lora_rank: int | None = 16, lora_alpha: float = 16.0, lora_targets: Sequence[str] | None = None,
                     generator: torch.Generator | None = None, **kwargs: Any) -> OneStepRestorer:
        """Randomly initialised models from config dicts (tests, benchmarks); weights from diffusers'
        own initialisation, which draws from the global torch RNG."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(dict(unet_config))
        vae = AutoencoderKL.from_config(dict(vae_config))
        if lora_rank is not None:
            add_unet_lora(unet, lora_rank, lora_alpha, lora_targets, generator)
        return cls(unet, vae, alphas_cumprod_from_config(scheduler_config), **kwargs)

    def save_lora_weights(self, path: str | Path) -> Path:
        """Write the UNet's LoRA as the official `pytorch_lora_weights.safetensors` into folder `path`
        (or to `path` if it ends in .safetensors); the LoRA scale is folded in (the file means scale 1)."""
        from haodiff_model.io.official import save_lora_weights  # io builds on the nets: imported on use

        return save_lora_weights(self.unet, path)

    def load_lora_weights(self, path: str | Path, strict: bool = True) -> LoraLoadReport:
        """Copy an official-layout LoRA file (or the one in folder `path`) into the UNet's LoRA layers;
        returns the LoraLoadReport (mismatched keys raise LoraFileError unless strict=False)."""
        from haodiff_model.io.official import load_lora_weights

        return load_lora_weights(self.unet, path, strict)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute UNet blocks and VAE-decoder blocks in the backward pass (non-reentrant)."""
        for model in (self.unet, self.vae):
            if enabled:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()

    @property
    def abar(self) -> torch.Tensor:
        return self.alphas_cumprod[self.timestep]

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latent of images in [-1, 1]: a posterior sample (official) or its mode."""
        with torch.no_grad():
            dist = self.vae.encode(image).latent_dist
            z = dist.sample(generator) if self.sample_latent else dist.mode()
        return z * self.scaling_factor

    def predict_eps(self, z: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """CFG noise prediction at the fixed timestep; both prompts in one batched UNet call
        (batch order [neg, pos], as the official predict_noise); cfg <= 1 runs the positive only."""
        t = torch.tensor([self.timestep], device=z.device, dtype=torch.long)
        if self.cfg_scale <= 1:
            return self.unet(z, t, encoder_hidden_states=pos).sample
        eps = self.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([neg, pos])).sample
        eps_neg, eps_pos = eps.chunk(2)
        return eps_neg + self.cfg_scale * (eps_pos - eps_neg)

    def x0_from_eps(self, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z_H = (z - sqrt(1 - abar) eps) / sqrt(abar), in float64 as the official code, returned float32."""
        abar = self.abar.double()
        x0 = (z.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()
        return x0.float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (clamped, as the official inference and OSEDiff training) from a scaled latent."""
        return self.vae.decode(latent / self.scaling_factor).sample.clamp(-1, 1)

    def forward(self, lq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                generator: torch.Generator | None = None) -> RestorerOutput:
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"OneStepRestorer expects LQ images (B, 3, H, W), got {tuple(lq.shape)}")
        if pos.shape != neg.shape or pos.shape[0] != lq.shape[0]:
            raise ValueError(f"prompts must both be (B={lq.shape[0]}, tokens, dim), got {tuple(pos.shape)} "
                             f"and {tuple(neg.shape)}")
        z = self.encode(lq, generator)
        latent = self.x0_from_eps(z, self.predict_eps(z, pos, neg))
        return RestorerOutput(self.decode(latent), latent)


__all__ = ["ADAPTER", "LORA_TARGET_SUFFIXES", "SD21_BASE_SCHEDULER_CONFIG", "SD21_BASE_UNET_CONFIG",
           "SD21_BASE_VAE_CONFIG", "OneStepRestorer", "RestorerOutput", "add_unet_lora", "alphas_cumprod_from_config",
           "cast_frozen_", "init_lora_", "lora_layers", "lora_target_modules"]
