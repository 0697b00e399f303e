"""DISTS (Ding et al., 2020): structure and texture similarity on VGG16 features, usable as a loss.

Numerically the formula of the official implementation: ImageNet-normalised RGB in [0, 1] through
a VGG16 whose max-pools are replaced by L2 pooling, six feature sets (the raw input, then
relu1_2 .. relu5_3: 3 + 64 + 128 + 256 + 512 + 512 = 1475 channels), per channel a luminance-like
term S1 on spatial means and a structure term S2 on (co)variances, weighted by learned alpha/beta.
VGG16 and alpha/beta come from local files (see `DISTS.from_files`).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from haodiff_model.losses.vgg import VGG16_STAGE_RELU_INDICES, load_vgg16_features

DISTS_CHANNELS: tuple[int, ...] = (3, 64, 128, 256, 512, 512)
DISTS_TOTAL_CHANNELS = sum(DISTS_CHANNELS)  # 1475
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_C1 = 1e-6
_C2 = 1e-6


def hanning_filter_3x3() -> torch.Tensor:
    """The 3x3 L2-pooling window: outer product of np.hanning(5)[1:-1], normalised to sum 1."""
    a = np.hanning(5)[1:-1]
    g = a[:, None] * a[None, :]
    return torch.from_numpy(g / g.sum()).float()


class L2Pool(nn.Module):
    """sqrt(Hanning-weighted mean of x^2), stride 2: an anti-aliased replacement for max-pool."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("filter", hanning_filter_3x3()[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x**2, self.filter.to(x.dtype), stride=2, padding=1, groups=self.channels)
        return torch.sqrt(out + 1e-12)


def load_dists_weights(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read alpha and beta, each (1, 1475, 1, 1), from a file in the official `weights.pt` layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DISTS weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ValueError(f"{path}: not a torch file ({type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with keys 'alpha' and 'beta', got {type(state).__name__}")
    keys = set(state)
    if keys != {"alpha", "beta"}:
        raise ValueError(
            f"{path}: expected exactly the keys 'alpha' and 'beta'; "
            f"missing {sorted({'alpha', 'beta'} - keys)}, unexpected {sorted(keys - {'alpha', 'beta'})}"
        )
    shape = (1, DISTS_TOTAL_CHANNELS, 1, 1)
    for name in ("alpha", "beta"):
        if not isinstance(state[name], torch.Tensor) or tuple(state[name].shape) != shape:
            got = tuple(state[name].shape) if isinstance(state[name], torch.Tensor) else type(state[name]).__name__
            raise ValueError(f"{path}: '{name}' must be a tensor of shape {shape}, got {got}")
    return state["alpha"].float(), state["beta"].float()


class DISTS(nn.Module):
    """DISTS distance between RGB images in [0, 1]; 0 for identical inputs, lower is more similar.

    Inputs (B, 3, H, W) or (B, 1, H, W); a 1-channel map (e.g. Sobel edges) is treated as grey
    RGB, which is what the reference code's broadcasting against the 3-channel mean/std does.
    Frozen; gradients flow to the inputs.
    """

    def __init__(self, vgg_features: nn.Sequential, alpha: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        shape = (1, DISTS_TOTAL_CHANNELS, 1, 1)
        if tuple(alpha.shape) != shape or tuple(beta.shape) != shape:
            raise ValueError(f"alpha and beta must have shape {shape}, got {tuple(alpha.shape)}, {tuple(beta.shape)}")
        if len(vgg_features) != 31:
            raise ValueError(f"vgg_features must be the 31-module VGG16 features stack, got {len(vgg_features)}")
        stages = []
        start = 0
        # Stage k > 1 starts with an L2 pool over the channels that stage k-1 produced.
        for relu_index, pool_channels in zip(VGG16_STAGE_RELU_INDICES, (None,) + DISTS_CHANNELS[1:5]):
            layers = [] if pool_channels is None else [L2Pool(pool_channels)]
            layers += list(vgg_features[start : relu_index + 1])
            stages.append(nn.Sequential(*layers))
            start = relu_index + 2  # skip the max-pool that follows this block's last ReLU
        self.stages = nn.ModuleList(stages)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("alpha", alpha.detach().clone().float())
        self.register_buffer("beta", beta.detach().clone().float())
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg16_path: str | Path, weights_path: str | Path) -> "DISTS":
        """VGG16 from a torchvision-format state dict, alpha/beta from an official-layout `weights.pt`."""
        alpha, beta = load_dists_weights(weights_path)
        return cls(load_vgg16_features(vgg16_path), alpha, beta)

    def train(self, mode: bool = True) -> "DISTS":
        # A fixed metric: never switch to training behaviour when the trainer calls .train().
        return super().train(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[raw input, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]; in-place ReLUs never touch `x`."""
        feats = [x]
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"DISTS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"DISTS expects (B, 3, H, W) or (B, 1, H, W) inputs, got {tuple(x.shape)}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)

        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w_sum, DISTS_CHANNELS, dim=1)
        betas = torch.split(self.beta / w_sum, DISTS_CHANNELS, dim=1)
        similarity = torch.zeros(x.shape[0], device=x.device)
        for fx, fy, a, b in zip(self.features(x), self.features(y), alphas, betas):
            # Statistics in float32: under bf16 autocast the variances would lose c2 = 1e-6 entirely.
            fx, fy = fx.float(), fy.float()
            mx = fx.mean(dim=(2, 3), keepdim=True)
            my = fy.mean(dim=(2, 3), keepdim=True)
            s1 = (2 * mx * my + _C1) / (mx**2 + my**2 + _C1)
            vx = ((fx - mx) ** 2).mean(dim=(2, 3), keepdim=True)
            vy = ((fy - my) ** 2).mean(dim=(2, 3), keepdim=True)
            cov = (fx * fy).mean(dim=(2, 3), keepdim=True) - mx * my
            s2 = (2 * cov + _C2) / (vx + vy + _C2)
            similarity = similarity + (a * s1 + b * s2).sum(dim=(1, 2, 3))
        score = 1 - similarity
        return score.mean() if reduction == "mean" else score
