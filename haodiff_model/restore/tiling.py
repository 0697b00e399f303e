"""Tiling for large images: latent tiles for the UNet, tiled VAE encoder/decoder.

Latent tiling (official `run_inference.py`, model_spec A.7): used when the latent's area exceeds
tile x tile (64 x 64, a 512 x 512 image). Square tiles of side T = min(tile, h, w) step by
T - overlap (5); the last tile of a row or column is snapped to the border. Each tile's CFG noise
prediction is weighted by a 2-D Gaussian (variance 0.01 in tile-normalised coordinates, x centre
(T-1)/2, y centre T/2: the official asymmetry is kept) and the weighted sum is divided by the sum
of weights, in float64 weights over float32 accumulators as the official code does.

Tiled VAE (the official code's "tiled VAE" hook, model_spec A.7): the image (encoder, tiles of
1024 px) or the latent (decoder, tiles of 224 latents) is cut into a grid of cores, each read with a
margin (32 px / 11 latents) of its neighbours, and the network runs layer by layer over all tiles.
Convolutions run per tile; every GroupNorm normalises with statistics gathered over all tiles, so
no tile is normalised differently from its neighbour (the seams of naive tiling come from there).
Differences from the official hook, on purpose: statistics are the exact per-image group mean and
variance over the tile cores (each position counted once, tiles combined with Chan's formula),
where the official hook averages per-tile variances over whole padded tiles; the mid-block
attention lets every tile attend to the whole latent (the official hook attends within a tile);
cores are an equal split aligned to 8 px. So with a margin as wide as the network's receptive
field the tiled result equals the untiled one, and with the default margins it differs only by
the convolutions' context cut at the margin. Tiling starts when the longer side exceeds
tile + 2 x margin (1088 px / 246 latents), as in the official code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LATENT_TILE, LATENT_OVERLAP = 64, 5
ENCODER_TILE, ENCODER_PAD = 1024, 32  # pixels
DECODER_TILE, DECODER_PAD = 224, 11  # latents
VAE_FACTOR = 8
# GroupNorm runs in fp32 on this many channels of a tile at a time: a whole 4096 px tile in fp32 would
# be the largest temporary of the tiled VAE (about 2 GiB in the decoder's last blocks).
NORM_CHUNK_CHANNELS = 32


# ----------------------------------------------------------------------------- latent tiles (UNet)


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the tiles covering 0..n: i * (tile - overlap), the last one snapped to n - tile."""
    step = tile - overlap
    if step < 1:
        raise ValueError(f"latent tile {tile} must be larger than the overlap {overlap}")
    count = 1
    while (count - 1) * step + tile < n:
        count += 1
    starts = [i * step for i in range(count)]
    starts[-1] = n - tile
    return starts


def gaussian_tile_weights(tile: int) -> torch.Tensor:
    """(tile, tile) float64 blend weights: outer product of 1-D Gaussians, variance 0.01 in units of
    the tile side, centred at (tile - 1) / 2 along x and tile / 2 along y (official asymmetry)."""
    var = 0.01
    coords = torch.arange(tile, dtype=torch.float64)

    def profile(mid: float) -> torch.Tensor:
        return torch.exp(-((coords - mid) ** 2) / (tile * tile) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(profile(tile / 2), profile((tile - 1) / 2))


@dataclass(frozen=True)
class LatentTiling:
    """Where the UNet tiles of an h x w latent lie; `None` from `plan` means no tiling."""

    size: int
    origins: tuple[tuple[int, int], ...]  # (y, x) of each tile, row-major

    @classmethod
    def plan(cls, h: int, w: int, tile: int = LATENT_TILE, overlap: int = LATENT_OVERLAP) -> LatentTiling | None:
        if h * w <= tile * tile:
            return None
        size = min(tile, h, w)
        ov = min(overlap, size - 1)  # a latent a few pixels thin; the official loop would never end
        return cls(size, tuple((y, x) for y in tile_starts(h, size, ov) for x in tile_starts(w, size, ov)))

    def split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B * tiles, C, T, T), image-major."""
        t = self.size
        parts = [z[:, :, y:y + t, x:x + t] for y, x in self.origins]
        return torch.stack(parts, dim=1).flatten(0, 1)

    def blend(self, tiles: torch.Tensor, batch: int, h: int, w: int) -> torch.Tensor:
        """Gaussian-weighted average of (B * tiles, C, T, T) predictions into (B, C, h, w) float32."""
        t = self.size
        weights = gaussian_tile_weights(t).to(tiles.device)
        tiles = tiles.view(batch, len(self.origins), *tiles.shape[1:])
        out = torch.zeros(batch, tiles.shape[2], h, w, dtype=torch.float32, device=tiles.device)
        total = torch.zeros(1, 1, h, w, dtype=torch.float32, device=tiles.device)
        for i, (y, x) in enumerate(self.origins):
            out[:, :, y:y + t, x:x + t] += tiles[:, i].double() * weights
            total[:, :, y:y + t, x:x + t] += weights
        return out / total


# ----------------------------------------------------------------------------- tiled VAE


@dataclass(frozen=True)
class Tile:
    """One tile: the region read from the input (with margin) and its core, in input units."""

    y0: int
    y1: int
    x0: int
    x1: int
    core_y0: int
    core_y1: int
    core_x0: int
    core_x1: int


def split_cores(n: int, tile: int, pad: int, align: int) -> list[tuple[int, int]]:
    """Equal cores covering 0..n, their count as the official hook picks it, sides aligned to `align`."""
    count = max(1, math.ceil((n - 2 * pad) / tile))
    side = math.ceil(n / count / align) * align
    return [(s, min(s + side, n)) for s in range(0, n, side)]


def plan_tiles(h: int, w: int, tile: int, pad: int, align: int) -> list[Tile]:
    tiles = []
    for cy0, cy1 in split_cores(h, tile, pad, align):
        for cx0, cx1 in split_cores(w, tile, pad, align):
            tiles.append(Tile(max(0, cy0 - pad), min(h, cy1 + pad), max(0, cx0 - pad), min(w, cx1 + pad),
                              cy0, cy1, cx0, cx1))
    return tiles


def needs_tiling(h: int, w: int, tile: int, pad: int) -> bool:
    return max(h, w) > tile + 2 * pad


class _TileSet:
    """The activations of every tile at one layer, and where each tile's core lies inside it.

    Memory is what limits the image size (a 4096 px decoder layer holds 4-8 GiB in bf16), so the
    transforms run a chain of layers tile by tile (one tile's intermediates live at a time, not a
    whole layer's) and, with `consume`, release each input tile as its output is made."""

    def __init__(self, tensors: list[torch.Tensor], cores: list[tuple[int, int, int, int]]):
        self.tensors, self.cores = tensors, cores

    def map(self, *fns: Callable[[torch.Tensor], torch.Tensor], consume: bool = False) -> _TileSet:
        """`fns` applied in turn to each tile. With `consume` this set is emptied as it goes: the
        caller must not use it again."""
        out = []
        for i, t in enumerate(self.tensors):
            if consume:
                self.tensors[i] = None
            for fn in fns:
                t = fn(t)
            out.append(t)
        return _TileSet(out, self.cores)

    def rescale(self, factor: float) -> _TileSet:
        """Cores after a resolution change by `factor` (0.5 for a downsampler, 2 for an upsampler)."""
        return _TileSet(self.tensors, [tuple(int(v * factor) for v in c) for c in self.cores])

    def group_norm(self, norm: nn.GroupNorm, *then: Callable[[torch.Tensor], torch.Tensor],
                   consume: bool = False) -> _TileSet:
        """GroupNorm with per-image statistics over all tile cores, then `then`, tile by tile."""
        groups = norm.num_groups
        per_group = norm.num_channels // groups
        chunk = per_group * max(1, NORM_CHUNK_CHANNELS // per_group)  # whole groups
        count = None
        mean = m2 = None
        for t, (y0, y1, x0, x1) in zip(self.tensors, self.cores):
            core, n = t[:, :, y0:y1, x0:x1], per_group * (y1 - y0) * (x1 - x0)
            moments = [torch.var_mean(core[:, c:c + chunk].float().reshape(t.shape[0], -1, n), dim=-1, correction=0)
                       for c in range(0, t.shape[1], chunk)]
            var_t, mean_t = (torch.cat(m, dim=1).double() for m in zip(*moments))
            m2_t = var_t * n
            if count is None:
                count, mean, m2 = n, mean_t, m2_t
                continue
            delta = mean_t - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + m2_t + delta**2 * (count * n / total)
            count = total
        var = m2 / count
        rstd = torch.rsqrt(var + norm.eps).float()
        rstd_c = rstd.repeat_interleave(per_group, dim=1)  # (B, C)
        mean_c = mean.float().repeat_interleave(per_group, dim=1)
        scale = rstd_c * (norm.weight.float() if norm.affine else 1.0)
        shift = (norm.bias.float() if norm.affine else 0.0) - mean_c * scale
        scale, shift = scale[:, :, None, None], shift[:, :, None, None]

        def normalize(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(t)
            for c in range(0, t.shape[1], chunk):
                part = slice(c, c + chunk)
                out[:, part] = t[:, part].to(torch.float32, copy=True).mul_(scale[:, part]).add_(shift[:, part])
            return out

        return self.map(normalize, *then, consume=consume)

    def stitch(self, tiles: list[Tile], factor: float, shape: tuple[int, int]) -> torch.Tensor:
        """The cores placed into one (B, C, H, W) tensor; `factor` maps tile-plan units to output units."""
        first = self.tensors[0]
        out = first.new_empty(first.shape[0], first.shape[1], *shape)
        for t, tile, (y0, y1, x0, x1) in zip(self.tensors, tiles, self.cores):
            oy, ox = int(tile.core_y0 * factor), int(tile.core_x0 * factor)
            out[:, :, oy:oy + (y1 - y0), ox:ox + (x1 - x0)] = t[:, :, y0:y1, x0:x1]
        return out


def _in_place(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation, in place where it is a SiLU (the VAE's): after a GroupNorm it runs on the
    tile's fresh normalised copy, so it need not allocate another tile."""
    return (lambda t: F.silu(t, inplace=True)) if isinstance(act, nn.SiLU) else act


def _resnet(block: nn.Module, x: _TileSet) -> _TileSet:
    """diffusers ResnetBlock2D without time embedding (the VAE's), GroupNorms shared across tiles.
    Consumes x; at most x and one other activation of the block live in full."""
    if getattr(block, "upsample", None) is not None or getattr(block, "downsample", None) is not None:
        raise ValueError("tiled VAE: ResNet blocks with built-in resampling are not supported")
    act = _in_place(block.nonlinearity)
    h = x.group_norm(block.norm1, act, block.conv1)
    h = h.group_norm(block.norm2, act, block.dropout, block.conv2, consume=True)
    for i, t in enumerate(h.tensors):
        s, x.tensors[i] = x.tensors[i], None
        s = block.conv_shortcut(s) if block.conv_shortcut is not None else s
        h.tensors[i] = t.add_(s).div_(block.output_scale_factor)
    return h


def _attention(attn: nn.Module, x: _TileSet) -> _TileSet:
    """diffusers Attention of the VAE mid block, shared GroupNorm. Every tile's queries attend to the
    keys and values of all tile cores, i.e. of the whole image once each: the attention is the
    untiled one, not a per-tile approximation (at the VAE's 1/8 resolution this costs what the
    untiled model costs, and keys/values are small)."""
    if attn.group_norm is None or attn.spatial_norm is not None or attn.norm_q is not None:
        raise ValueError("tiled VAE: only the plain group-normed VAE self-attention is supported")
    heads = attn.heads
    normed = x.group_norm(attn.group_norm)

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2).transpose(1, 2)

    def split_heads(y: torch.Tensor) -> torch.Tensor:
        return y.view(y.shape[0], -1, heads, y.shape[-1] // heads).transpose(1, 2)

    cores = [tokens(t[:, :, y0:y1, x0:x1]) for t, (y0, y1, x0, x1) in zip(normed.tensors, normed.cores)]
    keys = split_heads(attn.to_k(torch.cat(cores, dim=1)))
    values = split_heads(attn.to_v(torch.cat(cores, dim=1)))
    out = []
    for t, n in zip(x.tensors, normed.tensors):
        b, c, hh, ww = n.shape
        q = split_heads(attn.to_q(tokens(n)))
        y = F.scaled_dot_product_attention(q, keys, values).transpose(1, 2).reshape(b, hh * ww, -1)
        y = attn.to_out[1](attn.to_out[0](y)).transpose(1, 2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            y = y + t
        out.append(y / attn.rescale_output_factor)
    return _TileSet(out, x.cores)


def _mid_block(mid: nn.Module, x: _TileSet) -> _TileSet:
    x = _resnet(mid.resnets[0], x)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            x = _attention(attn, x)
        x = _resnet(resnet, x)
    return x


def _cut(x: torch.Tensor, tiles: list[Tile]) -> _TileSet:
    return _TileSet([x[:, :, t.y0:t.y1, t.x0:t.x1] for t in tiles],
                    [(t.core_y0 - t.y0, t.core_y1 - t.y0, t.core_x0 - t.x0, t.core_x1 - t.x0) for t in tiles])


@torch.no_grad()
def tiled_encode(vae: nn.Module, image: torch.Tensor, tile: int = ENCODER_TILE, pad: int = ENCODER_PAD) -> torch.Tensor:
    """Posterior moments (B, 2 * latent_channels, H/8, W/8) of images (H, W multiples of 8), tiled."""
    h, w = image.shape[-2:]
    if h % VAE_FACTOR or w % VAE_FACTOR or pad % VAE_FACTOR:
        raise ValueError(f"tiled VAE encoder needs sides and margin that are multiples of 8, got {h}x{w}, pad {pad}")
    enc = vae.encoder
    tiles = plan_tiles(h, w, tile, pad, VAE_FACTOR)
    x = _cut(image, tiles).map(enc.conv_in)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            x = _resnet(resnet, x)
        for down in block.downsamplers or []:
            x = x.map(down, consume=True).rescale(0.5)
    x = _mid_block(enc.mid_block, x)
    x = x.group_norm(enc.conv_norm_out, _in_place(enc.conv_act), enc.conv_out, consume=True)
    moments = x.stitch(tiles, 1 / VAE_FACTOR, (h // VAE_FACTOR, w // VAE_FACTOR))
    return vae.quant_conv(moments) if getattr(vae, "quant_conv", None) is not None else moments


@torch.no_grad()
def tiled_decode(vae: nn.Module, latent: torch.Tensor, tile: int = DECODER_TILE, pad: int = DECODER_PAD) -> torch.Tensor:
    """Image (B, 3, 8h, 8w) from an unscaled latent (B, C, h, w), tiled."""
    if getattr(vae, "post_quant_conv", None) is not None:
        latent = vae.post_quant_conv(latent)
    h, w = latent.shape[-2:]
    dec = vae.decoder
    tiles = plan_tiles(h, w, tile, pad, 1)
    x = _cut(latent, tiles).map(dec.conv_in)
    x = _mid_block(dec.mid_block, x)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            x = _resnet(resnet, x)
        for up in block.upsamplers or []:
            x = x.map(up, consume=True).rescale(2)
    x = x.group_norm(dec.conv_norm_out, _in_place(dec.conv_act), dec.conv_out, consume=True)
    return x.stitch(tiles, VAE_FACTOR, (h * VAE_FACTOR, w * VAE_FACTOR))


def encode_moments(vae: nn.Module, image: torch.Tensor, tile: int = ENCODER_TILE, pad: int = ENCODER_PAD,
                   force_tiles: bool = False) -> torch.Tensor:
    """Posterior moments of images in [-1, 1]; tiled above tile + 2 x pad (or always with force_tiles)."""
    h, w = image.shape[-2:]
    if force_tiles or needs_tiling(h, w, tile, pad):
        return tiled_encode(vae, image, tile, pad)
    moments = vae.encoder(image)
    return vae.quant_conv(moments) if getattr(vae, "quant_conv", None) is not None else moments


def decode_latent(vae: nn.Module, latent: torch.Tensor, tile: int = DECODER_TILE, pad: int = DECODER_PAD,
                  force_tiles: bool = False) -> torch.Tensor:
    """Image from an unscaled latent; tiled above tile + 2 x pad latents (or always with force_tiles)."""
    h, w = latent.shape[-2:]
    if force_tiles or needs_tiling(h, w, tile, pad):
        return tiled_decode(vae, latent, tile, pad)
    if getattr(vae, "post_quant_conv", None) is not None:
        latent = vae.post_quant_conv(latent)
    return vae.decoder(latent)


__all__ = ["DECODER_PAD", "DECODER_TILE", "ENCODER_PAD", "ENCODER_TILE", "LATENT_OVERLAP", "LATENT_TILE",
           "LatentTiling", "Tile", "decode_latent", "encode_moments", "gaussian_tile_weights", "needs_tiling",
           "plan_tiles", "split_cores", "tile_starts", "tiled_decode", "tiled_encode"]
