"""Training losses: stage 1 (DPG, paper Eq. 4-5) and stage 2 (restorer, paper Eq. 9-10)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from haodiff_model.losses.dists import DISTS

# Grey as torchvision's Grayscale (ITU-R 601 luma), which HAODiff's edge utility uses.
_LUMA = (0.299, 0.587, 0.114)
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


DICE_REDUCTIONS = ("sample", "batch")


def bounded_logits(logits: torch.Tensor, bound: float | None) -> torch.Tensor:
    """bound * tanh(logits / bound): the same ranking and 0.5 threshold, but |logit| < bound.

    With a bound, a head that drifts far off gets a sigmoid of at most sigmoid(bound), whose
    gradient stays > 0 (3.4e-4 at bound 8, against 0 at the +2000 an unbounded head reached).
    """
    return logits if bound is None else bound * torch.tanh(logits / bound)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, reduction: str = "sample") -> torch.Tensor:
    """1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps), p = sigmoid(logits).

    reduction "sample" (paper Eq. 5 per image, then the mean over the batch): a sample whose
    target is empty scores ~0 whatever it predicts next to the smoothing eps, so it barely pushes
    back, and on the samples with a mask a uniform prediction is pushed towards all ones.
    reduction "batch" sums numerator and denominator over the whole batch first: false positives
    on empty samples then enlarge the one denominator and cost as much as anywhere else.
    eps = 1 keeps the per-sample loss defined on empty targets; next to the thousands of pixels
    of a mask it is negligible otherwise.
    """
    if logits.shape != target.shape:
        raise ValueError(f"dice_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    if reduction not in DICE_REDUCTIONS:
        raise ValueError(f"dice_loss: reduction must be one of {DICE_REDUCTIONS}, got {reduction!r}")
    p = torch.sigmoid(logits).flatten(1)
    t = target.to(p.dtype).flatten(1)
    if reduction == "batch":
        p, t = p.reshape(1, -1), t.reshape(1, -1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


def focal_bce_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 0.0,
                   pos_weight: float = 1.0) -> torch.Tensor:
    """Per-pixel binary cross-entropy, mean over pixels; gamma > 0 is the focal loss (Lin et al. 2017),
    which down-weights pixels already classified well by (1 - p_t) ** gamma. pos_weight multiplies
    the loss of positive pixels: with HMB on a tenth of the pixels, plain BCE is cheapest at "never"."""
    if logits.shape != target.shape:
        raise ValueError(f"focal_bce_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    t = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    if gamma:
        p_t = torch.exp(-bce)  # the probability given to the true class
        bce = (1 - p_t) ** gamma * bce
    if pos_weight != 1.0:
        bce = bce * (1 + (pos_weight - 1) * t)
    return bce.mean()


@dataclass(frozen=True)
class Stage1Loss:
    """The stage-1 objective's settings (the `loss:` section of pipelines/train_dpg.yaml).

    The defaults are the ones the learnability benchmark chose (issue #12); `PAPER_LOSS` is paper
    Eq. 4-5 as written: Dice per image on the raw logits' sigmoid, no BCE.
    """

    dice_weight: float = 0.5  # alpha of paper Eq. 4 (paper: 0.02)
    dice_reduction: Literal["sample", "batch"] = "batch"
    dice_smooth: float = 1.0
    bce_weight: float = 0.1
    focal_gamma: float = 0.0
    bce_pos_weight: float = 1.0
    mask_logit_bound: float | None = None

    def __post_init__(self) -> None:
        checks = {
            "dice_weight": (self.dice_weight >= 0, ">= 0"),
            "dice_reduction": (self.dice_reduction in DICE_REDUCTIONS, f"one of {', '.join(DICE_REDUCTIONS)}"),
            "dice_smooth": (self.dice_smooth >= 0, ">= 0"),
            "bce_weight": (self.bce_weight >= 0, ">= 0"),
            "focal_gamma": (self.focal_gamma >= 0, ">= 0"),
            "bce_pos_weight": (self.bce_pos_weight > 0, "> 0"),
            "mask_logit_bound": (self.mask_logit_bound is None or self.mask_logit_bound > 0, "null or > 0"),
        }
        bad = [f"{n} must be {need}, got {getattr(self, n)!r}" for n, (ok, need) in checks.items() if not ok]
        if bad:
            raise ValueError("; ".join(bad))


PAPER_LOSS = Stage1Loss(dice_weight=0.02, dice_reduction="sample", dice_smooth=1.0, bce_weight=0.0, focal_gamma=0.0,
                        bce_pos_weight=1.0, mask_logit_bound=None)


def stage1_loss(
    pred_hq: torch.Tensor,
    pred_residual: torch.Tensor,
    mask_logits: torch.Tensor,
    hq: torch.Tensor,
    residual: torch.Tensor,
    mask: torch.Tensor,
    cfg: Stage1Loss = Stage1Loss(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1(HQ) + L1(residual = LQ - HQ) + dice_weight * Dice + bce_weight * (focal) BCE on the mask
    logits (bounded first when cfg says so).

    Returns the total and its weighted terms (detached, for logging): total == sum of the parts.
    """
    logits = bounded_logits(mask_logits, cfg.mask_logit_bound)
    parts = {
        "l1_hq": F.l1_loss(pred_hq, hq),
        "l1_residual": F.l1_loss(pred_residual, residual),
        "dice": cfg.dice_weight * dice_loss(logits, mask, cfg.dice_smooth, cfg.dice_reduction),
        "bce": cfg.bce_weight * focal_bce_loss(logits, mask, cfg.focal_gamma, cfg.bce_pos_weight) if cfg.bce_weight
        else logits.new_zeros(()),
    }
    total = parts["l1_hq"] + parts["l1_residual"] + parts["dice"] + parts["bce"]
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
