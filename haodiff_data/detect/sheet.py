"""Annotated contact sheets: boxes with confidences drawn on thumbnails, tiled in a grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

BOX_COLOR = (255, 40, 40)
TRUTH_COLOR = (40, 200, 40)
TEXT_BG = (0, 0, 0)


def fit(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """The image scaled so its longer side is ``side``, padded to a square; and the scale used."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    tile = np.full((side, side, 3), 255, np.uint8)
    tile[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=interp)
    return tile, scale


def put_label(tile: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.4) -> None:
    x, y = org
    cv2.putText(tile, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_BG, 3, cv2.LINE_AA)
    cv2.putText(tile, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def annotate(image: np.ndarray, boxes: Sequence[Sequence[float]], confidences: Sequence[float], side: int,
             title: str, truth: Sequence[Sequence[float]] = ()) -> np.ndarray:
    """A ``side`` x ``side`` RGB thumbnail of ``image`` with its boxes (pixel x0 y0 x1 y1) and confidences,
    and ``truth`` boxes (labels) thinner in green."""
    tile, s = fit(image, side)
    for x0, y0, x1, y1 in truth:
        cv2.rectangle(tile, (round(x0 * s), round(y0 * s)), (round(x1 * s), round(y1 * s)), TRUTH_COLOR, 1)
    for (x0, y0, x1, y1), c in zip(boxes, confidences):
        p0 = (int(round(x0 * s)), int(round(y0 * s)))
        p1 = (int(round(x1 * s)), int(round(y1 * s)))
        cv2.rectangle(tile, p0, p1, BOX_COLOR, 2)
        put_label(tile, f"{c:.2f}", (p0[0] + 2, max(p0[1] + 12, 12)))
    put_label(tile, title, (4, side - 6))
    return tile


def grid(tiles: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Tiles of one size in rows of ``columns``, white where the last row is short."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    return sheet


def save_rgb(path: Path, image: np.ndarray) -> None:
    """Write an RGB uint8 image atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cannot write image")
    tmp.replace(path)
