"""Stage-1 learnability benchmark: does a small DPG, trained by the real stage-1 trainer, learn what
DPG is for on a photo it never saw? (issue #12)

    python -m haodiff_model.bench.learn [PHOTOS ...] [--recipe haodiff] [--steps 1200] [--paper]
                                        [--set train.lr=1e-3 ...] [--out runs/bench_learn/NAME]

1. Data: an HMB-heavy recipe (the chosen recipe with first_order p_hmb raised, `--p-hmb`) feeds the
   real `haodiff-data synth` on the bundled photos (haodiff-data's three and matplotlib's Grace
   Hopper) + PHOTOS; one photo (`--holdout`) is synthesized apart and never trains. The shards are
   cached by recipe, photos, K and seed.
2. Training: `pipelines/train_dpg.yaml` (its defaults, or `--paper` for the paper's objective and
   optimiser as written) with a small DPG on random crops, for a fixed number of steps (the budget
   is in steps, so a run is reproducible whatever the machine's load), validation on the held-out
   shards, through the stage-1 `train()`: the loop, losses and guards a real run uses.
3. Evaluation on every held-out sample, whole 512x512 images:
   - mask head (p > 0.5) on HMB samples: IoU and Dice against the all-ones, all-zeros and person-mask
     baselines, also split by what moves (one part / the whole body, where the person mask is nearly
     the answer); its positive rate on samples without HMB; the AUROC of p inside the person; the best
     IoU over thresholds (a diagnostic: below the baselines, the ranking is the limit, not the 0.5);
   - PSNR of the HQ head and of LQ - residual head, each against the LQ's own PSNR;
   - the same on every `--train-every`-th training sample (the fit: if it is no nearer its
     baselines there than held out, the head does not fit, rather than not generalise), and by
     photo with each photo's detail (`detail`).
   Output: report.json, heldout.png (HQ | LQ | HQ head | LQ - residual | true mask | p | person),
   and the trainer's loss.png / heads.png / metrics.jsonl in the same folder; a table with the
   issue's targets marked pass / FAIL.
4. `--probe-steps N`: a plain full-resolution CNN trained on the mask alone, the same data, N steps;
   its AUROC inside the person says whether the data lets any model see the HMB (the recipe's
   limit) or only this one fails (the model's or objective's limit).

Every run made so far and what it showed: bench/learn.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml
from scipy.stats import rankdata

from haodiff_data.intake.sources import embedded_sources
from haodiff_data.recipe import PIPELINES_DIR, load_recipe
from haodiff_data.shards.reader import iter_samples
from haodiff_model.log import setup_logging
from haodiff_model.train.distributed import init_distributed
from haodiff_model.train.dpg import TrainDPGConfig, train
from haodiff_model.train.state import image_grid, save_png

ROOT = Path(__file__).resolve().parents[2]  # the checkout or site-packages: what the synth subprocess imports
TRAIN_CONFIG = PIPELINES_DIR / "train_dpg.yaml"  # inside the package, so an installed wheel finds it too
# A small DPG: the paper's structure (trunk 2 RSTBs, 2 per branch) at 24 channels, 0.2 M weights (paper: 9.7 M).
SMALL_MODEL = ("dpg.embed_dim=24", "dpg.depths=[2,2,1,1]", "dpg.num_heads=[3,3,3,3]")
# The paper's stage-1 objective, optimiser (Sec. 4.1) and data (no colour augmentation), as the trainer
# shipped them before issue #12.
PAPER_SETTINGS = ("loss.dice_weight=0.02", "loss.dice_reduction=sample", "loss.dice_smooth=1.0", "loss.bce_weight=0.0",
                  "loss.focal_gamma=0.0", "loss.bce_pos_weight=1.0", "loss.mask_logit_bound=null", "train.lr=2e-3",
                  "train.scheduler=constant", "train.warmup_steps=0", "train.eps=1e-8", "train.grad_clip=1.0",
                  "data.channel_shuffle=false")
TARGET_AUROC = 0.7
TARGET_EMPTY_RATE = 0.05  # "predicts little on samples without HMB": at most 5 % of the pixels
HMB_KINDS = ("part", "whole_body")  # one body part moves | the whole body does
THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 2)  # for the best-threshold IoU diagnostic
LOW_BAND_SIGMA = 3.0  # px at 512: the low band holds colour and tone, which the degradations barely change
GRID_ROWS, GRID_SIDE = 6, 192


def uptime() -> str:
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


# ----------------------------------------------------------------------------- data


def hmb_recipe(name: str, p_hmb: float, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe `name` (with `overrides`) with the first order drawn as HMB with probability p_hmb,
    the rest split 1:2 between none and generic (samples without HMB are needed to see what the mask
    head says there)."""
    recipe = load_recipe(name, overrides)
    rest = 1.0 - p_hmb
    first = dataclasses.replace(recipe.first_order, p_hmb=p_hmb, p_none=rest / 3, p_generic=2 * rest / 3)
    return dataclasses.replace(recipe, first_order=first).to_dict()


def synth(recipe_path: Path, photos: Sequence[str], out: Path, k: int, seed: int) -> None:
    """The real `haodiff-data synth`, in a subprocess (MediaPipe and its threads stay out of training)."""
    cmd = [sys.executable, "-m", "haodiff_data.cli", "synth", "--recipe", str(recipe_path), "--out", str(out),
           "-k", str(k), "--seed", str(seed), "--samples-per-shard", "64", "--workers", "2", "--no-progress",
           *photos]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def bundled_photos() -> list[str]:
    """haodiff-data's embedded photos plus matplotlib's Grace Hopper (public domain; matplotlib is a
    dependency): one more person and background, as two training photos alone cannot teach "blurred
    person" apart from "smooth background"."""
    import matplotlib.cbook

    return [s.path for s in embedded_sources()] + [str(matplotlib.cbook.get_sample_data("grace_hopper.jpg",
                                                                                       asfileobj=False))]


def build_data(args: argparse.Namespace) -> tuple[Path, Path]:
    """(training shards folder, held-out shards folder), synthesized once per recipe/photos/K/seed."""
    photos = [p for p in bundled_photos() if Path(p).stem not in args.exclude] + list(args.photos)
    held = [p for p in photos if Path(p).stem == args.holdout]
    if len(held) != 1:
        raise SystemExit(f"--holdout {args.holdout!r} must name exactly one photo (by stem) of {photos}")
    train_photos = [p for p in photos if p not in held]
    recipe = hmb_recipe(args.recipe, args.p_hmb, args.recipe_set)
    key = json.dumps([recipe, [Path(p).name for p in photos], args.holdout, args.k_train, args.k_heldout,
                      args.data_seed], sort_keys=True)
    folder = Path(args.data_dir) / hashlib.sha256(key.encode()).hexdigest()[:12]
    done = folder / "done.json"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        recipe_path = folder / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        synth(recipe_path, train_photos, folder / "train", args.k_train, args.data_seed)
        # another seed, so the held-out crops and degradations are not the training draws' twins
        synth(recipe_path, held, folder / "heldout", args.k_heldout, args.data_seed + 1)
        done.write_text(json.dumps({"recipe": args.recipe, "p_hmb": args.p_hmb, "train": train_photos,
                                    "heldout": held}, indent=1))
    print(f"data: {folder} (train: {len(train_photos)} photo(s) x {args.k_train}, held out: {held[0]} x "
          f"{args.k_heldout}, recipe {args.recipe} {' '.join(args.recipe_set)} with p_hmb {args.p_hmb})", flush=True)
    return folder / "train", folder / "heldout"


# ----------------------------------------------------------------------------- metrics


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def band_psnr(x: np.ndarray, ref: np.ndarray, sigma: float = LOW_BAND_SIGMA) -> tuple[float, float]:
    """PSNR of the low band (Gaussian blur, `sigma` px) and of the high band (the rest) of x against
    ref: tells an error in colour and tone (low) from one in detail and noise (high)."""
    x, ref = x.astype(np.float64), ref.astype(np.float64)
    x_low, ref_low = (cv2.GaussianBlur(a, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for a in (x, ref))
    return psnr(x_low, ref_low), psnr(x - x_low, ref - ref_low)


def to_u8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> HxWx3 uint8, as the loader's (u8 - 127.5) / 127.5 inverted."""
    return (x.clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def iou_dice(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    inter = np.logical_and(pred, true).sum()
    union = np.logical_or(pred, true).sum()
    total = pred.sum() + true.sum()
    return (float(inter / union) if union else 1.0), (float(2 * inter / total) if total else 1.0)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); nan without both classes."""
    pos = int(labels.sum())
    neg = labels.size - pos
    if not pos or not neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def detail(hq: np.ndarray, where: np.ndarray) -> float:
    """RMS of the HQ's grey high band (above a Gaussian of sigma 1 px) over `where`: how much fine
    detail the source has for HMB to remove. A soft photo (little detail) looks blurred without HMB."""
    grey = cv2.cvtColor(hq, cv2.COLOR_RGB2GRAY).astype(np.float64)
    high = grey - cv2.GaussianBlur(grey, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT)
    return float(np.sqrt(np.mean(high[where] ** 2))) if where.any() else float("nan")


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: Path, every: int = 1) -> tuple[dict[str, Any], np.ndarray]:
    """The figures of the module doc on every `every`-th sample of `shards`, overall and by photo, and
    the picture of the first GRID_ROWS of them."""
    model.eval()
    device = next(model.parameters()).device
    per: dict[str, list[float]] = {k: [] for k in ("psnr_lq", "psnr_hq_head", "psnr_lq_minus_res",
                                                   "psnr_lq_low", "psnr_lq_high", "psnr_hq_head_low",
                                                   "psnr_hq_head_high", "iou", "dice", "iou_ones", "dice_ones",
                                                   "iou_person", "dice_person", "pos_rate_hmb", "pos_rate_empty")}
    kinds: list[str] = []  # per HMB sample, in the order of per["iou"]
    photos_hmb: list[str] = []  # the same, for the source photo's stem
    photos_empty: list[str] = []  # per sample without HMB, in the order of per["pos_rate_empty"]
    details: dict[str, list[float]] = {}
    scores, labels, sweep, rows = [], [], [], []
    n_hmb = n_empty = 0
    for i, s in enumerate(iter_samples(sorted(shards.glob("*.tar")))):
        if i % every:
            continue
        photo = Path(s.meta["source"]["path"]).stem
        lq = torch.from_numpy(s.lq).permute(2, 0, 1).float().div(127.5).sub(1)[None].to(device)
        hq_pred, res_pred, logits = (x.float().cpu() for x in model(lq))
        lq = lq.cpu()
        p = torch.sigmoid(logits[0, 0]).numpy()
        hq_head, lq_minus_res = to_u8(hq_pred[0]), to_u8(lq[0] - res_pred[0])
        per["psnr_lq"].append(psnr(s.lq, s.hq))
        per["psnr_hq_head"].append(psnr(hq_head, s.hq))
        per["psnr_lq_minus_res"].append(psnr(lq_minus_res, s.hq))
        for name, image in (("lq", s.lq), ("hq_head", hq_head)):
            low, high = band_psnr(image, s.hq)
            per[f"psnr_{name}_low"].append(low)
            per[f"psnr_{name}_high"].append(high)
        true, person, pred = s.mask >= 128, s.parts > 0, p > 0.5
        details.setdefault(photo, []).append(detail(s.hq, person))
        if true.any():
            n_hmb += 1
            photos_hmb.append(photo)
            kinds.append("whole_body" if (s.meta.get("hmb") or {}).get("group") == "whole_body" else "part")
            for name, guess in (("", pred), ("_ones", np.ones_like(true)), ("_person", person)):
                iou, dice = iou_dice(guess, true)
                per[f"iou{name}"].append(iou)
                per[f"dice{name}"].append(dice)
            per["pos_rate_hmb"].append(float(pred.mean()))
            sweep.append([iou_dice(p > t, true)[0] for t in THRESHOLDS])
            scores.append(p[person])
            labels.append(true[person])
        else:
            n_empty += 1
            photos_empty.append(photo)
            per["pos_rate_empty"].append(float(pred.mean()))
        if len(rows) < GRID_ROWS:
            grey = [np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2) for m in (true, p, person)]
            rows.append([_small(x) for x in (s.hq, s.lq, hq_head, lq_minus_res, *grey)])
    model.train()
    out: dict[str, Any] = {k: (float(np.mean(v)) if v else float("nan")) for k, v in per.items()}
    out["iou_zeros"] = out["dice_zeros"] = 0.0  # an empty prediction against a non-empty mask
    if sweep:
        mean_iou = np.mean(sweep, axis=0)
        out["iou_best"], out["iou_best_threshold"] = float(mean_iou.max()), float(THRESHOLDS[mean_iou.argmax()])
    out["auroc_in_person"] = auroc(np.concatenate(scores), np.concatenate(labels)) if scores else float("nan")
    out["samples_hmb"], out["samples_empty"] = n_hmb, n_empty
    # The person mask is nearly the answer when the whole body moves and far from it when one limb
    # does: the IoU split by the moving group tells which case a shortfall comes from.
    for kind in HMB_KINDS:
        out[f"samples_hmb_{kind}"] = kinds.count(kind)
        for name in ("iou", "iou_person"):
            values = [v for v, k in zip(per[name], kinds) if k == kind]
            out[f"{name}_{kind}"] = float(np.mean(values)) if values else float("nan")

    def mean_of(name: str, photo: str, of: list[str]) -> float:
        values = [v for v, source in zip(per[name], of) if source == photo]
        return float(np.mean(values)) if values else float("nan")

    out["by_photo"] = {photo: {"samples_hmb": photos_hmb.count(photo), "iou": mean_of("iou", photo, photos_hmb),
                               "iou_person": mean_of("iou_person", photo, photos_hmb),
                               "samples_empty": photos_empty.count(photo),
                               "pos_rate_empty": mean_of("pos_rate_empty", photo, photos_empty),
                               "detail": float(np.mean(details[photo]))}
                       for photo in details}
    return out, image_grid(rows)


def _small(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (GRID_SIDE, GRID_SIDE), interpolation=cv2.INTER_AREA)


def targets(m: dict[str, Any]) -> list[tuple[str, bool]]:
    """The issue's targets on the CPU budget, as (what, met)."""
    return [
        (f"mask IoU {m['iou']:.3f} > all-ones {m['iou_ones']:.3f}", m["iou"] > m["iou_ones"]),
        (f"mask IoU {m['iou']:.3f} > person mask {m['iou_person']:.3f}", m["iou"] > m["iou_person"]),
        (f"positive rate without HMB {100 * m['pos_rate_empty']:.1f}% <= {100 * TARGET_EMPTY_RATE:.0f}%",
         m["pos_rate_empty"] <= TARGET_EMPTY_RATE),
        (f"AUROC inside the person {m['auroc_in_person']:.3f} >= {TARGET_AUROC}", m["auroc_in_person"] >= TARGET_AUROC),
        (f"HQ head {m['psnr_hq_head']:.2f} dB > LQ {m['psnr_lq']:.2f} dB", m["psnr_hq_head"] > m["psnr_lq"]),
        (f"LQ - residual head {m['psnr_lq_minus_res']:.2f} dB > LQ {m['psnr_lq']:.2f} dB",
         m["psnr_lq_minus_res"] > m["psnr_lq"]),
    ]


# ----------------------------------------------------------------------------- is the mask learnable at all?


def mask_probe_net(width: int = 32) -> torch.nn.Sequential:
    """A plain full-resolution CNN for the HMB mask alone (receptive field ~70 px): no shared trunk,
    no 4x downsampler, nothing else to learn. If it cannot find HMB, no stage-1 setting will."""
    def conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation), torch.nn.ReLU()]

    return torch.nn.Sequential(
        *conv(3, width), *conv(width, width), *conv(width, width, stride=2), *conv(width, width),
        *conv(width, width, stride=2), *conv(width, width, dilation=2), *conv(width, width, dilation=4),
        torch.nn.Conv2d(width, 1, 1), torch.nn.Upsample(scale_factor=4, mode="bilinear"))


def _lq_tensor(lq: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1).float().div(127.5).sub(1)


def mask_probe(train_dir: Path, heldout_dir: Path, steps: int, seed: int = 0, crop: int = 128,
               batch: int = 8) -> dict[str, float]:
    """Train `mask_probe_net` on the training shards' LQ -> HMB mask for `steps` Adam steps (BCE,
    HMB pixels weighted 4) and return its AUROC inside the person on the HMB samples of the first
    quarter of the training set and of the held-out set: the data's limit, apart from the model's."""
    samples = list(iter_samples(sorted(train_dir.glob("*.tar"))))
    lqs = np.stack([s.lq for s in samples])
    masks = np.stack([s.mask >= 128 for s in samples])
    torch.manual_seed(seed)
    net = mask_probe_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    h, w = masks.shape[1:]
    for _ in range(steps):
        idx = rng.integers(0, len(samples), batch)
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        window = (idx, slice(top, top + crop), slice(left, left + crop))
        x = torch.stack([_lq_tensor(lq) for lq in lqs[window]])
        t = torch.from_numpy(masks[window]).float()[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), t, pos_weight=torch.tensor(4.0))
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def probe_auroc(found: Sequence[Any]) -> float:
        scores, labels = [], []
        for s in found:
            true, person = s.mask >= 128, s.parts > 0
            if true.any():
                scores.append(net(_lq_tensor(s.lq)[None])[0, 0].numpy()[person])
                labels.append(true[person])
        return auroc(np.concatenate(scores), np.concatenate(labels)) if scores else float("nan")

    net.eval()
    return {"probe_auroc_train": probe_auroc(samples[:len(samples) // 4]),
            "probe_auroc_heldout": probe_auroc(list(iter_samples(sorted(heldout_dir.glob("*.tar")))))}


# ----------------------------------------------------------------------------- the run


def print_report(m: dict[str, Any], fit: dict[str, Any] | None, every: int, probe_steps: int) -> None:
    """The figures of `evaluate` on the held-out samples (`m`) and on the training samples (`fit`)."""
    print(f"held out ({m['samples_hmb']} HMB, {m['samples_empty']} without): "
          f"mask IoU {m['iou']:.3f} Dice {m['dice']:.3f} | all-ones IoU {m['iou_ones']:.3f} Dice {m['dice_ones']:.3f} "
          f"| person IoU {m['iou_person']:.3f} Dice {m['dice_person']:.3f} | all-zeros 0 | "
          f"positive rate HMB {100 * m['pos_rate_hmb']:.1f}% without {100 * m['pos_rate_empty']:.1f}% | "
          f"AUROC in person {m['auroc_in_person']:.3f} | best IoU {m.get('iou_best', float('nan')):.3f} at "
          f"p > {m.get('iou_best_threshold', float('nan')):.2f}")
    print("mask IoU by what moves: " + ", ".join(
        f"{kind.replace('_', ' ')} ({m[f'samples_hmb_{kind}']}) {m[f'iou_{kind}']:.3f} vs person {m[f'iou_person_{kind}']:.3f}"
        for kind in HMB_KINDS))
    print(f"PSNR: LQ {m['psnr_lq']:.2f} dB, HQ head {m['psnr_hq_head']:.2f} dB, "
          f"LQ - residual head {m['psnr_lq_minus_res']:.2f} dB; by band (Gaussian sigma {LOW_BAND_SIGMA:g} px), "
          f"low: LQ {m['psnr_lq_low']:.2f} HQ head {m['psnr_hq_head_low']:.2f} dB, high: LQ {m['psnr_lq_high']:.2f} "
          f"HQ head {m['psnr_hq_head_high']:.2f} dB")
    if fit is not None:
        # The same figures on samples it trained on: far nearer their baselines than held out, it does not
        # generalise; no nearer, it does not fit (the data or the model); by photo, which source it cannot fit.
        print(f"training samples (every {every}, {fit['samples_hmb']} HMB, {fit['samples_empty']} "
              f"without; the fit, not a target): mask IoU {fit['iou']:.3f} | all-ones {fit['iou_ones']:.3f} | person "
              f"{fit['iou_person']:.3f} | positive rate without HMB {100 * fit['pos_rate_empty']:.1f}% | "
              f"AUROC in person {fit['auroc_in_person']:.3f}")
    print("by photo: mask IoU vs person on HMB samples | positive rate without HMB | detail (HQ high-band RMS "
          "in the person, grey levels)")
    scored = [("held out", m)] + ([("trained on", fit)] if fit is not None else [])
    for role, figures in scored:
        for photo, f in figures["by_photo"].items():
            empty = f"{100 * f['pos_rate_empty']:.1f}%" if f["samples_empty"] else "-"
            print(f"  {photo} ({role}): {f['iou']:.3f} vs {f['iou_person']:.3f} ({f['samples_hmb']}) | "
                  f"{empty} ({f['samples_empty']}) | detail {f['detail']:.1f}")
    if probe_steps:
        print(f"mask probe (plain CNN, mask only, {probe_steps} steps): AUROC inside the person "
              f"{m['probe_auroc_train']:.3f} on training samples, {m['probe_auroc_heldout']:.3f} held out")


def run_config(args: argparse.Namespace, train_dir: Path, heldout_dir: Path, out: Path) -> TrainDPGConfig:
    overrides = [
        *SMALL_MODEL, f"dpg.img_size={args.crop}",
        f"data.urls=[{train_dir}]", f"data.batch_size={args.batch}", "data.num_workers=1", "data.seed=0",
        "data.epoch_length=100000", "data.shuffle_buffer=64", f"data.crop_size={args.crop}", "data.hflip=true",
        # the warm-up scales with the budget: a tenth of it (the YAML's 500 is for 20k steps)
        f"train.max_steps={args.steps}", f"train.warmup_steps={args.steps // 10}", f"train.device={args.device}",
        f"train.seed={args.seed}",
        f"val.urls=[{heldout_dir}]", "val.samples=4", f"val.every={max(1, args.steps // 4)}",
        f"output.dir={out}", f"output.log_every={args.log_every}", f"output.ckpt_every={args.steps}",
        "output.keep_last=1", "output.tensorboard=false",
        *(PAPER_SETTINGS if args.paper else ()), *args.set,
    ]
    return TrainDPGConfig.from_yaml(TRAIN_CONFIG, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m haodiff_model.bench.learn", description=__doc__.split("\n\n")[0])
    ap.add_argument("photos", nargs="*", help="more photos of people, added to the bundled ones")
    ap.add_argument("--recipe", default="haodiff", help="degradation recipe name or YAML (default: haodiff)")
    ap.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override, e.g. generic.scale=1 (repeatable; tells data limits from model limits)")
    ap.add_argument("--p-hmb", type=float, default=0.7, help="first-order HMB probability (default: 0.7)")
    ap.add_argument("--holdout", default="astronaut", help="stem of the photo never trained on (default: astronaut)")
    ap.add_argument("--exclude", action="append", default=[], metavar="STEM",
                    help="a bundled photo left out entirely, by stem (e.g. zidane); repeatable")
    ap.add_argument("--k-train", type=int, default=100, help="samples per training photo (default: 100)")
    ap.add_argument("--k-heldout", type=int, default=24, help="samples of the held-out photo (default: 24)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--data-dir", default="runs/bench_learn/data", help="shard cache (default: runs/bench_learn/data)")
    ap.add_argument("--steps", type=int, default=1200,
                    help="optimizer updates: the budget (default: 1200; 688 s of training on a quiet "
                         "2-core machine)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128,
                    help="training crop side (default: 128; at 96 a crop holds too little of a 20-80 px blur)")
    ap.add_argument("--seed", type=int, default=0, help="weight-init seed")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--paper", action="store_true", help="the paper's stage-1 objective and optimiser as written")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override after the benchmark's own (repeatable)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--data-only", action="store_true", help="synthesize (or find) the shards, then stop")
    ap.add_argument("--probe-steps", type=int, default=0,
                    help="also train a plain full-resolution CNN for the mask alone this many steps and report its "
                         "AUROC: whether the data lets any model find HMB (default: 0 = off; 1200 takes ~4 min)")
    ap.add_argument("--train-every", type=int, default=4,
                    help="also score every N-th training sample, the fit beside the held-out figures (default: 4; "
                         "0 = off)")
    ap.add_argument("--out", default=None, help="run folder (default: runs/bench_learn/<paper|default>-<steps>)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    setup_logging("bench.learn")  # the trainer's progress lines and guard warnings
    out = Path(args.out or f"runs/bench_learn/{'paper' if args.paper else 'default'}-{args.steps}")
    if not args.data_only and out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: choose another --out")
    print(f"start {time.strftime('%H:%M:%S')}  {uptime()}", flush=True)
    train_dir, heldout_dir = build_data(args)
    if args.data_only:
        return 0
    cfg = run_config(args, train_dir, heldout_dir, out)

    start = time.perf_counter()
    _, model = train(cfg, ctx=init_distributed(args.device))
    train_s = time.perf_counter() - start
    print(f"trained {args.steps} steps in {train_s:.0f} s ({train_s / args.steps:.2f} s/step)  {uptime()}", flush=True)

    start = time.perf_counter()
    metrics, grid = evaluate(model, heldout_dir)
    fit = evaluate(model, train_dir, args.train_every)[0] if args.train_every else None
    eval_s = time.perf_counter() - start
    save_png(out / "heldout.png", grid)
    checks = targets(metrics)
    report = {"config": cfg.to_dict(), "argv": list(sys.argv[1:] if argv is None else argv), "metrics": metrics,
              "train_metrics": fit, "targets": {what: ok for what, ok in checks}, "train_s": train_s,
              "eval_s": eval_s, "load": uptime()}
    (out / "report.json").write_text(json.dumps(report, indent=1))

    if args.probe_steps:
        start = time.perf_counter()
        metrics.update(mask_probe(train_dir, heldout_dir, args.probe_steps, args.seed))
        report["metrics"], report["probe_s"] = metrics, time.perf_counter() - start
        (out / "report.json").write_text(json.dumps(report, indent=1))
    print_report(metrics, fit, args.train_every, args.probe_steps)
    for what, ok in checks:
        print(f"  [{'pass' if ok else 'FAIL'}] {what}")
    print(f"{sum(ok for _, ok in checks)}/{len(checks)} targets met; {out}/(report.json heldout.png loss.png "
          f"heads.png); train {train_s:.0f} s, eval {eval_s:.0f} s; end {time.strftime('%H:%M:%S')}  {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
