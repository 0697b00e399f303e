"""``python -m haodiff_model.bench.data SHARDS``: decoded samples/s of the training loader.

Per worker: samples / time the worker spent producing its batches (read, shuffle, decode,
augment, collate), i.e. what one worker delivers when it never waits. Total: samples / wall time
after the warm-up batches, with the main process only pulling batches, i.e. the ceiling the
loader puts on a trainer. Compare the total with the trainer's samples/s (want >= 5x).
"""

from __future__ import annotations

import argparse
import time

from haodiff_model.train.data import ShardStreamConfig, make_loader


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m haodiff_model.bench.data", description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="shard files, folders, globs or brace patterns")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=100, help="timed batches (after the warm-up, at least 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: workers, at least 1)")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--crop", type=int, default=None, help="random crop size (default: full images)")
    parser.add_argument("--hflip", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    warmup = max(args.workers, 1) if args.warmup is None else args.warmup
    if args.batches < 1 or warmup < 0:
        parser.error("--batches must be >= 1 and --warmup >= 0")
    cfg = ShardStreamConfig(
        urls=args.shards, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
        epoch_length=warmup + args.batches, shuffle_buffer=args.shuffle_buffer,
        crop_size=args.crop, hflip=args.hflip,
    )
    loader = make_loader(cfg)
    start = time.perf_counter()
    timed_from = end = start
    warm: dict[int, tuple[int, float]] = {}
    shape = None
    for i, batch in enumerate(loader):
        if i == warmup:
            timed_from = time.perf_counter()
            warm = {w: (s.samples, s.busy_s) for w, s in loader.worker_stats.items()}
        shape = tuple(batch["hq"].shape)
    end = time.perf_counter()

    print(f"shards: {len(loader.urls)}  batch: {shape}  workers: {args.workers}  "
          f"warm-up: {warmup} batches in {timed_from - start:.2f} s (includes filling the shuffle buffer)")
    timed = 0
    for worker, stats in sorted(loader.worker_stats.items()):
        samples0, busy0 = warm.get(worker, (0, 0.0))
        samples, busy = stats.samples - samples0, stats.busy_s - busy0
        timed += samples
        rate = samples / busy if busy > 0 else 0.0
        skipped = f"  skipped {dict(stats.skipped)}" if stats.skipped else ""
        print(f"worker {worker}: {samples} samples, {rate:.1f} decoded samples/s{skipped}")
    wall = end - timed_from
    print(f"total: {timed} samples in {wall:.2f} s = {timed / wall:.1f} samples/s "
          f"({timed / wall / max(args.workers, 1):.1f} per worker)")

if __name__ == "__main__":
    main()
