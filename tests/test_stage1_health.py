"""Stage 1 learns (issue #12): the default objective keeps the mask head alive, the paper's as written
lets it saturate, the guard says so in the log, and the learnability benchmark's metrics are right."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import TINY_STAGE1_DPG
from haodiff_data.shards.schema import encode_sample
from haodiff_model.bench.learn import PAPER_SETTINGS, auroc, band_psnr, iou_dice, psnr
from haodiff_model.losses.losses import PAPER_LOSS, Stage1Loss, dice_loss, focal_bce_loss, stage1_loss
from haodiff_model.io.official import save_dpg
from haodiff_model.nets.dpg import DPGConfig, DPGNetwork
from haodiff_model.train.distributed import DistContext
from haodiff_model.train.dpg import TrainDPGConfig, dpg_train_step, make_optimizer, make_scheduler, train
from haodiff_model.train.guards import SATURATED_LOGIT, Stage1Guard
from haodiff_model.train.state import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
TINY_MODEL = {**TINY_STAGE1_DPG, "drop_path_rate": 0.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int = 0, batch: int = 4) -> dict[str, torch.Tensor]:
    """Blurred disc on half the samples (the HMB mask), none on the others, like an HMB-heavy set."""
    g = torch.Generator().manual_seed(seed)
    hq = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[::2, 0] = (((yy - 32) ** 2 + (xx - 28) ** 2) < 15 ** 2).float()
    blurred = torch.nn.functional.avg_pool2d(hq, 5, 1, 2)
    lq = mask * blurred + (1 - mask) * hq
    return {"hq": hq, "lq": lq, "residual": lq - hq, "mask": mask}


def _first_steps(steps: int, overrides: list[str], objective: Stage1Loss | None = None) -> list[dict[str, float]]:
    """HEAD_STATS of the first `steps` updates of the tiny DPG under train_dpg.yaml + overrides."""
    cfg = TrainDPGConfig.from_yaml(ROOT / "pipelines" / "train_dpg.yaml", [
        *(f"dpg.{k}={v}" for k, v in TINY_MODEL.items()), "train.device=cpu", f"train.max_steps={steps}",
        *overrides])
    t = cfg.train
    model = DPGNetwork(cfg.dpg, torch.Generator().manual_seed(0))
    opt = make_optimizer(model, t, torch.device("cpu"))
    sched = make_scheduler(opt, t)
    stats = []
    for step in range(steps):
        _, _, s = dpg_train_step(model, opt, _batch(step), objective or cfg.loss, t.grad_clip)
        sched.step()
        stats.append({k: v.item() for k, v in s.items()})
    return stats


def test_default_config_keeps_the_mask_head_alive() -> None:
    # the defaults, with the warm-up cut to a fifth of these steps so that the full lr is reached
    stats = _first_steps(25, ["train.warmup_steps=5"])
    for s in stats:
        assert s["mask_logit_absmax"] < SATURATED_LOGIT / 3  # bounded: the sigmoid still has a gradient
        assert s["grad_norm_mask"] > 1e-3  # and that gradient reaches the mask branch
    assert stats[-1]["grad_norm_mask"] > 0.01 * stats[0]["grad_norm_mask"]
    assert max(s["mask_pos_rate"] for s in stats[5:]) < 0.9  # never the all-ones collapse (the truth is ~8 %)


def test_paper_objective_as_written_saturates_the_mask_head() -> None:
    # The failure the defaults avoid, reproduced on the tiny model: the test above could not tell a
    # live head from a dead one if this one stayed alive.
    paper = _first_steps(25, list(PAPER_SETTINGS))
    assert sum(s["mask_pos_rate"] > 0.99 for s in paper[5:]) >= 12  # mostly all ones while ~8 % of pixels are HMB
    # per-image Dice hands the mask branch a gradient 1-2 orders of magnitude below BCE + batch Dice
    alive = _first_steps(25, list(PAPER_SETTINGS), Stage1Loss(dice_reduction="batch", bce_weight=0.1))
    assert np.median([s["grad_norm_mask"] for s in paper]) < 0.1 * np.median([s["grad_norm_mask"] for s in alive])


def _shards(root: Path) -> Path:
    for s in range(2):
        with wds.TarWriter(str(root / f"t-r000-{s:06d}.tar"), encoder=False, mtime=0) as tar:
            for i in range(4):
                b = _batch(10 * s + i, 1)
                u8 = [((b[k][0] * 127.5 + 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
                      for k in ("hq", "lq")]
                mask = (b["mask"][0, 0].numpy() * 255).astype(np.uint8)
                tar.write(encode_sample(f"s{s}k{i}", u8[0], u8[1], mask, np.zeros((SIZE, SIZE), np.uint8),
                                        {"index": i}))
    return root


def test_guard_warns_with_the_step_when_the_mask_head_is_forced_to_saturate(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    shards = _shards(tmp_path)
    saturated = DPGNetwork(DPGConfig.from_dict(TINY_MODEL))
    with torch.no_grad():
        saturated.upsamplers[2].conv_last.bias.fill_(1e4)  # every logit ~ +1e4: sigmoid 1, gradient 0
    save_dpg(saturated, tmp_path / "saturated.pth")
    cfg = TrainDPGConfig.from_dict({
        "dpg": TINY_MODEL,
        "model": {"init_weights": str(tmp_path / "saturated.pth")},
        "data": {"urls": [str(shards)], "batch_size": 2, "num_workers": 0, "epoch_length": 4, "shuffle_buffer": 4},
        "train": {"max_steps": 2, "device": "cpu"},
        "val": {"every": 0},
        "output": {"dir": str(tmp_path / "run"), "log_every": 1, "tensorboard": False},
    })
    lines: list[str] = []
    logger = logging.getLogger("haodiff_model")
    logger.addHandler(caplog.handler)  # directly: a CLI test before may have set propagate = False
    try:
        train(cfg, log=lines.append, ctx=DistContext())
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("step 1: mask head saturated") for w in warnings), warnings
    assert any(w.startswith("step 1: mask head predicts all ones") for w in warnings), warnings
    assert not any("mask head" in line for line in lines), "warnings go to the log's warning level, not the INFO lines"
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/warnings"] >= 2 for r in records] == [True, True]
    assert all(r["train/mask_pos_rate"] == 1.0 and r["train/mask_logit_absmax"] > 1e3 for r in records)
    assert all(r[f"train/grad_norm_{h}"] > 0 for r in records for h in ("hq", "residual"))
    assert (tmp_path / "run" / "heads.png").is_file()


def test_guard_on_healthy_vanishing_and_diverging_records() -> None:
    healthy = {"train/loss": 1.0, "train/grad_norm_hq": 1.0, "train/grad_norm_residual": 1.0,
               "train/grad_norm_mask": 1e-3, "train/mask_logit_absmax": 5.0, "train/mask_pos_rate": 0.3,
               "train/mask_true_rate": 0.2}
    guard = Stage1Guard()
    assert guard.check(10, healthy) == []
    assert guard.check(20, {**healthy, "train/loss": 0.5}) == []
    dead = guard.check(30, {**healthy, "train/grad_norm_mask": 1e-7, "train/mask_pos_rate": 0.0})
    names = [w.split(" (")[0].split(":")[0] for w in dead]
    assert names == ["mask head gradient vanished", "mask head predicts all zeros"]
    diverging = guard.check(40, {**healthy, "train/loss": 1.6})
    assert diverging == ["loss diverging: 1.6 against a best of 0.5"]
    # an all-zeros prediction on a batch without any HMB is right, not dead
    assert guard.check(50, {**healthy, "train/mask_pos_rate": 0.0, "train/mask_true_rate": 0.0}) == []


def test_mask_lr_scale_steps_only_the_mask_branch_faster() -> None:
    cfg = TrainDPGConfig.from_yaml(ROOT / "pipelines" / "train_dpg.yaml", [
        *(f"dpg.{k}={v}" for k, v in TINY_MODEL.items()), "train.warmup_steps=4", "train.mask_lr_scale=3"])
    model = DPGNetwork(cfg.dpg, torch.Generator().manual_seed(0))
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    sched = make_scheduler(opt, cfg.train)
    rest, mask = opt.param_groups
    mask_branch = {id(p) for p in [*model.branches[2].parameters(), *model.upsamplers[2].parameters()]}
    assert {id(p) for p in mask["params"]} == mask_branch
    assert len(rest["params"]) + len(mask["params"]) == len(list(model.parameters()))
    for _ in range(2):
        opt.step()  # no gradients: no update, only the schedule's order
        sched.step()
        assert rest["lr"] == pytest.approx(cfg.train.lr * (sched.last_epoch + 1) / 4)  # the warm-up applies to both
        assert mask["lr"] == pytest.approx(3 * rest["lr"])
    default = TrainDPGConfig.from_yaml(ROOT / "pipelines" / "train_dpg.yaml").train
    assert len(make_optimizer(model, default, torch.device("cpu")).param_groups) == 1  # old checkpoints resume
    with pytest.raises(ValueError, match="mask_lr_scale"):
        TrainDPGConfig.from_yaml(ROOT / "pipelines" / "train_dpg.yaml", ["train.mask_lr_scale=0"])


def test_batch_dice_counts_false_positives_on_empty_samples() -> None:
    logits = torch.stack([torch.full((1, 2, 2), 4.0), torch.full((1, 2, 2), 4.0)])  # p ~ 0.982 everywhere
    target = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    p = torch.sigmoid(torch.tensor(4.0)).item()
    per_sample = ((1 - (2 * 4 * p + 1) / (4 * p + 4 + 1)) + (1 - 1 / (4 * p + 1))) / 2
    assert dice_loss(logits, target, 1.0, "sample").item() == pytest.approx(per_sample, abs=1e-6)
    assert dice_loss(logits, target, 1.0, "batch").item() == pytest.approx(1 - (8 * p + 1) / (8 * p + 4 + 1), abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        dice_loss(logits, target, 1.0, "pixel")


def test_focal_bce_and_bounded_logits() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 100.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    bce = -(target * torch.nn.functional.logsigmoid(logits) + (1 - target) * torch.nn.functional.logsigmoid(-logits))
    assert focal_bce_loss(logits, target).item() == pytest.approx(bce.mean().item(), rel=1e-6)
    p_t = torch.where(target > 0, torch.sigmoid(logits), torch.sigmoid(-logits))
    assert focal_bce_loss(logits, target, 2.0).item() == pytest.approx(((1 - p_t) ** 2 * bce).mean().item(), rel=1e-5)
    z = torch.zeros(1, 3, 2, 2)
    objective = Stage1Loss(bce_weight=0.5, mask_logit_bound=8.0)
    total, parts = stage1_loss(z, z, logits, z, z, target, objective)
    bounded = 8 * torch.tanh(logits / 8)
    assert parts["bce"].item() == pytest.approx(0.5 * focal_bce_loss(bounded, target).item(), rel=1e-6)
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)
    assert stage1_loss(z, z, logits, z, z, target, PAPER_LOSS)[1]["bce"].item() == 0.0  # the paper has no BCE
    with pytest.raises(ValueError, match="mask_logit_bound must be null or > 0"):
        Stage1Loss(mask_logit_bound=0)


def test_benchmark_metrics_on_known_cases() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])) == 1.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([False, True, False, True])) == 0.5
    assert auroc(np.array([0.9, 0.1, 0.4]), np.array([False, True, True])) == 0.0
    assert math.isnan(auroc(np.array([0.3]), np.array([True])))
    pred = np.array([[1, 1], [0, 0]], bool)
    true = np.array([[1, 0], [1, 0]], bool)
    assert iou_dice(pred, true) == (pytest.approx(1 / 3), pytest.approx(0.5))
    ref = np.random.default_rng(0).integers(20, 200, (64, 64, 3)).astype(np.uint8)  # no uint8 wrap below
    low, high = band_psnr(ref + 20, ref)  # a colour shift is all low band
    assert low == pytest.approx(psnr(ref + 20, ref)) and high > 100  # identical high bands: only float rounding left
    noisy = (ref + np.random.default_rng(1).choice([-8, 8], ref.shape)).astype(np.uint8)
    low, high = band_psnr(noisy, ref)  # white noise is mostly high band
    assert high == pytest.approx(psnr(noisy, ref), abs=0.2) and low > high + 15
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a + 1, a) == pytest.approx(20 * math.log10(255))


def test_benchmark_config_paper_and_default(tmp_path: Path) -> None:
    import argparse

    from haodiff_model.bench.learn import hmb_recipe, run_config

    args = argparse.Namespace(crop=96, batch=8, steps=300, seed=0, log_every=10, device="cpu", paper=True, set=[])
    paper = run_config(args, tmp_path / "train", tmp_path / "held", tmp_path / "out")
    assert paper.loss == PAPER_LOSS
    assert (paper.train.lr, paper.train.scheduler, paper.train.warmup_steps) == (2e-3, "constant", 0)
    assert paper.data.channel_shuffle is False
    assert paper.val.urls == (str(tmp_path / "held"),) and paper.data.crop_size == paper.dpg.img_size == 96
    default = run_config(argparse.Namespace(**{**vars(args), "paper": False, "set": ["train.lr=5e-4"]}),
                         tmp_path / "train", tmp_path / "held", tmp_path / "out")
    yaml_cfg = TrainDPGConfig.from_yaml(ROOT / "pipelines" / "train_dpg.yaml")
    assert default.loss == yaml_cfg.loss == Stage1Loss() != PAPER_LOSS
    assert (default.train.lr, default.train.warmup_steps, default.train.max_steps) == (5e-4, 30, 300)
    first = hmb_recipe("s3diff-mild", 0.7)["first_order"]
    assert first["p_hmb"] == 0.7 and first["p_none"] == pytest.approx(0.1) and first["p_generic"] == pytest.approx(0.2)


def _probe_shards(root: Path, blur_marks_mask: bool, seed: int) -> Path:
    """Noise images; the mask is a box. Where blur_marks_mask, the box is blurred (visible HMB);
    otherwise a box of the same size elsewhere is blurred (the mask says nothing about the image)."""
    import cv2

    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(root / "p-r000-000000.tar"), encoder=False, mtime=0) as tar:
        for i in range(8):
            lq = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            mask = np.zeros((128, 128), np.uint8)
            y, x = rng.integers(8, 60, 2)
            mask[y:y + 48, x:x + 48] = 255
            by, bx = (y, x) if blur_marks_mask else rng.integers(8, 60, 2)
            lq[by:by + 48, bx:bx + 48] = cv2.GaussianBlur(lq[by:by + 48, bx:bx + 48], (0, 0), 3)
            tar.write(encode_sample(f"p{i:03d}", lq, lq, mask, np.ones((128, 128), np.uint8), {}))
    return root


@pytest.mark.parametrize("visible", [True, False])
def test_mask_probe_finds_visible_hmb_and_nothing_else(tmp_path: Path, visible: bool) -> None:
    from haodiff_model.bench.learn import mask_probe

    train, heldout = (_probe_shards(tmp_path / name, visible, seed) for seed, name in enumerate(("train", "heldout")))
    with torch.random.fork_rng():
        m = mask_probe(train, heldout, steps=60, crop=64, batch=4)
    if visible:
        assert m["probe_auroc_heldout"] > 0.85
    else:
        assert 0.3 < m["probe_auroc_heldout"] < 0.7


class _BoxAt(torch.nn.Module):
    """A stand-in DPG that returns its input as HQ, no residual, and p = `p_box` on a known box."""

    def __init__(self, box: tuple[slice, slice], p_box: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.box, self.logit = box, math.log(p_box / (1 - p_box))

    def forward(self, lq: torch.Tensor) -> list[torch.Tensor]:
        logits = torch.full_like(lq[:, :1], -10.0)
        logits[..., self.box[0], self.box[1]] = self.logit
        return [lq, torch.zeros_like(lq), logits]


def test_benchmark_evaluation_separates_ranking_from_threshold(tmp_path: Path) -> None:
    """A head that ranks the HMB box perfectly but under-confidently (p 0.3): IoU 0 at p > 0.5, best
    IoU 1 at a lower threshold; the all-ones and person baselines are the box's share of the image;
    the figures by photo and on every n-th sample count the right samples."""
    from haodiff_model.bench.learn import evaluate

    rng = np.random.default_rng(0)
    box = (slice(16, 48), slice(8, 40))
    mask = np.zeros((64, 64), np.uint8)
    mask[box] = 255
    parts = np.zeros((64, 64), np.uint8)
    parts[:, :48] = 1
    (tmp_path / "held").mkdir()
    with wds.TarWriter(str(tmp_path / "held" / "h-r000-000000.tar"), encoder=False, mtime=0) as tar:
        samples = ((mask, "head", "a"), (mask, "whole_body", "a"), (np.zeros_like(mask), None, "flat"))
        for i, (m, group, photo) in enumerate(samples):
            noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            img = noise if photo == "a" else np.full_like(noise, 90)
            meta = {"hmb": group and {"group": group}, "source": {"path": f"/photos/{photo}.png"}}
            tar.write(encode_sample(f"h{i:03d}", img, img, m, parts, meta))
    metrics, grid = evaluate(_BoxAt(box, 0.3), tmp_path / "held")
    assert (metrics["samples_hmb"], metrics["samples_empty"]) == (2, 1)
    assert metrics["iou"] == 0.0 and metrics["pos_rate_hmb"] == 0.0 and metrics["pos_rate_empty"] == 0.0
    assert metrics["iou_best"] == 1.0 and metrics["iou_best_threshold"] == pytest.approx(0.05)
    assert metrics["iou_ones"] == pytest.approx(32 * 32 / 64 ** 2)
    assert metrics["iou_person"] == pytest.approx(32 * 32 / (64 * 48))
    assert metrics["auroc_in_person"] == 1.0
    assert metrics["samples_hmb_part"] == metrics["samples_hmb_whole_body"] == 1
    assert metrics["iou_part"] == metrics["iou_whole_body"] == 0.0
    assert metrics["iou_person_part"] == metrics["iou_person_whole_body"] == metrics["iou_person"]
    assert grid.ndim == 3 and grid.shape[2] == 3
    a, flat = metrics["by_photo"]["a"], metrics["by_photo"]["flat"]
    assert (a["samples_hmb"], a["samples_empty"], flat["samples_hmb"], flat["samples_empty"]) == (2, 0, 0, 1)
    assert a["iou"] == 0.0 and a["iou_person"] == metrics["iou_person"] and math.isnan(a["pos_rate_empty"])
    assert flat["pos_rate_empty"] == 0.0 and math.isnan(flat["iou"])
    assert flat["detail"] < 1e-9 and a["detail"] > 20  # uniform noise has a strong high band

    every_other = evaluate(_BoxAt(box, 0.3), tmp_path / "held", every=2)[0]  # samples 0 and 2
    assert (every_other["samples_hmb"], every_other["samples_empty"]) == (1, 1)
    assert every_other["samples_hmb_part"] == 1 and every_other["samples_hmb_whole_body"] == 0
