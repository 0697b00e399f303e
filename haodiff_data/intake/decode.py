"""Decode untrusted image bytes to RGB uint8, or reject them with a reason."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit (recipe intake.max_pixels) before decoding anything.
Image.MAX_IMAGE_PIXELS = None


class RejectedInput(Exception):
    """An input that cannot become a sample; ``reason`` goes to the rejects manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        # 16-bit greyscale: scale the full range to 8 bits instead of PIL's clipping convert.
        peak = 65535 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255
        grey = np.clip(np.rint(arr.astype(np.float64) * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def decode_image(data: bytes, min_side: int, max_pixels: int) -> np.ndarray:
    """RGB uint8 HxWx3 with EXIF orientation applied; raises RejectedInput otherwise."""
    if not data:
        raise RejectedInput("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise RejectedInput(f"decompression bomb: {w}x{h} exceeds intake.max_pixels={max_pixels}")
            img.load()
    except RejectedInput:
        raise
    except UnidentifiedImageError:
        raise RejectedInput("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RejectedInput(f"corrupt or truncated image: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a malformed EXIF block must not kill the run
        raise RejectedInput(f"corrupt EXIF orientation: {exc}") from None
    rgb = _to_rgb_uint8(img)
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise RejectedInput(f"too small: {w}x{h}, shorter side < intake.min_side={min_side}")
    return rgb
