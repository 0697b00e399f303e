"""``haodiff-data yolo-export``: shards -> an ultralytics detection dataset of HMB boxes.

What the detector sees is the LQ (``lq.png``, copied byte for byte); what it learns to find is
class 0 ``hmb``, one box per HMB instance.

One HMB instance is one moving body part. In a sample, M_HMB (``mask.png``) is the region where
that part's blur weight W >= 0.5; occlusion or the crop can split it into several connected
regions (8-connectivity). Regions smaller than ``min_area`` (a fraction of the image) are dropped:
slivers of the feathered edge carry no visible blur. The remaining regions belong to the one moving
part the sample's JSON records (schema v1 draws one part per sample), so they merge into one box,
the tight pixel extent of their union. A sample with no HMB, or whose regions are all too small,
is a negative with an empty label file.

Train/val split: a sample goes to val when the first 8 bytes of sha256(its key) read as a fraction
below ``val_fraction``; the same key lands in the same split in every export. ``split_by=source``
hashes the source image instead, so crops of one photo never sit on both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from haodiff_data.shards.reader import expand_shards, iter_members
from haodiff_data.shards.schema import MEMBERS, SchemaError, check_meta, decode_png
from haodiff_data.shards.writer import atomic_write_bytes

CLASS_NAMES = ("hmb",)
SPLITS = ("train", "val")


class ExportError(RuntimeError):
    """An export that cannot run or would produce an unusable dataset."""


@dataclass(frozen=True)
class ExportConfig:
    val_fraction: float = 0.1
    min_area: float = 0.0005  # fraction of the image: 131 px at 512x512
    split_by: str = "key"  # key | source


def hmb_instance_box(mask: np.ndarray, min_area_px: float) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1), pixel edges, of one moving part's mask regions; None if none is large enough."""
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area_px]
    if not keep:
        return None
    x0 = min(int(stats[i, cv2.CC_STAT_LEFT]) for i in keep)
    y0 = min(int(stats[i, cv2.CC_STAT_TOP]) for i in keep)
    x1 = max(int(stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH]) for i in keep)
    y1 = max(int(stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT]) for i in keep)
    return x0, y0, x1, y1


def yolo_line(box: tuple[int, int, int, int], width: int, height: int, cls: int = 0) -> str:
    """``cls cx cy w h`` normalised to [0, 1], the ultralytics label format."""
    x0, y0, x1, y1 = box
    return (f"{cls} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
            f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")


def split_of(name: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def _write(path: Path, data: bytes) -> None:
    # Not fsynced one by one (thousands of files): the rename keeps readers from partial files and
    # export.json, written last with fsync, marks a complete export.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty; pass --overwrite to replace a previous export there")
        if not (out / "export.json").exists() and not (out / "dataset.yaml").exists():
            raise ExportError(f"{out} is not empty and holds no previous export; refusing to delete anything")
        for name in ("images", "labels"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("export.json", "dataset.yaml"):
            (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)


def dataset_yaml(out: Path) -> str:
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))
    return (f"# ultralytics detection dataset written by haodiff-data yolo-export\n"
            f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")


def _export_shard(path: Path, out: Path, cfg: ExportConfig, counts: dict, skipped: list[dict],
                  seen: dict[str, str], bar: tqdm) -> int:
    """Export one shard's samples; the number of HMB samples whose regions were all below min area."""
    too_small = 0
    for members in iter_members(path):
        key = str(members["__key__"])
        where = f"{path}:{key}"
        try:
            missing = [m for m in MEMBERS if m not in members]
            if missing:
                raise SchemaError(f"{where}: missing members {missing}")
            meta = json.loads(members["json"])
            check_meta(meta, where)
            mask = decode_png(members["mask.png"], 1)
        except (SchemaError, ValueError) as exc:
            skipped.append({"sample": where, "reason": str(exc)})
            continue
        if key in seen:
            raise ExportError(f"sample key {key} is in both {seen[key]} and {path}: export one run's shards "
                              f"per dataset (keys are unique within a run)")
        seen[key] = str(path)
        h, w = mask.shape
        box = hmb_instance_box(mask, cfg.min_area * h * w)
        if box is None and meta.get("first_order") == "hmb":
            too_small += 1
        name = key if cfg.split_by == "key" else meta["source"]["sha256"]
        split = split_of(name, cfg.val_fraction)
        _write(out / "images" / split / f"{key}.png", members["lq.png"])
        _write(out / "labels" / split / f"{key}.txt", (yolo_line(box, w, h) + "\n").encode() if box else b"")
        c = counts[split]
        c["images"] += 1
        c["positives" if box else "negatives"] += 1
        c["boxes"] += box is not None
        bar.update(1)
    return too_small


def export(shards: Sequence[str], out: Path, cfg: ExportConfig = ExportConfig(), overwrite: bool = False,
           progress: bool = True) -> dict:
    """Write ``images/{train,val}``, ``labels/{train,val}``, ``dataset.yaml`` and ``export.json``; the counts."""
    if not 0 < cfg.val_fraction < 1:
        raise ExportError("--val-fraction must be in (0, 1)")
    if not 0 <= cfg.min_area < 1:
        raise ExportError("--min-area must be in [0, 1)")
    if cfg.split_by not in ("key", "source"):
        raise ExportError("--split-by must be key or source")
    paths = expand_shards(list(shards))
    if not paths:
        raise ExportError(f"no shards found in {list(shards)}")
    _prepare(out, overwrite)
    counts = {s: {"images": 0, "positives": 0, "negatives": 0, "boxes": 0} for s in SPLITS}
    skipped: list[dict] = []
    hmb_too_small = 0
    seen: dict[str, str] = {}
    bar = tqdm(unit="sample", disable=not progress, dynamic_ncols=True)
    for path in paths:
        try:
            hmb_too_small += _export_shard(path, out, cfg, counts, skipped, seen, bar)
        except tarfile.TarError as exc:
            skipped.append({"shard": str(path), "reason": f"unreadable tar (samples after the damage lost): {exc}"})
    bar.close()
    empty = [s for s in SPLITS if counts[s]["images"] == 0]
    if empty:
        raise ExportError(f"the {' and '.join(empty)} split is empty ({len(seen)} samples, val fraction "
                          f"{cfg.val_fraction}); export more samples or change --val-fraction")
    atomic_write_bytes(out / "dataset.yaml", dataset_yaml(out).encode())
    summary = {"shards": [str(p) for p in paths], "config": asdict(cfg), "splits": counts,
               "hmb_below_min_area": hmb_too_small, "skipped": skipped}
    atomic_write_bytes(out / "export.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def format_counts(summary: dict, out: Path) -> str:
    lines = [f"{'split':6} {'images':>7} {'positives':>9} {'negatives':>9} {'boxes':>6}"]
    for split, c in summary["splits"].items():
        lines.append(f"{split:6} {c['images']:7d} {c['positives']:9d} {c['negatives']:9d} {c['boxes']:6d}")
    lines.append(f"HMB masks below min area (exported as negatives): {summary['hmb_below_min_area']}; "
                 f"samples skipped as unreadable: {len(summary['skipped'])}")
    lines.append(f"dataset: {out / 'dataset.yaml'}")
    return "\n".join(lines)
