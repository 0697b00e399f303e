"""Stage 1 trainer: the triple-branch DPG on streamed shards (paper Sec. 3.2, Eq. 4-5; Sec. 4.1).

LQ -> DPGNetwork -> [HQ, residual, mask logits]; loss L1(HQ) + L1(LQ - HQ) + 0.02 Dice(sigmoid(mask));
Adam (lr 2e-3, default betas), constant learning rate unless the config asks for warm-up/cosine
(the paper gives no schedule); bf16 autocast on CUDA, fp32 on CPU; gradient-norm clipping. Every
rank reads its own slice of the shard stream; DDP averages the gradients. Rank 0 alone logs,
validates and writes files. Validation uses a fixed batch from held-out shards (`val.urls`, or
else the last training shard, which is then excluded from training).

Outputs under `output.dir`: metrics.jsonl, tb/ (TensorBoard), val/step-*.png (grids: HQ | LQ |
pred HQ | residual | pred residual | mask | pred mask), loss.png, config.yaml,
checkpoints/step-*/{state.pt, dpg.pth} and, at the end, dpg.pth (official-layout stage-1 weights,
the file the official adapter loads as `pretrained_swinir`).

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
import dataclasses
import math
import re
import shutil
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from haodiff_model.checkpoint import load_dpg_weights, save_dpg
from haodiff_model.data import ShardLoader, ShardStreamConfig, make_loader, resolve_urls
from haodiff_model.distributed import (
    DistContext, all_gather_objects, barrier, broadcast_object, init_distributed, mean_scalars, shutdown_distributed,
    wrap_ddp,
)
from haodiff_model.dpg import ConfigError, DPGConfig, DPGNetwork, config_from_mapping
from haodiff_model.losses import stage1_loss
from haodiff_model.train_state import (
    METRICS_FILE, CheckpointManager, MetricLogger, apply_state, capture_rng, collect_state, derive_seed, image_grid,
    plot_metrics, restore_rng, save_png, to_rgb_uint8,
)

SCHEDULERS = ("constant", "cosine")
PRECISIONS = ("bf16", "fp32")
DPG_WEIGHTS = "dpg.pth"
LOSS_PARTS = ("l1_hq", "l1_residual", "dice")
_DROP_PATH_STREAM = 101  # seed tag of the drop-path generators, apart from the data streams' tags
# ShardStreamConfig fields that do not change which batches a rank gets
_STREAM_NEUTRAL = ("max_failures", "timeout_s", "pin_memory")


def _scalar_ok(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int to isinstance, but true/false is no step count
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _check_types(obj: Any) -> None:
    """Reject values of the wrong scalar type by field name (YAML typos such as lr: abc)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if not all(k in (int, float, str, bool, type(None)) for k in kinds):
            continue  # containers are checked by the owner's own validation
        if not any(_scalar_ok(value, k) for k in kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{f.name} must be {names}, got {value!r}")


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 20_000
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    dice_weight: float = 0.02
    scheduler: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "bf16"
    seed: int = 0
    init_weights: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        checks = {
            "max_steps": self.max_steps >= 1,
            "lr": self.lr > 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "dice_weight": self.dice_weight >= 0,
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
                             f" (scheduler: {SCHEDULERS}, precision: {PRECISIONS}, device: cuda|cpu|null)")


@dataclass(frozen=True)
class ValSettings:
    urls: tuple[str, ...] = ()
    samples: int = 4
    every: int = 1000

    def __post_init__(self) -> None:
        _check_types(self)
        if self.samples < 1 or self.every < 0:
            raise ValueError(f"invalid samples={self.samples!r} (>= 1) or every={self.every!r} (>= 0, 0 = off)")


@dataclass(frozen=True)
class OutputSettings:
    dir: str = "runs/dpg"
    log_every: int = 50
    ckpt_every: int = 2000
    keep_last: int = 3
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        bad = [n for n in ("log_every", "ckpt_every", "keep_last") if getattr(self, n) < 1]
        if bad:
            raise ValueError("must be >= 1: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))


def _default_data() -> ShardStreamConfig:
    return ShardStreamConfig(urls=["shards/*.tar"])


@dataclass(frozen=True)
class TrainDPGConfig:
    """The whole stage-1 run; YAML sections model / data / train / val / output (see pipelines/train_dpg.yaml)."""

    model: DPGConfig = field(default_factory=DPGConfig)
    data: ShardStreamConfig = field(default_factory=_default_data)
    train: TrainSettings = field(default_factory=TrainSettings)
    val: ValSettings = field(default_factory=ValSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "TrainDPGConfig") -> "TrainDPGConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(sections)}")
        section_types = {"model": DPGConfig, "data": ShardStreamConfig, "train": TrainSettings,
                         "val": ValSettings, "output": OutputSettings}
        kwargs = {}
        for name, value in data.items():
            value = {} if value is None else value
            if name == "data" and isinstance(value, Mapping) and "urls" not in value:
                value = {**value, "urls": list(_default_data().urls)}
            kwargs[name] = config_from_mapping(section_types[name], value, f"{where}:{name}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> "TrainDPGConfig":
        """Load `path`, then apply "section.key=value" overrides (values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist")
        with path.open() as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        return cls.from_dict(apply_overrides(data, overrides), str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (tuples as lists); from_dict(to_dict()) == self."""
        def plain(v: Any) -> Any:
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v
        return {f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                for f in dataclasses.fields(self)}


_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)  # PyYAML reads "2e-3" as a string (YAML 1.1 floats need a dot)
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each "section.key=value" applied; unknown names surface in from_dict."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-3")
        current = out.get(section)
        if current is None:
            current = out[section] = {}
        elif not isinstance(current, dict):
            raise ConfigError(f"override {item!r}: section {section!r} is not a mapping")
        current[key] = _parse_value(text)
    return out


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


def autocast_dtype(t: TrainSettings, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA when asked for; CPU always trains in fp32."""
    return torch.bfloat16 if t.precision == "bf16" and device.type == "cuda" else None


def dpg_forward_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], dice_weight: float,
                     amp_dtype: torch.dtype | None, device: torch.device
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """LQ -> predictions -> stage-1 loss (computed in fp32). Returns (loss, parts, predictions)."""
    lq, hq, residual, mask = (batch[k].to(device, non_blocking=True) for k in ("lq", "hq", "residual", "mask"))
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        preds = model(lq)
    preds = [p.float() for p in preds]
    loss, parts = stage1_loss(*preds, hq, residual, mask, dice_weight)
    return loss, parts, preds


def dpg_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
                   dice_weight: float = 0.02, grad_clip: float | None = 1.0, amp_dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer update on `batch`; returns (loss, parts, pre-clip gradient norm), all on device (no sync)."""
    device = device or next(model.parameters()).device
    loss, parts, _ = dpg_forward_loss(model, batch, dice_weight, amp_dtype, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip is not None else math.inf)
    optimizer.step()
    return loss.detach(), parts, norm.detach()


def split_holdout(cfg: TrainDPGConfig) -> tuple[list[str], list[str]]:
    """(training shards, validation shards). Validation shards never train: explicit `val.urls` are
    removed from the training list; without them the last training shard is held out, unless
    validation is off (val.every = 0)."""
    train = resolve_urls(cfg.data.urls)
    if cfg.val.urls:
        val = resolve_urls(cfg.val.urls)
        held = set(val)
        train = [u for u in train if u not in held]
        if not train:
            raise ConfigError(f"every training shard is also a validation shard (val.urls={list(cfg.val.urls)})")
        return train, val
    if not cfg.val.every:
        return train, []
    if len(train) < 2:
        raise ConfigError(f"data.urls {list(cfg.data.urls)} gives {len(train)} shard(s); holding one out for "
                          "validation needs >= 2: set val.urls to held-out shards, or val.every=0")
    return train[:-1], train[-1:]


def build_train_loader(cfg: TrainDPGConfig, train_urls: list[str], ctx: DistContext, start_step: int) -> ShardLoader:
    """This rank's batch stream, at batch `start_step` (each rank reads a different slice)."""
    return make_loader(dataclasses.replace(cfg.data, urls=train_urls), ctx.rank, ctx.world_size, start_step)


def load_val_batch(cfg: TrainDPGConfig, val_urls: list[str]) -> dict[str, Any]:
    """The fixed validation batch: the first `val.samples` samples of the held-out stream (same for any world size)."""
    val_cfg = dataclasses.replace(cfg.data, urls=val_urls, batch_size=cfg.val.samples, num_workers=0,
                                  epoch_length=1, shuffle_buffer=cfg.val.samples, pin_memory=False)
    return next(iter(make_loader(val_cfg)))


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


def _stream_settings(cfg: TrainDPGConfig, train_urls: list[str]) -> dict[str, Any]:
    d = dataclasses.asdict(cfg.data)
    d["urls"] = list(train_urls)
    for k in _STREAM_NEUTRAL:
        d.pop(k)
    return d


class DPGTrainer:
    """Stage-1 training loop; build it on every rank, then `run()`."""

    def __init__(self, cfg: TrainDPGConfig, ctx: DistContext, resume: bool = False,
                 log: Callable[[str], None] = print):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.output.dir)
        self._log = log
        self.ckpts = CheckpointManager(self.out / "checkpoints", cfg.output.keep_last, enabled=ctx.is_main)
        state = self._initial_state(resume)
        self.train_urls, self.val_urls = split_holdout(cfg)

        t = cfg.train
        self.model = DPGNetwork(cfg.model, torch.Generator().manual_seed(t.seed))
        if state is None and t.init_weights:
            self.say(str(load_dpg_weights(self.model, t.init_weights)))
        self.model.to(ctx.device)
        self.drop_path_gen = torch.Generator(device=ctx.device)
        self.model.set_drop_path_generator(self.drop_path_gen)
        self.optimizer = make_optimizer(self.model.parameters(), t, ctx.device)
        self.scheduler = make_scheduler(self.optimizer, t)
        self.amp_dtype = autocast_dtype(t, ctx.device)
        self.step = 0
        if state is None:
            self.drop_path_gen.manual_seed(derive_seed(t.seed, _DROP_PATH_STREAM, ctx.rank, 0))
        else:
            self._restore(state)
        self.ddp = wrap_ddp(self.model, ctx)
        self.loader = build_train_loader(cfg, self.train_urls, ctx, self.step)
        self.val_batch = load_val_batch(cfg, self.val_urls) if ctx.is_main and cfg.val.every else None
        self.metrics = MetricLogger(self.out, ctx.is_main, cfg.output.tensorboard,
                                    resume_step=self.step if state is not None else None)
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "config.yaml", "w") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            self._log(message)

    def _initial_state(self, resume: bool) -> dict[str, Any] | None:
        """Rank 0 finds and reads the checkpoint and sends it to all ranks (no shared disk needed)."""
        decision: tuple[str, Any] | None = None
        if self.ctx.is_main:
            latest = self.ckpts.latest()
            if latest is not None and resume:
                decision = ("resume", (str(latest), CheckpointManager.load(latest)))
            elif latest is not None:
                decision = ("error", (f"{self.out} already holds checkpoints (latest: {latest}); pass --resume "
                                      "to continue that run or choose another output directory"))
            else:
                decision = ("fresh", "no checkpoint found, starting from scratch" if resume else "")
        kind, payload = broadcast_object(decision)
        if kind == "error":
            raise FileExistsError(payload)
        if kind == "fresh":
            if payload:
                self.say(payload)
            return None
        path, state = payload
        self.say(f"resuming from {path} (step {state['step']})")
        return state

    def _restore(self, state: Mapping[str, Any]) -> None:
        saved_model = dict(state["config"]["model"])
        current = self.cfg.to_dict()["model"]
        diff = sorted(k for k in current if k != "attention" and saved_model.get(k) != current[k])
        if diff:
            raise ConfigError(f"the checkpoint's model config differs in {diff}: "
                              + ", ".join(f"{k}: {saved_model.get(k)!r} -> {current[k]!r}" for k in diff))
        self.step = apply_state(state, {"dpg": self.model}, {"adam": self.optimizer}, {"lr": self.scheduler})
        rank, world = self.ctx.rank, self.ctx.world_size
        if state["world_size"] == world:
            restore_rng(state["rng"][rank], {"drop_path": self.drop_path_gen})
        else:
            self.drop_path_gen.manual_seed(derive_seed(self.cfg.train.seed, _DROP_PATH_STREAM, rank, self.step))
            self.say(f"world size {state['world_size']} -> {world}: model, optimizer, scheduler and step restored "
                     "exactly; data streams and drop-path RNG re-derived for the new world (not an exact resume)")
        if state["data"] != _stream_settings(self.cfg, self.train_urls):
            self.say("data settings differ from the checkpoint's: the data stream restarts at the saved step "
                     "but is not the one the uninterrupted run would have read")

    def run(self) -> Path:
        """Train to `train.max_steps`; returns the path of the final official-layout weights."""
        t, o = self.cfg.train, self.cfg.output
        dev = self.ctx.device
        self.say(f"stage 1: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                 f"{len(self.train_urls)} training shard(s), {len(self.val_urls)} validation shard(s), "
                 f"world size {self.ctx.world_size}, device {dev}, "
                 f"{'bf16 autocast' if self.amp_dtype else 'fp32'}, step {self.step} -> {t.max_steps}")
        self.ddp.train()
        sums = torch.zeros(len(LOSS_PARTS) + 2, dtype=torch.float64, device=dev)  # loss, parts, grad norm
        count, wait, tick = 0, 0.0, time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        while self.step < t.max_steps:
            batches = iter(self.loader)
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break  # end of the loader's epoch: the next pass continues the stream
                wait += time.perf_counter() - t0
                loss, parts, norm = dpg_train_step(self.ddp, self.optimizer, batch, t.dice_weight, t.grad_clip,
                                                   self.amp_dtype, dev)
                self.scheduler.step()
                self.step += 1
                sums += torch.stack([loss, *(parts[k] for k in LOSS_PARTS), norm]).to(torch.float64)
                count += 1
                if self.loader.step != self.step:
                    raise RuntimeError(f"loader at batch {self.loader.step} but trainer at step {self.step}")
                last = self.step == t.max_steps
                if self.step % o.log_every == 0 or last:
                    self._log_train(sums / count, count, wait, time.perf_counter() - tick, batch["hq"].shape[0])
                    sums.zero_()
                    count, wait, tick = 0, 0.0, time.perf_counter()
                paused = time.perf_counter()
                if self.cfg.val.every and (self.step % self.cfg.val.every == 0 or last):
                    self.validate()
                if self.step % o.ckpt_every == 0 or last:
                    self.save()
                tick += time.perf_counter() - paused  # validation and checkpoints stay out of it/s
        return self.finish()

    def _log_train(self, means: torch.Tensor, count: int, wait: float, elapsed: float, batch_size: int) -> None:
        names = ["train/loss", *(f"train/{k}" for k in LOSS_PARTS), "train/grad_norm"]
        metrics = mean_scalars(dict(zip(names, means)), self.ctx.device)
        if not math.isfinite(metrics["train/loss"]):
            raise FloatingPointError(f"step {self.step}: non-finite loss {metrics}; resume from the last checkpoint "
                                     f"({self.ckpts.latest()}) with a lower lr or stronger clipping")
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/it_per_s"] = count / elapsed
        metrics["train/samples_per_s"] = count * batch_size * self.ctx.world_size / elapsed
        metrics["train/data_wait_frac"] = wait / elapsed
        if self.ctx.device.type == "cuda":
            metrics["train/max_mem_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        self.metrics.log(self.step, metrics)
        self.say(f"step {self.step}/{self.cfg.train.max_steps}  loss {metrics['train/loss']:.4f} "
                 f"(hq {metrics['train/l1_hq']:.4f} res {metrics['train/l1_residual']:.4f} "
                 f"dice {metrics['train/dice']:.4f})  |g| {metrics['train/grad_norm']:.3f}  "
                 f"lr {metrics['train/lr']:.2e}  {metrics['train/it_per_s']:.2f} it/s  "
                 f"data wait {100 * metrics['train/data_wait_frac']:.0f}%")

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Loss and image grid on the fixed held-out batch (rank 0; the other ranks go on)."""
        if not self.ctx.is_main or self.val_batch is None:
            return None
        self.model.eval()
        try:
            loss, parts, preds = dpg_forward_loss(self.model, self.val_batch, self.cfg.train.dice_weight,
                                                  self.amp_dtype, self.ctx.device)
        finally:
            self.model.train()
        metrics = {"val/loss": loss.item(), **{f"val/{k}": v.item() for k, v in parts.items()}}
        self.metrics.log(self.step, metrics)
        grid = validation_grid(self.val_batch, preds)
        save_png(self.out / "val" / f"step-{self.step:08d}.png", grid)
        self.metrics.log_image("val/grid", self.step, grid)
        self.metrics.flush()
        plot_metrics(self.out / METRICS_FILE, self.out / "loss.png",
                     ["train/loss", *(f"train/{k}" for k in LOSS_PARTS), "val/loss"])
        self.say(f"step {self.step}  val loss {metrics['val/loss']:.4f}")
        return metrics

    def save(self) -> Path | None:
        """Resumable state of all ranks plus official-layout weights, written by rank 0."""
        rng = all_gather_objects(capture_rng({"drop_path": self.drop_path_gen}))
        if not self.ctx.is_main:
            return None
        state = collect_state(self.step, {"dpg": self.model}, {"adam": self.optimizer}, {"lr": self.scheduler},
                              rng=rng, world_size=self.ctx.world_size, loader_step=self.loader.step,
                              data=_stream_settings(self.cfg, self.train_urls), config=self.cfg.to_dict())
        path = self.ckpts.save(self.step, state, extra=lambda folder: save_dpg(self.model, folder / DPG_WEIGHTS))
        self.say(f"saved {path}")
        return path

    def finish(self) -> Path:
        final = self.out / DPG_WEIGHTS
        if self.ctx.is_main:
            latest = self.ckpts.latest()
            if latest is not None and latest.name == self.ckpts.path_for(self.step).name:
                shutil.copyfile(latest / DPG_WEIGHTS, final)
            else:
                save_dpg(self.model, final)
            if (self.out / METRICS_FILE).is_file():
                plot_metrics(self.out / METRICS_FILE, self.out / "loss.png",
                             ["train/loss", *(f"train/{k}" for k in LOSS_PARTS), "val/loss"])
            self.say(f"done at step {self.step}: {final}")
        self.metrics.close()
        barrier()
        return final


def train(cfg: TrainDPGConfig, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run stage 1 in this process (joins the launcher's process group if there is one)."""
    ctx = init_distributed(cfg.train.device)
    return DPGTrainer(cfg, ctx, resume, log).run()


def config_from_args(args: argparse.Namespace) -> TrainDPGConfig:
    """The YAML at args.config with --set overrides, then --max-steps and --out."""
    cfg = TrainDPGConfig.from_yaml(args.config, list(args.set or []))
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, train=config_from_mapping(
            TrainSettings, {**dataclasses.asdict(cfg.train), "max_steps": args.max_steps}, "--max-steps"))
    if args.out is not None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(args.out)))
    return cfg


def main_dpg(args: argparse.Namespace) -> int:
    """`haodiff-train dpg` (arguments from haodiff_model.cli)."""
    cfg = config_from_args(args)
    try:
        train(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    return 0


__all__ = ["DPGTrainer", "DPG_WEIGHTS", "OutputSettings", "TrainDPGConfig", "TrainSettings", "ValSettings",
           "apply_overrides", "autocast_dtype", "build_train_loader", "config_from_args", "dpg_forward_loss",
           "dpg_train_step", "load_val_batch", "lr_factor", "main_dpg", "make_optimizer", "make_scheduler",
           "split_holdout", "train", "validation_grid"]
