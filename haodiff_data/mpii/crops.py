"""``haodiff-data mpii-test``: MPII annotations + images -> evaluation crops, manifest and counts.

``out/images.jsonl`` gets one line per annotated image, appended in annotation order as each is
done (every person's decision, the rule that dropped it, measured clip and overlap): it is the
run's state, so ``--resume`` continues after the last complete line. At the end come
``manifest.jsonl`` (one line per crop with the rules applied), ``summary.json`` and, with a
detector, ``hmb.jsonl``. Images are read only when a person passes the annotation-only rules; a
missing or corrupt image is recorded (its persons dropped by ``image_unreadable``), not fatal.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from haodiff_data.intake.decode import RejectedInput, decode_image
from haodiff_data.mpii.annotations import MPIIImage, read_annotations
from haodiff_data.mpii.select import RULES, MPIITestConfig, select_persons
from haodiff_data.shards.writer import atomic_write_bytes

MAX_PIXELS = 100_000_000
PAPER = {"instances": 1765, "images_with_hmb": 1326, "images": 5427}


class MPIIRunError(RuntimeError):
    """A run that cannot start (bad folders, existing output without --resume)."""


@dataclass(frozen=True)
class MPIIRun:
    annotations: Path
    images: Path
    out: Path
    rules: MPIITestConfig
    workers: int = 1
    resume: bool = False
    limit: int | None = None
    progress: bool = True


def crop_name(image: MPIIImage, person: int) -> str:
    return f"{Path(image.name).stem}_{person:02d}.png"


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    h, w = crop.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(crop, (nw, nh), interpolation=interp)


def process_image(image: MPIIImage, images_dir: Path, crops_dir: Path, rules: MPIITestConfig) -> dict:
    """Decide every person of ``image``, write the kept crops; the image's record."""
    record = {"image_index": image.index, "image": image.name, "train": image.train,
              "activity": image.activity, "category": image.category, "width": None, "height": None,
              "error": None, "persons": []}
    # Annotation-only rules first, with a nominal size: no pixel is read for an image nobody passes.
    early = select_persons(image, 10**6, 10**6, rules)
    if not any(d.dropped_by not in ("split", "min_keypoints", "single_person") for d in early):
        record["persons"] = [d.to_json() for d in early]
        return record
    try:
        rgb = decode_image((images_dir / image.name).read_bytes(), min_side=1, max_pixels=MAX_PIXELS)
    except (OSError, RejectedInput) as exc:
        record["error"] = exc.reason if isinstance(exc, RejectedInput) else f"unreadable: {exc}"
        for d in early:
            if d.dropped_by not in ("split", "min_keypoints", "single_person"):
                d.kept, d.dropped_by, d.box, d.clip, d.other_overlap = False, "image_unreadable", None, None, None
        record["persons"] = [d.to_json() for d in early]
        return record
    h, w = rgb.shape[:2]
    record["width"], record["height"] = w, h
    for d in select_persons(image, w, h, rules):
        row = d.to_json()
        if d.kept:
            x0, y0, x1, y1 = d.box
            crop = _resize(rgb[y0:y1, x0:x1], rules.size)
            ok, buf = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            if not ok:
                raise OSError(f"PNG encoding failed for {image.name} person {d.person}")
            name = crop_name(image, d.person)
            tmp = crops_dir / f".{name}.tmp"
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, crops_dir / name)
            row["crop"] = name
        record["persons"].append(row)
    return record


def _process(args: tuple) -> dict:
    return process_image(*args)


def _done_records(state: Path) -> list[dict]:
    """Complete lines of a previous run's images.jsonl; a torn last line is cut off the file."""
    if not state.exists():
        return []
    data = state.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(state, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def run(cfg: MPIIRun) -> dict:
    """Crop every selected person; write manifest and summary; the summary."""
    if not cfg.images.is_dir():
        raise MPIIRunError(f"images folder not found: {cfg.images}")
    images = read_annotations(cfg.annotations)
    if cfg.limit is not None:
        images = images[:cfg.limit]
    crops_dir = cfg.out / "crops"
    state = cfg.out / "images.jsonl"
    if cfg.out.exists() and any(cfg.out.iterdir()) and not cfg.resume:
        raise MPIIRunError(f"{cfg.out} is not empty; pass --resume to continue a run there")
    crops_dir.mkdir(parents=True, exist_ok=True)
    rules_path = cfg.out / "rules.json"
    rules = asdict(cfg.rules)
    if cfg.resume and rules_path.exists() and json.loads(rules_path.read_text()) != rules:
        raise MPIIRunError(f"{cfg.out} was made with other rules ({rules_path}); use a new --out")
    atomic_write_bytes(rules_path, (json.dumps(rules, indent=1) + "\n").encode())
    records = _done_records(state)
    todo = images[len(records):]
    bar = tqdm(total=len(images), initial=len(records), unit="img", disable=not cfg.progress, dynamic_ncols=True)
    tasks = [(im, cfg.images, crops_dir, cfg.rules) for im in todo]
    with open(state, "a") as f:
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers) as pool:
                results = pool.map(_process, tasks, chunksize=8)
                for rec in results:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                    f.flush()
                    records.append(rec)
                    bar.update(1)
        else:
            for task in tasks:
                rec = _process(task)
                f.write(json.dumps(rec, sort_keys=True) + "\n")
                f.flush()
                records.append(rec)
                bar.update(1)
    bar.close()
    return finish(cfg.out, records, rules)


def finish(out: Path, records: list[dict], rules: dict) -> dict:
    manifest = []
    dropped: Counter = Counter()
    for rec in records:
        for p in rec["persons"]:
            if p["kept"]:
                manifest.append({
                    "crop": f"crops/{p['crop']}", "image": rec["image"], "image_index": rec["image_index"],
                    "person": p["person"], "split": "train" if rec["train"] else "test",
                    "activity": rec["activity"], "category": rec["category"], "box": p["box"],
                    "keypoint_extent": p["extent"], "keypoints": p["keypoints"], "clip": p["clip"],
                    "other_overlap": p["other_overlap"], "rules": rules,
                })
            else:
                dropped[p["dropped_by"]] += 1
    lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in manifest)
    atomic_write_bytes(out / "manifest.jsonl", lines.encode())
    persons = sum(len(r["persons"]) for r in records)
    summary = {
        "images_in_annotations": len(records),
        "persons": persons,
        "dropped_by_rule": {r: dropped.get(r, 0) for r in (*RULES, "image_unreadable")},
        "crops": len(manifest),
        "images_with_crops": len({m["image"] for m in manifest}),
        "unreadable_images": [{"image": r["image"], "error": r["error"]} for r in records if r["error"]],
        "rules": rules,
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['persons']} annotated persons in {summary['images_in_annotations']} images"]
    left = summary["persons"]
    for rule, n in summary["dropped_by_rule"].items():
        left -= n
        lines.append(f"  {rule:20s} dropped {n:6d}  -> {left:6d} left")
    lines.append(f"{summary['crops']} crops from {summary['images_with_crops']} images "
                 f"({len(summary['unreadable_images'])} images unreadable)")
    return "\n".join(lines)


def detect_hmb(out: Path, weights: Path, conf: float, imgsz: int, device: str, batch: int, progress: bool) -> dict:
    """Run the HMB detector over the crops in manifest order: ``hmb.jsonl`` and the counts."""
    from haodiff_data.detect.predict import PredictConfig, detect_sources, write_jsonl
    from haodiff_data.intake.sources import Source

    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if x.strip()]
    sources = [Source(str(out / m["crop"])) for m in manifest]
    items, _, _ = detect_sources(sources, PredictConfig(weights, conf=conf, imgsz=imgsz, device=device, batch=batch),
                                 progress)
    for item, m in zip(items, manifest):
        item.file = m["crop"]
    write_jsonl(out / "hmb.jsonl", items)
    counts = {"instances": sum(len(i.detections) for i in items),
              "images_with_hmb": sum(bool(i.detections) for i in items), "images": len(items), "conf": conf}
    atomic_write_bytes(out / "hmb_summary.json", (json.dumps({**counts, "paper": PAPER}, indent=1) + "\n").encode())
    return counts


def format_hmb(counts: dict) -> str:
    return (f"{counts['instances']} HMB instances in {counts['images_with_hmb']} of {counts['images']} images "
            f"(conf >= {counts['conf']}); paper: {PAPER['instances']:,} in {PAPER['images_with_hmb']:,} "
            f"of {PAPER['images']:,}")
