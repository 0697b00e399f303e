"""A random-weight stand-in for a Sapiens lite segmentation checkpoint, for speed measurements.

The real checkpoints (CC-BY-NC) cannot be shipped or downloaded here, but their cost is set by the
architecture alone (data_spec C.1, C.3): a ViT over 16x16 patches of a 1024x768 input (64x48
tokens), then three stride-2 transposed convolutions, three 1x1 convolutions and a 28-class
classifier, giving 512x384 logits. Sapiens-0.3B is width 1024, 24 layers, 16 heads. This module
builds that network with random weights and saves it the way Sapiens lite ships it (traced
TorchScript, fp32), so `SapiensSegmenter` and `haodiff-data synth --segmenter sapiens` load it
through their real code paths:

    python -m haodiff_data.segment.sapiens_standin OUT_torchscript.pt2 [--device cuda]

Its labels are meaningless; only its speed and memory are those of the real model.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from haodiff_data.segment.goliath import NUM_CLASSES
from haodiff_data.segment.sapiens import INPUT_HW


@dataclass(frozen=True)
class StandinConfig:
    width: int = 1024  # Sapiens-0.3B
    depth: int = 24
    heads: int = 16
    patch: int = 16
    head_channels: int = 768
    classes: int = NUM_CLASSES


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.InstanceNorm2d(cout), nn.SiLU())


def _pointwise(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.InstanceNorm2d(cout), nn.SiLU())


class SapiensStandin(nn.Module):
    """Input N x 3 x 1024 x 768 (normalised), output N x classes x 512 x 384 logits."""

    def __init__(self, cfg: StandinConfig) -> None:
        super().__init__()
        self.grid = (INPUT_HW[0] // cfg.patch, INPUT_HW[1] // cfg.patch)
        self.embed = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.grid[0] * self.grid[1], cfg.width))
        self.blocks = nn.Sequential(*[Block(cfg.width, cfg.heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        c = cfg.head_channels
        self.head = nn.Sequential(_up(cfg.width, c), _up(c, c), _up(c, c),
                                  _pointwise(c, c), _pointwise(c, c), _pointwise(c, c),
                                  nn.Conv2d(c, cfg.classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.blocks(self.embed(x).flatten(2).transpose(1, 2) + self.pos))
        return self.head(tokens.transpose(1, 2).unflatten(2, self.grid))


def write_standin(path: str, cfg: StandinConfig = StandinConfig(), device: str = "cpu", seed: int = 0) -> int:
    """Trace the stand-in (fp32, as Sapiens lite's TorchScript files are) and save it; returns the
    number of parameters."""
    torch.manual_seed(seed)
    model = SapiensStandin(cfg).to(device).eval()
    example = torch.zeros(1, 3, *INPUT_HW, device=device)
    with torch.inference_mode(), warnings.catch_warnings():
        # Its shape checks are constant for the fixed input size; jit's deprecation is not actionable
        # here, since Sapiens lite ships TorchScript.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
    traced.save(path)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m haodiff_data.segment.sapiens_standin",
                                     description="write a random-weight Sapiens-sized TorchScript segmenter")
    parser.add_argument("out", help="output file; keep '_torchscript' in its name, as Sapiens lite does")
    parser.add_argument("--width", type=int, default=StandinConfig.width)
    parser.add_argument("--depth", type=int, default=StandinConfig.depth)
    parser.add_argument("--heads", type=int, default=StandinConfig.heads)
    parser.add_argument("--head-channels", type=int, default=StandinConfig.head_channels)
    parser.add_argument("--device", default="cpu", help="device the model is traced on (cuda traces faster)")
    args = parser.parse_args(argv)
    if args.width % args.heads:
        parser.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
    start = time.perf_counter()
    cfg = StandinConfig(width=args.width, depth=args.depth, heads=args.heads, head_channels=args.head_channels)
    params = write_standin(args.out, cfg, args.device)
    print(f"wrote {args.out}: {params / 1e6:.1f} M parameters (width {cfg.width}, {cfg.depth} layers, "
          f"{cfg.heads} heads), random weights, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
