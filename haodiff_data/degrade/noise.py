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

# uint8 level -> level / 255 in float32, shared by quantisation round trips.
LEVELS = (np.arange(256, dtype=np.float32) / np.float32(255)).astype(np.float32)

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
    if kind == "gaussian":
        noise = rng.standard_normal((h, w, 1) if params["gray"] else (h, w, 3), dtype=np.float32)
        noise *= np.float32(params["sigma"] / 255)
    else:
        if params["gray"]:
            source = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[..., None]
        else:
            source = img
        noise = _poisson_noise(rng, to_uint8(source), params["poisson_scale"])
    if noise.shape == img.shape:
        noise += img
        out = noise
    else:
        out = img + noise
    return np.clip(out, 0, 1, out=out)


def _poisson_noise(rng: np.random.Generator, levels: np.ndarray, scale: float) -> np.ndarray:
    """(Poisson(rate) / vals - level / 255) * scale with rate = level * vals / 255 (float32)."""
    flat = levels.reshape(-1)
    n_unique = int(np.count_nonzero(np.bincount(flat, minlength=256)))
    vals = 1 << (n_unique - 1).bit_length()  # 2 ** ceil(log2(n_unique))
    guide, cdf_rows, row_len = _poisson_tables(vals)
    u = rng.integers(0, 2**32, size=flat.size, dtype=np.uint32)
    idx = flat.astype(np.uint32)
    idx <<= _GUIDE_BITS
    idx |= u >> (32 - _GUIDE_BITS)
    k = guide[idx]
    ambiguous = np.flatnonzero(k >= _AMBIGUOUS)
    k &= ~_AMBIGUOUS
    if ambiguous.size:
        # Buckets that straddle a CDF step: finish with a binary search in the level's row.
        lev = flat[ambiguous].astype(np.int64)
        target = lev + u[ambiguous] * 2.0**-32
        k[ambiguous] = np.searchsorted(cdf_rows, target, side="right") - lev * row_len
    noise = k.astype(np.float32)
    noise *= np.float32(1 / vals)
    noise -= LEVELS[flat]
    noise *= np.float32(scale)
    return noise.reshape(levels.shape)


@functools.lru_cache(maxsize=16)
def _poisson_tables(vals: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Guide table, flattened row-offset CDFs (row l holds l + CDF_l) and the row length."""
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
    return guide.reshape(-1), cdf_rows, kmax + 1
