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

Outputs under output.dir: metrics.jsonl (validation: losses, PSNR / LPIPS / DISTS overall and per kind of
sample), tb/, val/step-*.png (LQ | restored | HQ rows), loss.png, best/ (with val.best_metric),
config.yaml, checkpoints/step-*/{state.pt, img_encoder_weights.pth, pytorch_lora_weights.safetensors}
and, at the end, the two official files in output.dir (EMA weights when EMA is on). The official
inference code loads them as they are (model_spec A.4, A.7).

Resume (`--resume`, from checkpoints/latest) restores the trainable weights (LoRA, prompt
embedders, D head/LoRA, embedding changers), both AdamW states, EMA, step, every rank's RNG
states (global ones and the VAE-sampling, GAN-timestep and Performer-redraw RNGs) and the
data position; frozen weights are re-read from their files. Same world size and data settings:
exact (bit-for-bit on CPU). Another world size: weights, optimizers and step exact, data streams
and per-rank RNGs re-derived.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from haodiff_model.eval.metrics import batch_psnr, load_lpips
from haodiff_model.io.official import IMG_ENCODER_FILE, LORA_FILE, CheckpointMismatchError
from haodiff_model.losses.losses import stage2_loss
from haodiff_model.restore.settings import SETTINGS_FILE
from haodiff_model.train.distributed import DistContext, init_distributed
from haodiff_model.train.ema import load_ema_state
from haodiff_model.train.loop import (
    VAL_KINDS, Run, TrainMeter, batches, build_train_loader, load_val_batch, restore_rngs, run_from_args,
    split_holdout,
)
from haodiff_model.train.osd_build import build_parts, load_trainable_state, trainable_state
from haodiff_model.train.osd_config import VAL_STREAM, TrainOSDConfig, resolve_paths
from haodiff_model.train.osd_step import Stage2Step, export_official
from haodiff_model.train.state import apply_state, derive_seed, image_grid, to_rgb_uint8


LOG_NAMES = ("loss", "mse", "ea_dists", "gan", "d_loss", "d_real", "d_fake", "grad_norm", "d_grad_norm")
PLOT_KEYS = ("train/loss", "train/mse", "train/ea_dists", "train/gan", "train/d_loss", "val/loss")
OUTPUT_FILES = (IMG_ENCODER_FILE, LORA_FILE, SETTINGS_FILE)


def checkpointed(step: Stage2Step) -> dict[str, Any]:
    """What a stage-2 checkpoint holds, by kind and name (the trainable weights only; frozen ones
    are re-read from their files)."""
    models: dict[str, nn.Module] = {"prompt_encoder": step.generator_module.encoder}
    if step.disc_module is not None and step.disc_module.conditioner is not None:
        models["conditioner"] = step.disc_module.conditioner
    optimizers = {"generator": step.opt_g, **({"discriminator": step.opt_d} if step.opt_d is not None else {})}
    extra = {"unet_lora": trainable_state(step.restorer.unet),
             "discriminator": trainable_state(step.disc_module.disc) if step.disc_module is not None else None,
             "ema": step.ema.state_dict() if step.ema is not None else None}
    return {"models": models, "optimizers": optimizers, "schedulers": {}, "rngs": step.rngs(), **extra}


def _check_same_architecture(state: Mapping[str, Any], cfg: TrainOSDConfig) -> None:
    saved, current = state["config"], cfg.to_dict()
    arch = [("dpg", k) for k in current["dpg"] if k != "attention"]
    arch += [("prompt_embedder", k) for k in current["prompt_embedder"]]
    arch += [("model", k) for k in ("lora_rank", "lora_alpha")]
    arch += [("discriminator", k) for k in ("backbone", "lora_rank", "head_channels", "head_layers",
                                            "head_norm_groups")]
    diff = [f"{s}.{k}" for s, k in arch if saved[s].get(k) != current[s][k]]
    if diff:
        raise CheckpointMismatchError(f"the checkpoint's architecture differs in {diff}")


def restore(step: Stage2Step, state: Mapping[str, Any]) -> int:
    """Trainable weights, optimizers and EMA from a checkpoint; returns its step."""
    parts = checkpointed(step)
    at = apply_state(state, parts["models"], parts["optimizers"], {})
    load_trainable_state(step.restorer.unet, state["unet_lora"], "unet_lora")
    if step.disc_module is not None:
        load_trainable_state(step.disc_module.disc, state["discriminator"], "discriminator")
    load_ema_state(step.ema, state)
    return at


@torch.no_grad()
def validate(step: Stage2Step, batch: Mapping[str, Any], seed: int, lpips: nn.Module
             ) -> tuple[dict[str, float], np.ndarray]:
    """Losses, PSNR / LPIPS (VGG) / DISTS of the restored images (means over the batch, and per kind
    of sample: val/<kind>/<metric> for hmb, generic, clean) and an LQ | restored | HQ grid, on the
    fixed held-out batch (EMA weights if on)."""
    rng = torch.Generator(device=step.ctx.device).manual_seed(derive_seed(seed, VAL_STREAM))
    with step.ema_weights():
        out = step.restore(batch["lq"], rng)
    hq = batch["hq"].to(step.ctx.device)
    with step.autocast():
        _, parts = stage2_loss(out.image, hq, step.ea_dists)
    metrics = {"val/loss": float(sum(v.item() for v in parts.values())),
               **{f"val/{k}": v.item() for k, v in parts.items()}}
    restored, reference = ((x.float() + 1) / 2 for x in (out.image.clamp(-1, 1), hq))
    scores = {"psnr": batch_psnr(restored, reference), "lpips": lpips(restored, reference, normalize=True).flatten(),
              "dists": step.ea_dists.dists(restored, reference, reduction="none")}
    kinds = np.array(batch["kind"])
    for name, per_image in scores.items():
        per_image = per_image.float().cpu()
        metrics[f"val/{name}"] = per_image.mean().item()
        for kind in VAL_KINDS:
            if (kinds == kind).any():
                metrics[f"val/{kind}/{name}"] = per_image[torch.from_numpy(kinds == kind)].mean().item()
    rows = [[to_rgb_uint8(batch["lq"][i]), to_rgb_uint8(out.image[i]), to_rgb_uint8(batch["hq"][i])]
            for i in range(out.image.shape[0])]
    return metrics, image_grid(rows)


def _summary(step: int, max_steps: int, metrics: Mapping[str, float]) -> str:
    m = {k.removeprefix("train/"): v for k, v in metrics.items()}
    return (f"step {step}/{max_steps}  loss {m['loss']:.4f} (mse {m['mse']:.4f} ea {m['ea_dists']:.4f} "
            f"gan {m['gan']:.4f})  D {m['d_loss']:.4f} (real {m['d_real']:+.2f} fake {m['d_fake']:+.2f})  "
            f"|g| {m['grad_norm']:.3f}  {m['it_per_s']:.2f} it/s  data wait {100 * m['data_wait_frac']:.0f}%")


def train(cfg: TrainOSDConfig, resume: bool = False, log: Callable[[str], None] | None = None,
          ctx: DistContext | None = None) -> tuple[Path, Path]:
    """Run stage 2 to `train.max_steps` on every rank (joining the launcher's process group unless
    `ctx` is given); returns the final official files (img_encoder, LoRA)."""
    ctx = ctx or init_distributed(cfg.train.device)
    t = cfg.train
    resolve_paths(cfg)  # name every missing file before anything slow happens
    run = Run(cfg, ctx, "osd", PLOT_KEYS, log)
    state = run.initial_state(resume)
    train_urls, val_urls = split_holdout(cfg)

    # models and the training step (frozen DPG and base weights, trainable prompt embedders and LoRA, D)
    parts = build_parts(cfg)
    for note in parts.notes:
        run.say(note)
    step_fn = Stage2Step(parts, t, cfg.discriminator, cfg.loss, ctx, cfg.model.gradient_checkpointing)

    # fresh start or resume
    step = 0
    if state is not None:
        _check_same_architecture(state, cfg)
        step = restore(step_fn, state)
        if not restore_rngs(state, step_fn.rngs(), ctx):
            step_fn.seed_rngs(step)
            run.say(f"world size {state['world_size']} -> {ctx.world_size}: weights, optimizers and step restored "
                    "exactly; data streams and per-rank RNGs re-derived for the new world (not an exact "
                    "resume)")
        run.check_data_settings(state, train_urls)
    loader = build_train_loader(cfg, train_urls, ctx, step)
    val_batch = load_val_batch(cfg, val_urls) if ctx.is_main and cfg.val.every else None
    # LPIPS on the VGG16 weights DISTS already reads: no other file to find
    lpips = load_lpips("vgg", cfg.loss.vgg16_weights).to(ctx.device) if val_batch is not None else None
    run.start(step, resumed=state is not None)

    def write_outputs(folder: Path) -> None:
        export_official(step_fn, folder)

    n_train = sum(p.numel() for p in step_fn.g_params.values())
    n_disc = sum(p.numel() for g in step_fn.opt_d.param_groups for p in g["params"]) if step_fn.opt_d else 0
    run.say(f"stage 2: {n_train:,} trainable generator parameters, {n_disc:,} discriminator, D backbone "
            f"{cfg.discriminator.backbone}, {len(train_urls)} training shard(s), world size {ctx.world_size}, "
            f"device {ctx.device}, {'bf16' if step_fn.amp_dtype else 'fp32'}, step {step} -> {t.max_steps}")
    step_fn.generator.train()
    if step_fn.disc is not None:
        step_fn.disc.train()
    meter = TrainMeter(LOG_NAMES, ctx)
    for batch in batches(loader, t.max_steps, meter):
        scalars = step_fn(batch, step)
        step += 1
        meter.add(torch.stack([scalars[k] for k in LOG_NAMES]))
        last = step == t.max_steps
        if step % cfg.output.log_every == 0 or last:
            metrics = meter.report(batch["hq"].shape[0])
            metrics["train/skipped_samples"] = run.skipped(loader)
            run.log_train(step, metrics, _summary(step, t.max_steps, metrics))
        with meter.paused():
            if val_batch is not None and (step % cfg.val.every == 0 or last):
                run.log_validation(step, *validate(step_fn, val_batch, t.seed, lpips), write_outputs)
            if step % cfg.output.ckpt_every == 0 or last:
                run.save(step, loader, train_urls, write_outputs=write_outputs, **checkpointed(step_fn))
    encoder_file, lora_file, _ = run.finish(step, OUTPUT_FILES, write_outputs, loader)
    return encoder_file, lora_file


def main_osd(args: argparse.Namespace) -> int:
    """`haodiff-train osd` (arguments from haodiff_model.cli)."""
    return run_from_args(TrainOSDConfig, train, args)


__all__ = ["LOG_NAMES", "OUTPUT_FILES", "PLOT_KEYS", "checkpointed", "main_osd", "restore", "train", "validate"]
