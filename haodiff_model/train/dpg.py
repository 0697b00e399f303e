"""Stage 1 trainer: the triple-branch DPG on streamed shards (paper Sec. 3.2, Eq. 4-5; Sec. 4.1).

LQ -> DPGNetwork -> [HQ, residual, mask logits]; loss L1(HQ) + L1(LQ - HQ) + 0.02 Dice(sigmoid(mask))
(+ a BCE term on the mask logits); Adam with warm-up and cosine decay; bf16 autocast on CUDA, fp32 on
CPU; gradient-norm clipping. The paper's objective and optimiser as written (Sec. 4.1: Dice per
image, no BCE, constant lr 2e-3) stay a config choice; the defaults differ because at those settings
the mask head saturates to all ones within a few dozen steps (issue #12; `python -m
haodiff_model.bench.learn` measures it). Every log record carries per-branch gradient norms and the
mask head's positive rate, and `Stage1Guard` warns when a head saturates, dies or the loss diverges. Every
rank reads its own slice of the shard stream; DDP averages the gradients. Rank 0 alone logs,
validates and writes files. Validation uses a fixed batch from held-out shards (`val.urls`, or
else the last training shard, which is then excluded from training).

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
from typing import Any

import numpy as np
import torch
from torch import nn

from haodiff_model.config import ConfigError, RunConfig, check_scalar_types
from haodiff_model.io.official import load_dpg_weights, save_dpg
from haodiff_model.losses.losses import DICE_REDUCTIONS, Stage1Objective, stage1_loss
from haodiff_model.nets.dpg import DPGConfig, DPGNetwork
from haodiff_model.restore.settings import dpg_sidecar, write_dpg_sidecar
from haodiff_model.train.data import ShardStreamConfig
from haodiff_model.train.distributed import DistContext, init_distributed, wrap_ddp
from haodiff_model.train.guards import Stage1Guard
from haodiff_model.train.loop import (
    PRECISIONS, OutputSettings, Trainer, ValSettings, autocast_dtype, run_from_args, split_holdout,
)
from haodiff_model.train.state import (
    METRICS_FILE, apply_state, derive_seed, image_grid, plot_metrics, restore_rng, to_rgb_uint8,
)

SCHEDULERS = ("constant", "cosine")
DPG_WEIGHTS = "dpg.pth"
LOSS_PARTS = ("l1_hq", "l1_residual", "dice", "bce")
# per-step health figures of the heads (pre-clip gradient norms; the mask head's raw logits)
HEAD_STATS = ("grad_norm", "grad_norm_hq", "grad_norm_residual", "grad_norm_mask", "mask_pos_rate",
              "mask_true_rate", "mask_logit_absmax")
HEAD_NAMES = ("hq", "residual", "mask")  # branch order of DPGNetwork
_DROP_PATH_STREAM = 101  # seed tag of the drop-path generators, apart from the data streams' tags


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 20_000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    dice_weight: float = 0.02
    dice_reduction: str = "batch"
    dice_smooth: float = 1.0
    bce_weight: float = 0.1
    focal_gamma: float = 0.0
    mask_logit_bound: float | None = None
    scheduler: str = "cosine"
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    precision: str = "bf16"
    seed: int = 0
    init_weights: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        check_scalar_types(self)
        checks = {
            "max_steps": self.max_steps >= 1,
            "lr": self.lr > 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "dice_weight": self.dice_weight >= 0,
            "dice_reduction": self.dice_reduction in DICE_REDUCTIONS,
            "dice_smooth": self.dice_smooth >= 0,
            "bce_weight": self.bce_weight >= 0,
            "focal_gamma": self.focal_gamma >= 0,
            "mask_logit_bound": self.mask_logit_bound is None or self.mask_logit_bound > 0,
            "scheduler": self.scheduler in SCHEDULERS,
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "precision": self.precision in PRECISIONS,
            "seed": self.seed >= 0,
            "device": self.device in (None, "cuda", "cpu"),
        }
        bad = [n for n, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad) +
                             f" (scheduler: {SCHEDULERS}, precision: {PRECISIONS}, device: cuda|cpu|null, "
                             f"dice_reduction: {DICE_REDUCTIONS})")

    def objective(self) -> Stage1Objective:
        return Stage1Objective(self.dice_weight, self.dice_reduction, self.dice_smooth, self.bce_weight,
                               self.focal_gamma, self.mask_logit_bound)


@dataclass(frozen=True)
class TrainDPGConfig(RunConfig):
    """The whole stage-1 run; YAML sections model / data / train / val / output (see pipelines/train_dpg.yaml)."""

    RUN_DEFAULTS = {"data": {"urls": ["shards/*.tar"]}, "output": {"dir": "runs/dpg"}}

    model: DPGConfig = field(default_factory=DPGConfig)
    data: ShardStreamConfig = field(default_factory=lambda: TrainDPGConfig.run_default("data"))
    train: TrainSettings = field(default_factory=TrainSettings)
    val: ValSettings = field(default_factory=ValSettings)
    output: OutputSettings = field(default_factory=lambda: TrainDPGConfig.run_default("output"))


def lr_factor(step: int, t: TrainSettings) -> float:
    """Multiplier of the base lr for optimizer update `step` (0-based): linear warm-up, then constant or cosine."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: Iterable[nn.Parameter], t: TrainSettings, device: torch.device) -> torch.optim.Adam:
    # fused Adam: one kernel for all parameters on CUDA (same update rule as the reference loop)
    return torch.optim.Adam(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                            fused=True if device.type == "cuda" else None)


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))


def dpg_forward_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], objective: Stage1Objective,
                     amp_dtype: torch.dtype | None, device: torch.device
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """LQ -> predictions -> stage-1 loss (computed in fp32). Returns (loss, parts, predictions)."""
    lq, hq, residual, mask = (batch[k].to(device, non_blocking=True) for k in ("lq", "hq", "residual", "mask"))
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        preds = model(lq)
    preds = [p.float() for p in preds]
    loss, parts = stage1_loss(*preds, hq, residual, mask, objective)
    return loss, parts, preds


def head_parameters(model: nn.Module) -> list[list[nn.Parameter]]:
    """Per branch (HQ, residual, mask): the parameters only that branch uses (its RSTBs and its head)."""
    net = getattr(model, "module", model)  # through DDP
    return [[*branch.parameters(), *head.parameters()] for branch, head in zip(net.branches, net.upsamplers)]


def _grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def dpg_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
                   objective: Stage1Objective = Stage1Objective(), grad_clip: float | None = 1.0,
                   amp_dtype: torch.dtype | None = None, device: torch.device | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One optimizer update on `batch`; returns (loss, parts, HEAD_STATS), all on device (no sync).

    The gradient norms are taken before clipping: the global one and one per branch.
    """
    device = device or next(model.parameters()).device
    loss, parts, preds = dpg_forward_loss(model, batch, objective, amp_dtype, device)
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


class DPGTrainer(Trainer):
    """Stage-1 training loop; build it on every rank, then `run()`."""

    LOG_NAMES = ("loss", *LOSS_PARTS, *HEAD_STATS)
    PLOT_KEYS = ("train/loss", *(f"train/{k}" for k in LOSS_PARTS), "val/loss")
    OUTPUT_FILES = (DPG_WEIGHTS, dpg_sidecar(DPG_WEIGHTS).name)

    def __init__(self, cfg: TrainDPGConfig, ctx: DistContext, resume: bool = False,
                 log: Callable[[str], None] = print):
        super().__init__(cfg, ctx, log)
        state = self._initial_state(resume)
        self.train_urls, self.val_urls = split_holdout(cfg)

        t = cfg.train
        self.objective = t.objective()
        self.guard = Stage1Guard()
        self.model = DPGNetwork(cfg.model, torch.Generator().manual_seed(t.seed))
        if state is None and t.init_weights:
            self.say(str(load_dpg_weights(self.model, t.init_weights)))
        self.model.to(ctx.device)
        self.drop_path_gen = torch.Generator(device=ctx.device)
        self.model.set_drop_path_generator(self.drop_path_gen)
        self.optimizer = make_optimizer(self.model.parameters(), t, ctx.device)
        self.scheduler = make_scheduler(self.optimizer, t)
        self.amp_dtype = autocast_dtype(t.precision, ctx.device)
        if state is None:
            self.drop_path_gen.manual_seed(derive_seed(t.seed, _DROP_PATH_STREAM, ctx.rank, 0))
        else:
            self._restore(state)
        self.ddp = wrap_ddp(self.model, ctx)
        self._start_run(resumed=state is not None)

    def models(self) -> dict[str, nn.Module]:
        return {"dpg": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.optimizer}

    def schedulers(self) -> dict[str, Any]:
        return {"lr": self.scheduler}

    def generators(self) -> dict[str, torch.Generator]:
        return {"drop_path": self.drop_path_gen}

    def _restore(self, state: Mapping[str, Any]) -> None:
        saved_model = dict(state["config"]["model"])
        current = self.cfg.to_dict()["model"]
        diff = sorted(k for k in current if k != "attention" and saved_model.get(k) != current[k])
        if diff:
            raise ConfigError(f"the checkpoint's model config differs in {diff}: "
                              + ", ".join(f"{k}: {saved_model.get(k)!r} -> {current[k]!r}" for k in diff))
        self.step = apply_state(state, self.models(), self.optimizers(), self.schedulers())
        rank, world = self.ctx.rank, self.ctx.world_size
        if state["world_size"] == world:
            restore_rng(state["rng"][rank], self.generators())
        else:
            self.drop_path_gen.manual_seed(derive_seed(self.cfg.train.seed, _DROP_PATH_STREAM, rank, self.step))
            self.say(f"world size {state['world_size']} -> {world}: model, optimizer, scheduler and step restored "
                     "exactly; data streams and drop-path RNG re-derived for the new world (not an exact resume)")
        self._check_data_settings(state)

    def run(self) -> Path:
        """Train to `train.max_steps`; returns the path of the final official-layout weights."""
        self.say(f"stage 1: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                 f"{len(self.train_urls)} training shard(s), {len(self.val_urls)} validation shard(s), "
                 f"world size {self.ctx.world_size}, device {self.ctx.device}, "
                 f"{'bf16 autocast' if self.amp_dtype else 'fp32'}, step {self.step} -> {self.cfg.train.max_steps}")
        self.ddp.train()
        self._train_loop()
        return self.finish()

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = self.cfg.train
        loss, parts, stats = dpg_train_step(self.ddp, self.optimizer, batch, self.objective, t.grad_clip,
                                            self.amp_dtype, self.ctx.device)
        self.scheduler.step()
        return torch.stack([loss, *(parts[k] for k in LOSS_PARTS), *(stats[k] for k in HEAD_STATS)])

    def check_health(self, metrics: Mapping[str, float]) -> list[str]:
        return self.guard.check(self.step, metrics)

    def _plot(self) -> None:
        keys = [k for k in self.PLOT_KEYS if k != "train/bce" or self.objective.bce_weight]
        plot_metrics(self.out / METRICS_FILE, self.out / "loss.png", keys)
        plot_metrics(self.out / METRICS_FILE, self.out / "heads.png",
                     [f"train/grad_norm_{n}" for n in HEAD_NAMES] + ["train/mask_logit_absmax"])

    def extra_train_metrics(self) -> dict[str, float]:
        return {"train/lr": self.scheduler.get_last_lr()[0]}

    def train_summary(self, metrics: Mapping[str, float]) -> str:
        return (f"step {self.step}/{self.cfg.train.max_steps}  loss {metrics['train/loss']:.4f} "
                f"(hq {metrics['train/l1_hq']:.4f} res {metrics['train/l1_residual']:.4f} "
                f"dice {metrics['train/dice']:.4f} bce {metrics['train/bce']:.4f})  "
                f"|g| {metrics['train/grad_norm']:.3f} "
                f"(hq {metrics['train/grad_norm_hq']:.2e} res {metrics['train/grad_norm_residual']:.2e} "
                f"mask {metrics['train/grad_norm_mask']:.2e})  mask+ {100 * metrics['train/mask_pos_rate']:.0f}% "
                f"(true {100 * metrics['train/mask_true_rate']:.0f}%)  "
                f"lr {metrics['train/lr']:.2e}  {metrics['train/it_per_s']:.2f} it/s  "
                f"data wait {100 * metrics['train/data_wait_frac']:.0f}%")

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Loss and image grid on the fixed held-out batch (rank 0; the other ranks go on)."""
        if not self.ctx.is_main or self.val_batch is None:
            return None
        self.model.eval()
        try:
            loss, parts, preds = dpg_forward_loss(self.model, self.val_batch, self.objective,
                                                  self.amp_dtype, self.ctx.device)
        finally:
            self.model.train()
        metrics = {"val/loss": loss.item(), **{f"val/{k}": v.item() for k, v in parts.items()}}
        self._log_validation(metrics, validation_grid(self.val_batch, preds))
        return metrics

    def write_outputs(self, folder: Path) -> None:
        save_dpg(self.model, folder / DPG_WEIGHTS)
        write_dpg_sidecar(folder / DPG_WEIGHTS, self.model.cfg.to_swinir_kwargs())

    def finish(self) -> Path:
        return self._finish()[0]


def train(cfg: TrainDPGConfig, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run stage 1 in this process (joins the launcher's process group if there is one)."""
    ctx = init_distributed(cfg.train.device)
    return DPGTrainer(cfg, ctx, resume, log).run()


def main_dpg(args: argparse.Namespace) -> int:
    """`haodiff-train dpg` (arguments from haodiff_model.cli)."""
    return run_from_args(TrainDPGConfig, train, args)


__all__ = ["DPGTrainer", "DPG_WEIGHTS", "HEAD_STATS", "TrainDPGConfig", "TrainSettings", "dpg_forward_loss",
           "dpg_train_step", "head_parameters", "lr_factor", "main_dpg", "make_optimizer", "make_scheduler", "train", "validation_grid"]
