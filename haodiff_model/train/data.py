"""Streaming schema-v1 shards into training batches (WebDataset, multi-node, resumable).

Per rank, the loader yields an endless sequence of batches, cut into epochs of
``epoch_length`` batches. Batch tensors:

  hq, lq    float32 (B,3,H,W) RGB, x = (u8 - 127.5) / 127.5, in [-1, 1]
  residual  float32 (B,3,H,W) = schema.residual(HQ, LQ) / 127.5, in [-2, 2]; equals lq - hq up to
            float32 rounding (|error| <= 2.4e-7). Computed from the two PNGs, which schema v1
            guarantees equal to the stored ``residual.npy.gz`` (so that member is not read).
  mask      float32 (B,1,H,W) in {0, 1} (mask.png >= 128)
  key       list of B sample keys

How the stream is built (epoch ``e``, rank ``r`` of ``R``, DataLoader worker ``w`` of ``W``):
one shard sequence per epoch, drawn with replacement by ``ResampledShards(deterministic=True)``
from seed (seed, e), is the same on every rank and worker; the node split keeps every R-th draw
from position r, the worker split every W-th of those. So each (rank, worker) reads a disjoint
slice of the draws and every rank sees different data. Samples are shuffled in a per-(e, r, w)
seeded buffer, decoded by the shard schema (haodiff_data.shards.schema), cropped / flipped with a
per-sample generator, and batched in the worker. ``WebLoader(...).with_epoch(n)`` cuts the epoch on the loader side.

Exact resume: batch ``j`` of a rank depends only on the config (shards, seed, batch size, workers,
world size, epoch length, shuffle buffer, crop, flip) and ``j``. ``make_loader(..., start_step=k)``
yields batch k, k+1, ... exactly as an uninterrupted run would. It skips the first batches of the
epoch containing ``k`` without decoding them (raw samples are dropped after the shuffle buffer),
so it is exact unless a sample in that skipped part fails PNG decoding (a corrupt member in an
otherwise readable sample); then the resumed epoch is shifted by that many samples. Changing the
number of workers or ranks changes the sequence.

Corrupt shards (unreadable tar) and bad samples (unknown schema, missing members, undecodable
PNG) are skipped, counted per worker (``ShardLoader.worker_stats``) and warned about in the main
process with the shard and key. A worker that meets ``max_failures`` failures in a row with no
good sample raises, and the DataLoader ``timeout_s`` turns any other stall into an error.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from haodiff_data.config import ConfigError
from haodiff_data.shards.reader import expand_shards
from haodiff_data.shards.schema import MEMBERS, SchemaError, decode_png, parse_meta, residual

# Only these members are read into memory; residual and parts are not needed for training.
_NEEDED = tuple(m for m in MEMBERS if m in ("hq.png", "lq.png", "mask.png", "json"))

# Seed-stream tags, so the shard, shuffle and augmentation generators never share a seed.
_SHARD_STREAM, _SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1, 2


class DataSkipWarning(UserWarning):
    """A shard or sample was skipped by the training loader."""


@dataclass
class ShardStreamConfig:
    urls: Sequence[str] = ("shards/*.tar",)  # shard files, folders (their *.tar), globs, brace patterns or remote URLs
    batch_size: int = 16
    num_workers: int = 4  # DataLoader workers per rank; 0 decodes in the main process
    seed: int = 0
    epoch_length: int = 1000  # batches per epoch, per rank
    shuffle_buffer: int = 256  # samples per worker; ~0.8 MB each at 512x512
    crop_size: int | None = None  # random square crop; None keeps full images (all the same size)
    hflip: bool = False  # flip hq, lq, mask (and so the residual) together with probability 0.5
    rot90: bool = False  # rotate hq, lq, mask together by 0, 90, 180 or 270 degrees, uniformly (square images)
    channel_shuffle: bool = False  # put hq's and lq's R, G, B in one of the 6 orders, the same for both
    max_failures: int = 100  # failed shard reads or decodes in a row before a worker gives up
    timeout_s: float = 600.0  # DataLoader error if no batch arrives from a worker for this long
    pin_memory: bool = True  # page-locked batches (only with CUDA)

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            self.urls = [self.urls]
        checks = {
            "urls": len(self.urls) > 0,
            "batch_size": self.batch_size >= 1,
            "num_workers": self.num_workers >= 0,
            "seed": self.seed >= 0,
            "epoch_length": self.epoch_length >= 1,
            "shuffle_buffer": self.shuffle_buffer >= 1,
            "crop_size": self.crop_size is None or self.crop_size >= 1,
            "max_failures": self.max_failures >= 1,
            "timeout_s": self.timeout_s >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"ShardStreamConfig: invalid {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")


def resolve_urls(specs: Sequence[str]) -> list[str]:
    """Shard URLs from local files, folders, globs and brace patterns; remote URLs kept as is."""
    urls: list[str] = []
    for spec in specs:
        expanded = wds.shardlists.expand_urls(spec)
        if "://" in spec or spec.startswith("pipe:"):
            urls.extend(expanded)
        else:
            urls.extend(str(p) for p in expand_shards(expanded))
    if not urls:
        raise FileNotFoundError(f"no shards found in {list(specs)}")
    return urls


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint32)[0])


def _same_stream_everywhere() -> int:
    """``worker_seed`` for ResampledShards: every rank and worker draws the same shard sequence."""
    return 0


def _every(source: Iterator[Any], start: int, step: int) -> Iterator[Any]:
    return islice(source, start, None, step)


@dataclass
class _WorkerReport:
    """What one worker tells the main process along with each batch."""

    worker: int
    busy_s: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)


class _WorkerStream:
    """The per-worker pipeline of one epoch: shard draws -> samples -> shuffled -> batches."""

    def __init__(self, cfg: ShardStreamConfig, urls: list[str], rank: int, world_size: int,
                 epoch: int, offset: int, worker: int, num_workers: int):
        self.cfg = cfg
        self.worker = worker
        # Batch i of the epoch comes from virtual worker i % W; the DataLoader always starts at
        # physical worker 0, so a resumed epoch (offset > 0) rotates the roles.
        virtual = (offset + worker) % num_workers
        self.skip_samples = (offset + worker) // num_workers * cfg.batch_size
        self.augment_seed = (cfg.seed, _AUGMENT_STREAM, epoch, rank, virtual)
        self.failures = 0  # failed shard reads and decodes since the last good sample
        self.current_url = ""
        self.draw_good = True  # the current shard draw gave a valid sample
        self.draw_reported = False  # ... or a skip was already reported for it
        self.report = _WorkerReport(worker)
        self.pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=_seed(cfg.seed, _SHARD_STREAM, epoch),
                                worker_seed=_same_stream_everywhere, deterministic=True),
            lambda src: _every(src, rank, world_size),  # split by node
            lambda src: _every(src, virtual, num_workers),  # split by worker
            self._watch_shards,
            wds.tarfile_to_samples(handler=self._on_tar_error, select_files=_is_needed),
            self._validate,
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer,
                        seed=_seed(cfg.seed, _SHUFFLE_STREAM, epoch, rank, virtual)),
            self._decode,
            self._batches,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.pipeline)

    def _skip(self, kind: str, message: str) -> None:
        self.report.skipped.append((kind, message))
        self.draw_reported = True

    def _failed(self, message: str) -> None:
        self.failures += 1
        if self.failures >= self.cfg.max_failures:
            raise RuntimeError(
                f"data worker {self.worker}: {self.failures} failed shard reads or decodes in a row "
                f"without a usable sample; the shards look unusable. Last: {message}"
            )

    def _watch_shards(self, urls: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
        for item in urls:
            if not self.draw_good:
                message = f"shard {self.current_url}: no usable sample"
                if not self.draw_reported:
                    self._skip("shard", message)
                self._failed(message)
            self.current_url, self.draw_good, self.draw_reported = item["url"], False, False
            yield item

    def _on_tar_error(self, exn: Exception) -> bool:
        # A truncated tar can raise twice (member, then stream); report the shard once per draw.
        if not self.draw_reported:
            reason = exn.args[0] if exn.args else ""
            self._skip("shard", f"shard {self.current_url}: unreadable tar ({type(exn).__name__}: {reason})")
        return True

    def _validate(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Cheap checks before buffering: members present, schema version known."""
        for sample in samples:
            where = f"{sample.get('__url__', self.current_url)}:{sample.get('__key__')}"
            try:
                missing = [m for m in _NEEDED if m not in sample]
                if missing:
                    raise SchemaError(f"{where}: missing members {missing}")
                parse_meta(sample["json"], where)
            except SchemaError as exn:
                self._skip("sample", f"skipped sample {exn}")
                continue
            self.draw_good = True
            yield sample

    def _decode(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for ordinal, sample in enumerate(samples):
            if ordinal < self.skip_samples:
                continue  # resume: these batches were consumed before
            where = f"{sample['__url__']}:{sample['__key__']}"
            try:
                hq, lq, mask = _decode_images(sample, where)
                if self.cfg.crop_size is not None or self.cfg.hflip or self.cfg.rot90 or self.cfg.channel_shuffle:
                    rng = np.random.default_rng([*self.augment_seed, ordinal])
                    hq, lq, mask = _augment(hq, lq, mask, self.cfg, rng, where)
            except SchemaError as exn:
                self.report.skipped.append(("decode", f"skipped sample {exn}"))
                self._failed(str(exn))
                continue
            self.failures = 0
            yield {"key": sample["__key__"], "hq": hq, "lq": lq, "mask": mask}

    def _batches(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        while True:
            start = time.perf_counter()
            batch = list(islice(samples, self.cfg.batch_size))
            if len(batch) < self.cfg.batch_size:
                return
            out = _collate(batch)
            self.report.busy_s = time.perf_counter() - start
            out["_report"] = self.report
            yield out
            self.report = _WorkerReport(self.worker)


def _is_needed(fname: str) -> bool:
    return fname.split("/")[-1].partition(".")[2].lower() in _NEEDED


def _decode_images(sample: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hq, lq as HxWx3 uint8 RGB and mask HxW uint8."""
    hq = decode_png(sample["hq.png"], 3, f"{where}: hq.png")
    lq = decode_png(sample["lq.png"], 3, f"{where}: lq.png")
    mask = decode_png(sample["mask.png"], 1, f"{where}: mask.png")
    if not hq.shape[:2] == lq.shape[:2] == mask.shape:
        raise SchemaError(f"{where}: hq {hq.shape}, lq {lq.shape} and mask {mask.shape} differ in size")
    return hq, lq, mask


def _augment(hq: np.ndarray, lq: np.ndarray, mask: np.ndarray, cfg: ShardStreamConfig,
             rng: np.random.Generator, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    crop = cfg.crop_size
    if crop is not None:
        h, w = mask.shape
        if h < crop or w < crop:
            raise ConfigError(f"data.crop_size={crop} is larger than the images ({where} is {w}x{h})")
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        window = (slice(top, top + crop), slice(left, left + crop))
        hq, lq, mask = hq[window], lq[window], mask[window]
    if cfg.hflip and rng.random() < 0.5:
        hq, lq, mask = hq[:, ::-1], lq[:, ::-1], mask[:, ::-1]
    if cfg.rot90:
        k = int(rng.integers(4))
        hq, lq, mask = (np.rot90(a, k) for a in (hq, lq, mask))
    if cfg.channel_shuffle:
        order = rng.permutation(3)
        hq, lq = hq[..., order], lq[..., order]
    return hq, lq, mask


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = {s["mask"].shape for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"samples of different sizes {sorted(sizes)} in one batch ({[s['key'] for s in samples]}); "
            "set crop_size to train on shards with mixed image sizes"
        )
    n, (h, w) = len(samples), samples[0]["mask"].shape
    hq, lq, res = (np.empty((n, 3, h, w), np.float32) for _ in range(3))
    mask = np.empty((n, 1, h, w), np.float32)
    half = np.float32(127.5)
    # One plane at a time stays in cache (about 2x faster than whole-batch array ops). The integer
    # residual and u8 - 127.5 are exact in float32, so each value is rounded once, by the division.
    for i, s in enumerate(samples):
        diff = residual(s["hq"], s["lq"])
        for c in range(3):
            np.subtract(s["hq"][:, :, c], half, out=hq[i, c], dtype=np.float32)
            np.subtract(s["lq"][:, :, c], half, out=lq[i, c], dtype=np.float32)
            res[i, c] = diff[:, :, c]
            for plane in (hq[i, c], lq[i, c], res[i, c]):
                np.divide(plane, half, out=plane)
        np.greater_equal(s["mask"], 128, out=mask[i, 0])
    return {
        "hq": torch.from_numpy(hq),
        "lq": torch.from_numpy(lq),
        "residual": torch.from_numpy(res),
        "mask": torch.from_numpy(mask),
        "key": [s["key"] for s in samples],
    }


class _EpochDataset(IterableDataset):
    """One epoch of one rank; each DataLoader worker builds its own ``_WorkerStream``."""

    def __init__(self, cfg: ShardStreamConfig, urls: list[str], rank: int, world_size: int, epoch: int, offset: int):
        super().__init__()
        self.cfg, self.urls = cfg, urls
        self.rank, self.world_size, self.epoch, self.offset = rank, world_size, epoch, offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(_WorkerStream(self.cfg, self.urls, self.rank, self.world_size,
                                  self.epoch, self.offset, worker, num_workers))


@dataclass
class WorkerStats:
    batches: int = 0
    samples: int = 0
    busy_s: float = 0.0  # time the worker spent producing its batches
    skipped: Counter = field(default_factory=Counter)  # by kind: shard, sample, decode


class ShardLoader:
    """Batches of one rank. Each ``for`` pass is one epoch; ``step`` counts batches delivered."""

    def __init__(self, cfg: ShardStreamConfig, urls: list[str], rank: int, world_size: int, start_step: int = 0):
        self.cfg, self.urls = cfg, urls
        self.rank, self.world_size = rank, world_size
        self.step = start_step
        self.worker_stats: dict[int, WorkerStats] = {}

    def __len__(self) -> int:
        return self.cfg.epoch_length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, offset = divmod(self.step, self.cfg.epoch_length)
        dataset = _EpochDataset(self.cfg, self.urls, self.rank, self.world_size, epoch, offset)
        workers = self.cfg.num_workers
        loader = wds.WebLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            timeout=self.cfg.timeout_s if workers > 0 else 0,
        ).with_epoch(self.cfg.epoch_length - offset)
        try:
            for batch in loader:
                self._account(batch.pop("_report"), len(batch["key"]))
                self.step += 1
                yield batch
        except ConfigError as exc:  # from a worker: its message is the last line of the wrapped traceback
            last = str(exc).strip().splitlines()[-1]
            raise ConfigError(last.removeprefix(f"{ConfigError.__module__}.ConfigError: ")) from None

    def _account(self, report: _WorkerReport, samples: int) -> None:
        stats = self.worker_stats.setdefault(report.worker, WorkerStats())
        stats.batches += 1
        stats.samples += samples
        stats.busy_s += report.busy_s
        for kind, message in report.skipped:
            stats.skipped[kind] += 1
            warnings.warn(f"rank {self.rank} worker {report.worker}: {message}", DataSkipWarning, stacklevel=2)

    def skipped_total(self) -> int:
        return sum(sum(s.skipped.values()) for s in self.worker_stats.values())


def make_loader(cfg: ShardStreamConfig, rank: int = 0, world_size: int = 1, start_step: int = 0) -> ShardLoader:
    """The batch stream of ``rank`` in ``world_size``, starting at batch ``start_step``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"make_loader: rank {rank} is not in a world of size {world_size}")
    if start_step < 0:
        raise ValueError(f"make_loader: start_step must be >= 0, got {start_step}")
    urls = resolve_urls(cfg.urls)
    readers = world_size * max(cfg.num_workers, 1)
    if len(urls) < readers:
        warnings.warn(
            f"{len(urls)} shard(s) for {world_size} rank(s) x {max(cfg.num_workers, 1)} worker(s) = {readers} "
            "readers. Not fatal: shards are resampled, so every reader still gets data, but readers "
            f"will often read the same shard at the same time; write at least {readers} shards (ideally many more).",
            stacklevel=2,
        )
    return ShardLoader(cfg, urls, rank, world_size, start_step)
