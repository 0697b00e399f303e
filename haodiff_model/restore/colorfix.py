"""Colour correction of the restored image against the LQ input (official `align_method`).

Both images come in as float RGB in [0, 1] (the official code re-reads its uint8 results), shape
(B, 3, H, W). `wavelet`: five levels of a dilated 3x3 binomial blur ([1, 2, 1] x [1, 2, 1] / 16,
dilation and replicate padding 2^i); the restored image's high frequencies (the sum of the five
detail bands) plus the LQ's residual low frequencies. `adain`: per image and channel, the restored
image is standardised and given the LQ's mean and standard deviation (unbiased variance + 1e-5).
The caller clamps to [0, 1] and converts to uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("wavelet", "adain", "none")
WAVELET_LEVELS = 5
ADAIN_EPS = 1e-5


def _binomial_kernel(channels: int, like: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0], dtype=like.dtype, device=like.device)
    k2 = torch.outer(k, k) / 16
    return k2.expand(channels, 1, 3, 3).contiguous()


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """The 3x3 binomial blur with taps `radius` apart, borders replicated."""
    kernel = _binomial_kernel(image.shape[1], image)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=radius)


def wavelet_decompose(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with high + low == image: `levels` detail bands summed, and the residual low-pass."""
    high = torch.zeros_like(image)
    low = image
    for i in range(levels):
        blurred = wavelet_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(restored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """High frequencies of `restored` plus low frequencies of `reference`."""
    high, _ = wavelet_decompose(restored)
    _, low = wavelet_decompose(reference)
    return high + low


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    var = flat.var(dim=2, correction=1) + ADAIN_EPS
    return flat.mean(dim=2)[:, :, None, None], var.sqrt()[:, :, None, None]


def adain_color_fix(restored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`restored` with the per-channel mean and standard deviation of `reference`."""
    mean_r, std_r = _mean_std(restored)
    mean_ref, std_ref = _mean_std(reference)
    return (restored - mean_r) / std_r * std_ref + mean_ref


def color_fix(restored: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Apply `method` (wavelet, adain, none) in float32; the result is not clamped."""
    if method not in COLOR_FIXES:
        raise ValueError(f"colour fix must be one of {COLOR_FIXES}, got {method!r}")
    if restored.shape != reference.shape:
        raise ValueError(f"colour fix needs images of one size, got {tuple(restored.shape)} and {tuple(reference.shape)}")
    restored, reference = restored.float(), reference.float()
    if method == "wavelet":
        return wavelet_color_fix(restored, reference)
    if method == "adain":
        return adain_color_fix(restored, reference)
    return restored


__all__ = ["COLOR_FIXES", "adain_color_fix", "color_fix", "wavelet_blur", "wavelet_color_fix", "wavelet_decompose"]
