"""Label maps computed elsewhere (e.g. a Sapiens run on a GPU cluster), read from a folder.

``labels_dir/<source stem>.png`` is an 8-bit single-channel PNG of Goliath-28 ids with the size
of the source image after EXIF orientation. The maps are per source, not per crop: the pipeline
loads one with :meth:`LabelsSegmenter.load` and crops it like the image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from haodiff_data.segment.goliath import NUM_CLASSES

# EXIF orientations 5-8 rotate by 90 degrees, so the decoded image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def oriented_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file after EXIF orientation, from its header only."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return height, width


class LabelsSegmenter:
    """Reads ``<labels_dir>/<source stem>.png``."""

    name = "labels"
    per_source = True

    def __init__(self, labels_dir: str) -> None:
        if not os.path.isdir(labels_dir):
            raise FileNotFoundError(f"labels_dir is not a folder: {labels_dir}")
        self.labels_dir = Path(labels_dir)
        self.model_id = f"labels:{self.labels_dir.resolve().name}"

    def path_for(self, source_path: str) -> Path:
        return self.labels_dir / f"{Path(source_path).stem}.png"

    def load(self, source_path: str, size_hw: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 HxW Goliath ids for one source image.

        The size is checked against ``size_hw`` when given, else against the source file's
        oriented size when ``source_path`` is a file on disk (an archive member is not).
        """
        path = self.path_for(source_path)
        if not path.is_file():
            raise FileNotFoundError(f"label map not found: {path} (for source {source_path})")
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise ValueError(f"label map {path}: expected an 8-bit single-channel PNG, got mode {img.mode}")
            labels = np.array(img, dtype=np.uint8)
        top = int(labels.max(initial=0))
        if top >= NUM_CLASSES:
            raise ValueError(f"label map {path}: id {top} is not a Goliath-28 class (ids are 0-{NUM_CLASSES - 1})")
        if size_hw is None and os.path.isfile(source_path):
            size_hw = oriented_size(source_path)
        if size_hw is not None and labels.shape != tuple(size_hw):
            raise ValueError(
                f"label map {path}: size {labels.shape[1]}x{labels.shape[0]} (WxH) does not match "
                f"source {source_path} of size {size_hw[1]}x{size_hw[0]}"
            )
        return labels

    def segment(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError(
            "segmenter 'labels' works per source image, not on crops: call load(source_path) and crop "
            "the label map with the image's crop box"
        )

    def close(self) -> None:
        pass
