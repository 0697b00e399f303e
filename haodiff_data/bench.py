"""``haodiff-data bench``: ms per stage at 512x512 on one core, and end-to-end samples/s.

Stages are timed on the bundled photos with the real code paths. ``degrade_ms_per_sample`` is one
HMB (trajectory, PSF, blur, blend) plus one full two-order generic degradation with its final
stage, the same work as the per-sample public route it is compared against in the README.
With ``--segmenter sapiens`` the segmentation stage and the end-to-end run use that checkpoint
(on ``--device``), and its throughput is also timed at several batch sizes; the degradation stages
always take their body parts from MediaPipe, so they time the same work whatever the segmenter.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import webdataset as wds

from haodiff_data.degrade import hmb as hmb_module
from haodiff_data.degrade.generic import apply_final, apply_order, draw_final, draw_order, tune_malloc
from haodiff_data.intake.crop import apply_crop, plan_crop, resize_to, working_size
from haodiff_data.intake.decode import decode_image
from haodiff_data.intake.sources import ASSETS_DIR, embedded_sources
from haodiff_data.recipe import Recipe
from haodiff_data.segment import make_segmenter
from haodiff_data.segment.goliath import group_masks
from haodiff_data.shards.schema import encode_sample
from haodiff_data.synth import SynthConfig, default_workers, synth


@dataclass(frozen=True)
class SegmenterChoice:
    name: str = "mediapipe"  # "mediapipe" | "sapiens"
    checkpoint: str | None = None
    device: str = "cpu"
    precision: str | None = None


# Batch sizes at which a Sapiens checkpoint's throughput is timed, and how many 512x512 crops:
# a 0.3B model takes seconds per crop on a CPU, ~0.1 s on a GPU.
SEGMENT_BATCHES = {"cuda": (1, 4, 16), "cpu": (1, 4)}
SEGMENT_IMAGES = {"cuda": 32, "cpu": 4}


def _mean_ms(fn: Callable[[int], Any], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1000 * (time.perf_counter() - t0) / n


def stage_timings(recipe: Recipe, n: int, seed: int, seg: SegmenterChoice = SegmenterChoice()) -> dict[str, float]:
    """Mean ms per stage over ``n`` runs, single-threaded, on 512x512 crops."""
    cv2.setNumThreads(1)
    tune_malloc()
    size = recipe.crop.size
    data = (ASSETS_DIR / "bus.jpg").read_bytes()
    rng = np.random.default_rng(seed)

    def intake(_: int) -> np.ndarray:
        rgb = decode_image(data, recipe.intake.min_side, recipe.intake.max_pixels)
        work = resize_to(rgb, working_size(*rgb.shape[:2], recipe.crop))
        return apply_crop(work, plan_crop(work.shape[:2], recipe.crop, rng)["box"])

    hq = cv2.cvtColor(cv2.imread(str(ASSETS_DIR / "astronaut.png")), cv2.COLOR_BGR2RGB)
    hq = cv2.resize(hq, (size, size), interpolation=cv2.INTER_AREA) if hq.shape[0] != size else hq
    parts = make_segmenter("mediapipe").segment([hq])[0].parts
    segmenter = make_segmenter(seg.name, checkpoint=seg.checkpoint, device=seg.device, precision=seg.precision)
    segmenter.segment([hq])  # warm-up: model load, first-call allocations
    groups = group_masks(parts, recipe.hmb.min_group_fraction)
    if not groups:
        raise RuntimeError("bench: the segmenter found no person in the bundled astronaut photo")
    img = hq.astype(np.float32) / 255
    draws = [hmb_module.draw_hmb(rng, recipe.hmb, list(groups), recipe.psf_scale()) for _ in range(n)]
    shape = hq.shape[:2]
    scale = recipe.generic.scale

    def trajectory_psf(i: int) -> None:
        hmb_module.clear_psf_cache()
        hmb_module.motion_psf(draws[i])

    def hmb_blur(i: int) -> None:
        hmb_module.apply_hmb(img, groups[draws[i]["group"]], draws[i])

    def generic(_: int) -> np.ndarray:
        out = apply_order(img, draw_order(rng, recipe.generic.first, shape, scale, second=False))
        out = apply_order(out, draw_order(rng, recipe.generic.second, shape, scale, second=True))
        return apply_final(out, draw_final(rng, recipe.generic.final, shape, scale))

    lq = generic(0)
    mask = np.zeros(shape, np.uint8)

    def encode_write(i: int) -> None:
        sample = encode_sample(f"s{i:09d}", hq, lq, mask, parts, {"bench": i}, recipe.shards.png_compression)
        with wds.TarWriter(io.BytesIO(), encoder=False, mtime=0) as tar:
            tar.write(sample)

    timings = {
        "intake": _mean_ms(intake, n),
        "segmentation": _mean_ms(lambda _: segmenter.segment([hq]), n),
        "trajectory_psf": _mean_ms(trajectory_psf, n),
        "hmb_blur": _mean_ms(hmb_blur, n),
        "generic": _mean_ms(generic, n),
        "encode_write": _mean_ms(encode_write, n),
    }
    return {k: round(v, 2) for k, v in timings.items()}


# Samples per source in the end-to-end run: a data set has many photos and few crops of each.
E2E_SAMPLES_PER_SOURCE = 2
SEGMENTATION_STAGES = ("person_search", "segment")  # the synth worker's timer names


def segment_throughput(seg: SegmenterChoice) -> dict[str, float]:
    """Images/s of one segmenter process at each batch size, on 512x512 crops of the astronaut.

    On CUDA the largest batch is also timed in the other precisions, each with the share of
    pixels labelled as at the chosen one."""
    kind = "cuda" if seg.device.startswith("cuda") else "cpu"
    batches, images = SEGMENT_BATCHES[kind], SEGMENT_IMAGES[kind]
    hq = cv2.cvtColor(cv2.imread(str(ASSETS_DIR / "astronaut.png")), cv2.COLOR_BGR2RGB)
    crops = [np.ascontiguousarray(np.roll(hq, 8 * i, axis=1)) for i in range(images)]
    out: dict[str, float] = {}

    def timed(batch: int, precision: str | None) -> list[np.ndarray]:
        segmenter = make_segmenter(seg.name, checkpoint=seg.checkpoint, device=seg.device, batch_size=batch,
                                   precision=precision)
        segmenter.segment(crops[:batch])
        start = time.perf_counter()
        labels = [s.parts for s in segmenter.segment(crops)]  # copies to the CPU: synchronised
        rate = images / (time.perf_counter() - start)
        out[str(batch) if precision == seg.precision else f"{batch}_{precision}"] = float(f"{rate:.3g}")
        segmenter.close()
        return labels

    for batch in batches:
        reference = timed(batch, seg.precision)
    if kind == "cuda":
        for precision in ("fp32", "tf32", "bf16"):
            if precision != seg.precision:
                labels = timed(max(batches), precision)
                out[f"{max(batches)}_{precision}_same_labels"] = round(
                    float(np.mean([np.mean(a == b) for a, b in zip(labels, reference)])), 4)
    return out


def end_to_end(recipe: Recipe, samples: int, workers: int, seed: int,
               seg: SegmenterChoice = SegmenterChoice()) -> dict[str, Any]:
    """A real ``synth`` run into a temporary folder, on copies of the bundled photos under distinct
    names, E2E_SAMPLES_PER_SOURCE samples each. With the 3 photos alone a source's task would hold a
    third of the run and 2 workers would wait on the last one (a task is one source)."""
    bundled = [Path(s.path) for s in embedded_sources()]
    copies = -(-samples // (E2E_SAMPLES_PER_SOURCE * len(bundled)))
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for j in range(copies):
            for photo in bundled:
                shutil.copyfile(photo, photos / f"{photo.stem}-{j:04d}{photo.suffix}")
        cfg = SynthConfig(inputs=[str(photos)], out=Path(tmp) / "shards", recipe=recipe, seed=seed,
                          samples_per_image=E2E_SAMPLES_PER_SOURCE, limit=samples, workers=workers, progress=False,
                          segmenter=seg.name, checkpoint=seg.checkpoint, device=seg.device,
                          seg_precision=seg.precision)
        summary = synth(cfg)
    inv = summary["this_invocation"]
    return {
        "samples": summary["samples_written"],
        "workers": workers,
        "wall_s": inv["wall_s"],
        "samples_per_s": inv["samples_per_s"],
        "peak_worker_rss_mib": inv["worker_peak_rss_mib"],
        "worker_cpu_ms_per_sample": inv["cpu_ms_per_sample"],
        "stage_ms_per_sample_in_run": inv["stage_ms_per_sample"],
        "segmentation_share": round(sum(v for k, v in inv["stage_ms_per_sample"].items() if k in SEGMENTATION_STAGES)
                                    / max(sum(inv["stage_ms_per_sample"].values()), 1e-9), 3),
    }


def run_bench(recipe: Recipe, n: int, workers: int | None, e2e_samples: int, seed: int,
              seg: SegmenterChoice = SegmenterChoice()) -> dict[str, Any]:
    stages = stage_timings(recipe, n, seed, seg)
    result: dict[str, Any] = {
        "image_size": recipe.crop.size,
        "segmenter": seg.name + (f" {os.path.basename(seg.checkpoint)} on {seg.device}" if seg.checkpoint else "")
        + (f" in {seg.precision}" if seg.precision else ""),
        "stage_ms_one_core": stages,
        "degrade_ms_per_sample": round(stages["trajectory_psf"] + stages["hmb_blur"] + stages["generic"], 2),
    }
    if seg.name == "sapiens":
        result["segment_images_per_s"] = segment_throughput(seg)
    if e2e_samples:
        workers = workers or default_workers(seg.name, seg.checkpoint, seg.device)
        result["end_to_end"] = end_to_end(recipe, e2e_samples, workers, seed, seg)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"segmenter: {result['segmenter']}",
             f"stage (one core, {result['image_size']}x{result['image_size']})     ms"]
    lines += [f"  {name:<28}{ms:>8.2f}" for name, ms in result["stage_ms_one_core"].items()]
    lines.append(f"  {'degrade (HMB + generic)':<28}{result['degrade_ms_per_sample']:>8.2f}")
    if "segment_images_per_s" in result:
        rates = ", ".join(f"batch {b}: {ips}" for b, ips in result["segment_images_per_s"].items())
        lines.append(f"segmentation throughput, one process (images/s; share of labels as chosen): {rates}")
    e2e = result.get("end_to_end")
    if e2e:
        lines.append(
            f"end to end: {e2e['samples']} samples with {e2e['workers']} workers in {e2e['wall_s']} s = "
            f"{e2e['samples_per_s']} samples/s; peak worker RSS {e2e['peak_worker_rss_mib']} MiB; "
            f"worker CPU {e2e['worker_cpu_ms_per_sample']} ms per sample; segmentation "
            f"{100 * e2e['segmentation_share']:.0f}% of the workers' stage time"
        )
    return "\n".join(lines)
