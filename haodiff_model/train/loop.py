"""What the stage-1 and stage-2 training loops share, as plain pieces they call: the run sections
(validation, output), held-out validation data, the batch stream across epochs, the step meter,
and `Run`, the output folder (resume handshake, logs, checkpoints, official files).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from haodiff_data.config import ConfigError
from haodiff_model.config import RunConfig
from haodiff_model.train.data import ShardLoader, ShardStreamConfig, make_loader, resolve_urls
from haodiff_model.train.distributed import (
    DistContext, all_gather_objects, barrier, broadcast_object, mean_scalars, shutdown_distributed,
)
from haodiff_model.train.state import (
    METRICS_FILE, CheckpointManager, MetricLogger, capture_rng, collect_state, plot_metrics, restore_rng, save_png,
)

# ShardStreamConfig fields that do not change which batches a rank gets
_STREAM_NEUTRAL = ("max_failures", "timeout_s", "pin_memory")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ValSettings:
    urls: tuple[str, ...] = ()
    samples: int = 6
    every: int = 1000
    scan: int = 64
    best_metric: str | None = None

    def __post_init__(self) -> None:
        if self.samples < 1 or self.every < 0 or self.scan < self.samples:
            raise ValueError(f"invalid samples={self.samples!r} (>= 1), every={self.every!r} (>= 0, 0 = off) or "
                             f"scan={self.scan!r} (>= samples)")
        if self.best_metric is not None and best_direction(self.best_metric) == 0:
            raise ValueError(f"best_metric={self.best_metric!r}: not a loss term ({', '.join(LOSS_TERMS)}) and "
                             f"its name does not say whether higher or lower is better (one of "
                             f"{', '.join(HIGHER_IS_BETTER + LOWER_IS_BETTER)} in it); or null")


# Validation metrics by the direction that is better: the loss terms by name (stage 1's `dice` is a
# loss, its `mask_dice` a score), the scores by what their name contains.
LOSS_TERMS = ("loss", "l1_hq", "l1_residual", "dice", "bce", "mse", "ea_dists", "gan")
LOWER_IS_BETTER = ("lpips", "dists")
HIGHER_IS_BETTER = ("psnr", "ssim", "dice", "iou")


def best_direction(metric: str) -> int:
    """+1 when a higher value of `metric` is better, -1 when lower, 0 when its name does not say."""
    name = metric.rsplit("/", 1)[-1]  # val/hmb/lpips -> lpips
    if name in LOSS_TERMS or any(k in name for k in LOWER_IS_BETTER):
        return -1
    return 1 if any(k in name for k in HIGHER_IS_BETTER) else 0


@dataclass(frozen=True)
class OutputSettings:
    dir: str = "runs"
    log_every: int = 50
    ckpt_every: int = 2000
    keep_last: int = 3
    tensorboard: bool = True

    def __post_init__(self) -> None:
        bad = [n for n in ("log_every", "ckpt_every", "keep_last") if getattr(self, n) < 1]
        if bad:
            raise ValueError("must be >= 1: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA when asked for; CPU always trains in fp32."""
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None


def run_from_args(config_cls: type[RunConfig], train: Callable[..., Any], args: argparse.Namespace) -> int:
    """A `haodiff-train` subcommand: build the config from `args`, train, leave the process group."""
    cfg = config_cls.from_args(args)
    try:
        train(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    return 0


# ----------------------------------------------------------------------------- data


def split_holdout(cfg: Any) -> tuple[list[str], list[str]]:
    """(training shards, validation shards) of a run config. Validation shards never train: explicit
    `val.urls` are removed from the training list; without them the last training shard is held
    out, unless validation is off (val.every = 0)."""
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


def build_train_loader(cfg: Any, train_urls: list[str], ctx: DistContext, start_step: int) -> ShardLoader:
    """This rank's batch stream, at batch `start_step` (each rank reads a different slice)."""
    return make_loader(dataclasses.replace(cfg.data, urls=train_urls), ctx.rank, ctx.world_size, start_step)


VAL_KINDS = ("hmb", "generic", "clean")


def sample_kind(mask: torch.Tensor, residual: torch.Tensor) -> str:
    """hmb: an HMB mask in view; clean: LQ == HQ; generic: any other degradation."""
    if mask.any():
        return "hmb"
    return "clean" if not residual.any() else "generic"


def load_val_batch(cfg: Any, val_urls: list[str]) -> dict[str, Any]:
    """The fixed validation batch (the same for any world size): `val.samples` samples taken in turn
    from each kind (HMB in view, other degradation, clean) among the first `val.scan` samples of the
    held-out stream, so that a small set does not miss a kind that set contains. `kind` lists them."""
    scan_cfg = dataclasses.replace(cfg.data, urls=val_urls, batch_size=1, num_workers=0, epoch_length=cfg.val.scan,
                                   shuffle_buffer=cfg.val.samples, pin_memory=False)
    by_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in VAL_KINDS}
    for sample in make_loader(scan_cfg):
        kind = sample_kind(sample["mask"], sample["residual"])
        if len(by_kind[kind]) < cfg.val.samples:
            by_kind[kind].append(sample)
    chosen: list[tuple[str, dict[str, Any]]] = []
    while len(chosen) < cfg.val.samples and any(by_kind.values()):
        for kind in VAL_KINDS:
            if by_kind[kind] and len(chosen) < cfg.val.samples:
                chosen.append((kind, by_kind[kind].pop(0)))
    if not chosen:
        raise ConfigError(f"val.urls: no readable sample in the held-out shards {val_urls}")
    batch: dict[str, Any] = {k: torch.cat([s[k] for _, s in chosen]) for k in ("hq", "lq", "residual", "mask")}
    batch["key"] = [s["key"][0] for _, s in chosen]
    batch["kind"] = [kind for kind, _ in chosen]
    return batch


def stream_settings(data: ShardStreamConfig, train_urls: list[str]) -> dict[str, Any]:
    """The data settings that decide which batches each rank reads (stored in checkpoints)."""
    d = dataclasses.asdict(data)
    d["urls"] = list(train_urls)
    for k in _STREAM_NEUTRAL:
        d.pop(k)
    return d


# ----------------------------------------------------------------------------- the run


def batches(loader: ShardLoader, max_steps: int, meter: TrainMeter) -> Iterator[dict[str, Any]]:
    """The loader's batches until it has delivered batch `max_steps`, across its epochs (each `for`
    pass over a ShardLoader is one epoch; the next pass continues the stream). The time spent
    waiting for each batch goes to `meter`."""
    while loader.step < max_steps:
        epoch = iter(loader)
        while loader.step < max_steps:
            start = time.perf_counter()
            batch = next(epoch, None)
            if batch is None:
                break
            meter.waited(time.perf_counter() - start)
            yield batch


class TrainMeter:
    """The logged scalars of the steps since the last report, summed on the device (no host sync per
    step), and the time they took; `report` averages them over steps and ranks."""

    def __init__(self, names: Sequence[str], ctx: DistContext):
        self.names, self.ctx = tuple(names), ctx
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=ctx.device)
        self.count, self.wait, self.tick = 0, 0.0, time.perf_counter()
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, scalars: torch.Tensor) -> None:
        """One step's scalars, in the order of `names`."""
        self.sums += scalars.to(torch.float64)
        self.count += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in the block (validation, checkpoints) does not count against it/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.tick += time.perf_counter() - start

    def report(self, batch_size: int) -> dict[str, float]:
        """train/<name> means over the steps and ranks, it/s, samples/s, data-wait fraction (and peak
        CUDA memory); starts the next window. A collective call."""
        elapsed = time.perf_counter() - self.tick
        means = self.sums / self.count
        metrics = mean_scalars({f"train/{k}": v for k, v in zip(self.names, means)}, self.ctx.device)
        metrics["train/it_per_s"] = self.count / elapsed
        metrics["train/samples_per_s"] = self.count * batch_size * self.ctx.world_size / elapsed
        metrics["train/data_wait_frac"] = self.wait / elapsed
        if self.ctx.device.type == "cuda":
            metrics["train/max_mem_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        self.sums.zero_()
        self.count, self.wait, self.tick = 0, 0.0, time.perf_counter()
        return metrics


def restore_rngs(state: Mapping[str, Any], rngs: Mapping[str, torch.Generator], ctx: DistContext) -> bool:
    """This rank's saved RNG states, when the checkpoint was written by as many ranks as there are now
    (True); on another world size nothing is restored and the caller re-derives its generators."""
    if state["world_size"] != ctx.world_size:
        return False
    restore_rng(state["rng"][ctx.rank], rngs)
    return True


class Run:
    """The output folder of one training run and what is written to it; every rank holds one, rank 0
    alone writes. The stages' loops call it to resume (`initial_state`), to start the logs
    (`start`), to log (`log_train`, `log_validation`), to checkpoint (`save`) and to end (`finish`).

    Folder: config.yaml, metrics.jsonl, tb/ (TensorBoard), val/step-*.png, loss.png,
    checkpoints/step-*/{state.pt, the official files}, and the official files at the end.
    """

    def __init__(self, cfg: Any, ctx: DistContext, stage: str, plot_keys: Sequence[str],
                 log: Callable[[str], None] | None = None):
        self.cfg, self.ctx, self.stage = cfg, ctx, stage
        self.out = Path(cfg.output.dir)
        self.plot_keys = list(plot_keys)
        self._log = log or logging.getLogger(__name__).info  # console setup: haodiff_model/log.py
        self.ckpts = CheckpointManager(self.out / "checkpoints", cfg.output.keep_last, enabled=ctx.is_main)
        self.metrics = MetricLogger(self.out, enabled=False)

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            self._log(message)

    def warn(self, message: str) -> None:
        """A warning (stderr, `<prog>: warning: ...`), said by rank 0 alone: the metrics behind it are
        all-reduced, so every rank would say the same."""
        if self.ctx.is_main:
            logging.getLogger(__name__).warning(message)

    def initial_state(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from (None: start fresh). Rank 0 finds and reads it and sends it to
        all ranks (no shared disk needed); a folder that cannot be resumed by this run raises."""
        decision: tuple[str, Any] | None = None
        if self.ctx.is_main:
            latest = self.ckpts.latest()
            if latest is not None and resume:
                state = CheckpointManager.load(latest)
                problem = self._resume_problem(state)
                decision = ("config", problem) if problem else ("resume", (str(latest), state))
            elif latest is not None:
                decision = ("exists", (f"{self.out} already holds checkpoints (latest: {latest}); pass --resume "
                                       "to continue that run or choose another output directory"))
            else:
                decision = ("fresh", "no checkpoint found, starting from scratch" if resume else "")
        kind, payload = broadcast_object(decision)
        if kind == "exists":
            raise FileExistsError(payload)
        if kind == "config":
            raise ConfigError(payload)
        if kind == "fresh":
            if payload:
                self.say(payload)
            return None
        path, state = payload
        self.say(f"resuming from {path} (step {state['step']})")
        return state

    def _resume_problem(self, state: Mapping[str, Any]) -> str:
        """Why `state` cannot be resumed by this run ("" when it can)."""
        # checkpoints written before the stage was stored are told apart by their models
        stage = state.get("stage") or ("dpg" if "dpg" in state["models"] else "osd")
        if stage != self.stage:
            return (f"{self.out} holds a stage-{'1' if stage == 'dpg' else '2'} run ({stage}): resume it with "
                    f"`haodiff-train {stage} --resume`, or give this {self.stage} run another output folder")
        if state["step"] > self.cfg.train.max_steps:
            return (f"the checkpoint in {self.out} is at step {state['step']}, beyond train.max_steps="
                    f"{self.cfg.train.max_steps}: pass a larger --max-steps to continue it")
        return ""

    def check_data_settings(self, state: Mapping[str, Any], train_urls: list[str]) -> None:
        now = stream_settings(self.cfg.data, train_urls)
        # a setting added after the checkpoint was written was at its default then
        defaults = {f.name: f.default for f in dataclasses.fields(ShardStreamConfig) if f.name in now}
        if {**defaults, **state["data"]} != now:
            self.say("data settings differ from the checkpoint's: the data stream restarts at the saved step "
                     "but is not the one the uninterrupted run would have read")

    def start(self, step: int, resumed: bool) -> None:
        """Open the metric logs (a resumed run drops the records after its checkpoint) and write config.yaml."""
        self.metrics = MetricLogger(self.out, self.ctx.is_main, self.cfg.output.tensorboard,
                                    resume_step=step if resumed else None)
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "config.yaml", "w") as f:
                yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)

    def log_train(self, step: int, metrics: Mapping[str, float], line: str) -> None:
        """A training record (stops the run on a non-finite loss) and its console line."""
        if not math.isfinite(metrics["train/loss"]):
            raise FloatingPointError(f"step {step}: non-finite loss {dict(metrics)}; resume from the last checkpoint "
                                     f"({self.ckpts.latest()}) with a lower lr or stronger clipping")
        self.metrics.log(step, metrics)
        self.say(line)

    def log_validation(self, step: int, metrics: Mapping[str, float], grid: np.ndarray,
                       write_outputs: Callable[[Path], Any]) -> None:
        """Validation metrics and the image grid (rank 0); with `val.best_metric`, the official files
        of the best validation so far go to best/ (best.json says its step and value)."""
        self.metrics.log(step, metrics)
        save_png(self.out / "val" / f"step-{step:08d}.png", grid)
        self.metrics.log_image("val/grid", step, grid)
        self.metrics.flush()
        self._plot()
        shown = "  ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items())
        self.say(f"step {step}  val  {shown}")
        metric = self.cfg.val.best_metric
        if metric is None:
            return
        if metric not in metrics:
            raise ConfigError(f"val.best_metric={metric!r} is not among this stage's validation metrics: "
                              f"{', '.join(sorted(metrics))}")
        best_file = self.out / "best" / "best.json"
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        value = metrics[metric]
        if not math.isfinite(value):  # e.g. mask_iou on a batch without HMB: nothing to compare
            return
        if best is None or (value - best["value"]) * best_direction(metric) > 0:
            staging = self.out / "best.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            write_outputs(staging)
            (staging / "best.json").write_text(json.dumps({"step": step, "metric": metric, "value": value}))
            shutil.rmtree(self.out / "best", ignore_errors=True)
            staging.rename(self.out / "best")
            self.say(f"step {step}  new best {metric} {value:.4f} -> {self.out / 'best'}")

    def _plot(self) -> None:
        plot_metrics(self.out / METRICS_FILE, self.out / "loss.png", self.plot_keys)

    def save(self, step: int, loader: ShardLoader, train_urls: list[str], models: Mapping[str, nn.Module],
             optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
             rngs: Mapping[str, torch.Generator], write_outputs: Callable[[Path], Any],
             **extra: Any) -> Path | None:
        """Checkpoint `step`: the resumable state (every rank's RNGs) and the official files that
        `write_outputs(folder)` writes, by rank 0. A collective call."""
        rng = all_gather_objects(capture_rng(rngs))
        if not self.ctx.is_main:
            return None
        state = collect_state(step, models, optimizers, schedulers, rng=rng, world_size=self.ctx.world_size,
                              loader_step=loader.step, data=stream_settings(self.cfg.data, train_urls),
                              config=self.cfg.to_dict(), stage=self.stage, **extra)
        path = self.ckpts.save(step, state, extra=write_outputs)
        self.say(f"saved {path}")
        return path

    def skipped(self, loader: ShardLoader) -> int:
        """Shards and samples the data loaders skipped so far, all ranks together. A collective call."""
        mean = mean_scalars({"skipped": loader.skipped_total()}, self.ctx.device)["skipped"]
        return round(mean * self.ctx.world_size)

    def finish(self, step: int, names: Sequence[str], write_outputs: Callable[[Path], Any],
               loader: ShardLoader) -> list[Path]:
        """The official files in the output folder (copied from the final checkpoint when it is this step's)."""
        files = [self.out / name for name in names]
        skipped = self.skipped(loader)
        if self.ctx.is_main:
            latest = self.ckpts.latest()
            if latest is not None and latest.name == self.ckpts.path_for(step).name:
                for f in files:
                    shutil.copyfile(latest / f.name, f)
            else:
                write_outputs(self.out)
            if (self.out / METRICS_FILE).is_file():
                self._plot()
            self.say(f"done at step {step}: {', '.join(str(f) for f in files)}; "
                     f"{skipped} shard(s) or sample(s) skipped by the data loader")
        self.metrics.close()
        barrier()
        return files


__all__ = ["HIGHER_IS_BETTER", "LOSS_TERMS", "LOWER_IS_BETTER", "OutputSettings", "Run", "TrainMeter", "VAL_KINDS",
           "ValSettings", "autocast_dtype", "batches", "best_direction", "build_train_loader", "load_val_batch",
           "restore_rngs", "run_from_args", "sample_kind", "split_holdout", "stream_settings"]
