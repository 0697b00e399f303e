"""Stage 1 trainer: the triple-branch DPG on streamed shards (paper Sec. 3.2, Eq. 4-5; Sec. 4.1).

LQ -> DPGNetwork -> [HQ, residual, mask logits]; loss L1(HQ) + L1(LQ - HQ) + alpha Dice(sigmoid(mask)) +
a BCE term on the mask logits (defaults: alpha 0.5, Dice over the batch, BCE 0.1; paper: alpha 0.02);
Adam with warm-up and cosine decay (the mask branch's lr scaled by `train.mask_lr_scale`); bf16 autocast
on CUDA, fp32 on CPU; gradient-norm clipping; optionally an EMA of the weights (`train.ema_decay`),
which validation and the exported files then use. The paper's objective and optimiser as written (Sec.
4.1: Dice per image, no BCE, constant lr 2e-3) stay a config choice; the defaults differ because at
those settings the mask head saturates to all ones within a few dozen steps (issue #12; `python -m
haodiff_model.bench.learn` measures it). Every log record carries per-branch gradient norms and the mask
head's positive rate, and `Stage1Guard` warns when a head saturates, dies or the loss diverges. Every
rank reads its own slice of the shard stream; DDP averages the gradients. Rank 0 alone logs, validates
and writes files. Validation uses a fixed batch from held-out shards (`val.urls`, or else the last
training shard, which is then excluded from training).

Outputs under `output.dir`: metrics.jsonl, tb/ (TensorBoard), val/step-*.png (grids: HQ | LQ |
pred HQ | residual | pred residual | mask | pred mask), loss.png, config.yaml,
checkpoints/step-*/{state.pt, dpg.pth, dpg.json} and, at the end, dpg.pth (official-layout stage-1
weights, the file the official adapter loads as `pretrained_swinir`) with dpg.json beside it (its
architecture as `swinir_kwargs`, which stage 2 and `haodiff-restore convert` read).

Resume (`--resume`, from checkpoints/latest). Restored: model, Adam state, scheduler, step, RNG
states of every rank (Python, NumPy, torch, CUDA and the drop-path generator) and the data
position (each rank's loader restarts at batch `step` of its stream). Exact: with the same world
size and data settings, the resumed run computes what the uninterrupted run would have (bit-for-bit
on CPU; on CUDA up to the non-determinism of the GPU kernels themselves). On a different world
size: model, optimizer, scheduler and step carry over exactly; each rank's data stream is
re-derived for the new world (batch `step` of rank r of the new split, so the samples differ from
any uninterrupted run and the global batch changes with the world size; the learning rate is not
rescaled) and the drop-path generators are re-seeded from (seed, rank, step). Optimizer
hyper-parameters (lr, betas) come from the checkpoint, not the config.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from haodiff_model.config import RunConfig
from haodiff_model.eval.metrics import batch_psnr, mask_dice_iou
from haodiff_model.io.official import CheckpointMismatchError, load_dpg_weights
from haodiff_model.losses.losses import Stage1Loss, stage1_loss
from haodiff_model.nets.dpg import DPGConfig, DPGNetwork
from haodiff_model.restore.settings import dpg_sidecar
from haodiff_model.train.data import ShardStreamConfig
from haodiff_model.train.distributed import DistContext, init_distributed, wrap_ddp
from haodiff_model.train.ema import EMA, load_ema_state, maybe_swapped
from haodiff_model.train.loop import (
    OutputSettings, Run, TrainMeter, ValSettings, autocast_dtype, batches, build_train_loader, load_val_batch,
    restore_rngs, run_from_args, split_holdout,
)
from haodiff_model.train.guards import Stage1Guard
from haodiff_model.train.state import (
    METRICS_FILE, apply_state, derive_seed, image_grid, plot_metrics, to_rgb_uint8,
)

DPG_WEIGHTS = "dpg.pth"
LOSS_PARTS = ("l1_hq", "l1_residual", "dice", "bce")
# per-step health figures of the heads (pre-clip gradient norms; the mask head's raw logits)
HEAD_STATS = ("grad_norm", "grad_norm_hq", "grad_norm_residual", "grad_norm_mask", "mask_pos_rate",
              "mask_true_rate", "mask_logit_absmax")
HEAD_NAMES = ("hq", "residual", "mask")  # branch order of DPGNetwork
LOG_NAMES = ("loss", *LOSS_PARTS, *HEAD_STATS)  # the scalars each step logs, in order
HEADS_PLOT_KEYS = (*(f"train/grad_norm_{n}" for n in HEAD_NAMES), "train/mask_logit_absmax")
_DROP_PATH_STREAM = 101  # seed tag of the drop-path generators, apart from the data streams' tags


@dataclass(frozen=True)
class ModelSettings:
    """Where the trained DPG starts: the official initialisation, or these stage-1 weights."""

    init_weights: str | None = None


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 20_000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    scheduler: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    precision: Literal["bf16", "fp32"] = "bf16"
    ema_decay: float | None = None
    mask_lr_scale: float = 1.0
    seed: int = 0
    device: Literal["cuda", "cpu"] | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_steps": self.max_steps >= 1,
            "lr": self.lr > 0,
            "betas": all(0 <= b < 1 for b in self.betas),
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "ema_decay": self.ema_decay is None or 0 < self.ema_decay < 1,
            "mask_lr_scale": self.mask_lr_scale > 0,
            "seed": self.seed >= 0,
        }
        bad = [n for n, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))


@dataclass(frozen=True)
class TrainDPGConfig(RunConfig):
    """The whole stage-1 run; YAML sections dpg / model / loss / data / train / val / output
    (see pipelines/train_dpg.yaml)."""

    dpg: DPGConfig = field(default_factory=DPGConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    loss: Stage1Loss = field(default_factory=Stage1Loss)
    # channel shuffle on (ours, issue #12): without it the HQ head re-learns the training photos' colours
    data: ShardStreamConfig = field(default_factory=lambda: ShardStreamConfig(channel_shuffle=True))
    train: TrainSettings = field(default_factory=TrainSettings)
    val: ValSettings = field(default_factory=ValSettings)
    output: OutputSettings = field(default_factory=lambda: OutputSettings(dir="runs/dpg"))


def lr_factor(step: int, t: TrainSettings) -> float:
    """Multiplier of the base lr for optimizer update `step` (0-based): linear warm-up, then constant or cosine."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, t: TrainSettings, device: torch.device) -> torch.optim.Adam:
    """Adam over the model; the mask branch and its head in a group of their own at lr x mask_lr_scale."""
    if t.mask_lr_scale == 1.0:  # one group, as checkpoints written before the knob hold
        groups = [{"params": list(model.parameters())}]
    else:
        mask_ids = {id(p) for p in head_parameters(model)[HEAD_NAMES.index("mask")]}
        groups = [{"params": [p for p in model.parameters() if id(p) not in mask_ids]},
                  {"params": [p for p in model.parameters() if id(p) in mask_ids], "lr": t.lr * t.mask_lr_scale}]
    # fused Adam: one kernel for all parameters on CUDA (same update rule as the reference loop)
    return torch.optim.Adam(groups, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                            fused=True if device.type == "cuda" else None)


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))


def dpg_forward_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], loss_cfg: Stage1Loss,
                     amp_dtype: torch.dtype | None, device: torch.device
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """LQ -> predictions -> stage-1 loss (computed in fp32). Returns (loss, parts, predictions)."""
    lq, hq, residual, mask = (batch[k].to(device, non_blocking=True) for k in ("lq", "hq", "residual", "mask"))
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        preds = model(lq)
    preds = [p.float() for p in preds]
    loss, parts = stage1_loss(*preds, hq, residual, mask, loss_cfg)
    return loss, parts, preds


def head_parameters(model: nn.Module) -> list[list[nn.Parameter]]:
    """Per branch (HQ, residual, mask): the parameters only that branch uses (its RSTBs and its head)."""
    net = getattr(model, "module", model)  # through DDP
    return [[*branch.parameters(), *head.parameters()] for branch, head in zip(net.branches, net.upsamplers)]


def _grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def dpg_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
                   loss_cfg: Stage1Loss = Stage1Loss(), grad_clip: float | None = 1.0,
                   amp_dtype: torch.dtype | None = None, device: torch.device | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One optimizer update on `batch`; returns (loss, parts, HEAD_STATS), all on device (no sync).

    The gradient norms are taken before clipping: the global one and one per branch.
    """
    device = device or next(model.parameters()).device
    loss, parts, preds = dpg_forward_loss(model, batch, loss_cfg, amp_dtype, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    heads = [_grad_norm(ps).to(device) for ps in head_parameters(model)]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip is not None else math.inf)
    optimizer.step()
    logits = preds[2].detach()
    stats = {
        "grad_norm": norm.detach(), **{f"grad_norm_{n}": h for n, h in zip(HEAD_NAMES, heads)},
        "mask_pos_rate": (logits > 0).float().mean(),
        "mask_true_rate": batch["mask"].to(device).float().mean(),
        "mask_logit_absmax": logits.abs().max(),
    }
    return loss.detach(), parts, stats


def validation_grid(batch: Mapping[str, torch.Tensor], preds: Sequence[torch.Tensor]) -> np.ndarray:
    """Rows of HQ | LQ | pred HQ | residual | pred residual | mask | pred mask as uint8 HxWx3."""
    hq_pred, res_pred, mask_logits = (p.detach().float().cpu() for p in preds)
    rows = []
    for i in range(batch["hq"].shape[0]):
        rows.append([
            to_rgb_uint8(batch["hq"][i]), to_rgb_uint8(batch["lq"][i]), to_rgb_uint8(hq_pred[i]),
            # residuals shown on the image scale: grey = no degradation
            to_rgb_uint8(batch["residual"][i]), to_rgb_uint8(res_pred[i]),
            to_rgb_uint8(batch["mask"][i], 0.0, 1.0), to_rgb_uint8(torch.sigmoid(mask_logits[i]), 0.0, 1.0),
        ])
    return image_grid(rows)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1], clipped as a saved image would be."""
    return ((x + 1) / 2).clamp(0, 1)


def head_metrics(batch: Mapping[str, torch.Tensor], preds: Sequence[torch.Tensor]) -> dict[str, float]:
    """Each head on its own, against what it must beat (all means over the batch):
    psnr_lq (the input's), psnr_hq_head, psnr_lq_minus_res (LQ - residual head), on [0, 1] images;
    mask_dice / mask_iou on the samples with HMB in view (nan without one) and mask_pos_rate_no_hmb,
    the fraction of pixels called HMB where there is none (nan without such a sample)."""
    hq_pred, res_pred, logits = (p.detach().float().cpu() for p in preds)
    hq, lq, mask = batch["hq"], batch["lq"], batch["mask"]
    out = {
        "psnr_lq": batch_psnr(_unit(lq), _unit(hq)).mean().item(),
        "psnr_hq_head": batch_psnr(_unit(hq_pred), _unit(hq)).mean().item(),
        "psnr_lq_minus_res": batch_psnr(_unit(lq - res_pred), _unit(hq)).mean().item(),
    }
    has_hmb = mask.flatten(1).amax(dim=1) > 0.5
    dice, iou = mask_dice_iou(logits, mask)
    out["mask_dice"] = dice[has_hmb].mean().item() if has_hmb.any() else math.nan
    out["mask_iou"] = iou[has_hmb].mean().item() if has_hmb.any() else math.nan
    out["mask_pos_rate_no_hmb"] = (logits[~has_hmb] > 0).float().mean().item() if (~has_hmb).any() else math.nan
    return out


@torch.no_grad()
def validate(model: nn.Module, batch: Mapping[str, torch.Tensor], loss_cfg: Stage1Loss,
             amp_dtype: torch.dtype | None, device: torch.device) -> tuple[dict[str, float], np.ndarray]:
    """Loss terms, per-head metrics (`head_metrics`) and the image grid on the fixed held-out batch, in eval mode."""
    model.eval()
    try:
        loss, parts, preds = dpg_forward_loss(model, batch, loss_cfg, amp_dtype, device)
    finally:
        model.train()
    metrics = {"val/loss": loss.item(), **{f"val/{k}": v.item() for k, v in parts.items()},
               **{f"val/{k}": v for k, v in head_metrics(batch, preds).items()}}
    return metrics, validation_grid(batch, preds)


def _summary(step: int, max_steps: int, m: Mapping[str, float]) -> str:
    return (f"step {step}/{max_steps}  loss {m['train/loss']:.4f} (hq {m['train/l1_hq']:.4f} "
            f"res {m['train/l1_residual']:.4f} dice {m['train/dice']:.4f} bce {m['train/bce']:.4f})  "
            f"|g| {m['train/grad_norm']:.3f} (hq {m['train/grad_norm_hq']:.2e} "
            f"res {m['train/grad_norm_residual']:.2e} mask {m['train/grad_norm_mask']:.2e})  "
            f"mask+ {100 * m['train/mask_pos_rate']:.0f}% (true {100 * m['train/mask_true_rate']:.0f}%)  "
            f"lr {m['train/lr']:.2e}  {m['train/it_per_s']:.2f} it/s  data wait {100 * m['train/data_wait_frac']:.0f}%")


def _check_same_architecture(state: Mapping[str, Any], cfg: TrainDPGConfig) -> None:
    saved, current = dict(state["config"]["dpg"]), cfg.to_dict()["dpg"]
    diff = sorted(k for k in current if k != "attention" and saved.get(k) != current[k])
    if diff:
        raise CheckpointMismatchError(f"the checkpoint's dpg architecture differs in {diff}: "
                                      + ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in diff))


def _load_init_weights(model: DPGNetwork, path: str) -> str:
    try:
        return str(load_dpg_weights(model, path))
    except CheckpointMismatchError as exc:
        summary = " ".join(line.strip() for line in str(exc).splitlines())
        summary = summary if len(summary) < 400 else summary[:400] + " ..."
        raise CheckpointMismatchError(f"model.init_weights does not fit the dpg section: {summary}") from None


def train(cfg: TrainDPGConfig, resume: bool = False, log: Callable[[str], None] | None = None,
          ctx: DistContext | None = None) -> tuple[Path, DPGNetwork]:
    """Run stage 1 to `train.max_steps` on every rank (joining the launcher's process group unless
    `ctx` is given); returns the final official-layout weights file and the trained network (holding
    the EMA weights when `train.ema_decay` is set, as the file does)."""
    ctx = ctx or init_distributed(cfg.train.device)
    t = cfg.train
    plot_keys = ["train/loss", *(f"train/{k}" for k in LOSS_PARTS if k != "bce" or cfg.loss.bce_weight), "val/loss"]
    run = Run(cfg, ctx, "dpg", plot_keys, log)
    guard = Stage1Guard()
    state = run.initial_state(resume)
    train_urls, val_urls = split_holdout(cfg)

    # model, optimizer, schedule
    model = DPGNetwork(cfg.dpg, torch.Generator().manual_seed(t.seed))
    if state is None and cfg.model.init_weights:
        run.say(_load_init_weights(model, cfg.model.init_weights))
    model.to(ctx.device)
    drop_path_rng = torch.Generator(device=ctx.device)
    model.set_drop_path_generator(drop_path_rng)
    optimizer = make_optimizer(model, t, ctx.device)
    scheduler = make_scheduler(optimizer, t)
    amp_dtype = autocast_dtype(t.precision, ctx.device)
    ema = EMA(dict(model.named_parameters()), t.ema_decay) if t.ema_decay is not None else None
    checkpointed = {"models": {"dpg": model}, "optimizers": {"adam": optimizer}, "schedulers": {"lr": scheduler},
                    "rngs": {"drop_path": drop_path_rng}}

    # fresh start or resume
    step = 0
    if state is not None:
        _check_same_architecture(state, cfg)
        step = apply_state(state, checkpointed["models"], checkpointed["optimizers"], checkpointed["schedulers"])
        load_ema_state(ema, state)
        if not restore_rngs(state, checkpointed["rngs"], ctx):
            run.say(f"world size {state['world_size']} -> {ctx.world_size}: model, optimizer, scheduler and step "
                    "restored exactly; data streams and drop-path RNG re-derived for the new world (not an exact "
                    "resume)")
        run.check_data_settings(state, train_urls)
    if state is None or state["world_size"] != ctx.world_size:
        drop_path_rng.manual_seed(derive_seed(t.seed, _DROP_PATH_STREAM, ctx.rank, step))
    ddp = wrap_ddp(model, ctx)
    loader = build_train_loader(cfg, train_urls, ctx, step)
    val_batch = load_val_batch(cfg, val_urls) if ctx.is_main and cfg.val.every else None
    run.start(step, resumed=state is not None)

    def write_outputs(folder: Path) -> None:
        with maybe_swapped(ema):
            model.save_pretrained(folder / DPG_WEIGHTS)

    run.say(f"stage 1: {sum(p.numel() for p in model.parameters()):,} parameters, {len(train_urls)} training "
            f"shard(s), {len(val_urls)} validation shard(s), world size {ctx.world_size}, device {ctx.device}, "
            f"{'bf16 autocast' if amp_dtype else 'fp32'}, step {step} -> {t.max_steps}")
    ddp.train()
    meter = TrainMeter(LOG_NAMES, ctx)
    for batch in batches(loader, t.max_steps, meter):
        loss, parts, stats = dpg_train_step(ddp, optimizer, batch, cfg.loss, t.grad_clip, amp_dtype, ctx.device)
        scheduler.step()
        if ema is not None:
            ema.update()
        step += 1
        meter.add(torch.stack([loss, *(parts[k] for k in LOSS_PARTS), *(stats[k] for k in HEAD_STATS)]))
        last = step == t.max_steps
        if step % cfg.output.log_every == 0 or last:
            metrics = meter.report(batch["hq"].shape[0])
            metrics["train/lr"] = scheduler.get_last_lr()[0]
            metrics["train/skipped_samples"] = run.skipped(loader)
            warnings = guard.check(step, metrics)
            metrics["train/warnings"] = len(warnings)
            run.log_train(step, metrics, _summary(step, t.max_steps, metrics))
            for warning in warnings:
                run.warn(f"step {step}: {warning}")
        with meter.paused():
            if val_batch is not None and (step % cfg.val.every == 0 or last):
                with maybe_swapped(ema):
                    val_metrics, grid = validate(model, val_batch, cfg.loss, amp_dtype, ctx.device)
                run.log_validation(step, val_metrics, grid, write_outputs)
            if step % cfg.output.ckpt_every == 0 or last:
                run.save(step, loader, train_urls, write_outputs=write_outputs,
                         ema=ema.state_dict() if ema is not None else None, **checkpointed)
    weights = run.finish(step, [DPG_WEIGHTS, dpg_sidecar(DPG_WEIGHTS).name], write_outputs, loader)[0]
    if ctx.is_main:
        plot_metrics(run.out / METRICS_FILE, run.out / "heads.png", HEADS_PLOT_KEYS)
    if ema is not None:
        ema.copy_to_params()
    return weights, model


def main_dpg(args: argparse.Namespace) -> int:
    """`haodiff-train dpg` (arguments from haodiff_model.cli)."""
    return run_from_args(TrainDPGConfig, train, args)


__all__ = ["DPG_WEIGHTS", "HEAD_STATS", "TrainDPGConfig", "TrainSettings", "dpg_forward_loss", "dpg_train_step",
           "head_metrics", "head_parameters", "lr_factor", "main_dpg", "make_optimizer", "make_scheduler", "train",
           "validation_grid"]
