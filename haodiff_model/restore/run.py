"""A restore run over many inputs: naming, skipping, batching by size, rejects, progress, summary.

Inputs are expanded as `haodiff-data` does (folders recursively, files, .txt lists, globs, .tar
shards). Each output is `OUT/<name>.png`: a folder input keeps its relative path, anything else
its file stem. Under torchrun (WORLD_SIZE > 1) rank r takes inputs r, r + W, r + 2W, ...; ranks
share nothing, so no process group is needed. Images are batched only with images of the same
size; a bucket runs when full and the rest at the end.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from haodiff_data.intake.decode import RejectedInput, decode_image
from haodiff_data.intake.sources import Source, list_sources

MAX_PIXELS = 1 << 28  # 268 M pixels: a 16k x 16k image; larger inputs are rejected before decoding
MIN_SIDE = 8


@dataclass(frozen=True)
class Job:
    source: Source
    output: Path


@dataclass
class RunSummary:
    restored: int = 0
    skipped: int = 0
    rejected: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.restored / self.seconds if self.seconds > 0 else 0.0
        return (f"restored {self.restored}, skipped {self.skipped} (output exists), rejected {len(self.rejected)} "
                f"in {self.seconds:.1f} s ({rate:.2f} images/s)")


def plan_jobs(inputs: Sequence[str], out: Path) -> tuple[list[Job], list[dict]]:
    """One job per input image; a second input wanting an output name already taken is rejected."""
    jobs: list[Job] = []
    rejects: list[dict] = []
    taken: dict[Path, str] = {}
    for spec in inputs:
        root = Path(spec) if Path(spec).is_dir() else None
        listing = list_sources([spec])
        rejects += [{"input": r["source"], "reason": r["reason"]} for r in listing.rejects]
        for src in listing.sources:
            if root is not None and src.member is None:
                rel = Path(src.path).relative_to(root).with_suffix(".png")
            else:
                rel = Path(src.stem + ".png")
            target = out / rel
            if target in taken:
                if taken[target] != src.id:
                    rejects.append({"input": src.id, "reason": f"output name {rel} is already used by {taken[target]}"})
                continue
            taken[target] = src.id
            jobs.append(Job(src, target))
    return jobs, rejects


def rank_share(jobs: list[Job]) -> tuple[list[Job], int, int]:
    """This process's share under torchrun / accelerate (RANK, WORLD_SIZE), else everything."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    return jobs[rank::world], rank, world


def read_image(job: Job) -> np.ndarray:
    return decode_image(job.source.read_bytes(), MIN_SIDE, MAX_PIXELS)


def write_png(path: Path, image: np.ndarray) -> None:
    """Atomic: the PNG appears complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _decoded(jobs: list[Job], threads: int = 2, lookahead: int = 8) -> Iterator[tuple[Job, np.ndarray | str]]:
    """(job, image or rejection reason), in order, decoded ahead in threads."""
    with ThreadPoolExecutor(threads) as pool:
        pending = []
        it = iter(jobs)
        for job in it:
            pending.append((job, pool.submit(read_image, job)))
            if len(pending) >= lookahead:
                break
        while pending:
            job, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read_image, nxt)))
            try:
                yield job, fut.result()
            except RejectedInput as exc:
                yield job, exc.reason
            except OSError as exc:
                yield job, f"unreadable: {exc}"


def run_restore(restore_batch: Callable[[list[np.ndarray]], list[np.ndarray]], jobs: list[Job], batch_size: int,
                overwrite: bool, progress: bool = True) -> RunSummary:
    """Restore `jobs` with `restore_batch`, writing PNGs; a failing input or batch is recorded, not fatal."""
    from tqdm import tqdm

    summary = RunSummary()
    start = time.perf_counter()
    todo = []
    for job in jobs:
        if job.output.exists() and not overwrite:
            summary.skipped += 1
        else:
            todo.append(job)
    buckets: dict[tuple[int, ...], list[tuple[Job, np.ndarray]]] = {}
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def flush(key: tuple[int, ...]) -> None:
        items = buckets.pop(key)
        try:
            outputs = restore_batch([im for _, im in items])
        except Exception as exc:  # noqa: BLE001 - recorded per input; the run goes on
            for job, _ in items:
                summary.rejected.append({"input": job.source.id, "reason": f"restore failed: {type(exc).__name__}: {exc}"})
        else:
            for (job, _), out in zip(items, outputs):
                write_png(job.output, out)
                summary.restored += 1
        bar.update(len(items))

    for job, image in _decoded(todo):
        if isinstance(image, str):
            summary.rejected.append({"input": job.source.id, "reason": image})
            bar.update(1)
            continue
        key = image.shape
        buckets.setdefault(key, []).append((job, image))
        if len(buckets[key]) >= batch_size:
            flush(key)
    for key in list(buckets):
        flush(key)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def write_rejects(out: Path, rank: int, rejects: list[dict]) -> Path | None:
    """`OUT/rejects-r{rank}.jsonl`, one JSON object per rejected input; removed when there are none."""
    path = out / f"rejects-r{rank:03d}.jsonl"
    if not rejects:
        path.unlink(missing_ok=True)
        return None
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rejects))
    os.replace(tmp, path)
    return path


__all__ = ["Job", "RunSummary", "plan_jobs", "rank_share", "read_image", "run_restore", "write_png", "write_rejects"]
