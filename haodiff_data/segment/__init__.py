"""Body-part segmenters: RGB uint8 images in, Goliath-28 uint8 label maps out (design 3.3).

Backends are imported lazily so that, e.g., the MediaPipe path never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

SEGMENTERS: tuple[str, ...] = ("mediapipe", "sapiens", "labels")


class Segmenter(Protocol):
    name: str  # "mediapipe" | "sapiens" | "labels"
    model_id: str  # recorded in every sample's JSON
    per_source: bool  # True when labels come per source file (load()) instead of segment()

    def segment(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 HxWx3 images -> uint8 HxW Goliath ids; all zeros where no person is found."""
        ...

    def close(self) -> None: ...


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
) -> Segmenter:
    """Build a segmenter by name. ``device`` and ``batch_size`` only matter for ``sapiens``."""
    if name not in SEGMENTERS:
        raise ValueError(f"segmenter: unknown name {name!r}, expected one of {', '.join(SEGMENTERS)}")
    if checkpoint is not None and name != "sapiens":
        raise ValueError(f"segmenter {name!r} takes no checkpoint (got {checkpoint!r}); only 'sapiens' does")
    if labels_dir is not None and name != "labels":
        raise ValueError(f"segmenter {name!r} takes no labels_dir (got {labels_dir!r}); only 'labels' does")
    if name == "mediapipe":
        from haodiff_data.segment.mediapipe_pose import MediaPipeSegmenter

        return MediaPipeSegmenter()
    if name == "sapiens":
        if checkpoint is None:
            raise ValueError("segmenter 'sapiens' needs checkpoint= (a Sapiens lite *_torchscript.pt2 or *.pt2 file)")
        from haodiff_data.segment.sapiens import SapiensSegmenter

        return SapiensSegmenter(checkpoint, device=device, batch_size=batch_size)
    if labels_dir is None:
        raise ValueError("segmenter 'labels' needs labels_dir= (a folder of <source stem>.png label maps)")
    from haodiff_data.segment.labels import LabelsSegmenter

    return LabelsSegmenter(labels_dir)
