"""Swin layers for the DPG network: window attention, Swin block, RSTB (SwinIR's residual group).

Module and parameter names follow the official SwinIR code that HAODiff ships, so official state
dicts load by name. The layout of the computation does not: the residual stream is kept in
*window order* (tokens grouped window by window) for the whole RSTB, so an unshifted block needs
no window partition at all and a shifted block needs one gather in and one out (the official code
does roll + partition + reverse + roll). Only the RSTB's 3x3 conv needs raster order. All index
tables and shift masks come from a `WindowGeometry` computed once per token grid and device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from haodiff_model.nets.layers import LayerNorm, init_default_

# Value the official code puts between tokens of different regions in a shifted window; exp(-100)
# underflows to 0 in float32 softmax, so it acts as -inf but matches the official numbers.
SHIFT_MASK_VALUE = -100.0
ATTENTION_MODES = ("sdpa", "explicit")


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2 relative-position bias table, as in Swin/SwinIR."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_order(height: int, width: int, window: int, shift: int = 0) -> torch.Tensor:
    """Raster index of each window-order slot after a cyclic shift by -shift (torch.roll).

    Slot k = ((wy * nWw + wx) * w + iy) * w + ix holds the token at grid position
    ((wy*w + iy + shift) % H, (wx*w + ix + shift) % W), i.e. exactly what the official
    roll-then-window_partition produces.
    """
    ys = (torch.arange(height).view(height // window, 1, window, 1) + shift) % height
    xs = (torch.arange(width).view(1, width // window, 1, window) + shift) % width
    return (ys * width + xs).reshape(-1)


def shift_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w) additive float32 mask of the official SW-MSA: -100 across regions, else 0."""
    def region(n: int) -> torch.Tensor:
        pos = torch.arange(n)
        return (pos >= n - window).long() + (pos >= n - shift).long()

    ids = region(height)[:, None] * 3 + region(width)[None, :]
    ids = ids.view(height // window, window, width // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(diff.shape).masked_fill_(diff, SHIFT_MASK_VALUE)


@dataclass(frozen=True)
class WindowGeometry:
    """Index tables of one token grid: built once per (H, W, device), shared by every block."""

    height: int
    width: int
    window: int
    shift: int
    to_window: torch.Tensor  # x_win = x_raster[:, to_window]
    to_raster: torch.Tensor  # x_raster = x_win[:, to_raster]
    to_shifted: torch.Tensor | None  # x_shifted_win = x_win[:, to_shifted]
    from_shifted: torch.Tensor | None  # x_win = x_shifted_win[:, from_shifted]
    shift_mask: torch.Tensor | None  # (nW, N, N) float32, in shifted-window order
    rel_index: torch.Tensor  # (N*N,) long

    @property
    def key(self) -> tuple:
        return (self.height, self.width, self.to_window.device)

    @classmethod
    def build(cls, height: int, width: int, window: int, shift: int, device: torch.device) -> "WindowGeometry":
        if height % window or width % window:
            raise ValueError(f"token grid {height}x{width} is not a multiple of the window size {window}")
        plain = window_order(height, width, window)
        inverse = torch.argsort(plain)
        to_shifted = from_shifted = mask = None
        if shift:
            shifted = window_order(height, width, window, shift)
            to_shifted = inverse[shifted]
            from_shifted = torch.argsort(shifted)[plain]
            mask = shift_window_mask(height, width, window, shift).to(device)
            to_shifted, from_shifted = to_shifted.to(device), from_shifted.to(device)
        return cls(height, width, window, shift, plain.to(device), inverse.to(device), to_shifted, from_shifted,
                   mask, relative_position_index(window).reshape(-1).to(device))


class DropPath(nn.Module):
    """Stochastic depth per sample. Its randomness comes only from `generator` (set by the owner)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            raise RuntimeError("DropPath in training needs a torch.Generator: call set_drop_path_generator() "
                               "on the network (or build it with drop_path_rate=0)")
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), generator=self.generator,
                          device=x.device, dtype=torch.float32) < keep
        return x * (mask.to(x.dtype) / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop (timm's `Mlp` signature; official SwinIR names)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative-position bias (official names).

    mode "sdpa": one fused scaled_dot_product_attention call with bias (+ shift mask) as its
    additive mask. Head dims that are not a multiple of 8 (150/6 = 25, 150/3 = 50) keep the fused
    CUDA kernels out, so q, k, v are zero-padded to the next multiple of 8 by zero rows in the qkv
    weight (and zero columns in proj): the GEMMs emit the padded layout, nothing is copied, and
    the padding contributes exact zeros. mode "explicit": softmax(q k^T * scale + bias) v with the
    attention matrix materialised, as the official code does (the reference and the baseline).
    """

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attention: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.head_dim = dim // num_heads
        self.padded_head_dim = -(-self.head_dim // 8) * 8
        self.scale = qk_scale or self.head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.mode = attention
        self.register_load_state_dict_pre_hook(_drop_relative_position_index)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {value!r}")
        self._mode = value

    # The bias and the padded weights are rebuilt on every call, not cached: caching both (and the
    # performer's fused weights) saved 0.6% of the frozen 512 px prompt path on the CPU (8.36 vs
    # 8.41 s bf16, 9.74 vs 9.80 s fp32; issue #10), not worth the invalidation logic.
    def attention_bias(self, geom: WindowGeometry, shifted: bool, dtype: torch.dtype) -> torch.Tensor:
        """(1 or nW, heads, N, N) relative-position bias plus shift mask, in `dtype`."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[geom.rel_index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if shifted:
            bias = bias + geom.shift_mask.unsqueeze(1)
        return bias.to(dtype).contiguous()

    def _padded_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """qkv weight/bias with zero rows and proj weight with zero columns padding each head to 8k."""
        w, b, pw = self.qkv.weight, self.qkv.bias, self.proj.weight
        h, d, pad = self.num_heads, self.head_dim, self.padded_head_dim - self.head_dim
        w = F.pad(w.view(3, h, d, self.dim), (0, 0, 0, pad)).reshape(-1, self.dim)
        if b is not None:
            b = F.pad(b.view(3, h, d), (0, pad)).reshape(-1)
        pw = F.pad(pw.view(self.dim, h, d), (0, pad)).reshape(self.dim, -1)
        return w, b, pw

    def forward(self, x: torch.Tensor, geom: WindowGeometry, shifted: bool, batch: int) -> torch.Tensor:
        """x: (B*nW, N, C) windows of `batch` images, in (shifted-)window order."""
        if self._mode == "explicit":
            return self._forward_explicit(x, geom, shifted, batch)
        bw, n, c = x.shape
        h, dp = self.num_heads, self.padded_head_dim
        if dp != self.head_dim:
            w, b, pw = self._padded_weights()
        else:
            w, b, pw = self.qkv.weight, self.qkv.bias, self.proj.weight
        q, k, v = F.linear(x, w, b).view(bw, n, 3, h, dp).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.attention_bias(geom, shifted, q.dtype)
        if bias.shape[0] != 1 and batch != 1:
            # per-window masks cannot broadcast over the merged (batch, window) axis
            bias = bias.unsqueeze(0).expand(batch, *bias.shape).reshape(-1, *bias.shape[1:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return F.linear(out.transpose(1, 2).reshape(bw, n, h * dp), pw, self.proj.bias)

    def _forward_explicit(self, x: torch.Tensor, geom: WindowGeometry, shifted: bool, batch: int) -> torch.Tensor:
        bw, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        # the bias stays in the table's dtype, as in the official code (fp32 add under autocast)
        bias = self.attention_bias(geom, shifted, self.relative_position_bias_table.dtype)
        attn = (attn.view(batch, -1, h, n, n) + bias).view(bw, h, n, n)
        out = attn.softmax(dim=-1).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={self.window}, num_heads={self.num_heads}, mode={self._mode}"


def _drop_relative_position_index(module: "WindowAttention", state_dict: dict, prefix: str, *args) -> None:
    """Official files store the derived `relative_position_index`; check it matches the window, drop it."""
    stored = state_dict.pop(prefix + "relative_position_index", None)
    if stored is not None and not torch.equal(stored.cpu().long(), relative_position_index(module.window)):
        raise RuntimeError(f"state dict: {prefix}relative_position_index does not belong to a window of "
                           f"{module.window}; the checkpoint was built for another window_size")


def _drop_attn_mask(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Official files store each shifted block's `attn_mask` for their img_size; it is recomputed per grid."""
    state_dict.pop(prefix + "attn_mask", None)


class SwinTransformerBlock(nn.Module):
    """Pre-LN (shifted) window attention + MLP, on a residual stream held in window order.

    `window` and `shift` are the values in effect (DPGConfig.window / .shift: the official code
    clamps them when the token grid is no larger than window_size).
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int = 0, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_path: float = 0.0,
                 attention: str = "sdpa"):
        super().__init__()
        self.shift = shift
        self.norm1 = LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias, qk_scale=qk_scale, attention=attention)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        self.register_load_state_dict_pre_hook(_drop_attn_mask)

    def forward(self, x: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
        b, length, c = x.shape
        n = geom.window * geom.window
        h = self.norm1(x)
        if self.shift:
            h = h.index_select(1, geom.to_shifted)
        h = self.attn(h.view(-1, n, c), geom, self.shift > 0, b).view(b, length, c)
        if self.shift:
            h = h.index_select(1, geom.from_shifted)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """`depth` Swin blocks, shift 0 on even and window//2 on odd indices (official `BasicLayer`)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, shift: int = 0, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_path: float | Sequence[float] = 0.0,
                 attention: str = "sdpa"):
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        if len(rates) != depth:
            raise ValueError(f"BasicLayer: {len(rates)} drop-path rates for {depth} blocks")
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window, shift=0 if i % 2 == 0 else shift, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, qk_scale=qk_scale, drop_path=rates[i], attention=attention)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, geom)
        return x


def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    """The conv closing an RSTB (and opening the official upsampler): '1conv' or '3conv'."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


def tokens_to_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Raster tokens (B, H*W, C) -> (B, C, H, W) as a channels_last view (no copy)."""
    return x.view(x.shape[0], height, width, x.shape[2]).permute(0, 3, 1, 2)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> raster tokens (B, H*W, C); free for channels_last input."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


class RSTB(nn.Module):
    """Residual Swin Transformer Block: blocks -> 3x3 conv (raster, channels_last) -> + input."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, shift: int = 0, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_path: float | Sequence[float] = 0.0,
                 resi_connection: str = "1conv", attention: str = "sdpa"):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window, shift=shift, mlp_ratio=mlp_ratio,
                                         qkv_bias=qkv_bias, qk_scale=qk_scale, drop_path=drop_path,
                                         attention=attention)
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
        """x: (B, H*W, C) tokens in window order; returns the same layout."""
        y = self.residual_group(x, geom).index_select(1, geom.to_raster)
        y = self.conv(tokens_to_image(y, geom.height, geom.width))
        return x + image_to_tokens(y).index_select(1, geom.to_window)


def init_swin_(module: nn.Module, generator: torch.Generator) -> None:
    """Official initialisation of every layer under `module`, drawn from `generator` in module order.

    The official SwinIR does not apply its `_init_weights`: Linear/Conv keep PyTorch defaults,
    LayerNorm is (1, 0) and the relative-position tables are trunc_normal(std=0.02).
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            init_default_(m, generator)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02, generator=generator)
