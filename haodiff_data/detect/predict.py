"""``haodiff-data detect predict``: run an HMB detector over images, folders, lists.

Writes ``detections.jsonl`` (one line per image: file, size, and every box in pixels x0 y0 x1 y1
with confidence and class; unreadable images get an ``error`` instead) and an annotated
``detections.png`` contact sheet. Images are decoded by the project's intake (EXIF orientation
applied), batched to the detector, and never resized by us: ultralytics letterboxes to ``imgsz``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from haodiff_data.detect import sheet
from haodiff_data.detect.yolo import DetectorError, load_model
from haodiff_data.intake.decode import RejectedInput, decode_image
from haodiff_data.intake.sources import Source, list_sources

MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the decoded image
    confidence: float
    cls: int
    name: str


@dataclass
class ImageDetections:
    file: str
    width: int = 0
    height: int = 0
    detections: list[Detection] = field(default_factory=list)
    error: str | None = None

    def count(self, conf: float) -> int:
        return sum(d.confidence >= conf for d in self.detections)

    def to_json(self) -> dict:
        out = asdict(self)
        out["detections"] = [
            {"box": [round(v, 2) for v in d.box], "confidence": round(d.confidence, 5), "class": d.cls, "name": d.name}
            for d in self.detections
        ]
        if self.error is None:
            del out["error"]
        return out


@dataclass(frozen=True)
class PredictConfig:
    weights: Path
    conf: float = 0.25
    iou: float = 0.7
    imgsz: int = 512
    device: str = "cpu"
    batch: int = 16
    max_det: int = 300


def _read(source: Source) -> np.ndarray:
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise RejectedInput(f"unreadable: {exc}") from None
    return decode_image(data, min_side=1, max_pixels=MAX_PIXELS)


def _to_detections(result) -> list[Detection]:
    boxes = result.boxes
    xyxy = boxes.xyxy.cpu().numpy().astype(np.float64)
    conf = boxes.conf.cpu().numpy().astype(np.float64)
    cls = boxes.cls.cpu().numpy().astype(np.int64)
    order = np.argsort(-conf, kind="stable")
    return [
        Detection(tuple(float(v) for v in xyxy[i]), float(conf[i]), int(cls[i]), result.names[int(cls[i])])
        for i in order
    ]


def detect_sources(sources: Sequence[Source], cfg: PredictConfig, progress: bool = True,
                   keep_images: bool = False) -> tuple[list[ImageDetections], dict[str, np.ndarray], dict[str, float]]:
    """Detections for every source in order, the decoded images (if ``keep_images``) and timings.

    An image that cannot be read or decoded gets ``error`` and no detections; the run goes on.
    """
    if cfg.batch < 1:
        raise DetectorError("--batch must be >= 1")
    if not 0 <= cfg.conf <= 1 or not 0 <= cfg.iou <= 1:
        raise DetectorError("--conf and --iou must be in [0, 1]")
    model = load_model(cfg.weights)
    results: list[ImageDetections] = []
    images: dict[str, np.ndarray] = {}
    timing = {"decode_s": 0.0, "detect_s": 0.0, "images": 0}
    bar = tqdm(total=len(sources), unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(sources), cfg.batch):
        chunk = sources[start:start + cfg.batch]
        t0 = time.perf_counter()
        decoded: list[tuple[ImageDetections, np.ndarray]] = []
        for src in chunk:
            item = ImageDetections(file=src.id)
            results.append(item)
            try:
                rgb = _read(src)
            except RejectedInput as exc:
                item.error = exc.reason
                continue
            item.height, item.width = rgb.shape[:2]
            decoded.append((item, rgb))
            if keep_images:
                images[src.id] = rgb
        t1 = time.perf_counter()
        if decoded:
            # ultralytics takes numpy images as BGR.
            bgr = [np.ascontiguousarray(rgb[..., ::-1]) for _, rgb in decoded]
            preds = model.predict(bgr, imgsz=cfg.imgsz, conf=cfg.conf, iou=cfg.iou, device=cfg.device,
                                  max_det=cfg.max_det, batch=len(bgr), verbose=False)
            for (item, _), pred in zip(decoded, preds):
                item.detections = _to_detections(pred)
        t2 = time.perf_counter()
        timing["decode_s"] += t1 - t0
        timing["detect_s"] += t2 - t1
        timing["images"] += len(decoded)
        bar.update(len(chunk))
    bar.close()
    return results, images, timing


def write_jsonl(path: Path, items: Sequence[ImageDetections]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for item in items:
            f.write(json.dumps(item.to_json(), sort_keys=True) + "\n")
    tmp.replace(path)


def detections_sheet(items: Sequence[ImageDetections], images: dict[str, np.ndarray], max_images: int,
                     side: int = 256, columns: int = 6) -> np.ndarray | None:
    """Thumbnails with boxes; images with detections first (most confident first), then the rest."""
    readable = [i for i in items if i.error is None and i.file in images]
    readable.sort(key=lambda i: (-max((d.confidence for d in i.detections), default=-1.0)))
    tiles = []
    for item in readable[:max_images]:
        title = f"{Path(item.file.split('::')[-1]).name} ({len(item.detections)})"
        tiles.append(sheet.annotate(images[item.file], [d.box for d in item.detections],
                                    [d.confidence for d in item.detections], side, title))
    if not tiles:
        return None
    return sheet.grid(tiles, min(columns, len(tiles)))


def predict(inputs: Sequence[str], out: Path, cfg: PredictConfig, max_sheet: int = 48,
            progress: bool = True) -> dict:
    """Detect on ``inputs``, write ``detections.jsonl`` and ``detections.png`` to ``out``; the summary."""
    sources, unlisted = list_sources(inputs)
    if not sources and not unlisted:
        raise DetectorError(f"no images found in {list(inputs)}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    items, images, timing = detect_sources(sources, cfg, progress, keep_images=True)
    # Inputs that never became images (dangling links, loops, unreadable folders) are reported too.
    items += [ImageDetections(file=r["source"], error=r["reason"]) for r in unlisted]
    wall = time.perf_counter() - t0
    write_jsonl(out / "detections.jsonl", items)
    sheet_img = detections_sheet(items, images, max_sheet)
    if sheet_img is not None:
        sheet.save_rgb(out / "detections.png", sheet_img)
    n_ok = timing["images"]
    summary = {
        "images": len(items),
        "unreadable": sum(i.error is not None for i in items),
        "images_with_detections": sum(bool(i.detections) for i in items),
        "detections": sum(len(i.detections) for i in items),
        "conf": cfg.conf,
        "imgsz": cfg.imgsz,
        "device": cfg.device,
        "batch": cfg.batch,
        "wall_s": round(wall, 3),
        "decode_s": round(timing["decode_s"], 3),
        "detect_s": round(timing["detect_s"], 3),
        "detect_images_per_s": round(n_ok / timing["detect_s"], 3) if timing["detect_s"] > 0 else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(summary: dict, out: Path) -> str:
    return (
        f"{summary['detections']} detections in {summary['images_with_detections']} of {summary['images']} images "
        f"(conf >= {summary['conf']}, imgsz {summary['imgsz']}, {summary['device']}); "
        f"{summary['unreadable']} unreadable; detector {summary['detect_images_per_s']} images/s "
        f"(decode {summary['decode_s']} s, detect {summary['detect_s']} s, wall {summary['wall_s']} s) -> {out}"
    )

