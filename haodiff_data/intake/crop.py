"""The HQ crop policy (design section 3): where a 512x512 HQ sample comes from in a source."""

from __future__ import annotations

import cv2
import numpy as np

from haodiff_data.recipe import CropConfig


def working_size(h: int, w: int, cfg: CropConfig) -> tuple[int, int] | None:
    """(height, width) the source is resized to before cropping, or None to crop at native size.

    Square sources larger than the crop (FFHQ-like faces) are downsampled whole when
    ``square_downsample``; sources whose short side is below the crop are resized up to it.
    """
    s = cfg.size
    if cfg.square_downsample and h == w and h > s:
        return s, s
    if min(h, w) < s:
        scale = s / min(h, w)
        return max(s, round(h * scale)), max(s, round(w * scale))
    return None


def resize_to(image: np.ndarray, size_hw: tuple[int, int] | None, labels: bool = False) -> np.ndarray:
    if size_hw is None or size_hw == image.shape[:2]:
        return image
    h, w = size_hw
    if labels:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if h < image.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(image, (w, h), interpolation=interp)


def plan_crop(
    hw: tuple[int, int],
    cfg: CropConfig,
    rng: np.random.Generator,
    person_box: tuple[int, int, int, int] | None = None,
) -> dict:
    """Crop box [x0, y0, x1, y1] in working-image coordinates, and how it was chosen.

    ``person``: the person's box centre falls in the middle half of the crop (so K crops of one
    image differ but all show the person); without a person it falls back to ``random``.
    """
    h, w = hw
    s = cfg.size
    mode = cfg.mode
    if mode == "person" and person_box is None:
        mode = "random"
    if mode == "center":
        x0, y0 = (w - s) // 2, (h - s) // 2
    elif mode == "random":
        x0 = int(rng.integers(0, w - s + 1))
        y0 = int(rng.integers(0, h - s + 1))
    else:
        assert person_box is not None
        cx = (person_box[0] + person_box[2]) / 2
        cy = (person_box[1] + person_box[3]) / 2
        x0 = _around(cx, s, w, rng)
        y0 = _around(cy, s, h, rng)
    return {"mode": mode, "box": [x0, y0, x0 + s, y0 + s]}


def _around(centre: float, s: int, extent: int, rng: np.random.Generator) -> int:
    lo = int(np.clip(np.ceil(centre - 0.75 * s), 0, extent - s))
    hi = int(np.clip(np.floor(centre - 0.25 * s), 0, extent - s))
    return int(rng.integers(lo, max(lo, hi) + 1))


def apply_crop(image: np.ndarray, box: list[int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(image[y0:y1, x0:x1])
