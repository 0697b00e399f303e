"""Body-part segmenters: RGB uint8 images in, Goliath-28 part labels and person instances out
(design 3.3).

Backends are imported lazily so that, e.g., the MediaPipe path never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

SEGMENTERS: tuple[str, ...] = ("mediapipe", "sapiens", "labels")


@dataclass
class Segmentation:
    """One image's segmentation: which part (Goliath id) and which person each pixel shows."""

    parts: np.ndarray  # uint8 HxW Goliath-28 ids, 0 where no person is
    persons: np.ndarray  # uint8 HxW person ids 1..n in order of discovery, 0 where no person is

    @property
    def count(self) -> int:
        return int(self.persons.max(initial=0))


class Segmenter(Protocol):
    name: str  # "mediapipe" | "sapiens" | "labels"
    model_id: str  # recorded in every sample's JSON
    per_source: bool  # True when labels come per source file (load()) instead of segment()

    def segment(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        """RGB uint8 HxWx3 images -> their segmentations; all zeros where no person is found."""
        ...


def renumber(persons: np.ndarray) -> np.ndarray:
    """Person ids made consecutive (1..n) in order of first id, so absent ids leave no gaps."""
    present = np.unique(persons)
    present = present[present > 0]
    if present.size == 0 or present[-1] == present.size:
        return persons
    table = np.zeros(256, np.uint8)
    table[present] = np.arange(1, present.size + 1, dtype=np.uint8)
    return table[persons]


# Pixels of one person closer than this (in px) are joined, so that a hand separated from its arm
# by a held object stays one person; people further apart than this become separate instances.
INSTANCE_GAP = 9


def instances_from_parts(parts: np.ndarray) -> np.ndarray:
    """Person ids for a label map that has none (Sapiens, precomputed maps): connected regions of
    labelled pixels, gaps of up to ``INSTANCE_GAP`` px bridged. People who touch stay one instance."""
    fg = (parts > 0).astype(np.uint8)
    if not fg.any():
        return np.zeros(parts.shape, np.uint8)
    bridged = cv2.dilate(fg, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (INSTANCE_GAP, INSTANCE_GAP)))
    count, components = cv2.connectedComponents(bridged, connectivity=8)
    # Ids by area (largest first), capped at 255: the map is uint8.
    areas = np.bincount(components[fg > 0], minlength=count)
    order = np.argsort(-areas[1:], kind="stable")[:255] + 1
    table = np.zeros(count, np.uint8)
    table[order[areas[order] > 0]] = np.arange(1, int((areas[order] > 0).sum()) + 1, dtype=np.uint8)
    return np.where(fg > 0, table[components], 0).astype(np.uint8)


def check_rgb(images: Sequence[np.ndarray]) -> None:
    """Raise ValueError unless every image is an RGB uint8 HxWx3 array."""
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
            raise ValueError(f"images[{i}]: expected an RGB uint8 HxWx3 array, got {desc}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"images[{i}]: empty image of shape {image.shape}")


def make_segmenter(
    name: str,
    *,
    checkpoint: str | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    labels_dir: str | None = None,
    precision: str | None = None,
) -> Segmenter:
    """Build a segmenter by name. ``device``, ``batch_size`` and ``precision`` only matter for ``sapiens``."""
    if name not in SEGMENTERS:
        raise ValueError(f"segmenter: unknown name {name!r}, expected one of {', '.join(SEGMENTERS)}")
    if checkpoint is not None and name != "sapiens":
        raise ValueError(f"segmenter {name!r} takes no checkpoint (got {checkpoint!r}); only 'sapiens' does")
    if precision is not None and name != "sapiens":
        raise ValueError(f"segmenter {name!r} takes no precision (got {precision!r}); only 'sapiens' does")
    if labels_dir is not None and name != "labels":
        raise ValueError(f"segmenter {name!r} takes no labels_dir (got {labels_dir!r}); only 'labels' does")
    if name == "mediapipe":
        from haodiff_data.segment.mediapipe_pose import MediaPipeSegmenter

        return MediaPipeSegmenter()
    if name == "sapiens":
        if checkpoint is None:
            raise ValueError("segmenter 'sapiens' needs checkpoint= (a Sapiens lite *_torchscript.pt2 or *.pt2 file)")
        from haodiff_data.segment.sapiens import SapiensSegmenter

        return SapiensSegmenter(checkpoint, device=device, batch_size=batch_size, precision=precision)
    if labels_dir is None:
        raise ValueError("segmenter 'labels' needs labels_dir= (a folder of <source stem>.png label maps)")
    from haodiff_data.segment.labels import LabelsSegmenter

    return LabelsSegmenter(labels_dir)
