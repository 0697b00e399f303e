"""Do the tiled VAE encoder and decoder leave seams? ``python -m haodiff_model.bench.seams [--size 2048]``

A photo (the bundled astronaut, resized to --size) goes through the SD2.1-base VAE twice: whole,
and tiled as `haodiff-restore` tiles large images (encoder tiles 1024 px, decoder tiles 224
latents, the default margins). The difference between the two is what tiling costs. A seam is
that difference concentrated on the tile boundaries, so the report compares the mean error in a
band around the boundaries with the mean error elsewhere, for the encoder's latent and the
decoded image, and writes a picture: the tiled decode beside its error map, boundaries drawn.

The weights are random (SD2.1-base cannot be downloaded here): seams come from how tiles are cut
and normalised, which the architecture alone decides; the error magnitudes of trained weights may
differ. Peak memory is that of the untiled reference, not of restoring.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from haodiff_model.restore.tiling import (
    DECODER_PAD, DECODER_TILE, ENCODER_PAD, ENCODER_TILE, VAE_FACTOR, plan_tiles, tiled_decode, tiled_encode,
)

BAND = 2  # boundary band half-width, in the map's own units (latents or pixels)


def boundary_band(h: int, w: int, tile: int, pad: int, align: int, band: int = BAND) -> np.ndarray:
    """True within `band` of an inner edge between two tile cores of a (h, w) map."""
    mask = np.zeros((h, w), bool)
    for t in plan_tiles(h, w, tile, pad, align):
        for y in (t.core_y0, t.core_y1):
            if 0 < y < h:
                mask[max(0, y - band):y + band, t.core_x0:t.core_x1] = True
        for x in (t.core_x0, t.core_x1):
            if 0 < x < w:
                mask[t.core_y0:t.core_y1, max(0, x - band):x + band] = True
    return mask


def error_stats(tiled: torch.Tensor, whole: torch.Tensor, band: np.ndarray) -> dict[str, float]:
    """Mean |tiled - whole| (over channels) on the boundary band and off it, the largest error, and
    the reference's standard deviation for scale."""
    err = (tiled.float() - whole.float()).abs().mean(dim=1)[0].cpu().numpy()
    return {"mean_abs_error_at_boundaries": float(err[band].mean()) if band.any() else float("nan"),
            "mean_abs_error_elsewhere": float(err[~band].mean()),
            "max_abs_error": float(err.max()), "reference_std": float(whole.float().std())}


def _photo(size: int) -> torch.Tensor:
    from haodiff_data.intake.sources import ASSETS_DIR

    rgb = cv2.cvtColor(cv2.imread(str(ASSETS_DIR / "astronaut.png")), cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1


def _picture(image: torch.Tensor, err: np.ndarray, edges: list[tuple[int, int, int, int]], path: Path,
             side: int = 1024) -> None:
    """Tiled decode | error map (square root of |error| over its maximum, so small errors show),
    the inner tile edges drawn as thin green lines beside, not over, the error."""
    rgb = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    heat = cv2.applyColorMap(np.clip(255 * np.sqrt(err / max(float(err.max()), 1e-12)), 0, 255).astype(np.uint8),
                             cv2.COLORMAP_INFERNO)
    sheet = np.hstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), heat])
    scale = side / sheet.shape[1]
    sheet = cv2.resize(sheet, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    offset = side // 2
    for y0, x0, y1, x1 in edges:
        cv2.line(sheet, (offset + round(x0 * scale), round(y0 * scale)), (offset + round(x1 * scale), round(y1 * scale)),
                 (0, 160, 0), 1)
    cv2.imwrite(str(path), sheet)


def inner_edges(h: int, w: int, tile: int, pad: int, align: int) -> list[tuple[int, int, int, int]]:
    """Segments (y0, x0, y1, x1) where two tile cores meet."""
    edges = []
    for t in plan_tiles(h, w, tile, pad, align):
        if t.core_y0 > 0:
            edges.append((t.core_y0, t.core_x0, t.core_y0, t.core_x1))
        if t.core_x0 > 0:
            edges.append((t.core_y0, t.core_x0, t.core_y1, t.core_x0))
    return edges


@torch.no_grad()
def seam_check(vae: torch.nn.Module, size: int, out: Path | None = None,
               encoder: tuple[int, int] = (ENCODER_TILE, ENCODER_PAD),
               decoder: tuple[int, int] = (DECODER_TILE, DECODER_PAD)) -> dict[str, Any]:
    """Tiled vs whole encoder moments and decoded image for a `size` x `size` photo."""
    image = _photo(size)
    start = time.perf_counter()
    whole_moments = vae.encoder(image)
    if getattr(vae, "quant_conv", None) is not None:
        whole_moments = vae.quant_conv(whole_moments)
    tiled_moments = tiled_encode(vae, image, *encoder)
    h = size // VAE_FACTOR
    enc_band = boundary_band(size, size, encoder[0], encoder[1], VAE_FACTOR, BAND * VAE_FACTOR)[::VAE_FACTOR, ::VAE_FACTOR]
    report: dict[str, Any] = {"size": size, "encoder_tiles": len(plan_tiles(size, size, *encoder, VAE_FACTOR)),
                              "encoder": error_stats(tiled_moments, whole_moments, enc_band)}
    latent = whole_moments[:, : whole_moments.shape[1] // 2]
    post = vae.post_quant_conv(latent) if getattr(vae, "post_quant_conv", None) is not None else latent
    whole_image = vae.decoder(post)
    tiled_image = tiled_decode(vae, latent, *decoder)
    dec_band = np.kron(boundary_band(h, h, decoder[0], decoder[1], 1),
                       np.ones((VAE_FACTOR, VAE_FACTOR), bool)).astype(bool)
    report["decoder_tiles"] = len(plan_tiles(h, h, *decoder, 1))
    report["decoder"] = error_stats(tiled_image, whole_image, dec_band)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if out is not None:
        err = (tiled_image - whole_image).abs().mean(dim=1)[0].numpy()
        edges = [tuple(VAE_FACTOR * v for v in e) for e in inner_edges(h, h, decoder[0], decoder[1], 1)]
        _picture(tiled_image, err, edges, out)
        report["picture"] = str(out)
    return report


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL

    from haodiff_model.nets.restorer import SD21_BASE_VAE_CONFIG

    parser = argparse.ArgumentParser(prog="python -m haodiff_model.bench.seams", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="image side in px, a multiple of 8 (default 2048)")
    parser.add_argument("--out", type=Path, default=Path("seams.png"), help="picture: tiled decode | error map")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random VAE weights")
    args = parser.parse_args(argv)
    if args.size % VAE_FACTOR or args.size < 64:
        parser.error("--size must be a multiple of 8, at least 64")
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_config(dict(SD21_BASE_VAE_CONFIG)).eval()
    print(json.dumps(seam_check(vae, args.size, args.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
