"""Human motion blur (HMB): blur one body-part group along a random trajectory (design 3.1).

I_HMB = (1 - W) * I_H + W * I_B, with W = Norm(G(D(E(mask)))) equal to 1 on the moving part and
I_B = I_H convolved with a unit-sum, centroid-centred Markov-trajectory PSF. Only the bounding box
of W > 0 is ever blurred, so the cost follows the part's size, not the image's.

``draw_hmb`` takes every random value from its generator and records it; ``weight_map``,
``motion_psf`` and ``apply_hmb`` are deterministic functions of (image, mask, params).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import scipy.fft

from haodiff_data.degrade.trajectory import (
    exposure_weights,
    markov_trajectory,
    trajectory_extent,
    trajectory_psf,
)
from haodiff_data.recipe import HMBConfig
from haodiff_data.rng import child_seed

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


def draw_hmb(
    rng: np.random.Generator, cfg: HMBConfig, available_groups: list[str], psf_scale: float = 1.0
) -> dict:
    """Draw the group, morphology, feathering and PSF parameters of one HMB sample.

    Draw order (fixed, for replay): group, erosion size, dilation size, feather sigma, expl,
    fraction, psf_seed. The group is drawn among ``available_groups`` in recipe order with the
    recipe weights renormalised over them. ``psf_scale`` magnifies the trajectory (and its canvas)
    after it is drawn: the same motion, measured in pixels of an image that many times larger.
    """
    if not psf_scale > 0:
        raise ValueError(f"draw_hmb: psf_scale must be > 0, got {psf_scale}")
    group = _draw_group(rng, cfg, available_groups)
    erode = _draw_odd(rng, cfg.erode_range, "hmb.erode_range")
    dilate = _draw_odd(rng, cfg.dilate_range, "hmb.dilate_range")
    lo, hi = cfg.feather_sigma_range
    if not 0 < lo <= hi:
        raise ValueError(f"hmb.feather_sigma_range: expected 0 < low <= high, got {cfg.feather_sigma_range}")
    sigma = float(rng.uniform(lo, hi))
    if not cfg.psf_expl_choices or not cfg.psf_fraction_choices:
        raise ValueError("hmb.psf_expl_choices and hmb.psf_fraction_choices must not be empty")
    expl = float(cfg.psf_expl_choices[rng.integers(len(cfg.psf_expl_choices))])
    fraction = float(cfg.psf_fraction_choices[rng.integers(len(cfg.psf_fraction_choices))])
    params = {
        "group": group,
        "erode_ksize": erode,
        "dilate_ksize": dilate,
        "feather_sigma": sigma,
        "psf_seed": child_seed(rng),
        "psf_canvas": int(cfg.psf_canvas),
        "psf_iters": int(cfg.psf_iters),
        "psf_max_len": float(cfg.psf_max_len),
        "psf_expl": expl,
        "psf_fraction": fraction,
        "psf_scale": float(psf_scale),
    }
    _, info = _psf_and_info(*_psf_key(params))
    info = dict(info)
    params["psf_extent_px"] = info.pop("exposed_extent_px")
    params["psf_support_px"] = info.pop("psf_support_px")
    params["trajectory"] = info
    return params


def weight_map(part_mask: np.ndarray, params: dict) -> np.ndarray:
    """W = Norm(G(D(E(mask)))) as float32 in [0, 1], 1 on the moving part; an empty mask gives 0."""
    weights, _ = _weights_and_box(part_mask, params)
    return weights


def motion_psf(params: dict) -> np.ndarray:
    """The float64 unit-sum PSF described by ``params`` (rebuilt from its seed).

    Its side is ceil(psf_canvas * psf_scale) px.
    """
    psf, _ = _psf_and_info(*_psf_key(params))
    return psf.copy()


def apply_hmb(img: np.ndarray, part_mask: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Blend a motion-blurred copy of ``img`` (float32 HxWx3 in [0, 1]) into the part.

    Returns (I_HMB, W), both float32; pixels where W == 0 are returned bit-identical. The caller
    derives M_HMB = W >= threshold.
    """
    if not (isinstance(img, np.ndarray) and img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3):
        got = f"{getattr(img, 'dtype', type(img).__name__)} {np.shape(img)}"
        raise ValueError(f"apply_hmb: img must be a float32 HxWx3 array in [0, 1], got {got}")
    if np.shape(part_mask) != img.shape[:2]:
        raise ValueError(
            f"apply_hmb: part_mask shape {np.shape(part_mask)} differs from image {img.shape[:2]}"
        )
    weights, box = _weights_and_box(part_mask, params)
    if box is None:
        return img.copy(), weights
    psf, _ = _psf_and_info(*_psf_key(params))
    return _blend(img, weights, box, _blur_box(img, box, psf)), weights


def clear_psf_cache() -> None:
    """Forget cached PSFs (benchmarks time the trajectory and splat from scratch)."""
    _psf_and_info.cache_clear()


def _draw_group(rng: np.random.Generator, cfg: HMBConfig, available_groups: list[str]) -> str:
    if not available_groups:
        raise ValueError(
            "draw_hmb: no body-part group is available (empty available_groups); HMB needs a person"
        )
    if len(cfg.groups) != len(cfg.group_weights):
        raise ValueError("hmb.groups and hmb.group_weights must have the same length")
    weight_of = dict(zip(cfg.groups, cfg.group_weights))
    unknown = sorted(set(available_groups) - set(weight_of))
    if unknown:
        raise ValueError(f"draw_hmb: groups {unknown} are not in hmb.groups {list(cfg.groups)}")
    available = set(available_groups)
    names = [g for g in dict.fromkeys(cfg.groups) if g in available]
    weights = np.array([weight_of[g] for g in names], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"draw_hmb: hmb.group_weights of the available groups {names} must be >= 0 and not all 0"
        )
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _draw_odd(rng: np.random.Generator, bounds: tuple[int, int], name: str) -> int:
    lo, hi = bounds
    odds = np.arange(lo + 1 - lo % 2, hi + 1, 2)
    if lo < 1 or odds.size == 0:
        raise ValueError(f"{name}: expected 1 <= low <= high containing an odd size, got {bounds}")
    return int(odds[rng.integers(odds.size)])


def _psf_key(params: dict) -> tuple:
    try:
        return (
            int(params["psf_seed"]),
            int(params["psf_canvas"]),
            int(params["psf_iters"]),
            float(params["psf_max_len"]),
            float(params["psf_expl"]),
            float(params["psf_fraction"]),
            # Samples written before the PSF could be magnified carry no psf_scale: they used 1.
            float(params.get("psf_scale", 1.0)),
        )
    except KeyError as exc:
        raise ValueError(f"HMB params: missing key {exc.args[0]!r}") from exc


# draw_hmb measures the PSF for the JSON and apply_hmb needs it again; memoising the pure
# (seed, shape) -> PSF map saves building the same trajectory twice per sample.
@functools.lru_cache(maxsize=16)
def _psf_and_info(
    seed: int, canvas: int, iters: int, max_len: float, expl: float, fraction: float, scale: float
) -> tuple[np.ndarray, dict]:
    traj, info = markov_trajectory(np.random.default_rng(seed), canvas, iters, max_len, expl)
    traj = traj * scale
    psf = trajectory_psf(traj, math.ceil(canvas * scale), fraction)
    psf.flags.writeable = False
    info["extent_px"] = round(trajectory_extent(traj), 3)
    info["exposed_extent_px"] = round(trajectory_extent(traj, exposure_weights(iters, fraction)), 3)
    info["psf_support_px"] = int(np.count_nonzero(psf))
    return psf, info


def _weights_and_box(part_mask: np.ndarray, params: dict) -> tuple[np.ndarray, Box | None]:
    """W on the full frame and the tight box of W > 0 (None when W is all zero).

    Morphology and feathering run on the mask's bounding box grown by the dilation and Gaussian
    radii. Within that margin the mask is 0, so cv2's border rules (erosion: outside counts as 1,
    dilation: as 0, Gaussian: reflect-101) see only what the full frame would: same values.
    """
    if not (isinstance(part_mask, np.ndarray) and part_mask.dtype == np.bool_ and part_mask.ndim == 2):
        got = f"{getattr(part_mask, 'dtype', type(part_mask).__name__)} {np.shape(part_mask)}"
        raise ValueError(f"HMB part_mask must be a bool HxW array, got {got}")
    try:
        erode, dilate, sigma = params["erode_ksize"], params["dilate_ksize"], float(params["feather_sigma"])
    except KeyError as exc:
        raise ValueError(f"HMB params: missing key {exc.args[0]!r}") from exc
    for key, size in (("erode_ksize", erode), ("dilate_ksize", dilate)):
        if not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"HMB params: {key} must be an odd int >= 1, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"HMB params: feather_sigma must be > 0, got {sigma}")
    height, width = part_mask.shape
    weights = np.zeros((height, width), np.float32)
    rows, cols = np.flatnonzero(part_mask.any(axis=1)), np.flatnonzero(part_mask.any(axis=0))
    if rows.size == 0:
        return weights, None
    gauss = 2 * math.ceil(3 * sigma) + 1
    margin = dilate // 2 + gauss // 2 + 1
    y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, height)
    x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, width)

    crop = part_mask[y0:y1, x0:x1].astype(np.uint8)
    crop = cv2.erode(crop, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (erode, erode)))
    crop = cv2.dilate(crop, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (dilate, dilate)))
    soft = cv2.GaussianBlur(crop.astype(np.float32), (gauss, gauss), sigma)
    peak = float(soft.max())
    if peak <= 0:
        return weights, None
    np.clip(soft / np.float32(peak), 0.0, 1.0, out=soft)
    weights[y0:y1, x0:x1] = soft

    support = soft > 0
    rows, cols = np.flatnonzero(support.any(axis=1)), np.flatnonzero(support.any(axis=0))
    return weights, (y0 + int(rows[0]), y0 + int(rows[-1]) + 1, x0 + int(cols[0]), x0 + int(cols[-1]) + 1)


def _reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Symmetric (edge-repeating) reflection of any integer index into [0, size)."""
    index = np.mod(index, 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


def _blur_box(img: np.ndarray, box: Box, psf: np.ndarray) -> np.ndarray:
    """img convolved with psf (origin at pixel canvas//2), evaluated on ``box``, reflect-padded.

    The PSF is cropped to its support; only the image region feeding the box is transformed, and
    the transform size need only cover that region because the wanted outputs are the 'valid'
    part of the linear convolution, which circular wrap-around never reaches.
    """
    centre = psf.shape[0] // 2
    rows, cols = np.flatnonzero(psf.any(axis=1)), np.flatnonzero(psf.any(axis=0))
    kernel = psf[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    kh, kw = kernel.shape
    oy, ox = centre - int(rows[0]), centre - int(cols[0])

    y0, y1, x0, x1 = box
    height, width = img.shape[:2]
    ry0, ry1 = y0 - (kh - 1 - oy), y1 + oy
    rx0, rx1 = x0 - (kw - 1 - ox), x1 + ox
    if ry0 >= 0 and rx0 >= 0 and ry1 <= height and rx1 <= width:
        region = img[ry0:ry1, rx0:rx1]
    else:
        ys, xs = _reflect_index(np.arange(ry0, ry1), height), _reflect_index(np.arange(rx0, rx1), width)
        region = img[np.ix_(ys, xs)]
    hr, wr = region.shape[:2]
    shape = (scipy.fft.next_fast_len(hr), scipy.fft.next_fast_len(wr, real=True))
    spectrum = scipy.fft.rfft2(region, s=shape, axes=(0, 1), workers=1)
    spectrum *= scipy.fft.rfft2(kernel, s=shape, workers=1)[..., None]
    full = scipy.fft.irfft2(spectrum, s=shape, axes=(0, 1), workers=1)
    return np.clip(full[kh - 1 : hr, kw - 1 : wr], 0.0, 1.0)


def _blend(img: np.ndarray, weights: np.ndarray, box: Box, blurred: np.ndarray) -> np.ndarray:
    """(1 - W) * img + W * blurred on ``box``; outside it W == 0 and img is copied untouched."""
    y0, y1, x0, x1 = box
    w = weights[y0:y1, x0:x1, None]
    out = img.copy()
    out[y0:y1, x0:x1] = (1.0 - w) * img[y0:y1, x0:x1] + w * blurred
    return out
