"""Training losses: stage 1 (DPG, paper Eq. 4-5) and stage 2 (restorer, paper Eq. 9-10)."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from haodiff_model.losses.dists import DISTS

# Grey as torchvision's Grayscale (ITU-R 601 luma), which HAODiff's edge utility uses.
_LUMA = (0.299, 0.587, 0.114)
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) per sample, p = sigmoid(logits), then the mean.

    eps = 1 (additive smoothing) keeps the loss defined and its gradient bounded on the many
    samples without HMB, whose target mask is empty (loss -> 0 as the predicted mask empties);
    next to the ~2.6e5 pixels of a 512x512 mask it is negligible otherwise.
    """
    if logits.shape != target.shape:
        raise ValueError(f"dice_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    p = torch.sigmoid(logits).flatten(1)
    t = target.to(p.dtype).flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


@dataclass(frozen=True)
class Stage1Loss:
    """The stage-1 objective's settings (the `loss:` section of pipelines/train_dpg.yaml)."""

    dice_weight: float = 0.02  # alpha of paper Eq. 4

    def __post_init__(self) -> None:
        if self.dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")


def stage1_loss(
    pred_hq: torch.Tensor,
    pred_residual: torch.Tensor,
    mask_logits: torch.Tensor,
    hq: torch.Tensor,
    residual: torch.Tensor,
    mask: torch.Tensor,
    cfg: Stage1Loss = Stage1Loss(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1(HQ) + L1(residual = LQ - HQ) + cfg.dice_weight * Dice(sigmoid(mask_logits), M_HMB).

    Returns the total and its weighted terms (detached, for logging): total == sum of the parts.
    """
    parts = {
        "l1_hq": F.l1_loss(pred_hq, hq),
        "l1_residual": F.l1_loss(pred_residual, residual),
        "dice": cfg.dice_weight * dice_loss(mask_logits, mask),
    }
    total = parts["l1_hq"] + parts["l1_residual"] + parts["dice"]
    return total, {k: v.detach() for k, v in parts.items()}


def sobel_edges(img: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude sqrt(gx^2 + gy^2 + 1e-6) of the luma of RGB images, (B, 1, H, W).

    Borders are replicate-padded: zero padding would draw a frame of strong "edges" around every
    bright image, the same in prediction and target, which only dilutes the edge-map statistics.
    """
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"sobel_edges expects (B, 3, H, W) RGB images, got {tuple(img.shape)}")
    luma = torch.tensor(_LUMA, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    grey = (img * luma).sum(dim=1, keepdim=True)
    kx = torch.tensor(_SOBEL_X, dtype=img.dtype, device=img.device)
    kernels = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3): x and y
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return torch.sqrt(g[:, :1] ** 2 + g[:, 1:] ** 2 + 1e-6)


class EdgeAwareDISTS(nn.Module):
    """EA-DISTS (paper Eq. 9): DISTS(x, y) + DISTS(Sobel(x), Sobel(y)); RGB inputs in [0, 1]."""

    def __init__(self, dists: DISTS):
        super().__init__()
        self.dists = dists

    @classmethod
    def from_files(cls, vgg16_path: str | Path, dists_weights_path: str | Path) -> "EdgeAwareDISTS":
        return cls(DISTS.from_files(vgg16_path, dists_weights_path))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dists(x, y) + self.dists(sobel_edges(x), sobel_edges(y))


def stage2_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    ea_dists: EdgeAwareDISTS,
    gan_generator_loss: torch.Tensor | None = None,
    gan_weight: float = 0.01,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE + EA-DISTS + gan_weight * L_G (paper Eq. 10) on decoded images in [-1, 1].

    MSE is taken in the VAE's [-1, 1] range; EA-DISTS sees the images mapped to [0, 1] as DISTS
    expects. `gan_generator_loss` is `generator_gan_loss(D(fake))`, or None before the GAN starts.
    Returns the total and its weighted terms (detached): total == sum of the parts.
    """
    if pred.shape != target.shape:
        raise ValueError(f"stage2_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    parts = {
        "mse": F.mse_loss(pred, target),
        "ea_dists": ea_dists((pred + 1) / 2, (target + 1) / 2),
    }
    if gan_generator_loss is not None:
        parts["gan"] = gan_weight * gan_generator_loss
    total = sum(parts.values())
    return total, {k: v.detach() for k, v in parts.items()}
