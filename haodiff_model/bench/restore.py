"""Restore benchmark: `haodiff-restore --bench` or `python -m haodiff_model.bench.restore` (full
SD2.1-base architecture, random weights).

Builds the paper's DPG + prompt embedders and the SD2.1-base UNet (LoRA merged, as restoring does)
and VAE from their configs with random weights, then times `HAODiffRestorer.restore` on random
images per stage (prompt = DPG + embedders, VAE encode, UNet with CFG, VAE decode, colour fix) at
each batch size, after one untimed warm-up call, and prints ms per stage, images/s and peak memory
(CUDA: max_memory_allocated; CPU: the process's peak RSS, which includes the model weights).

Also here: the tiny model configs that tests use to write a real SD2.1-shaped folder.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# A VAE with the real block structure and 8x downsampling, a few channels wide.
TINY_VAE8_CONFIG: dict[str, Any] = {
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}


def _prompt_encoder(full: bool, seed: int):
    from haodiff_model.bench.osd import TINY_DPG, TINY_PROMPT
    from haodiff_model.nets.dpg import DPGConfig
    from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig

    dpg = DPGConfig() if full else DPGConfig.from_dict(TINY_DPG)
    prompt = PromptEmbedderConfig() if full else PromptEmbedderConfig.from_dict(TINY_PROMPT)
    return DualPromptEncoder(dpg, prompt, torch.Generator().manual_seed(seed))


def write_tiny_folders(root: str | Path, seed: int = 0, lora_scale: float = 0.05) -> tuple[Path, Path]:
    """A tiny SD2.1-shaped diffusers folder (unet/, vae/, scheduler/) and a weights folder with a
    tiny img_encoder_weights.pth and a LoRA file with non-zero B; returns (base, weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from haodiff_model.bench.osd import TINY_UNET_CONFIG
    from haodiff_model.io.official import save_lora_weights
    from haodiff_model.nets.restorer import ADAPTER, SD21_BASE_SCHEDULER_CONFIG, add_unet_lora, lora_layers

    root = Path(root)
    base, weights = root / "sd21", root / "weights"
    torch.manual_seed(seed)  # diffusers initialises from the global RNG
    unet = UNet2DConditionModel.from_config(TINY_UNET_CONFIG)
    unet.save_pretrained(base / "unet")
    AutoencoderKL.from_config(TINY_VAE8_CONFIG).save_pretrained(base / "vae")
    DDIMScheduler.from_config(SD21_BASE_SCHEDULER_CONFIG).save_pretrained(base / "scheduler")
    g = torch.Generator().manual_seed(seed + 1)
    add_unet_lora(unet, 4, 4.0, generator=g)
    with torch.no_grad():
        for _, layer in lora_layers(unet):
            b = layer.lora_B[ADAPTER].weight
            b.copy_(torch.randn(b.shape, generator=g) * lora_scale)
    save_lora_weights(unet, weights)
    _prompt_encoder(False, seed + 2).save_pretrained(weights)
    return base, weights


def build_random_restorer(precision: str, device: torch.device, full: bool = True, seed: int = 0):
    """HAODiffRestorer with random weights: full SD2.1-base + paper DPG, or the tiny test models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from haodiff_model.bench.osd import TINY_UNET_CONFIG
    from haodiff_model.nets.restorer import (
        SD21_BASE_SCHEDULER_CONFIG, SD21_BASE_UNET_CONFIG, SD21_BASE_VAE_CONFIG, OneStepRestorer,
        alphas_cumprod_from_config,
    )
    from haodiff_model.restore.pipeline import HAODiffRestorer, RestoreOptions
    from haodiff_model.restore.settings import InferenceSettings

    torch.manual_seed(seed)
    unet_cfg, vae_cfg = (SD21_BASE_UNET_CONFIG, SD21_BASE_VAE_CONFIG) if full else (TINY_UNET_CONFIG, TINY_VAE8_CONFIG)
    unet = UNet2DConditionModel.from_config(dict(unet_cfg))
    vae = AutoencoderKL.from_config(dict(vae_cfg))
    restorer = OneStepRestorer(unet, vae, alphas_cumprod_from_config(SD21_BASE_SCHEDULER_CONFIG))
    return HAODiffRestorer(_prompt_encoder(full, seed), restorer, InferenceSettings(),
                           RestoreOptions(precision=precision), device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_restore(restorer, size: int, batch: int, repeats: int, warmup: int = 1) -> dict[str, Any]:
    from haodiff_model.restore.pipeline import StageTimer

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    for _ in range(warmup):  # kernels, allocator, oneDNN primitives
        restorer.restore(images)
    if restorer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(restorer.device)
    timer = StageTimer(restorer.device)
    start = time.perf_counter()
    for _ in range(repeats):
        restorer.restore(images, timer)
    total = time.perf_counter() - start
    per_image = 1000 * total / (repeats * batch)
    return {
        "batch": batch, "size": size, "precision": restorer.options.precision,
        "ms_per_stage_per_call": {k: round(1000 * v / repeats, 1) for k, v in timer.seconds.items()},
        "ms_per_image": round(per_image, 1), "images_per_s": round(1000 / per_image, 3),
        "peak_memory_gib": round(_peak_memory_gib(restorer.device), 2),
    }


def run_benchmark(device: torch.device, precision: str, size: int, batches: list[int], repeats: int,
                  official: bool, full: bool = True, warmup: int = 1,
                  report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time each batch size (and the official-equivalent fp32 batch 1); `report` gets a line per run
    as soon as it is measured (a full-size CPU run takes minutes)."""
    t0 = time.perf_counter()
    restorer = build_random_restorer(precision, device, full)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "models": "SD2.1-base UNet + VAE, paper DPG + prompt embedders, random weights" if full else "tiny",
        "build_s": round(time.perf_counter() - t0, 1), "warmup_calls": warmup, "runs": [],
    }
    if report:
        report(format_header(result))
    for batch in batches:
        result["runs"].append(time_restore(restorer, size, batch, repeats, warmup))
        if report:
            report(format_run(result["runs"][-1]))
    if official and precision != "fp32":
        del restorer
        run = {"official_equivalent": True,
               **time_restore(build_random_restorer("fp32", device, full), size, 1, repeats, warmup)}
        result["runs"].append(run)
        if report:
            report(format_run(run))
    return result


def format_header(result: dict[str, Any]) -> str:
    return (f"device {result['device']}; {result['models']}; build {result['build_s']} s; "
            f"{result['warmup_calls']} untimed warm-up call(s) per run")


def format_run(run: dict[str, Any]) -> str:
    stages = "  ".join(f"{k} {v:.0f}" for k, v in run["ms_per_stage_per_call"].items())
    tag = " (official-equivalent fp32 b1)" if run.get("official_equivalent") else ""
    return (f"{run['precision']} batch {run['batch']} {run['size']}px{tag}: {run['ms_per_image']:.0f} ms/image, "
            f"{run['images_per_s']:.3f} images/s, peak {run['peak_memory_gib']} GiB; ms per call: {stages}")


def main_bench(args: argparse.Namespace, device: torch.device) -> int:
    batches = [int(b) for b in args.bench_batches.split(",") if b.strip()]
    if not batches or min(batches) < 1 or args.bench_repeats < 1 or args.bench_size < 8:
        raise ValueError("--bench-batches must list sizes >= 1, --bench-repeats >= 1, --bench-size >= 8")
    if args.bench_warmup < 0:
        raise ValueError("--bench-warmup must be >= 0")
    report = None if args.json else (lambda line: print(line, flush=True))
    result = run_benchmark(device, args.precision, args.bench_size, batches, args.bench_repeats, args.bench_official,
                           warmup=args.bench_warmup, report=report)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from haodiff_model.restore.cli import main

    sys.exit(main(["--bench", *sys.argv[1:]]))
