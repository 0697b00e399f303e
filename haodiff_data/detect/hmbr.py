"""HMB-R: how many human-motion-blur instances a restorer leaves behind (HAODiff Sec. 4.1, Fig. 7).

HMB-R = (detections on the restored images) / (detections on the inputs), both counted by the same
HMB detector at one confidence threshold over the whole set; lower is better (the paper reports
0.0929 with its HMB branch, 0.2816 without). Detections are counted, not matched box to box, as the
paper defines it. One threshold hides a choice, so the ratio is also given over a range of
thresholds. The detector runs once per image at the lowest threshold; counts at a higher threshold
are the detections whose confidence reaches it (greedy NMS only lets a box suppress lower-scored
ones, so filtering after NMS equals filtering before it).

Use from Python (``haodiff-eval --detector`` does)::

    from haodiff_data.detect.hmbr import compute_hmbr
    result = compute_hmbr("mpii_test/crops", "restored/", "best.pt")
    print(result.summary_line()); result.write("hmbr_out/")
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from haodiff_data.detect import sheet
from haodiff_data.detect.predict import MAX_PIXELS, Detection, ImageDetections, PredictConfig, detect_sources
from haodiff_data.detect.yolo import DetectorError
from haodiff_data.intake.decode import decode_image
from haodiff_data.intake.sources import IMAGE_EXTENSIONS, Source
from haodiff_data.shards.writer import atomic_write_bytes

DEFAULT_CONF = 0.25  # ultralytics' own predict default; the paper gives none
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95


class PairingError(DetectorError):
    """Input and restored folders whose images do not pair up one to one by name."""


@dataclass(frozen=True)
class ImagePair:
    name: str  # path relative to the folder, without extension: the pairing key
    input_file: str
    restored_file: str
    input_detections: tuple[Detection, ...] = ()
    restored_detections: tuple[Detection, ...] = ()

    def counts(self, conf: float) -> tuple[int, int]:
        return (sum(d.confidence >= conf for d in self.input_detections),
                sum(d.confidence >= conf for d in self.restored_detections))


@dataclass
class HMBRResult:
    conf: float
    hmbr: float | None  # None when the inputs have no detection at ``conf`` (the ratio is undefined)
    input_detections: int
    restored_detections: int
    pairs: list[ImagePair]
    curve: list[dict] = field(default_factory=list)  # {"conf", "inputs", "restored", "hmbr"} per threshold

    def per_image(self) -> list[dict]:
        rows = []
        for p in self.pairs:
            n_in, n_out = p.counts(self.conf)
            rows.append({"name": p.name, "input_file": p.input_file, "restored_file": p.restored_file,
                         "input_detections": n_in, "restored_detections": n_out})
        return rows

    def to_dict(self) -> dict:
        return {
            "hmbr": self.hmbr,
            "conf": self.conf,
            "images": len(self.pairs),
            "input_detections": self.input_detections,
            "restored_detections": self.restored_detections,
            "images_with_input_detections": sum(p.counts(self.conf)[0] > 0 for p in self.pairs),
            "images_with_restored_detections": sum(p.counts(self.conf)[1] > 0 for p in self.pairs),
            "curve": self.curve,
            "per_image": self.per_image(),
        }

    def summary_line(self) -> str:
        ratio = "undefined (no detections on the inputs)" if self.hmbr is None else f"{self.hmbr:.4f}"
        return (f"HMB-R = {ratio} at conf >= {self.conf}: {self.restored_detections} HMB detections on "
                f"{len(self.pairs)} restored images / {self.input_detections} on the inputs")

    def write(self, out: str | Path, sheet_rows: int = 24) -> list[Path]:
        """``hmbr.json``, ``hmbr_per_image.csv``, ``hmbr_curve.csv`` and ``hmbr_sheet.png`` (0 rows: no sheet)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "hmbr.json", out / "hmbr_per_image.csv", out / "hmbr_curve.csv"]
        atomic_write_bytes(paths[0], (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        atomic_write_bytes(paths[1], _csv(self.per_image()))
        atomic_write_bytes(paths[2], _csv(self.curve))
        if sheet_rows > 0:
            tiles = self.sheet(sheet_rows)
            if tiles is not None:
                paths.append(out / "hmbr_sheet.png")
                sheet.save_rgb(paths[-1], tiles)
        return paths

    def sheet(self, max_rows: int = 24, side: int = 256) -> np.ndarray | None:
        """Input | restored with boxes, for images with HMB on the input: those where it remains first."""
        rows = []
        for p in self.pairs:
            n_in, n_out = p.counts(self.conf)
            if n_in:
                rows.append((n_out == 0, p, n_in, n_out))
        rows.sort(key=lambda r: (r[0], r[1].name))
        tiles = []
        for gone, p, n_in, n_out in rows[:max_rows]:
            for file, dets, label in ((p.input_file, p.input_detections, f"input {p.name}: {n_in}"),
                                      (p.restored_file, p.restored_detections,
                                       f"restored: {n_out} ({'gone' if gone else 'remains'})")):
                kept = [d for d in dets if d.confidence >= self.conf]
                tiles.append(sheet.annotate(_read_rgb(file), [d.box for d in kept], [d.confidence for d in kept],
                                            side, label))
        return sheet.grid(tiles, 2) if tiles else None


def _read_rgb(path: str) -> np.ndarray:
    return decode_image(Path(path).read_bytes(), min_side=1, max_pixels=MAX_PIXELS)


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue().encode()


def ratio(restored: int, inputs: int) -> float | None:
    return restored / inputs if inputs else None


def hmbr_from_pairs(pairs: Sequence[ImagePair], conf: float = DEFAULT_CONF,
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> HMBRResult:
    """HMB-R from detections already made (at a threshold no higher than any asked for)."""
    def totals(t: float) -> tuple[int, int]:
        counts = [p.counts(t) for p in pairs]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    n_in, n_out = totals(conf)
    curve = []
    for t in sorted(set(thresholds)):
        a, b = totals(t)
        curve.append({"conf": t, "inputs": a, "restored": b, "hmbr": ratio(b, a)})
    return HMBRResult(conf=conf, hmbr=ratio(n_out, n_in), input_detections=n_in, restored_detections=n_out,
                      pairs=list(pairs), curve=curve)


def _index(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise PairingError(f"{role} folder not found: {folder}")
    index: dict[str, Path] = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS):
            key = f.relative_to(folder).with_suffix("").as_posix()
            if key in index:
                raise PairingError(f"{role} folder {folder}: {index[key].name} and {f.name} share the name {key!r}")
            index[key] = f
    if not index:
        raise PairingError(f"{role} folder {folder} holds no images")
    return index


def pair_folders(inputs: str | Path, restored: str | Path) -> list[tuple[str, Path, Path]]:
    """(name, input file, restored file) paired by path without extension (a.jpg pairs with a.png).

    Every image on either side must have its partner; otherwise the error names the missing ones.
    """
    a, b = _index(Path(inputs), "inputs"), _index(Path(restored), "restored")
    missing_restored = sorted(set(a) - set(b))
    missing_input = sorted(set(b) - set(a))
    if missing_restored or missing_input:
        parts = []
        for what, names in (("no restored image for", missing_restored), ("no input image for", missing_input)):
            if names:
                shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                parts.append(f"{what} {len(names)}: {shown}")
        raise PairingError(f"{inputs} and {restored} do not pair by name: " + "; ".join(parts))
    return [(k, a[k], b[k]) for k in sorted(a)]


def compute_hmbr(inputs: str | Path, restored: str | Path, weights: str | Path, conf: float = DEFAULT_CONF,
                 thresholds: Sequence[float] = DEFAULT_THRESHOLDS, imgsz: int = 512, iou: float = 0.7,
                 device: str = "cpu", batch: int = 16, progress: bool = True) -> HMBRResult:
    """HMB-R of the images in ``restored`` against their originals in ``inputs`` (paired by name).

    ``conf`` gives the headline ratio, ``thresholds`` the curve. An unreadable image on either side is an error: a ratio over a silently shrunk set misleads.
    """
    if not 0 < conf <= 1 or any(not 0 < t <= 1 for t in thresholds):
        raise DetectorError("confidence thresholds must be in (0, 1]")
    pairs = pair_folders(inputs, restored)
    files = [str(p[1]) for p in pairs] + [str(p[2]) for p in pairs]
    cfg = PredictConfig(weights=Path(weights), conf=min([conf, *thresholds]), iou=iou, imgsz=imgsz,
                        device=device, batch=batch)
    items, _, _ = detect_sources([Source(f) for f in files], cfg, progress)
    by_file: dict[str, ImageDetections] = {i.file: i for i in items}
    bad = [f"{i.file} ({i.error})" for i in items if i.error is not None]
    if bad:
        raise DetectorError(f"unreadable images: {'; '.join(bad[:10])}")
    image_pairs = [
        ImagePair(name, str(fa), str(fb), tuple(by_file[str(fa)].detections), tuple(by_file[str(fb)].detections))
        for name, fa, fb in pairs
    ]
    return hmbr_from_pairs(image_pairs, conf, thresholds)
