"""Blur kernels of the Real-ESRGAN degradation model and a fast exact 2-D filter.

Kernels are described by JSON-able parameter dicts (``draw_*``) and rebuilt from them
(``build_kernel``), so a sample's JSON replays its blur exactly. Closed forms follow
``reference/data_spec.md`` A.3: on the integer grid p = (x, y) centred on the kernel (x runs along
columns, y along rows), q(p) = p^T Sigma^-1 p with Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import special

from haodiff_data.recipe import BlurConfig

MIXED_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_TYPES = MIXED_TYPES + ("sinc",)

# A filtered image may differ from the exact full-kernel correlation by at most this much
# (L1 mass of the kernel parts dropped by trimming and low-rank truncation; pixels in [0, 1]).
FILTER_TOL = 1e-6
_TRIM_TOL = 2e-7


def _check_size(size: int, where: str) -> None:
    if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"{where}: kernel size must be a positive odd integer, got {size!r}")


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    _check_size(size, "kernels")
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernels: sigmas must be > 0, got sigma_x={sigma_x}, sigma_y={sigma_y}")
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    x, y = np.meshgrid(r, r, indexing="xy")
    c, s = np.cos(theta), np.sin(theta)
    # Coordinates in the kernel's principal frame: R(theta)^T p.
    u = c * x + s * y
    v = -s * x + c * y
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """exp(-q/2), normalised to sum 1 (float64)."""
    k = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
    """exp(-q^beta / 2), normalised to sum 1 (float64)."""
    if beta <= 0:
        raise ValueError(f"kernels: beta must be > 0, got {beta}")
    k = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta)
    return k / k.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """1 / (1 + q^beta), normalised to sum 1 (float64)."""
    if beta <= 0:
        raise ValueError(f"kernels: beta must be > 0, got {beta}")
    k = 1.0 / (1.0 + _quadratic_form(size, sigma_x, sigma_y, theta) ** beta)
    return k / k.sum()


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """Circular low-pass omega_c J1(omega_c r) / (2 pi r), centre omega_c^2 / (4 pi); sum 1."""
    _check_size(size, "sinc_kernel")
    if not 0 < omega_c <= np.pi:
        raise ValueError(f"sinc_kernel: omega_c must be in (0, pi], got {omega_c}")
    r1 = np.arange(size, dtype=np.float64) - (size - 1) / 2
    rad = np.hypot(*np.meshgrid(r1, r1, indexing="xy"))
    c = (size - 1) // 2
    rad[c, c] = 1.0  # placeholder, the centre takes the r -> 0 limit below
    k = omega_c * special.j1(omega_c * rad) / (2 * np.pi * rad)
    k[c, c] = omega_c**2 / (4 * np.pi)
    return k / k.sum()


def _draw_beta(rng: np.random.Generator, beta_range: tuple[float, float], where: str) -> float:
    lo, hi = beta_range
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"{where}: expected 0 < low <= 1 <= high, got {beta_range}")
    # Half the draws below 1, half above (BasicSR); with low = 1 the lower branch is exactly 1.
    if rng.random() < 0.5:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(1.0, hi))


def _draw_size(rng: np.random.Generator, sizes: tuple[int, ...], where: str) -> int:
    if not sizes:
        raise ValueError(f"{where}: kernel_sizes is empty")
    for s in sizes:
        _check_size(s, where)
    return int(sizes[int(rng.integers(len(sizes)))])


def draw_blur_kernel(rng: np.random.Generator, cfg: BlurConfig) -> dict:
    """One blur kernel's parameters (data_spec A.2): sinc with ``sinc_prob``, else a mixed type."""
    size = _draw_size(rng, cfg.kernel_sizes, "blur.kernel_sizes")
    if rng.random() < cfg.sinc_prob:
        lo = np.pi / 3 if size < 13 else np.pi / 5
        return _params("sinc", size, omega_c=float(rng.uniform(lo, np.pi)))
    if len(cfg.kernel_types) != len(cfg.kernel_probs):
        raise ValueError("blur: kernel_types and kernel_probs differ in length")
    unknown = set(cfg.kernel_types) - set(MIXED_TYPES)
    if unknown:
        raise ValueError(f"blur.kernel_types: unknown {sorted(unknown)}, expected some of {MIXED_TYPES}")
    probs = np.asarray(cfg.kernel_probs, dtype=np.float64)
    if (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"blur.kernel_probs: must be >= 0 and not all 0, got {cfg.kernel_probs}")
    kind = cfg.kernel_types[int(rng.choice(len(probs), p=probs / probs.sum()))]
    lo, hi = cfg.sigma_range
    if not 0 < lo <= hi:
        raise ValueError(f"blur.sigma_range: expected 0 < low <= high, got {cfg.sigma_range}")
    sigma_x = float(rng.uniform(lo, hi))
    if kind.endswith("aniso"):
        sigma_y = float(rng.uniform(lo, hi))
        theta = float(rng.uniform(-np.pi, np.pi))
    else:
        sigma_y, theta = sigma_x, 0.0
    beta = None
    if kind.startswith("generalized"):
        beta = _draw_beta(rng, cfg.betag_range, "blur.betag_range")
    elif kind.startswith("plateau"):
        beta = _draw_beta(rng, cfg.betap_range, "blur.betap_range")
    return _params(kind, size, sigma_x=sigma_x, sigma_y=sigma_y, theta=theta, beta=beta)


def draw_sinc(rng: np.random.Generator, kernel_sizes: tuple[int, ...]) -> dict:
    """Final-stage sinc: random size from ``kernel_sizes``, omega_c ~ U[pi/3, pi]."""
    size = _draw_size(rng, kernel_sizes, "final.kernel_sizes")
    return _params("sinc", size, omega_c=float(rng.uniform(np.pi / 3, np.pi)))


def _params(kind: str, size: int, sigma_x=None, sigma_y=None, theta=None, beta=None, omega_c=None) -> dict:
    return {
        "type": kind,
        "size": size,
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "theta": theta,
        "beta": beta,
        "omega_c": omega_c,
    }


def build_kernel(params: dict) -> np.ndarray:
    """The float32 (k, k) kernel, summing to 1, described by ``params``."""
    kind = params.get("type")
    if kind not in KERNEL_TYPES:
        raise ValueError(f"kernel params: unknown type {kind!r}, expected one of {KERNEL_TYPES}")
    size = params["size"]
    if kind == "sinc":
        k = sinc_kernel(size, params["omega_c"])
    else:
        geometry = (size, params["sigma_x"], params["sigma_y"], params["theta"])
        if kind in ("iso", "aniso"):
            k = gaussian_kernel(*geometry)
        elif kind.startswith("generalized"):
            k = generalized_gaussian_kernel(*geometry, params["beta"])
        else:
            k = plateau_kernel(*geometry, params["beta"])
    return k.astype(np.float32)


# Costs in ms per 512x512x3 float32 image of the three exact filter paths (fitted on one x86
# core). Only the choice of path depends on them; every path is exact to FILTER_TOL.
_SEP_COST = (0.4, 0.065)  # per separable term: a + b * (taps_x + taps_y)
_DIRECT_COST = (0.3, 0.035)  # cv2.filter2D skips zero taps: a + b * nonzero taps
_DIRECT_MAX_TAPS = 121  # above ~130 taps cv2.filter2D switches to its own, slower, DFT
_DFT_COST = 5.5  # times the padded DFT area over the image area


def _trim(kernel: np.ndarray) -> np.ndarray:
    """Smallest centred sub-kernel whose dropped border holds at most _TRIM_TOL of L1 mass."""
    a = np.abs(kernel.astype(np.float64))
    c = kernel.shape[0] // 2
    r = c
    while r > 0 and a.sum() - a[c - r + 1 : c + r, c - r + 1 : c + r].sum() <= _TRIM_TOL:
        r -= 1
        a = a[1:-1, 1:-1]
    return kernel[c - r : c + r + 1, c - r : c + r + 1]


def _sparsify(kernel: np.ndarray, budget: float) -> np.ndarray:
    """Zero the smallest taps whose summed magnitude stays within ``budget``."""
    a = np.abs(kernel.astype(np.float64)).reshape(-1)
    order = np.argsort(a, kind="stable")
    n_drop = int(np.searchsorted(np.cumsum(a[order]), budget, side="right"))
    out = kernel.copy().reshape(-1)
    out[order[:n_drop]] = 0
    return out.reshape(kernel.shape)


def _low_rank(kernel: np.ndarray, budget: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fewest (column, row) vector pairs whose outer-product sum is within ``budget`` (L1)."""
    k64 = kernel.astype(np.float64)
    u, s, vt = np.linalg.svd(k64)
    approx = np.zeros_like(k64)
    terms = []
    for i in range(len(s)):
        approx += s[i] * np.outer(u[:, i], vt[i])
        terms.append(((u[:, i] * s[i]).astype(np.float32), vt[i].astype(np.float32)))
        if np.abs(k64 - approx).sum() <= budget:
            break
    return terms


def _dft_area(shape: tuple[int, int], k: int) -> int:
    return cv2.getOptimalDFTSize(shape[0] + k - 1) * cv2.getOptimalDFTSize(shape[1] + k - 1)


def _plan(kernel: np.ndarray, shape: tuple[int, int]) -> tuple[str, object]:
    """Cheapest exact path for correlating an image of ``shape`` (h, w) with ``kernel``."""
    trimmed = _trim(kernel)
    dropped = np.abs(kernel.astype(np.float64)).sum() - np.abs(trimmed.astype(np.float64)).sum()
    budget = FILTER_TOL - float(dropped)
    kt = trimmed.shape[0]
    terms = _low_rank(trimmed, budget)
    sparse = _sparsify(trimmed, budget)
    costs = {
        "sep": len(terms) * (_SEP_COST[0] + _SEP_COST[1] * 2 * kt),
        "direct": _DIRECT_COST[0] + _DIRECT_COST[1] * np.count_nonzero(sparse)
        if kt * kt <= _DIRECT_MAX_TAPS
        else np.inf,
        "dft": _DFT_COST * _dft_area(shape, kt) / (shape[0] * shape[1]),
    }
    path = min(costs, key=costs.get)
    return path, {"sep": terms, "direct": sparse, "dft": trimmed}[path]


def _filter_dft(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation with reflect-101 borders through cv2.dft (linear, not circular)."""
    h, w = img.shape[:2]
    k = kernel.shape[0]
    r = k // 2
    nh = cv2.getOptimalDFTSize(h + 2 * r)
    nw = cv2.getOptimalDFTSize(w + 2 * r)
    kpad = np.zeros((nh, nw), np.float32)
    kpad[:k, :k] = kernel
    kspec = cv2.dft(kpad, nonzeroRows=k)
    # Reflect-pad by r, then up to the DFT size: rows/cols past h + 2r never reach the output.
    padded = cv2.copyMakeBorder(img, r, nh - h - r, r, nw - w - r, cv2.BORDER_REFLECT_101)
    if padded.ndim == 2:
        padded = padded[..., None]
    # Reused buffers: fresh arrays of this size cost page faults that rival the transforms.
    chan = np.empty((nh, nw), np.float32)
    spec = np.empty_like(chan)
    res = np.empty_like(chan)
    out = np.empty((h, w, padded.shape[2]), np.float32)
    for i in range(padded.shape[2]):
        cv2.extractChannel(padded, i, chan)
        cv2.dft(chan, spec)
        cv2.mulSpectrums(spec, kspec, 0, spec, conjB=True)
        cv2.dft(spec, res, flags=cv2.DFT_INVERSE | cv2.DFT_SCALE | cv2.DFT_REAL_OUTPUT)
        out[..., i] = res[:h, :w]
    return out if img.ndim == 3 else out[..., 0]


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate an HWC (or HW) float32 image with an odd square kernel, reflect-101 borders.

    Equals cv2.filter2D with the full kernel to within FILTER_TOL per pixel for images in [0, 1].
    It takes the cheapest of three paths, each exact to that tolerance: a low-rank separable
    decomposition (cv2.sepFilter2D), cv2.filter2D's direct path on the trimmed kernel with
    negligible taps zeroed, or a DFT. The path depends only on the kernel and the image shape,
    so equal inputs give equal bytes.
    """
    if img.dtype != np.float32 or img.ndim not in (2, 3):
        raise ValueError(f"filter2d: expected a float32 HW or HWC image, got {img.dtype} {img.shape}")
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise ValueError(f"filter2d: expected an odd square kernel, got shape {kernel.shape}")
    path, data = _plan(np.asarray(kernel, dtype=np.float32), img.shape[:2])
    img = np.ascontiguousarray(img)
    border = cv2.BORDER_REFLECT_101
    if path == "direct":
        return cv2.filter2D(img, -1, data, borderType=border)
    if path == "dft":
        return _filter_dft(img, data)
    col, row = data[0]
    out = cv2.sepFilter2D(img, -1, row, col, borderType=border)
    for col, row in data[1:]:
        out += cv2.sepFilter2D(img, -1, row, col, borderType=border)
    return out
