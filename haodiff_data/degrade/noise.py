"""Gaussian and Poisson noise of the Real-ESRGAN degradation model (``data_spec.md`` A.5).

``draw_noise`` records every drawn value plus a ``noise_seed``; ``add_noise`` rebuilds the noise
field from that seed, so the same params always give the same bytes.

Poisson sampling is exact inverse-CDF sampling from 32-bit uniforms. The image is rounded to 8-bit
levels first, so a sample has at most 256 distinct rates l * vals / 255 with vals a power of two;
their CDFs are tabulated once per vals, and a guide table indexed by (level, top bits of the
uniform) resolves almost every pixel with one lookup. This is several times faster than
``Generator.poisson`` on a full image.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
from scipy import special

from haodiff_data.recipe import NoiseConfig
from haodiff_data.rng import child_seed

NOISE_KINDS = ("gaussian", "poisson")

_GUIDE_BITS = 12
_AMBIGUOUS = np.uint16(0x8000)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Round a [0, 1] float image to uint8 levels (round half to even, then clip)."""
    t = np.multiply(img, np.float32(255), dtype=np.float32)
    np.rint(t, out=t)
    np.clip(t, 0, 255, out=t)
    return t.astype(np.uint8)


def _uniform(rng: np.random.Generator, lo: float, hi: float, where: str) -> float:
    if not lo <= hi:
        raise ValueError(f"{where}: expected low <= high, got ({lo}, {hi})")
    return float(rng.uniform(lo, hi))


def draw_noise(rng: np.random.Generator, cfg: NoiseConfig) -> dict:
    """Gaussian (prob ``gaussian_prob``) or Poisson noise, gray with prob ``gray_prob``."""
    gaussian = bool(rng.random() < cfg.gaussian_prob)
    sigma = poisson_scale = None
    if gaussian:
        sigma = _uniform(rng, *cfg.sigma_range, "noise.sigma_range")
    else:
        poisson_scale = _uniform(rng, *cfg.poisson_scale_range, "noise.poisson_scale_range")
    return {
        "kind": "gaussian" if gaussian else "poisson",
        "gray": bool(rng.random() < cfg.gray_prob),
        "sigma": sigma,
        "poisson_scale": poisson_scale,
        "noise_seed": child_seed(rng),
    }


def add_noise(img: np.ndarray, params: dict) -> np.ndarray:
    """A new float32 HWC image: ``img`` plus the noise of ``params``, clipped to [0, 1]."""
    if img.dtype != np.float32 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"add_noise: expected a float32 HxWx3 image, got {img.dtype} {img.shape}")
    kind = params["kind"]
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise params: unknown kind {kind!r}, expected one of {NOISE_KINDS}")
    rng = np.random.default_rng(params["noise_seed"])
    h, w = img.shape[:2]
    shape = (h, w, 1) if params["gray"] else (h, w, 3)
    if kind == "gaussian":
        noise = gaussian_field(rng, h * w * shape[2], params["sigma"] / 255).reshape(shape)
    else:
        if params["gray"]:
            source = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY).reshape(shape)
        else:
            source = img
        noise = _poisson_noise(rng, to_uint8(source), params["poisson_scale"])
    if params["gray"]:
        out = img + noise
    else:
        noise += img
        out = noise
    return np.clip(out, 0, 1, out=out)


def gaussian_field(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """``n`` independent N(0, std^2) float32 values by the Box-Muller transform.

    About 3x faster than ``Generator.standard_normal(dtype=float32)`` here: a uniform draw plus a
    few vectorised log/sqrt/sin/cos. The 24-bit uniforms bound |z| by 5.8 std (the mass beyond is
    8e-9), which is immaterial for 8-bit images.
    """
    half = (n + 1) // 2
    u = rng.random(2 * half, dtype=np.float32)
    radius, angle = u[:half], u[half:]
    np.subtract(np.float32(1), radius, out=radius)  # (0, 1], so the log is finite
    np.log(radius, out=radius)
    radius *= np.float32(-2 * std * std)
    np.sqrt(radius, out=radius)
    angle *= np.float32(2 * np.pi)
    cos = np.cos(angle)
    np.sin(angle, out=angle)
    angle *= radius
    np.multiply(cos, radius, out=radius)
    return u[:n]


def _poisson_noise(rng: np.random.Generator, levels: np.ndarray, scale: float) -> np.ndarray:
    """(Poisson(rate) - rate) * scale / vals with rate = level * vals / 255, float32."""
    flat = levels.reshape(-1)
    # calcHist counts in float32: counts saturate past 2^24 but never return to 0, so the number
    # of distinct levels stays exact (and it is ~4x faster than np.bincount on uint8).
    hist = cv2.calcHist([flat.reshape(1, -1)], [0], None, [256], [0, 256])
    vals = 1 << (int(np.count_nonzero(hist)) - 1).bit_length()  # 2 ** ceil(log2(#levels))
    guide, cdf, cdf_rows, row_len = _poisson_tables(vals)
    u = rng.integers(0, 2**32, size=flat.size, dtype=np.uint32)
    idx = flat.astype(np.uint32)
    idx <<= _GUIDE_BITS
    idx |= u >> (32 - _GUIDE_BITS)
    k = np.take(guide, idx)
    ambiguous = np.flatnonzero(k >= _AMBIGUOUS)
    k &= ~_AMBIGUOUS
    if ambiguous.size:
        # The bucket straddles a CDF step: step once (enough in the bulk of the distribution),
        # then binary-search the level's row for the few left in multi-step tail buckets.
        base = flat[ambiguous].astype(np.intp) * row_len
        ua = u[ambiguous] * 2.0**-32
        ka = k[ambiguous].astype(np.intp)
        ka += ua >= cdf[base + ka]
        more = np.flatnonzero(ua >= cdf[base + ka])
        if more.size:
            lev = flat[ambiguous[more]].astype(np.float64)
            ka[more] = np.searchsorted(cdf_rows, lev + ua[more], side="right") - base[more]
        k[ambiguous] = ka
    # k * scale / vals - level * scale / 255 in one pass.
    k, flat = k.reshape(1, -1), flat.reshape(1, -1)
    noise = cv2.addWeighted(k, scale / vals, flat, -scale / 255, 0, dtype=cv2.CV_32F)
    return noise.reshape(levels.shape)


@functools.lru_cache(maxsize=16)
def _poisson_tables(vals: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Guide table, flattened CDFs, the same with row l offset by l (one sorted array for
    np.searchsorted), and the row length."""
    rates = np.arange(256, dtype=np.float64) * (vals / 255)
    # Support far past the largest rate: the mass beyond it is far below 2^-32.
    kmax = int(np.ceil(vals + 14 * np.sqrt(vals) + 30))
    ks = np.arange(kmax + 1, dtype=np.float64)
    log_pmf = special.xlogy(ks[None, :], rates[:, None]) - rates[:, None] - special.gammaln(ks + 1)[None, :]
    cdf = np.minimum(np.cumsum(np.exp(log_pmf), axis=1), 1.0)
    cdf[:, -1] = 1.0
    buckets = 1 << _GUIDE_BITS
    lo = np.arange(buckets, dtype=np.float64) / buckets
    hi = lo + (1 / buckets - 2.0**-32)  # largest uniform value in each bucket
    guide = np.empty((256, buckets), dtype=np.uint16)
    for level in range(256):
        k_lo = np.searchsorted(cdf[level], lo, side="right")
        k_hi = np.searchsorted(cdf[level], hi, side="right")
        guide[level] = k_lo | np.where(k_hi != k_lo, _AMBIGUOUS, 0)
    cdf_rows = (np.arange(256, dtype=np.float64)[:, None] + cdf).reshape(-1)
    return guide.reshape(-1), cdf.reshape(-1), cdf_rows, kmax + 1
