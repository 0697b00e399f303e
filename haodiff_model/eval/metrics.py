"""Full-reference image metrics: PSNR, SSIM (on RGB and on Y), LPIPS, DISTS.

Conventions (the field's two, both reported):
- Images are uint8 RGB; PSNR and SSIM work on [0, 255] values in float64.
- RGB: PSNR over all pixels and channels; SSIM per channel, averaged over the channels.
- Y: the ITU-R BT.601 luma of MATLAB's rgb2ycbcr, Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255
  (unrounded, in [16, 235]), as BasicSR's `test_y_channel`.
- `crop_border` pixels are removed from every side first (default 0: restoration at the input's
  size; super-resolution papers crop the scale factor).
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255,
  statistics with population (co)variances, averaged over the positions where the window fits
  ("valid"), which is what scikit-image's gaussian_weights=True, use_sample_covariance=False mode and
  BasicSR compute.
- LPIPS (Zhang et al. 2018) from the `lpips` wheel, which ships the linear heads; the AlexNet or
  VGG16 backbone comes from a local torchvision-format file. DISTS from `haodiff_model.losses.dists`.
Lower is better for LPIPS and DISTS, higher for PSNR and SSIM.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
Y_WEIGHTS = (65.481, 128.553, 24.966)
LPIPS_NETS = ("alex", "vgg")
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
# conv layers of torchvision's `features` stacks that LPIPS uses (all of them)
BACKBONE_CONVS = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}


def crop(image: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return image
    if min(image.shape[:2]) <= 2 * border:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is too small for crop_border {border}")
    return image[border:-border, border:-border]


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 1) float64 luma in [16, 235] (MATLAB rgb2ycbcr, unrounded)."""
    return (16.0 + image.astype(np.float64) @ np.array(Y_WEIGHTS) / 255.0)[..., None]


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two arrays of values in [0, peak]; inf for identical inputs."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs arrays of one shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _gaussian_taps() -> np.ndarray:
    r = np.arange(SSIM_WINDOW, dtype=np.float64) - (SSIM_WINDOW - 1) / 2
    g = np.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _window_mean(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Gaussian-weighted mean at every position where the 11x11 window fits (separable, float64)."""
    from scipy.ndimage import correlate1d

    r = (len(taps) - 1) // 2
    y = correlate1d(correlate1d(x, taps, axis=0, mode="constant"), taps, axis=1, mode="constant")
    return y[r:-r, r:-r]


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Mean SSIM over positions and channels of (H, W, C) arrays with values in [0, peak]."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs arrays of one shape, got {a.shape} and {b.shape}")
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1]}x{a.shape[0]}")
    taps = _gaussian_taps()
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    per_channel = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _window_mean(x, taps), _window_mean(y, taps)
        vx = _window_mean(x * x, taps) - mx**2
        vy = _window_mean(y * y, taps) - my**2
        cov = _window_mean(x * y, taps) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        per_channel.append(s.mean())
    return float(np.mean(per_channel))


def pixel_metrics(restored: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> dict[str, float]:
    """psnr, ssim (RGB) and psnr_y, ssim_y of two uint8 RGB images of one size."""
    if restored.shape != reference.shape:
        raise ValueError(f"restored {restored.shape[1]}x{restored.shape[0]} and reference "
                         f"{reference.shape[1]}x{reference.shape[0]} differ in size")
    a, b = crop(restored, crop_border), crop(reference, crop_border)
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    return {"psnr": psnr(a, b), "ssim": ssim(a, b), "psnr_y": psnr(ya, yb), "ssim_y": ssim(ya, yb)}


def to_tensor01(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device).float() / 255


def load_lpips(net: str, backbone: str | Path) -> nn.Module:
    """`lpips.LPIPS` with the wheel's linear heads and the backbone weights from a torchvision-format
    state dict (`features.{i}.*`, as torchvision's alexnet / vgg16 ImageNet files hold them)."""
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
    path = Path(backbone)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS {net} backbone {path} not found: give the torchvision ImageNet weights of "
                                f"{'AlexNet' if net == 'alex' else 'VGG16'} ({BACKBONE_FILES[net]}, "
                                "torchvision's IMAGENET1K_V1 file, as torch hub caches it) with --lpips-backbone")
    import lpips

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    missing = [f"features.{i}.{kind}" for i in BACKBONE_CONVS[net] for kind in ("weight", "bias")
               if f"features.{i}.{kind}" not in state]
    if missing:
        raise ValueError(f"{path}: not a torchvision {net} state dict; missing {missing[:6]}")
    with warnings.catch_warnings():  # torchvision's deprecation notice for lpips' `pretrained=False`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    targets = {name: p for name, p in model.net.named_parameters()}
    wanted = {}
    for name in targets:  # slice{k}.{i}.weight <- features.{i}.weight (lpips keeps torchvision's indices)
        _, index, kind = name.split(".")
        wanted[name] = f"features.{index}.{kind}"
    bad = [f"{wanted[n]} {tuple(state[wanted[n]].shape)} vs {tuple(p.shape)}" for n, p in targets.items()
           if state[wanted[n]].shape != p.shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for LPIPS {net}: {bad[:4]}")
    with torch.no_grad():
        for name, p in targets.items():
            p.copy_(state[wanted[name]])
    return model.eval().requires_grad_(False)


class PerceptualMetrics:
    """LPIPS and/or DISTS on one device; `__call__` returns {"lpips": .., "dists": ..} for a pair."""

    def __init__(self, lpips_model: nn.Module | None, dists_model: nn.Module | None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.lpips = lpips_model.to(self.device) if lpips_model is not None else None
        self.dists = dists_model.to(self.device) if dists_model is not None else None

    @property
    def names(self) -> list[str]:
        return [n for n, m in (("lpips", self.lpips), ("dists", self.dists)) if m is not None]

    @torch.no_grad()
    def batch(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image scores (B,) of image batches in [0, 1], (B, 3, H, W)."""
        out: dict[str, torch.Tensor] = {}
        x, y = x.to(self.device).float(), y.to(self.device).float()
        if self.lpips is not None:
            out["lpips"] = self.lpips(x, y, normalize=True).flatten()
        if self.dists is not None:
            out["dists"] = self.dists(x, y, reduction="none")
        return out

    def __call__(self, restored: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        if not self.names:
            return {}
        scores = self.batch(to_tensor01(restored), to_tensor01(reference))
        return {k: float(v[0]) for k, v in scores.items()}


def batch_psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of float batches in [0, 1] (validation during training)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def mask_dice_iou(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU (B,) of thresholded mask logits (> 0) against binary targets."""
    pred = (logits > 0).flatten(1).float()
    true = (target > 0.5).flatten(1).float()
    inter = (pred * true).sum(dim=1)
    total = pred.sum(dim=1) + true.sum(dim=1)
    union = total - inter
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return dice, iou


__all__ = ["BACKBONE_FILES", "LPIPS_NETS", "PerceptualMetrics", "batch_psnr", "crop", "load_lpips", "mask_dice_iou",
           "pixel_metrics", "psnr", "rgb_to_y", "ssim", "to_tensor01"]
