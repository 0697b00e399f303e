"""``haodiff-data detect train``: an ultralytics YOLO11 HMB detector on a ``yolo-export`` dataset.

From scratch (``yolo11n.yaml``) by default, or fine-tuned from a local ``.pt`` (``--weights``).
Writes ultralytics' run folder into ``--out`` plus ``best.pt``, ``metrics.json`` (mAP50,
mAP50-95, precision, recall of best.pt on the synthetic val split) and ``val_predictions.png``
(predicted boxes red, labelled boxes green).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from haodiff_data.detect import sheet
from haodiff_data.detect.predict import PredictConfig, detect_sources
from haodiff_data.detect.yolo import DetectorError, load_model
from haodiff_data.intake.decode import decode_image
from haodiff_data.intake.sources import Source
from haodiff_data.shards.writer import atomic_write_bytes

# Augmentations that erase or fake blur are off. The detector must learn what HMB looks like, so
# anything that blurs without a label, or hides the blurred part, teaches it the wrong thing:
AUGMENT_OFF = {
    "mixup": 0.0,  # blending two images gives ghosted double contours: motion blur with no box
    "cutmix": 0.0,  # pasted patches cut blurred parts and paste sharp ones over them
    "copy_paste": 0.0,  # same, per instance (and needs masks)
    "erasing": 0.0,  # random erasing can wipe the blurred part out (classification only, kept off anyway)
    "augmentations": [],  # no Albumentations Blur/MedianBlur (p=0.01 each when albumentations is installed)
}
# Kept at ultralytics' defaults: mosaic, scale, translate, flips and HSV change where and how large
# the blurred part is, not whether it is blurred.


@dataclass(frozen=True)
class TrainConfig:
    data: Path  # a yolo-export folder or its dataset.yaml
    out: Path
    model: str = "yolo11n.yaml"  # architecture, built untrained
    weights: Path | None = None  # a local .pt to fine-tune instead
    imgsz: int = 512
    epochs: int = 100
    hours: float | None = None  # a wall-clock budget: ultralytics fits the epochs into it
    batch: int = 16
    device: str = "cpu"
    workers: int = 2
    seed: int = 0
    patience: int = 50
    precision: str = "bf16"  # bf16 | fp32; only used on CUDA
    plots: bool = True


def _dataset_yaml(data: Path) -> Path:
    path = data / "dataset.yaml" if data.is_dir() else data
    if not path.is_file():
        raise DetectorError(f"{data}: no dataset.yaml (make one with haodiff-data yolo-export)")
    return path


def train(cfg: TrainConfig) -> dict:
    """Train, validate best.pt, draw val predictions; the metrics."""
    data_yaml = _dataset_yaml(cfg.data)
    if cfg.precision not in ("bf16", "fp32"):
        # fp16 would run ultralytics' AMP check, which downloads yolo26n.pt.
        raise DetectorError("--precision must be bf16 or fp32")
    source = str(cfg.weights) if cfg.weights else cfg.model
    if cfg.weights and not Path(cfg.weights).is_file():
        raise DetectorError(f"{cfg.weights}: weights file not found (weights are never downloaded)")
    model = load_model(source)
    on_cuda = str(cfg.device).lower() not in ("cpu", "mps")
    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model.train(
        data=str(data_yaml), imgsz=cfg.imgsz, epochs=cfg.epochs, time=cfg.hours, batch=cfg.batch,
        device=cfg.device, workers=cfg.workers, seed=cfg.seed, deterministic=True, patience=cfg.patience,
        amp="bf16" if on_cuda and cfg.precision == "bf16" else False, plots=cfg.plots, pretrained=bool(cfg.weights),
        project=str(out.parent), name=out.name, exist_ok=True, verbose=False, **AUGMENT_OFF,
    )
    train_s = time.perf_counter() - t0
    best = out / "weights" / "best.pt"
    if not best.is_file():
        raise DetectorError(f"training finished without {best}")
    shutil.copyfile(best, out / "best.pt")
    metrics = validate(out / "best.pt", data_yaml, cfg)
    metrics.update(train_s=round(train_s, 1), config={k: str(v) if isinstance(v, Path) else v
                                                      for k, v in asdict(cfg).items()})
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    val_sheet = val_predictions_sheet(out / "best.pt", data_yaml, cfg)
    sheet.save_rgb(out / "val_predictions.png", val_sheet)
    return metrics


def validate(weights: Path, data_yaml: Path, cfg: TrainConfig) -> dict:
    model = load_model(weights)
    res = model.val(data=str(data_yaml), imgsz=cfg.imgsz, batch=cfg.batch, device=cfg.device,
                    workers=cfg.workers, plots=False, verbose=False, project=str(cfg.out.resolve()),
                    name="val", exist_ok=True)
    box = res.box
    return {"mAP50": round(float(box.map50), 5), "mAP50-95": round(float(box.map), 5),
            "precision": round(float(box.mp), 5), "recall": round(float(box.mr), 5),
            "val_images": len(_val_files(data_yaml)[0]), "weights": str(weights)}


def _val_files(data_yaml: Path) -> tuple[list[Path], Path]:
    root = data_yaml.parent
    images = sorted((root / "images" / "val").glob("*.png"))
    return images, root / "labels" / "val"


def _label_boxes(label: Path, w: int, h: int) -> list[tuple[float, float, float, float]]:
    boxes = []
    if label.is_file():
        for line in label.read_text().split("\n"):
            if line.strip():
                _, cx, cy, bw, bh = (float(v) for v in line.split())
                boxes.append(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
    return boxes


def val_predictions_sheet(weights: Path, data_yaml: Path, cfg: TrainConfig, n: int = 24, side: int = 256) -> np.ndarray:
    """Up to ``n`` val images, positives first: labelled boxes green, predictions (conf >= 0.25) red."""
    images, labels = _val_files(data_yaml)
    positives = [p for p in images if (labels / f"{p.stem}.txt").is_file() and (labels / f"{p.stem}.txt").stat().st_size]
    negatives = [p for p in images if p not in set(positives)]
    chosen = positives[: n * 2 // 3] + negatives[: n - min(len(positives), n * 2 // 3)]
    if not chosen:
        raise DetectorError(f"{data_yaml}: the val split has no images")
    items, _, _ = detect_sources([Source(str(p)) for p in chosen], PredictConfig(weights, imgsz=cfg.imgsz,
                                                                                   device=cfg.device), progress=False)
    tiles = []
    for path, item in zip(chosen, items):
        rgb = decode_image(path.read_bytes(), min_side=1, max_pixels=10**8)
        h, w = rgb.shape[:2]
        tile = sheet.annotate(rgb, [d.box for d in item.detections], [d.confidence for d in item.detections],
                              side, f"{path.stem} pred {len(item.detections)}",
                              truth=_label_boxes(labels / f"{path.stem}.txt", w, h))
        tiles.append(tile)
    return sheet.grid(tiles, 6)
