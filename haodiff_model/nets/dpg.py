"""DPG, the triple-branch Swin network of paper Sec. 3.2 (official `SwinIR` multi-branch).

`DPGFeatureExtractor` is what the prompt encoder runs (official `SwinIRFeatureExtractor`):
conv downsampler -> shared trunk of RSTBs -> long skip -> one RSTB stack per branch -> shared
LayerNorm, returning per-branch raster tokens. `DPGNetwork` is the stage-1 training network: the
same modules plus one nearest+conv upsampler head per branch (HQ image, residual LQ-HQ, HMB mask
logits). Parameter names equal the official ones, so the two load each other's state dicts and the
official files load by name: `DPGNetwork.from_pretrained(path)` / `save_pretrained(path)` read and
write the stage-1 file (with its architecture in dpg.json beside it; io/official.py owns the layout).

Differences from the official module list, on purpose: the stage-1 network does not build the
dead `layers.2/3` RSTBs the official one carries (never used in its forward; loading reports and
skips them, official-layout export writes them back), and the RGB mean is a constant, not state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from haodiff_data.config import ConfigError, from_dict
from haodiff_model.config import read_section
from haodiff_model.nets.layers import LayerNorm
from haodiff_model.nets.swin import (
    ATTENTION_MODES, RSTB, DropPath, WindowAttention, WindowGeometry, image_to_tokens, init_swin_,
    residual_conv, tokens_to_image,
)

if TYPE_CHECKING:
    from haodiff_model.io.official import LoadReport

RGB_MEAN = (0.4488, 0.4371, 0.4040)
# swinir_kwargs keys the official code accepts that carry no architecture: kept out of DPGConfig.
OFFICIAL_PASSIVE_KWARGS = frozenset({"pretrained_swinir", "net_type", "init_type", "upsampler", "norm_layer"})


@dataclass(frozen=True)
class DPGConfig:
    """DPG architecture; field names are the official `swinir_kwargs` keys (paper values as defaults).

    `attention` is a runtime choice, not architecture: it is never written to checkpoints.
    """

    img_size: int = 512
    patch_size: int = 1
    in_chans: int = 3
    embed_dim: int = 150
    depths: tuple[int, ...] = (6, 6, 3, 3)
    num_heads: tuple[int, ...] = (6, 6, 3, 3)
    window_size: int = 8
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False
    patch_norm: bool = True
    upscale: int = 4
    img_range: float = 1.0
    downsample: bool = True
    branch_num: int = 3
    skip_branch: tuple[int, ...] = ()
    resi_connection: str = "1conv"
    use_checkpoint: bool = False
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads) or len(self.depths) < 2:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must have the same length >= 2")
        for heads in self.num_heads:
            if self.embed_dim % heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {heads}")
        if self.patch_size != 1:
            raise ValueError(f"patch_size must be 1 (the official PatchEmbed only flattens), got {self.patch_size}")
        if self.downsample and self.upscale not in (2, 4):
            raise ValueError(f"upscale must be 2 or 4 with downsample=True, got {self.upscale}")
        if self.img_size % self.downscale or self.grid % self.window:
            raise ValueError(f"img_size {self.img_size} / downscale {self.downscale} = grid {self.grid} "
                             f"is not a multiple of the window {self.window}")
        if self.branch_num < 1 or any(not 0 <= b < self.branch_num for b in self.skip_branch):
            raise ValueError(f"branch_num {self.branch_num} / skip_branch {self.skip_branch} are inconsistent")
        if self.resi_connection not in ("1conv", "3conv"):
            raise ValueError(f"resi_connection must be '1conv' or '3conv', got {self.resi_connection!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")

    @property
    def downscale(self) -> int:
        return self.upscale if self.downsample else 1

    @property
    def grid(self) -> int:
        """Side of the token grid (128 for the paper config)."""
        return self.img_size // self.downscale

    @property
    def window(self) -> int:
        """Window after the official clamp (a grid no larger than the window is one window)."""
        return min(self.window_size, self.img_size // self.downscale)

    @property
    def shift(self) -> int:
        return 0 if self.img_size // self.downscale <= self.window_size else self.window_size // 2

    @property
    def num_trunk_layers(self) -> int:
        return len(self.depths) // 2

    @property
    def kept_branches(self) -> tuple[int, ...]:
        return tuple(b for b in range(self.branch_num) if b not in self.skip_branch)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "dpg") -> "DPGConfig":
        return from_dict(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str = "dpg") -> "DPGConfig":
        return cls.from_dict(read_section(path, section), f"{path}: {section}")

    @classmethod
    def from_swinir_kwargs(cls, kwargs: Mapping[str, Any], attention: str = "sdpa") -> "DPGConfig":
        """From the official `swinir_kwargs` (checkpoint); passive official keys are skipped."""
        if "norm_layer" in kwargs and kwargs["norm_layer"] not in (None, nn.LayerNorm, "LayerNorm"):
            raise ConfigError(f"swinir_kwargs: only LayerNorm is supported, got norm_layer={kwargs['norm_layer']!r}")
        kept = {k: v for k, v in kwargs.items() if k not in OFFICIAL_PASSIVE_KWARGS}
        return from_dict(cls, {**kept, "attention": attention}, "swinir_kwargs")

    def to_swinir_kwargs(self) -> dict[str, Any]:
        """Official `swinir_kwargs` (plain Python types, lists for sequences)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "attention":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class ConvDownsampler(nn.Module):
    """Official `ConvDownsampler`: conv + LeakyReLU(0.01), stride-2 conv(s), conv; no activation between."""

    def __init__(self, in_chans: int, num_feat: int, downscale: int):
        super().__init__()
        self.downscale = downscale
        self.conv_before_downsample = nn.Sequential(nn.Conv2d(in_chans, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.conv_down1 = nn.Conv2d(num_feat, num_feat, 3, stride=2, padding=1)
        if downscale == 4:
            self.conv_down2 = nn.Conv2d(num_feat, num_feat, 3, stride=2, padding=1)
        self.conv_last = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_down1(self.conv_before_downsample(x))
        if self.downscale == 4:
            x = self.conv_down2(x)
        return self.conv_last(x)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> raster tokens (B, H*W, C), then LayerNorm when patch_norm (official naming)."""

    def __init__(self, dim: int, patch_norm: bool):
        super().__init__()
        self.norm = LayerNorm(dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = image_to_tokens(x)
        return self.norm(x) if self.norm is not None else x


class NearestConvUpsampler(nn.Module):
    """Official stage-1 head: conv_after_body -> conv+LReLU(0.01) -> (nearest x2 -> conv -> LReLU(0.2)) x
    log2(upscale) -> conv_hr -> LReLU(0.2) -> conv_last."""

    def __init__(self, num_feat: int, upscale: int, out_chans: int, resi_connection: str):
        super().__init__()
        self.upscale = upscale
        self.conv_after_body = residual_conv(num_feat, resi_connection)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1) if upscale == 4 else None
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, out_chans, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_before_upsample(self.conv_after_body(x))
        x = F.leaky_relu(self.conv_up1(F.interpolate(x, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        if self.conv_up2 is not None:
            x = F.leaky_relu(self.conv_up2(F.interpolate(x, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        return self.conv_last(F.leaky_relu(self.conv_hr(x), 0.2, inplace=True))


class DPGFeatureExtractor(nn.Module):
    """Frozen-DPG feature path (official `SwinIRFeatureExtractor`): x -> per-branch (B, H*W, C) tokens.

    Built on the meta device and initialised from `generator` (CPU; seed 0 when None) exactly
    like the official module: PyTorch-default Linear/Conv, trunc_normal(0.02) bias tables, and all
    branches starting from the same weights (the official code deep-copies one set).
    """

    def __init__(self, cfg: DPGConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        with torch.device("meta"):
            self._build()
        self.to_empty(device="cpu")
        self._geometries: dict[tuple, WindowGeometry] = {}
        self._means: dict[tuple, torch.Tensor] = {}
        self.reset_parameters(generator)

    def _rstb(self, i: int, dpr: list[float]) -> RSTB:
        c = self.cfg
        start = sum(c.depths[:i])
        return RSTB(c.embed_dim, c.depths[i], c.num_heads[i], c.window, shift=c.shift, mlp_ratio=c.mlp_ratio,
                    qkv_bias=c.qkv_bias, qk_scale=c.qk_scale, drop_path=dpr[start:start + c.depths[i]],
                    resi_connection=c.resi_connection, attention=c.attention)

    def _build(self) -> None:
        c = self.cfg
        if c.downsample:
            self.conv_first = ConvDownsampler(c.in_chans, c.embed_dim, c.upscale)
        else:
            self.conv_first = nn.Conv2d(c.in_chans, c.embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(c.embed_dim, c.patch_norm)
        if c.ape:
            self.absolute_pos_embed = nn.Parameter(torch.empty(1, c.grid * c.grid, c.embed_dim))
        dpr = torch.linspace(0, c.drop_path_rate, sum(c.depths), device="cpu").tolist()
        half = c.num_trunk_layers
        self.layers = nn.ModuleList([self._rstb(i, dpr) for i in range(half)])
        self.branches = nn.ModuleList([
            nn.ModuleList([self._rstb(i, dpr) for i in range(half, len(c.depths))]) for _ in c.kept_branches
        ])
        self.norm = LayerNorm(c.embed_dim)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        init_swin_(self.conv_first, g)
        init_swin_(self.patch_embed, g)
        if self.cfg.ape:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02, generator=g)
        init_swin_(self.layers, g)
        init_swin_(self.branches[0], g)
        for branch in self.branches[1:]:
            for dst, src in zip(branch.parameters(), self.branches[0].parameters()):
                dst.copy_(src)
        init_swin_(self.norm, g)
        init_swin_(self._heads(), g)

    def _heads(self) -> nn.Module:
        return nn.ModuleList()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: DPGConfig | None = None, strict: bool = True,
                        param_key: str | None = None, weights_only: bool = True, output_loading_info: bool = False
                        ) -> DPGFeatureExtractor | tuple[DPGFeatureExtractor, LoadReport]:
        """The network of a stage-1 file (`path`, or `path`/dpg.pth): architecture from dpg.json beside
        it, else `config` (an official file has none); every key accounted for as in `load_dpg_weights`.
        Returns the model, or (model, LoadReport) with output_loading_info."""
        from haodiff_model.io.official import load_dpg  # io builds on the nets: imported on use

        model, report = load_dpg(cls, path, config, strict, param_key, weights_only)
        return (model, report) if output_loading_info else model

    def save_pretrained(self, path: str | Path, official_layout: bool = True) -> Path:
        """Write the official stage-1 file to `path` (a .pth file) or `path`/dpg.pth, with dpg.json
        (this architecture) beside it; returns the weights file."""
        from haodiff_model.io.official import save_dpg

        return save_dpg(self, path, official_layout, with_config=True)

    def set_attention(self, mode: str) -> None:
        """Switch every window attention between "sdpa" and "explicit" (same weights)."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.mode = mode

    def set_drop_path_generator(self, generator: torch.Generator | None) -> None:
        """The generator (on the activations' device) that all stochastic-depth draws come from."""
        for m in self.modules():
            if isinstance(m, DropPath):
                m.generator = generator

    def geometry(self, height: int, width: int, device: torch.device) -> WindowGeometry:
        """Index tables and shift mask of an HxW token grid, computed once per (H, W, device)."""
        key = (height, width, torch.device(device))
        geom = self._geometries.get(key)
        if geom is None:
            geom = WindowGeometry.build(height, width, self.cfg.window, self.cfg.shift, key[2])
            self._geometries[key] = geom
        return geom

    def rgb_mean(self, like: torch.Tensor) -> torch.Tensor:
        """(1, C, 1, 1) input mean (official: RGB_MEAN for 3 channels, else 0), cached per device/dtype."""
        key = (like.device, like.dtype)
        mean = self._means.get(key)
        if mean is None:
            values = RGB_MEAN if self.cfg.in_chans == 3 else (0.0,) * self.cfg.in_chans
            mean = torch.tensor(values, dtype=like.dtype).view(1, -1, 1, 1).to(like.device)
            self._means[key] = mean
        return mean

    def _check_training(self) -> None:
        c = self.cfg
        if self.training and torch.is_grad_enabled() and (c.drop_rate or c.attn_drop_rate or c.use_checkpoint):
            raise RuntimeError("training with drop_rate/attn_drop_rate > 0 or use_checkpoint is not supported "
                               "(the paper config uses 0/0/False); they only load for inference")

    def forward_trunk(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, WindowGeometry]:
        """Image -> (per-branch tokens before the shared norm, x_mid), all in window order."""
        self._check_training()
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"DPG input must be (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
        x = x - self.rgb_mean(x)
        if self.cfg.img_range != 1.0:
            x = x * self.cfg.img_range
        f = self.conv_first(x)
        geom = self.geometry(f.shape[2], f.shape[3], f.device)
        shallow = self.patch_embed(f).index_select(1, geom.to_window)
        t = shallow
        if self.cfg.ape:
            if f.shape[2] * f.shape[3] != self.absolute_pos_embed.shape[1]:
                raise ValueError(f"ape needs a {self.cfg.grid}x{self.cfg.grid} token grid, got {tuple(f.shape[2:])}")
            t = t + self.absolute_pos_embed.index_select(1, geom.to_window)
        for layer in self.layers:
            t = layer(t, geom)
        x_mid = t + shallow  # official: patch_embed applied a second time as a long skip
        outs = []
        for branch in self.branches:
            b = x_mid
            for layer in branch:
                b = layer(b, geom)
            outs.append(b)
        return outs, x_mid, geom

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in the DPG input range -> one (B, H/d * W/d, C) raster token tensor per branch."""
        outs, _, geom = self.forward_trunk(x)
        return [self.norm(b).index_select(1, geom.to_raster) for b in outs]


class DPGNetwork(DPGFeatureExtractor):
    """Stage-1 network (official multi-branch `SwinIR`): returns [HQ, residual, mask logits].

    Branch b's head outputs in_chans channels (mean added back, also for the residual branch, as
    the official code does) except branch 2, which outputs raw 1-channel mask logits. The input
    is reflect-padded to a multiple of window*downscale and every output cropped back to H x W
    (the official code pads to a multiple of the window only, which cannot run on other sizes).
    """

    def __init__(self, cfg: DPGConfig, generator: torch.Generator | None = None):
        if cfg.skip_branch:
            raise ValueError("the stage-1 network always has all branches; skip_branch applies to the extractor")
        super().__init__(cfg, generator)

    def _build(self) -> None:
        super()._build()
        c = self.cfg
        self.upsamplers = nn.ModuleList([
            NearestConvUpsampler(c.embed_dim, c.upscale, 1 if b == 2 else c.in_chans, c.resi_connection)
            for b in range(c.branch_num)
        ])

    def _heads(self) -> nn.Module:
        return self.upsamplers

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[2:]
        m = self.cfg.window * self.cfg.downscale
        x = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="reflect")
        outs, x_mid, geom = self.forward_trunk(x)
        results = []
        for tokens, head in zip(outs, self.upsamplers):
            tokens = (self.norm(tokens) + x_mid).index_select(1, geom.to_raster)
            y = head(tokens_to_image(tokens, geom.height, geom.width))[:, :, :h, :w]
            if y.shape[1] == 3:  # official test: 3-channel heads get the mean back, the residual one too
                if self.cfg.img_range != 1.0:
                    y = y / self.cfg.img_range
                y = y + self.rgb_mean(y)
            results.append(y.contiguous())
        return results


__all__ = [
    "ConvDownsampler", "DPGConfig", "DPGFeatureExtractor", "DPGNetwork", "NearestConvUpsampler",
    "PatchEmbed", "RGB_MEAN",
]
