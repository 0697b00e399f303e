"""``haodiff-data degrade``: new degradations for existing shards, no segmentation.

Each input shard is one task: its samples keep their key, HQ and part labels and get a fresh
degradation drawn from (new seed, sample index) with the given recipe.
"""

from __future__ import annotations

import functools
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from haodiff_data.recipe import Recipe
from haodiff_data.report import write_summary
from haodiff_data.run import RunError, TaskResult, Timer, drive, open_sink, ordered_map
from haodiff_data.segment import Segmentation
from haodiff_data.shards.reader import expand_shards, iter_members
from haodiff_data.shards.schema import SchemaError, decode_sample
from haodiff_data.synth import make_sample


@dataclass
class DegradeConfig:
    shards: list[str]
    out: Path
    recipe: Recipe
    seed: int = 0
    workers: int = 1
    prefix: str = "haodiff"
    resume: bool = False
    progress: bool = True


class DegradeWorker:
    """Re-degrades one shard per task, keeping each sample's HQ, part labels and people."""

    def __init__(self, cfg: DegradeConfig) -> None:
        cv2.setNumThreads(1)
        self.cfg = cfg

    def __call__(self, path: Path) -> TaskResult:
        cfg = self.cfg
        result = TaskResult()
        timer = Timer(result.timings)
        members_iter = iter_members(path)
        while True:
            try:
                members = next(members_iter, None)
            except (OSError, tarfile.TarError) as exc:
                # A cut or corrupt shard: keep the samples before the damage, record the rest.
                result.rejects.append({"source": str(path), "reason": f"unreadable shard: {exc}", "samples": []})
                break
            if members is None:
                break
            where = f"{path}:{members['__key__']}"
            try:
                sample = decode_sample(members, where)
            except (SchemaError, ValueError) as exc:
                result.rejects.append({"source": where, "reason": f"unreadable sample: {exc}",
                                       "samples": [members["__key__"]]})
                continue
            meta = sample.meta
            result.samples.append(make_sample(
                sample.hq, Segmentation(sample.parts, sample.person_map()), meta["sample_index"], cfg.seed,
                cfg.recipe, meta["source"], {"name": meta["segmenter"]["name"], "model_id": meta["segmenter"]["model_id"]},
                timer,
            ))
        return result


def count_samples(paths: list[Path]) -> int:
    """Samples in the shards, from tar headers alone (for the progress bar); a damaged shard
    counts up to the damage."""
    total = 0
    for path in paths:
        try:
            with tarfile.open(path, "r") as tar:
                for info in tar:
                    total += info.name.endswith(".json")
        except (OSError, tarfile.TarError):
            pass
    return total


def redegrade(cfg: DegradeConfig) -> dict[str, Any]:
    inputs = expand_shards(cfg.shards)
    out = cfg.out.resolve()
    if any(p.parent == out for p in inputs):
        raise RunError(f"--out {cfg.out} must differ from the input shards' folder")
    identity = {"seed": cfg.seed, "recipe_sha256": cfg.recipe.sha256(), "inputs": [str(p) for p in inputs],
                "samples_per_shard": cfg.recipe.shards.samples_per_shard}
    sink = open_sink(cfg.out, cfg.prefix, 0, identity, cfg.resume, cfg.recipe.shards.samples_per_shard)
    first = sink.state.next_task
    t0 = time.perf_counter()
    results = ordered_map(functools.partial(DegradeWorker, cfg), inputs[first:], cfg.workers,
                          preload=("haodiff_data.redegrade",))
    made, timings = drive(results, sink, first, len(inputs), count_samples(inputs[first:]), cfg.progress)
    run_info = {"seed": cfg.seed, "num_nodes": 1, "workers": cfg.workers, "degraded_from": [str(p) for p in inputs]}
    return write_summary(cfg.out, cfg.prefix, 0, sink.state, cfg.recipe, run_info, time.perf_counter() - t0, made, timings)
