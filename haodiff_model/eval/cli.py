"""`haodiff-eval`: score restored images against references.

    haodiff-eval --restored DIR --reference DIR [--inputs DIR] [--out DIR]
                 [--lpips-backbone alexnet-owt-7be5be79.pth] [--lpips-net alex|vgg]
                 [--vgg16 vgg16-397923af.pth --dists-weights weights.pt] [--crop-border N]

Images are paired by file name without extension (relative path inside the folder); a restored
image without a reference, or a reference without a restored image, is an error that lists them.
Per image and on average: PSNR / SSIM on RGB and on Y (border crop as given, default 0), LPIPS
when --lpips-backbone is given, DISTS when --vgg16 and --dists-weights are given. Writes
OUT/metrics.csv (one row per image, then the mean), OUT/metrics.json (settings, per image, mean),
OUT/sheet.png (input | restored | reference for the worst and best images) and prints a table.

Exit codes: 0 success; 2 bad arguments, missing files or pairs.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from haodiff_model.eval.metrics import LPIPS_NETS, PerceptualMetrics, load_lpips, pixel_metrics
from haodiff_model.log import EXIT_OK, EXIT_USAGE, setup_logging

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "psnr_y": True, "ssim_y": True, "lpips": False, "dists": False}


def index_images(folder: Path, exclude: Path | None = None) -> dict[str, Path]:
    """name (relative path without extension) -> file, for the images under `folder`."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    out: dict[str, Path] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if exclude is not None and exclude in f.parents:
            continue
        key = f.relative_to(folder).with_suffix("").as_posix()
        if key in out:
            raise ValueError(f"{folder}: two images named {key}: {out[key].name} and {f.name}")
        out[key] = f
    return out


def pair_up(restored: dict[str, Path], reference: dict[str, Path]) -> list[str]:
    only_r = sorted(set(restored) - set(reference))
    only_ref = sorted(set(reference) - set(restored))
    if only_r or only_ref:
        parts = []
        if only_r:
            parts.append(f"{len(only_r)} restored image(s) without a reference: {', '.join(only_r[:10])}")
        if only_ref:
            parts.append(f"{len(only_ref)} reference image(s) without a restored one: {', '.join(only_ref[:10])}")
        raise ValueError("; ".join(parts))
    if not restored:
        raise ValueError("no images to evaluate")
    return sorted(restored)


def read_rgb(path: Path) -> np.ndarray:
    from haodiff_data.intake.decode import RejectedInput, decode_image

    try:
        return decode_image(path.read_bytes(), 1, 1 << 28)
    except RejectedInput as exc:
        raise ValueError(f"{path}: {exc.reason}") from None


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.4f}"


def write_csv(path: Path, names: list[str], rows: list[dict[str, float]], mean: dict[str, float]) -> None:
    keys = list(mean)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *keys])
        for name, row in zip(names, rows):
            w.writerow([name, *(_fmt(row[k]) for k in keys)])
        w.writerow(["mean", *(_fmt(mean[k]) for k in keys)])
    os.replace(tmp, path)


def _tile(image: np.ndarray | None, height: int, label: str):
    from PIL import Image, ImageDraw

    if image is None:
        tile = Image.new("RGB", (height, height), (40, 40, 40))
    else:
        img = Image.fromarray(image)
        tile = img.resize((max(1, round(img.width * height / img.height)), height), Image.BICUBIC)
    canvas = Image.new("RGB", (tile.width, height + 18), (255, 255, 255))
    canvas.paste(tile, (0, 18))
    ImageDraw.Draw(canvas).text((3, 3), label, fill=(0, 0, 0))
    return canvas


def write_sheet(path: Path, picks: list[tuple[str, str]], images: dict[str, tuple], height: int = 256) -> None:
    """One row per picked image: input | restored | reference, labelled with its metric value."""
    from PIL import Image

    rows = []
    for name, label in picks:
        lq, restored, reference = images[name]
        tiles = [_tile(lq, height, "input"), _tile(restored, height, f"{name}: {label}"),
                 _tile(reference, height, "reference")]
        row = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height), (255, 255, 255))
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.width + 8
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 8 * (len(rows) - 1)),
                      (255, 255, 255))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 8
    tmp = path.with_name(f".{path.name}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="haodiff-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--restored", type=Path, required=True, help="folder of restored images")
    p.add_argument("--reference", type=Path, default=None, help="folder of ground-truth images, paired by name")
    p.add_argument("--inputs", type=Path, default=None, help="folder of the LQ inputs (shown in the sheet)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RESTORED-eval beside RESTORED)")
    p.add_argument("--crop-border", type=int, default=0, help="pixels removed from each side for PSNR/SSIM")
    p.add_argument("--lpips-backbone", type=Path, default=None,
                   help="torchvision ImageNet weights of the LPIPS backbone (alexnet-owt-7be5be79.pth or "
                        "vgg16-397923af.pth); LPIPS is skipped without it")
    p.add_argument("--lpips-net", choices=LPIPS_NETS, default="alex", help="LPIPS backbone (default alex)")
    p.add_argument("--vgg16", type=Path, default=None, help="torchvision VGG16 weights for DISTS")
    p.add_argument("--dists-weights", type=Path, default=None, help="DISTS alpha/beta weights.pt")
    p.add_argument("--detector", type=Path, default=None, help="HMB detector weights: also report HMB-R")
    p.add_argument("--hmbr-conf", type=float, default=None,
                   help="confidence threshold of the headline HMB-R (default: haodiff-data hmbr's)")
    p.add_argument("--detector-imgsz", type=int, default=512, help="detector input size (default 512)")
    p.add_argument("--sheet-rows", type=int, default=3, help="worst and best images shown in the sheet (each)")
    p.add_argument("--sort-by", default=None, help="metric ranking the sheet (default: lpips if computed, else psnr)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.reference is None and args.detector is None:
        raise ValueError("nothing to measure: give --reference (full-reference metrics) and/or --detector (HMB-R)")
    if args.detector is not None and args.inputs is None:
        raise ValueError("--detector needs --inputs: HMB-R compares detections on the restored images with "
                         "detections on their inputs")
    if (args.vgg16 is None) != (args.dists_weights is None):
        raise ValueError("DISTS needs both --vgg16 and --dists-weights")
    out = args.out or args.restored.parent / f"{args.restored.name}-eval"
    hmbr = None
    if args.detector is not None:
        from haodiff_data.detect.hmbr import compute_hmbr  # ultralytics (AGPL-3.0) only when asked for

        conf = {} if args.hmbr_conf is None else {"conf": args.hmbr_conf}
        hmbr = compute_hmbr(args.inputs, args.restored, args.detector, imgsz=args.detector_imgsz,
                            device=args.device, progress=not args.no_progress, **conf)
        hmbr.write(out)
        log.info(f"haodiff-eval: {hmbr.summary_line()}; wrote {out / 'hmbr.json'}")
        if args.reference is None:
            return EXIT_OK
    restored = index_images(args.restored, exclude=out)
    reference = index_images(args.reference)
    names = pair_up(restored, reference)
    inputs = index_images(args.inputs) if args.inputs is not None else {}
    lp = load_lpips(args.lpips_net, args.lpips_backbone) if args.lpips_backbone is not None else None
    dists = None
    if args.vgg16 is not None:
        from haodiff_model.losses.dists import DISTS

        dists = DISTS.from_files(args.vgg16, args.dists_weights)
    perceptual = PerceptualMetrics(lp, dists, args.device)

    start = time.perf_counter()
    rows: list[dict[str, float]] = []
    for name in tqdm(names, unit="img", disable=args.no_progress, file=sys.stderr):
        a, b = read_rgb(restored[name]), read_rgb(reference[name])
        try:
            row = pixel_metrics(a, b, args.crop_border)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        row.update(perceptual(a, b))
        rows.append(row)
    keys = list(rows[0])
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", names, rows, mean)
    settings = {"restored": str(args.restored), "reference": str(args.reference), "crop_border": args.crop_border,
                "y_channel": "BT.601 luma, MATLAB rgb2ycbcr (16-235), unrounded",
                "ssim": "11x11 Gaussian sigma 1.5, K1 0.01, K2 0.03, valid positions; RGB: channel mean",
                "lpips": f"{args.lpips_net} ({args.lpips_backbone})" if lp is not None else None,
                "dists": str(args.dists_weights) if dists is not None else None}
    report = {"settings": settings, "count": len(names), "mean": mean,
              "per_image": [{"image": n, **r} for n, r in zip(names, rows)],
              "hmbr": hmbr.to_dict() if hmbr is not None else None}
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, out / "metrics.json")

    sort_key = args.sort_by or ("lpips" if "lpips" in keys else "psnr")
    if sort_key not in keys:
        raise ValueError(f"--sort-by {sort_key}: not computed (computed: {keys})")
    order = sorted(range(len(names)), key=lambda i: rows[i][sort_key], reverse=HIGHER_IS_BETTER[sort_key])
    k = min(args.sheet_rows, (len(order) + 1) // 2)
    picked = order[:k] + [i for i in order[-k:] if i not in order[:k]]
    picks = [(names[i], f"{'best' if n < k else 'worst'} {sort_key} {_fmt(rows[i][sort_key])}")
             for n, i in enumerate(picked)]
    images = {names[i]: (read_rgb(inputs[names[i]]) if names[i] in inputs else None, read_rgb(restored[names[i]]),
                         read_rgb(reference[names[i]])) for i in picked}
    write_sheet(out / "sheet.png", picks, images)

    width = max(len(n) for n in names + ["mean"])
    log.info(f"{'image':{width}s}  " + "  ".join(f"{k:>8s}" for k in keys))
    for name, row in zip(names, rows):
        log.info(f"{name:{width}s}  " + "  ".join(f"{_fmt(row[k]):>8s}" for k in keys))
    log.info(f"{'mean':{width}s}  " + "  ".join(f"{_fmt(mean[k]):>8s}" for k in keys))
    log.info(f"haodiff-eval: {len(names)} pairs in {time.perf_counter() - start:.1f} s, crop border {args.crop_border}; "
             f"wrote {out / 'metrics.csv'}, {out / 'metrics.json'}, {out / 'sheet.png'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from haodiff_data.detect.yolo import DetectorError

    args = build_parser().parse_args(argv)
    setup_logging("haodiff-eval")
    try:
        return run(args)
    except (FileNotFoundError, ValueError, DetectorError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
