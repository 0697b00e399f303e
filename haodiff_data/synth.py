"""``haodiff-data synth``: sources -> HQ crops -> part labels -> degradations -> shards.

Work is split into tasks, one per source image (its K samples share decoding, resizing and the
person search). Sample ``i = source_position * K + k`` draws only from ``(seed, i)``; node ``r``
of ``N`` takes the sources with ``position % N == r``. Workers return encoded samples; the main
process writes them in task order, so output bytes never depend on the worker count.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from haodiff_data import __version__
from haodiff_data.degrade.generic import tune_malloc
from haodiff_data.degrade.pipeline import apply_degradation, draw_degradation
from haodiff_data.intake.crop import apply_crop, plan_crop, resize_to, working_size
from haodiff_data.intake.decode import RejectedInput, decode_image
from haodiff_data.intake.sources import Source, list_sources, sha256
from haodiff_data.recipe import Recipe
from haodiff_data.report import write_summary
from haodiff_data.rng import CROP_STREAM, DEGRADE_STREAM, sample_rng
from haodiff_data.run import RunError, TaskResult, Timer, drive, open_sink, ordered_map, process_context
from haodiff_data.segment import Segmentation, Segmenter, instances_from_parts, make_segmenter, renumber
from haodiff_data.segment.goliath import people_by_group, person_box, person_groups
from haodiff_data.shards.schema import encode_sample

# Person search runs on a reduced copy: MediaPipe works at 256 px internally anyway.
PERSON_SEARCH_SIDE = 640


@dataclass
class SynthConfig:
    inputs: list[str]
    out: Path
    recipe: Recipe
    seed: int = 0
    samples_per_image: int = 1
    limit: int | None = None
    workers: int = 1
    segmenter: str = "mediapipe"
    checkpoint: str | None = None
    device: str = "cpu"
    seg_precision: str | None = None  # sapiens only: fp32 | tf32 | bf16; None = as the checkpoint kind runs
    seg_batch: int | None = None  # sapiens only: images per forward; None = default_seg_batch(device)
    labels_dir: str | None = None
    num_nodes: int = 1
    node_rank: int = 0
    prefix: str = "haodiff"
    resume: bool = False
    progress: bool = True


@dataclass
class Task:
    position: int  # the source's position in the full, ordered source list
    source: Source
    ks: list[int]  # which of the source's K samples to make


def sample_key(index: int) -> str:
    return f"s{index:09d}"


def make_tasks(sources: list[Source], cfg: SynthConfig) -> list[Task]:
    k_per = cfg.samples_per_image
    tasks = []
    for position, source in enumerate(sources):
        if position % cfg.num_nodes != cfg.node_rank:
            continue
        ks = [k for k in range(k_per) if cfg.limit is None or position * k_per + k < cfg.limit]
        if ks:
            tasks.append(Task(position, source, ks))
    return tasks


def run_identity(cfg: SynthConfig, sources: list[Source]) -> dict[str, Any]:
    """What must match for ``--resume`` to continue a run rather than mix two."""
    # surrogateescape: file names are bytes, not always UTF-8.
    listing = hashlib.sha256("\n".join(s.id for s in sources).encode("utf-8", "surrogateescape")).hexdigest()
    return {
        "seed": cfg.seed,
        "recipe_sha256": cfg.recipe.sha256(),
        "sources_sha256": listing,
        "samples_per_image": cfg.samples_per_image,
        "limit": cfg.limit,
        "segmenter": cfg.segmenter,
        "checkpoint": cfg.checkpoint,
        "seg_precision": cfg.seg_precision,  # None matches runs recorded before the option existed
        "num_nodes": cfg.num_nodes,
        "node_rank": cfg.node_rank,
        "samples_per_shard": cfg.recipe.shards.samples_per_shard,
    }


# ---- worker side -----------------------------------------------------------------------------


class SegmenterError(RunError):
    """The segmenter cannot be built: the run stops instead of rejecting every source."""


class SynthWorker:
    """Turns tasks into encoded samples; one per process. ``segmenter`` is the run's shared Sapiens
    (a client of the segmentation service, or the model itself when tasks run in the main
    process); without it the worker builds its own (MediaPipe, label maps) on first use."""

    def __init__(self, cfg: SynthConfig, segmenter: Segmenter | None = None) -> None:
        # One OpenCV thread per worker: parallelism comes from processes, and it keeps OpenCV's
        # results independent of thread scheduling.
        cv2.setNumThreads(1)
        tune_malloc()
        self.cfg = cfg
        self._segmenter = segmenter

    @property
    def segmenter(self):
        if self._segmenter is None:
            cfg = self.cfg
            try:
                self._segmenter = make_segmenter(cfg.segmenter, checkpoint=cfg.checkpoint, device=cfg.device,
                                                 labels_dir=cfg.labels_dir, precision=cfg.seg_precision)
            except (OSError, ValueError, ImportError, RuntimeError) as exc:
                raise SegmenterError(f"segmenter {cfg.segmenter!r} cannot start: {exc}") from exc
        return self._segmenter

    def __call__(self, task: Task) -> TaskResult:
        """One source's samples; an unexpected failure rejects that source instead of ending the run."""
        try:
            return self._process(task)
        except RunError:  # the segmenter cannot start or its service is gone: no later task can succeed
            raise
        except Exception as exc:  # noqa: BLE001 - a long run must record a bad input and go on
            k_per = self.cfg.samples_per_image
            reason = f"processing failed: {type(exc).__name__}: {exc}"
            return TaskResult(rejects=[{"source": task.source.id, "reason": reason,
                                        "samples": [task.position * k_per + k for k in task.ks]}])

    def _find_person(self, work: np.ndarray) -> tuple[int, int, int, int] | None:
        h, w = work.shape[:2]
        scale = min(1.0, PERSON_SEARCH_SIDE / max(h, w))
        small = resize_to(work, (round(h * scale), round(w * scale))) if scale < 1 else work
        box = person_box(self.segmenter.segment([small])[0].parts)
        if box is None:
            return None
        return tuple(int(round(v / scale)) for v in box)  # type: ignore[return-value]

    def _process(self, task: Task) -> TaskResult:
        cfg = self.cfg
        recipe = cfg.recipe
        result = TaskResult()
        k_per = cfg.samples_per_image
        indices = [task.position * k_per + k for k in task.ks]
        timer = Timer(result.timings)

        def reject(reason: str, which: list[int]) -> TaskResult:
            result.rejects.append({"source": task.source.id, "reason": reason, "samples": which})
            return result

        with timer("intake"):
            try:
                data = task.source.read_bytes()
            except OSError as exc:
                return reject(f"unreadable: {exc}", indices)
            try:
                rgb = decode_image(data, recipe.intake.min_side, recipe.intake.max_pixels)
            except RejectedInput as exc:
                return reject(exc.reason, indices)
            work_hw = working_size(*rgb.shape[:2], recipe.crop)
            work = resize_to(rgb, work_hw)
        seg = self.segmenter
        full = None
        if seg.per_source:
            try:
                labels = seg.load(task.source.member or task.source.path)
            except (OSError, ValueError) as exc:
                return reject(f"label map: {exc}", indices)
            if labels.shape != rgb.shape[:2]:
                return reject(f"label map {labels.shape} does not match image {rgb.shape[:2]}", indices)
            labels = resize_to(labels, work_hw, labels=True)
            full = Segmentation(labels, instances_from_parts(labels))
        # A working image the size of the crop leaves no choice of position: skip the search.
        box = None
        if recipe.crop.mode == "person" and max(work.shape[:2]) > recipe.crop.size:
            with timer("person_search"):
                box = person_box(full.parts) if full is not None else self._find_person(work)

        plans = [plan_crop(work.shape[:2], recipe.crop, sample_rng(cfg.seed, i, CROP_STREAM), box) for i in indices]
        hqs = [apply_crop(work, p["box"]) for p in plans]
        with timer("segment"):
            if full is not None:
                segs = [Segmentation(apply_crop(full.parts, p["box"]), renumber(apply_crop(full.persons, p["box"])))
                        for p in plans]
            else:
                segs = seg.segment(hqs)
        source_meta = {
            "path": task.source.path,
            "resolved": task.source.resolved,
            "member": task.source.member,
            "sha256": sha256(data),
            "size": [rgb.shape[1], rgb.shape[0]],
            "working_size": None if work_hw is None else [work_hw[1], work_hw[0]],
        }
        no_person = []
        seg_meta = {"name": seg.name, "model_id": seg.model_id}
        for i, plan, hq, crop_seg in zip(indices, plans, hqs, segs):
            if recipe.first_order.require_person and not crop_seg.parts.any():
                no_person.append(i)
                continue
            result.samples.append(
                make_sample(hq, crop_seg, i, cfg.seed, recipe, {**source_meta, "crop": plan}, seg_meta, timer)
            )
        if no_person:
            reject("no person found (first_order.require_person)", no_person)
        return result


def make_sample(
    hq: np.ndarray,
    seg: Segmentation,
    index: int,
    seed: int,
    recipe: Recipe,
    source_meta: dict[str, Any],
    segmenter_meta: dict[str, Any],
    timer: Timer,
) -> dict[str, Any]:
    """Degrade one HQ crop and encode it as a WebDataset sample; shared by ``synth`` and ``degrade``.

    HMB blurs one group of one person: the groups are computed per person, on their pixels only."""
    with timer("degrade"):
        people = person_groups(seg.parts, seg.persons, recipe.hmb.min_group_fraction)
        group_people = people_by_group(people)
        params = draw_degradation(sample_rng(seed, index, DEGRADE_STREAM), recipe, hq.shape[:2], list(group_people),
                                  group_people)
        part_mask = people[params["hmb"]["person"]][params["hmb"]["group"]] if params["hmb"] else None
        lq, mask = apply_degradation(hq, part_mask, params)
    meta = {
        "key": sample_key(index),
        "sample_index": index,
        "seed": seed,
        "haodiff_version": __version__,
        "recipe": {"name": recipe.name, "sha256": recipe.sha256()},
        "source": source_meta,
        "segmenter": {**segmenter_meta, "person_found": bool(seg.parts.any()), "groups": list(group_people),
                      "persons": seg.count, "person_area": round(float((seg.parts > 0).mean()), 4)},
        **params,
    }
    with timer("encode"):
        return encode_sample(sample_key(index), hq, lq, mask, seg.parts, meta, recipe.shards.png_compression,
                             persons=seg.persons)


# ---- main process ----------------------------------------------------------------------------


def check_segmenter(cfg: SynthConfig) -> None:
    """Stop a run that cannot segment before it lists its sources (the model itself loads in
    ``shared_sapiens``, still before any task)."""
    if cfg.segmenter == "sapiens":
        from haodiff_data.segment.sapiens import check_checkpoint

        try:
            check_checkpoint(cfg.checkpoint or "", cfg.device)
        except (OSError, ValueError, ImportError) as exc:
            raise SegmenterError(str(exc)) from exc


def synth(cfg: SynthConfig) -> dict[str, Any]:
    """Run (or resume) one node's share; returns the summary that is also written as JSON."""
    check_segmenter(cfg)
    sources, listing_rejects = list_sources(cfg.inputs)
    tasks = make_tasks(sources, cfg)
    # Inputs that never became sources are recorded by node 0 only: each is listed once.
    sink = open_sink(cfg.out, cfg.prefix, cfg.node_rank, run_identity(cfg, sources), cfg.resume,
                     cfg.recipe.shards.samples_per_shard, listing_rejects if cfg.node_rank == 0 else [])
    first = sink.state.next_task
    todo = tasks[first:]
    t0 = time.perf_counter()
    ctx = process_context(preload=("haodiff_data.synth",))
    with shared_sapiens(cfg, ctx) as shared:
        # closing: the pool ends (on errors too) before the service it talks to.
        with contextlib.closing(ordered_map(functools.partial(SynthWorker, cfg, shared.segmenter), todo,
                                            cfg.workers, ctx=ctx)) as results:
            made, timings = drive(results, sink, first, len(tasks), sum(len(t.ks) for t in todo), cfg.progress)
    run_info = {"seed": cfg.seed, "num_nodes": cfg.num_nodes, "workers": cfg.workers, "segmenter": cfg.segmenter,
                "samples_per_image": cfg.samples_per_image}
    return write_summary(cfg.out, cfg.prefix, cfg.node_rank, sink.state, cfg.recipe, run_info,
                         time.perf_counter() - t0, made, timings, shared.stats)


@dataclass
class SharedSapiens:
    segmenter: Segmenter | None = None  # what the workers segment with; None: each builds its own
    stats: dict[str, Any] | None = None  # the forwards' statistics, set when the run ends well


@contextlib.contextmanager
def shared_sapiens(cfg: SynthConfig, ctx: Any) -> Iterator[SharedSapiens]:
    """The run's one Sapiens model, loaded before any task. With one worker it runs in this
    process: a lone worker sends one request at a time, so a service could not batch across
    sources and would only add a process and a copy of every crop. With more, it runs in a
    segmentation service process (haodiff_data.segment.service) that all workers reach."""
    shared = SharedSapiens()
    if cfg.segmenter != "sapiens":
        yield shared
        return
    from haodiff_data.segment.service import SegmentationService, default_seg_batch, forward_stats

    seg_batch = cfg.seg_batch or default_seg_batch(cfg.device)
    if cfg.workers <= 1:
        import torch

        if cfg.device == "cpu":
            # This process is the only one computing; torch's default counts the machine's cores,
            # not the ones this job may use (SLURM, taskset).
            torch.set_num_threads(cpu_count())
        try:
            seg = make_segmenter("sapiens", checkpoint=cfg.checkpoint, device=cfg.device, batch_size=seg_batch,
                                 precision=cfg.seg_precision)
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise SegmenterError(f"segmenter 'sapiens' cannot start: {exc}") from exc
        shared.segmenter = seg
        try:
            yield shared
            shared.stats = forward_stats(seg.forwards, seg.images, 0, "in-process", seg_batch)
        finally:
            seg.close()
        return
    service = SegmentationService(ctx, cfg.checkpoint or "", cfg.device, cfg.seg_precision, seg_batch,
                                  slots=cfg.workers, threads=cpu_count())
    service.start()
    finished = False
    try:
        shared.segmenter = service.client()
        yield shared
        finished = True
    finally:
        shared.stats = service.close(graceful=finished)


def cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# Peak RSS of one worker: with MediaPipe measured at 470 MiB (``haodiff-data bench``); a Sapiens
# worker holds no model (the segmentation service does) and stays below that. Sapiens on the CPU
# takes about 4x its TorchScript file (7.6 GB for the 1.36 GB 0.3B file), once per run.
WORKER_BYTES = 512 * 2**20
SAPIENS_CPU_FACTOR = 4.5


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_workers(segmenter: str = "mediapipe", checkpoint: str | None = None, device: str = "cpu") -> int:
    """All cores, fewer when one worker per core would not fit in memory. Sapiens is held once per
    run by the segmentation service, whatever the worker count: on the CPU its memory comes off the
    top; on a GPU it is in device memory, and every worker helps fill the service's batches."""
    cores = cpu_count()
    free = available_memory()
    if free is None:
        return cores
    if segmenter == "sapiens" and device == "cpu" and checkpoint and os.path.isfile(checkpoint):
        free -= int(SAPIENS_CPU_FACTOR * os.path.getsize(checkpoint))
    return max(1, min(cores, free // WORKER_BYTES))
