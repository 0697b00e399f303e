"""Stage-2 training-step benchmark: `python -m haodiff_model.bench.osd [--json]`.

On CUDA it builds the full SD2.1-base UNet + VAE (configs of model_spec C.1, random weights, LoRA
r16 on the OSEDiff module set), a full-size DPG prompt encoder and the SDXL-UNet latent
discriminator (or the SD2.1 one with --disc sd21), and times complete stage-2 steps (generator
step with MSE + EA-DISTS + GAN, then discriminator step) at batch 2, 512x512, bf16 autocast with
gradient checkpointing; it prints seconds per step and torch.cuda.max_memory_allocated. Without
CUDA it runs the same step code on tiny configs (a smoke test, numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from haodiff_model.train.osd_build import Stage2Parts

# Tiny models for CPU tests and smoke runs (same block types as the real ones).
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 48,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,
}
TINY_DPG = {"img_size": 64, "embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 2, 2], "drop_path_rate": 0.0}
TINY_PROMPT = {"dim_head": 16, "embed_dim": 32, "out_tokens": 7, "num_layers": 1, "num_heads_performer": 2,
               "num_heads_pool": 4, "pool_patch": 4}


def build_random_parts(disc: str, full: bool, device: torch.device, seed: int = 0,
                       gradient_checkpointing: bool = True) -> Stage2Parts:
    """Stage-2 models with random weights: the real architectures (full) or the tiny ones.

    The diffusion UNets are created directly on `device` (the SDXL UNet has 2.6 B parameters);
    the rest on the CPU, as Stage2Step moves them.
    """
    from diffusers import UNet2DConditionModel

    from haodiff_model.losses.dists import DISTS, DISTS_TOTAL_CHANNELS
    from haodiff_model.nets.dpg import DPGConfig
    from haodiff_model.losses.losses import EdgeAwareDISTS
    from haodiff_model.nets.restorer import SD21_BASE_UNET_CONFIG, SD21_BASE_VAE_CONFIG, OneStepRestorer
    from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig
    from haodiff_model.nets.sdxl_cond import SDXL_BASE_UNET_CONFIG
    from haodiff_model.train.osd_build import Stage2Parts, discriminator_from_unet
    from haodiff_model.train.osd_config import DiscriminatorSettings
    from haodiff_model.losses.vgg import vgg16_features

    torch.manual_seed(seed)  # diffusers and nn defaults draw from the global RNG
    gen = torch.Generator().manual_seed(seed)
    dpg = DPGConfig() if full else DPGConfig.from_dict(TINY_DPG)
    prompt = PromptEmbedderConfig() if full else PromptEmbedderConfig.from_dict(TINY_PROMPT)
    encoder = DualPromptEncoder(dpg, prompt, gen)
    unet_cfg, vae_cfg = (SD21_BASE_UNET_CONFIG, SD21_BASE_VAE_CONFIG) if full else (TINY_UNET_CONFIG, TINY_VAE_CONFIG)
    with torch.device(device):
        restorer = OneStepRestorer.from_configs(unet_cfg, vae_cfg, generator=gen)
        disc_unet = None
        if disc != "none":
            config = {"sdxl": SDXL_BASE_UNET_CONFIG if full else TINY_SDXL_UNET_CONFIG, "sd21": unet_cfg}[disc]
            disc_unet = UNet2DConditionModel.from_config(dict(config))
    settings = DiscriminatorSettings(backbone=disc, head_channels=256 if full else 16,
                                     head_norm_groups=32 if full else 8)
    discriminator, conditioner = None, None
    if disc_unet is not None:
        discriminator, conditioner = discriminator_from_unet(disc_unet, settings, prompt, seed, gradient_checkpointing)
        del disc_unet  # the up path is dropped here
    shape = (1, DISTS_TOTAL_CHANNELS, 1, 1)
    alpha, beta = torch.rand(shape, generator=gen) + 0.1, torch.rand(shape, generator=gen) + 0.1
    ea_dists = EdgeAwareDISTS(DISTS(vgg16_features(), alpha, beta))
    return Stage2Parts(encoder, restorer, discriminator, conditioner, ea_dists)


def run_benchmark(disc: str = "sdxl", steps: int = 5, warmup: int = 2, batch: int = 2, size: int | None = None,
                  precision: str = "bf16", gradient_checkpointing: bool = True,
                  device: str | None = None) -> dict[str, Any]:
    """Time `steps` stage-2 training steps (after `warmup`); full models on CUDA, tiny ones on CPU."""
    from haodiff_model.train.distributed import DistContext
    from haodiff_model.train.osd_config import DiscriminatorSettings, LossSettings, TrainSettings
    from haodiff_model.train.osd_step import Stage2Step

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = dev.type == "cuda"
    size = size or (512 if full else 32)
    t0 = time.perf_counter()
    parts = build_random_parts(disc, full, dev, gradient_checkpointing=gradient_checkpointing)
    train = TrainSettings(precision=precision, device=dev.type)
    step = Stage2Step(parts, train, DiscriminatorSettings(backbone=disc), LossSettings(), DistContext(device=dev),
                      gradient_checkpointing)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    hq = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    data = {"hq": hq, "lq": (hq + 0.2 * torch.randn(hq.shape, generator=g)).clamp(-1, 1)}
    step.generator.train()
    if step.disc is not None:
        step.disc.train()
    for i in range(warmup):
        step(data, i)
    if full:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times, last = [], {}
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        last = step(data, i)
        if full:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if full else "cpu (tiny models: smoke test only)",
        "models": "full SD2.1-base UNet+VAE, paper DPG + prompt embedders" if full else "tiny",
        "discriminator": disc, "batch": batch, "size": size, "precision": precision if full else "fp32",
        "gradient_checkpointing": gradient_checkpointing, "steps": steps, "warmup": warmup,
        "build_s": round(build_s, 2), "s_per_step": round(sum(times) / len(times), 4),
        "s_per_step_min": round(min(times), 4),
        "trainable_generator_params": sum(p.numel() for p in step.g_params.values()),
        "trainable_discriminator_params": sum(p.numel() for gr in step.opt_d.param_groups for p in gr["params"])
        if step.opt_d is not None else 0,
        "last_losses": {k: round(float(v), 5) for k, v in last.items()},
    }
    if full:
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        result["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / 2**30, 2)
        result["fits_40gib"] = result["max_memory_allocated_gib"] < 40
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m haodiff_model.bench.osd", description=__doc__.splitlines()[0])
    parser.add_argument("--disc", choices=("sdxl", "sd21", "none"), default="sdxl", help="discriminator backbone")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=None, help="image side (default 512 on CUDA, 32 on CPU)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    result = run_benchmark(args.disc, args.steps, args.warmup, args.batch, args.size, args.precision,
                           not args.no_checkpointing, args.device)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
