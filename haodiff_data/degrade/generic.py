"""Generic (Real-ESRGAN two-order) degradation, per sample, on CPU (``data_spec.md`` A).

``draw_order`` / ``draw_final`` take all randomness from a generator and return plain JSON-able
dicts recording every drawn value; ``apply_order`` / ``apply_final`` are pure functions of
(image, params), so a sample replays exactly from its JSON. Unlike Real-ESRGAN, nothing is shared
across a batch, and JPEG is a real codec (OpenCV / libjpeg) with an integer quality.
"""

from __future__ import annotations

import ctypes

import cv2
import numpy as np

from haodiff_data.degrade.kernels import build_kernel, draw_blur_kernel, draw_sinc, filter2d
from haodiff_data.degrade.noise import add_noise, draw_noise, to_uint8
from haodiff_data.recipe import FinalConfig, OrderConfig, ResizeConfig

RESIZE_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
RESIZE_KINDS = ("up", "down", "keep")
FINAL_ORDERS = ("resize_sinc_jpeg", "jpeg_resize_sinc")


def _check_shape(hq_shape: tuple[int, int], scale: int) -> tuple[int, int]:
    h, w = hq_shape[:2]
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"generic: hq_shape must be two positive integers, got {hq_shape}")
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"generic: scale must be an integer >= 1, got {scale!r}")
    if h // scale < 1 or w // scale < 1:
        raise ValueError(f"generic: hq_shape {hq_shape} is smaller than the scale {scale}")
    return int(h), int(w)


def _choose(rng: np.random.Generator, options: tuple[str, ...], where: str) -> str:
    unknown = [m for m in options if m not in RESIZE_MODES]
    if not options or unknown:
        raise ValueError(f"{where}: expected a non-empty list from {tuple(RESIZE_MODES)}, got {options}")
    return str(options[int(rng.integers(len(options)))])


def _draw_quality(rng: np.random.Generator, jpeg_range: tuple[float, float], where: str) -> int:
    lo, hi = int(np.ceil(jpeg_range[0])), int(np.floor(jpeg_range[1]))
    if not 1 <= lo <= hi <= 100:
        raise ValueError(f"{where}: expected 1 <= low <= high <= 100 (integer qualities), got {jpeg_range}")
    return int(rng.integers(lo, hi, endpoint=True))


def _draw_resize(rng: np.random.Generator, cfg: ResizeConfig, base: tuple[float, float], where: str) -> dict:
    probs = np.asarray(cfg.probs, dtype=np.float64)
    if len(probs) != 3 or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"{where}.probs: expected three weights (up, down, keep) >= 0, got {cfg.probs}")
    lo, hi = cfg.range
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"{where}.range: expected 0 < low <= 1 <= high, got {cfg.range}")
    kind = RESIZE_KINDS[int(rng.choice(3, p=probs / probs.sum()))]
    if kind == "up":
        factor = float(rng.uniform(1.0, hi))
    elif kind == "down":
        factor = float(rng.uniform(lo, 1.0))
    else:
        factor = 1.0
    mode = _choose(rng, cfg.modes, f"{where}.modes")
    # Same truncation as F.interpolate / Real-ESRGAN's int(h / scale * factor).
    size = [max(1, int(base[0] * factor)), max(1, int(base[1] * factor))]
    return {"kind": kind, "factor": factor, "mode": mode, "size": size}


def draw_order(
    rng: np.random.Generator, cfg: OrderConfig, hq_shape: tuple[int, int], scale: int, second: bool
) -> dict:
    """Parameters of one degradation order: blur -> resize -> noise -> JPEG (if any).

    The first order resizes relative to its input (the HQ); the second relative to hq / scale.
    """
    h, w = _check_shape(hq_shape, scale)
    blur_coin = bool(rng.random() < cfg.blur_prob)
    blur = draw_blur_kernel(rng, cfg.blur) if blur_coin else None
    base = (h / scale, w / scale) if second else (h, w)
    resize = _draw_resize(rng, cfg.resize, base, "resize")
    noise = draw_noise(rng, cfg.noise)
    quality = None if cfg.jpeg_range is None else _draw_quality(rng, cfg.jpeg_range, "jpeg_range")
    return {
        "order": "second" if second else "first",
        "blur_coin": blur_coin,
        "blur": blur,
        "resize": resize,
        "noise": noise,
        "jpeg_quality": quality,
    }


def _check_image(img: np.ndarray, where: str) -> None:
    if img.dtype != np.float32 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{where}: expected a float32 HxWx3 RGB image, got {img.dtype} {img.shape}")


def resize(img: np.ndarray, size: list[int], mode: str) -> np.ndarray:
    """Resize an HWC float32 image to ``size`` = [h, w] (no copy when the size is unchanged)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize: unknown mode {mode!r}, expected one of {tuple(RESIZE_MODES)}")
    h, w = size
    if (h, w) == img.shape[:2]:
        return img
    if mode == "area":
        return area_resize(img, (h, w))
    return cv2.resize(img, (w, h), interpolation=RESIZE_MODES[mode])


def area_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PyTorch's ``interpolate(mode="area")``, the ``area`` of Real-ESRGAN and OSEDiff: adaptive
    average pooling, output pixel i of n averaging input pixels floor(i N / n) .. ceil((i+1) N / n) - 1
    on each axis. OpenCV's INTER_AREA weights partial pixels instead and interpolates when
    enlarging: sharper whenever the ratio is not an integer. Both agree for integer factors."""
    h, w = size
    H, W = img.shape[:2]
    if (H % h == 0 and W % w == 0) or (h % H == 0 and w % W == 0):
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)  # the fastest exact route
    if h >= H and w >= W:
        # Enlarging, a bin holds one or two pixels: their mean is a bilinear sample at the bin's
        # middle (weights 0 or 1/2, exact in OpenCV's weight table), 3-4x faster than gathering.
        (sy, ey), (sx, ex) = _bins(H, h), _bins(W, w)
        map_y = np.repeat(((sy + ey - 1) / 2).astype(np.float32)[:, None], w, axis=1)
        map_x = np.repeat(((sx + ex - 1) / 2).astype(np.float32)[None, :], h, axis=0)
        return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR)
    rows = np.ascontiguousarray(_average_bins(img, h).transpose(1, 0, 2))
    return np.ascontiguousarray(_average_bins(rows, w).transpose(1, 0, 2))


def _bins(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n_out)
    return i * n_in // n_out, -(-(i + 1) * n_in // n_out)


def _average_bins(img: np.ndarray, n_out: int) -> np.ndarray:
    """Adaptive average pooling along axis 0: one vectorised pass per position within a bin."""
    if img.shape[0] == n_out:
        return img
    start, end = _bins(img.shape[0], n_out)
    length = end - start
    out = img[start]
    for j in range(1, int(length.max())):
        longer = np.flatnonzero(length > j)
        out[longer] += img[start[longer] + j]
    out /= length.astype(np.float32)[:, None, None]
    return out


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Clip, round to 8 bit, JPEG encode/decode (libjpeg, 4:2:0) at integer ``quality``; float32 out."""
    if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"jpeg: quality must be an integer in [1, 100], got {quality!r}")
    bgr = cv2.cvtColor(to_uint8(img), cv2.COLOR_RGB2BGR)
    flags = [
        cv2.IMWRITE_JPEG_QUALITY, int(quality),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    ]  # fmt: skip
    ok, buf = cv2.imencode(".jpg", bgr, flags)
    if not ok:
        raise RuntimeError(f"jpeg: OpenCV failed to encode a {img.shape} image at quality {quality}")
    rgb = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return to_float(rgb)


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 levels to float32 level / 255 (correctly rounded)."""
    return np.divide(img, np.float32(255), dtype=np.float32)


def apply_order(img: np.ndarray, params: dict) -> np.ndarray:
    """Apply one order drawn by ``draw_order``; float32 HWC RGB in [0, 1] in and out."""
    _check_image(img, "apply_order")
    out = img
    if params["blur"] is not None:
        out = filter2d(out, build_kernel(params["blur"]))
    out = resize(out, params["resize"]["size"], params["resize"]["mode"])
    out = add_noise(out, params["noise"])
    if params["jpeg_quality"] is not None:
        out = jpeg(out, params["jpeg_quality"])
    return out


def draw_final(rng: np.random.Generator, cfg: FinalConfig, hq_shape: tuple[int, int], scale: int) -> dict:
    """Parameters of the final stage: resize to hq / scale + optional sinc, and JPEG, in either
    order; then the resize back to the HQ size when ``cfg.resize_back``."""
    h, w = _check_shape(hq_shape, scale)
    order = FINAL_ORDERS[int(rng.random() < cfg.jpeg_first_prob)]
    mode = _choose(rng, cfg.resize_modes, "final.resize_modes")
    sinc = draw_sinc(rng, cfg.kernel_sizes) if rng.random() < cfg.sinc_prob else None
    quality = _draw_quality(rng, cfg.jpeg_range, "final.jpeg_range")
    back = None
    if cfg.resize_back:
        back = {"mode": _choose(rng, cfg.resize_back_modes, "final.resize_back_modes"), "size": [h, w]}
    return {
        "order": order,
        "resize": {"mode": mode, "size": [h // scale, w // scale]},
        "sinc": sinc,
        "jpeg_quality": quality,
        "resize_back": back,
    }


def apply_final(img: np.ndarray, params: dict) -> np.ndarray:
    """Apply the final stage drawn by ``draw_final``; float32 in, quantised uint8 HWC RGB out."""
    _check_image(img, "apply_final")
    order = params["order"]
    if order not in FINAL_ORDERS:
        raise ValueError(f"final params: unknown order {order!r}, expected one of {FINAL_ORDERS}")
    out = img
    if order == "jpeg_resize_sinc":
        out = jpeg(out, params["jpeg_quality"])
    out = resize(out, params["resize"]["size"], params["resize"]["mode"])
    if params["sinc"] is not None:
        out = filter2d(out, build_kernel(params["sinc"]))
    if order == "resize_sinc_jpeg":
        out = jpeg(out, params["jpeg_quality"])
    if params["resize_back"] is not None:
        out = resize(out, params["resize_back"]["size"], params["resize_back"]["mode"])
    return to_uint8(out)


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    A sample allocates and frees many 1-4 MB arrays. With glibc's defaults they come back as fresh
    pages, and the page faults can cost as much as the arithmetic (a 512 px DFT blur: 14 ms with
    2,800 faults vs 6.5 ms without). Process-wide: call once at the start of a worker. Returns
    False, changing nothing, where the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's largest mmap threshold; heap memory beyond 256 MiB free is still trimmed.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))
