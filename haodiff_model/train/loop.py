"""What the stage-1 and stage-2 trainers share: the run config scaffolding (sections, YAML,
overrides), held-out validation data, and the `Trainer` base that owns the loop, logging,
checkpoints and the resume handshake. Each trainer supplies its models and its training step.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
    METRICS_FILE, CheckpointManager, MetricLogger, capture_rng, collect_state, plot_metrics, save_png,
)

# ShardStreamConfig fields that do not change which batches a rank gets
_STREAM_NEUTRAL = ("max_failures", "timeout_s", "pin_memory")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ValSettings:
    urls: tuple[str, ...] = ()
    samples: int = 4
    every: int = 1000

    def __post_init__(self) -> None:
        if self.samples < 1 or self.every < 0:
            raise ValueError(f"invalid samples={self.samples!r} (>= 1) or every={self.every!r} (>= 0, 0 = off)")


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


def load_val_batch(cfg: Any, val_urls: list[str]) -> dict[str, Any]:
    """The fixed validation batch: the first `val.samples` samples of the held-out stream (same for any world size)."""
    val_cfg = dataclasses.replace(cfg.data, urls=val_urls, batch_size=cfg.val.samples, num_workers=0,
                                  epoch_length=1, shuffle_buffer=cfg.val.samples, pin_memory=False)
    return next(iter(make_loader(val_cfg)))


def stream_settings(data: ShardStreamConfig, train_urls: list[str]) -> dict[str, Any]:
    """The data settings that decide which batches each rank reads (stored in checkpoints)."""
    d = dataclasses.asdict(data)
    d["urls"] = list(train_urls)
    for k in _STREAM_NEUTRAL:
        d.pop(k)
    return d


# ----------------------------------------------------------------------------- the trainer


class Trainer(abc.ABC):
    """The loop, logging, validation output, checkpoints and resume handshake of a trainer.

    A subclass builds its models in __init__ between `_initial_state` and `_start_run`, and gives:
    LOG_NAMES (the scalars `train_step` returns, in order), PLOT_KEYS, `train_step`, `models`,
    `optimizers`, `train_summary`, `validate`, `write_outputs(folder)` (the official files) and
    OUTPUT_FILES (their names); optionally `schedulers`, `generators` (explicit RNGs saved per
    rank), `extra_state` and `extra_train_metrics`.
    """

    STAGE: ClassVar[str] = ""  # the haodiff-train subcommand, stored in checkpoints
    LOG_NAMES: ClassVar[tuple[str, ...]] = ()
    PLOT_KEYS: ClassVar[tuple[str, ...]] = ()
    OUTPUT_FILES: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, ctx: DistContext, log: Callable[[str], None] = print):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.output.dir)
        self._log = log
        self.ckpts = CheckpointManager(self.out / "checkpoints", cfg.output.keep_last, enabled=ctx.is_main)
        self.step = 0

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            self._log(message)

    def _initial_state(self, resume: bool) -> dict[str, Any] | None:
        """Rank 0 finds and reads the checkpoint and sends it to all ranks (no shared disk needed)."""
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
        """Why `state` cannot be resumed by this trainer and config ("" when it can)."""
        # checkpoints written before the stage was stored are told apart by their models
        stage = state.get("stage") or ("dpg" if "dpg" in state["models"] else "osd")
        if stage != self.STAGE:
            return (f"{self.out} holds a stage-{'1' if stage == 'dpg' else '2'} run ({stage}): resume it with "
                    f"`haodiff-train {stage} --resume`, or give this {self.STAGE} run another output folder")
        if state["step"] > self.cfg.train.max_steps:
            return (f"the checkpoint in {self.out} is at step {state['step']}, beyond train.max_steps="
                    f"{self.cfg.train.max_steps}: pass a larger --max-steps to continue it")
        return ""

    def _check_data_settings(self, state: Mapping[str, Any]) -> None:
        if state["data"] != stream_settings(self.cfg.data, self.train_urls):
            self.say("data settings differ from the checkpoint's: the data stream restarts at the saved step "
                     "but is not the one the uninterrupted run would have read")

    def _start_run(self, resumed: bool) -> None:
        """Data streams, metrics and config.yaml, once the models are built (and restored)."""
        self.loader = build_train_loader(self.cfg, self.train_urls, self.ctx, self.step)
        self.val_batch = load_val_batch(self.cfg, self.val_urls) if self.ctx.is_main and self.cfg.val.every else None
        self.metrics = MetricLogger(self.out, self.ctx.is_main, self.cfg.output.tensorboard,
                                    resume_step=self.step if resumed else None)
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "config.yaml", "w") as f:
                yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)

    # hooks --------------------------------------------------------------------------------

    @abc.abstractmethod
    def train_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One update at `self.step`; the LOG_NAMES scalars stacked, on device (no host sync)."""

    @abc.abstractmethod
    def models(self) -> dict[str, nn.Module]:
        """The modules whose state dicts checkpoints hold, by name."""

    @abc.abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers checkpoints hold, by name."""

    def schedulers(self) -> dict[str, Any]:
        return {}

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def extra_train_metrics(self) -> dict[str, float]:
        return {}

    @abc.abstractmethod
    def train_summary(self, metrics: Mapping[str, float]) -> str:
        """The console line for a training log record."""

    @abc.abstractmethod
    def write_outputs(self, folder: Path) -> None:
        """Write OUTPUT_FILES into `folder`."""

    # the run -------------------------------------------------------------------------------

    def _train_loop(self) -> None:
        t, o = self.cfg.train, self.cfg.output
        dev = self.ctx.device
        sums = torch.zeros(len(self.LOG_NAMES), dtype=torch.float64, device=dev)
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
                scalars = self.train_step(batch)
                self.step += 1
                sums += scalars.to(torch.float64)
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

    def _log_train(self, means: torch.Tensor, count: int, wait: float, elapsed: float, batch_size: int) -> None:
        metrics = mean_scalars({f"train/{k}": v for k, v in zip(self.LOG_NAMES, means)}, self.ctx.device)
        if not math.isfinite(metrics["train/loss"]):
            raise FloatingPointError(f"step {self.step}: non-finite loss {metrics}; resume from the last checkpoint "
                                     f"({self.ckpts.latest()}) with a lower lr or stronger clipping")
        metrics.update(self.extra_train_metrics())
        metrics["train/it_per_s"] = count / elapsed
        metrics["train/samples_per_s"] = count * batch_size * self.ctx.world_size / elapsed
        metrics["train/data_wait_frac"] = wait / elapsed
        metrics["train/skipped_samples"] = self._skipped()
        if self.ctx.device.type == "cuda":
            metrics["train/max_mem_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        self.metrics.log(self.step, metrics)
        self.say(self.train_summary(metrics))

    @abc.abstractmethod
    def validate(self) -> dict[str, float] | None:
        """Validation losses and grid on the fixed held-out batch (rank 0); see `_log_validation`."""

    def _log_validation(self, metrics: Mapping[str, float], grid: np.ndarray) -> None:
        """Record validation losses (val/loss among them) and the image grid (rank 0)."""
        self.metrics.log(self.step, metrics)
        save_png(self.out / "val" / f"step-{self.step:08d}.png", grid)
        self.metrics.log_image("val/grid", self.step, grid)
        self.metrics.flush()
        self._plot()
        self.say(f"step {self.step}  val loss {metrics['val/loss']:.4f}")

    def _plot(self) -> None:
        plot_metrics(self.out / METRICS_FILE, self.out / "loss.png", list(self.PLOT_KEYS))

    def save(self) -> Path | None:
        """Resumable state of all ranks plus the official files, written by rank 0."""
        rng = all_gather_objects(capture_rng(self.generators()))
        if not self.ctx.is_main:
            return None
        state = collect_state(self.step, self.models(), self.optimizers(), self.schedulers(), rng=rng,
                              world_size=self.ctx.world_size, loader_step=self.loader.step,
                              data=stream_settings(self.cfg.data, self.train_urls), config=self.cfg.to_dict(),
                              stage=self.STAGE,
                              **self.extra_state())
        path = self.ckpts.save(self.step, state, extra=self.write_outputs)
        self.say(f"saved {path}")
        return path

    def _skipped(self) -> int:
        """Shards and samples the data loaders skipped so far, all ranks together (a collective call)."""
        mean = mean_scalars({"skipped": self.loader.skipped_total()}, self.ctx.device)["skipped"]
        return round(mean * self.ctx.world_size)

    def _finish(self) -> list[Path]:
        """The official files in the output folder (copied from the final checkpoint when it is this step's)."""
        files = [self.out / name for name in self.OUTPUT_FILES]
        skipped = self._skipped()
        if self.ctx.is_main:
            latest = self.ckpts.latest()
            if latest is not None and latest.name == self.ckpts.path_for(self.step).name:
                for f in files:
                    shutil.copyfile(latest / f.name, f)
            else:
                self.write_outputs(self.out)
            if (self.out / METRICS_FILE).is_file():
                self._plot()
            self.say(f"done at step {self.step}: {', '.join(str(f) for f in files)}; "
                     f"{skipped} shard(s) or sample(s) skipped by the data loader")
        self.metrics.close()
        barrier()
        return files


__all__ = ["OutputSettings", "Trainer", "ValSettings", "autocast_dtype",
           "build_train_loader", "load_val_batch", "run_from_args", "split_holdout",
           "stream_settings"]
