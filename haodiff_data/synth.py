"""``haodiff-data synth``: sources -> HQ crops -> part labels -> degradations -> shards.

Work is split into tasks, one per source image (its K samples share decoding, resizing and the
person search). Sample ``i = source_position * K + k`` draws only from ``(seed, i)``; node ``r``
of ``N`` takes the sources with ``position % N == r``. Workers return encoded samples; the main
process writes them in task order, so output bytes never depend on the worker count.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from haodiff_data import __version__
from haodiff_data.degrade.generic import tune_malloc
from haodiff_data.degrade.pipeline import apply_degradation, draw_degradation
from haodiff_data.intake.crop import apply_crop, plan_crop, resize_to, working_size
from haodiff_data.intake.decode import RejectedInput, decode_image
from haodiff_data.intake.sources import Source, list_sources, sha256
from haodiff_data.recipe import Recipe
from haodiff_data.rng import CROP_STREAM, DEGRADE_STREAM, sample_rng
from haodiff_data.segment import make_segmenter
from haodiff_data.segment.goliath import group_masks, person_box
from haodiff_data.shards import writer
from haodiff_data.shards.reader import iter_members
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


@dataclass
class TaskResult:
    samples: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


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
        "num_nodes": cfg.num_nodes,
        "node_rank": cfg.node_rank,
        "samples_per_shard": cfg.recipe.shards.samples_per_shard,
    }


# ---- worker side -----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: SynthConfig) -> None:
    # One thread per worker: parallelism comes from processes, and it keeps OpenCV's
    # results independent of thread scheduling.
    cv2.setNumThreads(1)
    tune_malloc()
    _WORKER["cfg"] = cfg
    _WORKER["segmenter"] = None


def _segmenter():
    if _WORKER["segmenter"] is None:
        cfg: SynthConfig = _WORKER["cfg"]
        _WORKER["segmenter"] = make_segmenter(
            cfg.segmenter, checkpoint=cfg.checkpoint, device=cfg.device, labels_dir=cfg.labels_dir
        )
    return _WORKER["segmenter"]


def _find_person(work: np.ndarray, full_labels: np.ndarray | None) -> tuple[int, int, int, int] | None:
    if full_labels is not None:
        return person_box(full_labels)
    h, w = work.shape[:2]
    scale = min(1.0, PERSON_SEARCH_SIDE / max(h, w))
    small = resize_to(work, (round(h * scale), round(w * scale))) if scale < 1 else work
    box = person_box(_segmenter().segment([small])[0])
    if box is None:
        return None
    return tuple(int(round(v / scale)) for v in box)  # type: ignore[return-value]


def process_task(task: Task) -> TaskResult:
    """One source's samples; an unexpected failure rejects that source instead of ending the run."""
    try:
        return _process_task(task)
    except Exception as exc:  # noqa: BLE001 - a long run must record a bad input and go on
        k_per = _WORKER["cfg"].samples_per_image
        reason = f"processing failed: {type(exc).__name__}: {exc}"
        return TaskResult(rejects=[{"source": task.source.id, "reason": reason,
                                    "samples": [task.position * k_per + k for k in task.ks]}])


def _process_task(task: Task) -> TaskResult:
    cfg: SynthConfig = _WORKER["cfg"]
    recipe = cfg.recipe
    result = TaskResult()
    k_per = cfg.samples_per_image
    indices = [task.position * k_per + k for k in task.ks]
    timer = _Timer(result.timings)

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
    seg = _segmenter()
    full_labels = None
    if seg.per_source:
        try:
            labels = seg.load(task.source.member or task.source.path)
        except (OSError, ValueError) as exc:
            return reject(f"label map: {exc}", indices)
        if labels.shape != rgb.shape[:2]:
            return reject(f"label map {labels.shape} does not match image {rgb.shape[:2]}", indices)
        full_labels = resize_to(labels, work_hw, labels=True)
    # A working image the size of the crop leaves no choice of position: skip the search.
    box = None
    if recipe.crop.mode == "person" and max(work.shape[:2]) > recipe.crop.size:
        with timer("person_search"):
            box = _find_person(work, full_labels)

    plans = [plan_crop(work.shape[:2], recipe.crop, sample_rng(cfg.seed, i, CROP_STREAM), box) for i in indices]
    hqs = [apply_crop(work, p["box"]) for p in plans]
    with timer("segment"):
        if full_labels is not None:
            parts_list = [apply_crop(full_labels, p["box"]) for p in plans]
        else:
            parts_list = seg.segment(hqs)
    source_meta = {
        "path": task.source.path,
        "resolved": task.source.resolved,
        "member": task.source.member,
        "sha256": sha256(data),
        "size": [rgb.shape[1], rgb.shape[0]],
        "working_size": None if work_hw is None else [work_hw[1], work_hw[0]],
    }
    no_person = []
    for i, plan, hq, parts in zip(indices, plans, hqs, parts_list):
        if recipe.first_order.require_person and not parts.any():
            no_person.append(i)
            continue
        result.samples.append(
            make_sample(hq, parts, i, cfg.seed, recipe, {**source_meta, "crop": plan}, _segmenter_meta(seg), timer)
        )
    if no_person:
        reject("no person found (first_order.require_person)", no_person)
    return result


def _segmenter_meta(seg) -> dict[str, str]:
    return {"name": seg.name, "model_id": seg.model_id}


def make_sample(
    hq: np.ndarray,
    parts: np.ndarray,
    index: int,
    seed: int,
    recipe: Recipe,
    source_meta: dict[str, Any],
    segmenter_meta: dict[str, Any],
    timer: _Timer,
) -> dict[str, Any]:
    """Degrade one HQ crop and encode it as a WebDataset sample; shared by ``synth`` and ``degrade``."""
    with timer("degrade"):
        groups = group_masks(parts, recipe.hmb.min_group_fraction)
        params = draw_degradation(sample_rng(seed, index, DEGRADE_STREAM), recipe, hq.shape[:2], list(groups))
        part_mask = groups[params["hmb"]["group"]] if params["hmb"] else None
        lq, mask = apply_degradation(hq, part_mask, params)
    meta = {
        "key": sample_key(index),
        "sample_index": index,
        "seed": seed,
        "haodiff_version": __version__,
        "recipe": {"name": recipe.name, "sha256": recipe.sha256()},
        "source": source_meta,
        "segmenter": {**segmenter_meta, "person_found": bool(parts.any()), "groups": list(groups)},
        **params,
    }
    with timer("encode"):
        return encode_sample(sample_key(index), hq, lq, mask, parts, meta, recipe.shards.png_compression)


class _Timer:
    """Accumulates wall time per stage name into a dict."""

    def __init__(self, into: dict[str, float]):
        self.into = into

    def __call__(self, name: str):
        return _Span(self.into, name)


class _Span:
    def __init__(self, into: dict[str, float], name: str):
        self.into, self.name = into, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.into[self.name] = self.into.get(self.name, 0.0) + time.perf_counter() - self.t0


# ---- main process ----------------------------------------------------------------------------


def ordered_map(fn, tasks: list, workers: int, initializer, initargs: tuple) -> Iterator:
    """``fn`` over ``tasks`` in worker processes, results in task order (so bytes never depend on
    the worker count); in-process when ``workers <= 1``."""
    if workers <= 1:
        initializer(*initargs)
        for task in tasks:
            yield fn(task)
        return
    # forkserver, not fork: a process forked after MediaPipe ran in its parent crashes.
    ctx = mp.get_context("forkserver")
    # Workers fork from a server that already imported the pipeline: no per-worker import cost.
    ctx.set_forkserver_preload(["haodiff_data.synth"])
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(fn, tasks, chunksize=1)


def drive(results: Iterator[TaskResult], sink: writer.ShardSink, first_task: int, n_tasks: int,
          total: int, progress: bool) -> tuple[int, Counter]:
    """Write task results in order, committing shards; returns (samples made, stage seconds)."""
    timings: Counter[str] = Counter()
    made = 0
    bar = tqdm(total=total or None, unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        for n, result in enumerate(results, start=first_task + 1):
            for sample in result.samples:
                sink.add(sample)
            for record in result.rejects:
                sink.reject(record)
            timings.update(result.timings)
            made += len(result.samples)
            bar.update(len(result.samples) + sum(len(r["samples"]) for r in result.rejects))
            sink.task_done(n)
        sink.finish(n_tasks)
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    return made, timings


def open_sink(out: Path, prefix: str, node_rank: int, identity: dict, resume: bool, samples_per_shard: int,
              listing_rejects: list[dict] | None = None) -> writer.ShardSink:
    """The node's shard sink, continuing a committed state under ``resume``; a new state starts
    with ``listing_rejects`` (inputs that never became sources)."""
    out.mkdir(parents=True, exist_ok=True)
    state = writer.load_state(out, prefix, node_rank)
    if state is not None and not resume:
        raise RunError(f"{out} already holds a run of prefix {prefix!r} node {node_rank}: pass --resume or a new --out")
    if state is not None and state.config != identity:
        changed = sorted(k for k in identity if state.config.get(k) != identity[k])
        raise RunError(f"--resume: the run in {out} used different settings ({', '.join(changed)})")
    if state is None:
        state = writer.NodeState(config=identity, rejects=list(listing_rejects or []))
    writer.clean_uncommitted(out, prefix, node_rank, state.next_shard)
    return writer.ShardSink(out, prefix, node_rank, samples_per_shard, state)


class RunError(RuntimeError):
    """A run that cannot start (e.g. existing output without --resume)."""


def synth(cfg: SynthConfig) -> dict[str, Any]:
    """Run (or resume) one node's share; returns the summary that is also written as JSON."""
    sources, listing_rejects = list_sources(cfg.inputs)
    tasks = make_tasks(sources, cfg)
    # Inputs that never became sources are recorded by node 0 only: each is listed once.
    sink = open_sink(cfg.out, cfg.prefix, cfg.node_rank, run_identity(cfg, sources), cfg.resume,
                     cfg.recipe.shards.samples_per_shard, listing_rejects if cfg.node_rank == 0 else [])
    first = sink.state.next_task
    todo = tasks[first:]
    t0 = time.perf_counter()
    results = ordered_map(process_task, todo, cfg.workers, _init_worker, (cfg,))
    made, timings = drive(results, sink, first, len(tasks), sum(len(t.ks) for t in todo), cfg.progress)
    run_info = {"seed": cfg.seed, "num_nodes": cfg.num_nodes, "workers": cfg.workers, "segmenter": cfg.segmenter,
                "samples_per_image": cfg.samples_per_image}
    return write_summary(cfg.out, cfg.prefix, cfg.node_rank, sink.state, cfg.recipe, run_info,
                         time.perf_counter() - t0, made, timings)


def _histogram(values: list[float], bins: int = 10) -> dict[str, list[float]]:
    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values, float), bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def parameter_table(metas: list[dict[str, Any]]) -> dict[str, list]:
    """Flatten the drawn parameters that are worth plotting, one list per name."""
    table: dict[str, list] = {
        "first_order": [], "hmb_group": [], "psf_extent_px": [], "kernel_type_1": [], "kernel_type_2": [],
        "jpeg_quality_1": [], "jpeg_quality_final": [], "noise_1": [], "noise_2": [], "final_order": [],
    }
    for m in metas:
        table["first_order"].append(m["first_order"])
        if m.get("hmb"):
            table["hmb_group"].append(m["hmb"]["group"])
            if "psf_extent_px" in m["hmb"]:
                table["psf_extent_px"].append(m["hmb"]["psf_extent_px"])
        for tag, order in (("1", m.get("generic_first")), ("2", m.get("generic_second"))):
            if not order:
                continue
            if order.get("blur"):
                table[f"kernel_type_{tag}"].append(order["blur"]["type"])
            table[f"noise_{tag}"].append(order["noise"]["kind"])
            if tag == "1" and order.get("jpeg_quality") is not None:
                table["jpeg_quality_1"].append(order["jpeg_quality"])
        final = m["final"]
        table["final_order"].append(final["order"])
        table["jpeg_quality_final"].append(final["jpeg_quality"])
    return table


def repeated_crops(metas: list[dict[str, Any]]) -> int:
    """Samples whose HQ is the same crop of the same source as an earlier sample: a source at the
    crop size leaves no room to move, so its K samples share one HQ (and differ in degradation)."""
    crops = Counter(json.dumps([m["source"]["sha256"], m["source"].get("working_size"), m["source"]["crop"]["box"]])
                    for m in metas)
    return sum(n - 1 for n in crops.values())


def summarize_table(table: dict[str, list]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in table.items():
        if values and isinstance(values[0], str):
            out[name] = dict(sorted(Counter(values).items()))
        else:
            out[name] = _histogram(values)
    return out


def read_metas(shards: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(m["json"]) for path in shards for m in iter_members(path)]


def node_shards(out: Path, prefix: str, node_rank: int) -> list[Path]:
    return sorted(out.glob(f"{prefix}-r{node_rank:03d}-*.tar"))


def write_summary(out: Path, prefix: str, node_rank: int, state: writer.NodeState, recipe: Recipe,
                  run_info: dict[str, Any], wall: float, made_now: int, timings: Counter) -> dict[str, Any]:
    """Write ``rejects-rNNN.jsonl`` and ``summary-rNNN.json`` (counts, throughput, parameter
    histograms over every sample of this node's shards, resumed parts included)."""
    shards = node_shards(out, prefix, node_rank)
    metas = read_metas(shards)
    summary = {
        "haodiff_version": __version__,
        "prefix": prefix,
        "node_rank": node_rank,
        **run_info,
        "recipe": recipe.to_dict(),
        "shards": [p.name for p in shards],
        "samples_written": len(metas),
        "samples_rejected": sum(len(r["samples"]) for r in state.rejects),
        "sources_rejected": len({r["source"] for r in state.rejects}),
        "rejects_by_reason": dict(Counter(r["reason"].split(":")[0] for r in state.rejects)),
        "samples_repeating_a_crop": repeated_crops(metas),
        "this_invocation": {
            "samples": made_now,
            "wall_s": round(wall, 3),
            "samples_per_s": round(made_now / wall, 3) if wall > 0 else None,
            "stage_ms_per_sample": {k: round(1000 * v / max(made_now, 1), 2) for k, v in sorted(timings.items())},
        },
        "parameters": summarize_table(parameter_table(metas)),
    }
    rejects = "".join(json.dumps(r, sort_keys=True) + "\n" for r in state.rejects)
    writer.atomic_write_bytes(out / f"rejects-r{node_rank:03d}.jsonl", rejects.encode())
    writer.atomic_write_bytes(out / f"summary-r{node_rank:03d}.json", json.dumps(summary, indent=1).encode())
    return summary


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def print_summary(summary: dict[str, Any], out: Path, file=None, command: str = "synth") -> None:
    inv = summary["this_invocation"]
    print(
        f"haodiff-data {command}: {summary['samples_written']} samples in {len(summary['shards'])} shard(s) "
        f"in {out}, {summary['samples_rejected']} rejected ({summary['sources_rejected']} sources); "
        f"this run {inv['samples']} samples in {inv['wall_s']} s ({inv['samples_per_s']} samples/s, "
        f"{summary['workers']} workers)",
        file=file or sys.stderr,
    )
    if summary.get("samples_repeating_a_crop"):
        print(f"  note: {summary['samples_repeating_a_crop']} samples repeat the HQ crop of an earlier sample of the "
              "same source (sources at the crop size); they differ only in degradation", file=file or sys.stderr)
