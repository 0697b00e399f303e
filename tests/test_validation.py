"""Validation during training: a held-out batch with every kind of sample, per-head stage-1 metrics,
and the best checkpoint kept by a chosen metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from haodiff_data.config import ConfigError
from haodiff_data.shards.schema import encode_sample
from haodiff_model.train.distributed import DistContext
from haodiff_model.train.dpg import TrainDPGConfig, head_metrics, train
from haodiff_model.train.loop import Run, ValSettings, best_direction, load_val_batch
from haodiff_model.train.state import read_metrics

SIZE = 32
TINY_MODEL = {"img_size": SIZE, "embed_dim": 12, "depths": [2, 2, 1, 1], "num_heads": [3, 3, 2, 2],
              "window_size": 8, "drop_path_rate": 0.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(key: str, kind: str) -> dict:
    rng = np.random.default_rng([ord(c) for c in key])
    hq = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    noisy = np.clip(hq.astype(np.int16) + rng.integers(-25, 26, hq.shape), 0, 255).astype(np.uint8)
    lq = hq if kind == "clean" else noisy
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if kind == "hmb":
        mask[4:20, 8:24] = 255
    return encode_sample(key, hq, lq, mask, np.zeros((SIZE, SIZE), np.uint8), {"kind": kind})


def _shards(root: Path, name: str, kinds: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / f"{name}-r000-000000.tar"), encoder=False, mtime=0) as tar:
        for i, kind in enumerate(kinds):
            tar.write(_sample(f"{name}{i:03d}", kind))
    return root


def _config(train: Path, val: Path, out: Path, **val_settings) -> TrainDPGConfig:
    return TrainDPGConfig.from_dict({
        "dpg": dict(TINY_MODEL),
        "data": {"urls": [str(train)], "batch_size": 2, "num_workers": 0, "epoch_length": 4, "shuffle_buffer": 4,
                 "pin_memory": False},
        "train": {"max_steps": 4, "device": "cpu", "lr": 2e-3, "warmup_steps": 0},
        "val": {"urls": [str(val)], "samples": 3, "every": 1, **val_settings},
        "output": {"dir": str(out), "log_every": 1, "ckpt_every": 4, "keep_last": 1, "tensorboard": False},
    })


def test_the_validation_batch_takes_each_kind_in_turn(tmp_path: Path) -> None:
    # mostly generic, the rare kinds late in the stream: the first 3 samples alone would be generic only
    kinds = ["generic"] * 6 + ["hmb", "generic", "clean", "hmb"]
    val = _shards(tmp_path / "val", "v", kinds)
    cfg = _config(val, val, tmp_path / "run", scan=len(kinds))
    batch = load_val_batch(cfg, [str(val / "v-r000-000000.tar")])
    assert sorted(batch["kind"]) == ["clean", "generic", "hmb"]
    for i, kind in enumerate(batch["kind"]):
        assert bool(batch["mask"][i].any()) == (kind == "hmb")
        assert bool(batch["residual"][i].any()) == (kind != "clean")
    assert batch["hq"].shape == (3, 3, SIZE, SIZE) and len(batch["key"]) == 3


def test_head_metrics_score_each_head_against_its_input() -> None:
    rng = torch.Generator().manual_seed(0)
    hq = torch.rand(2, 3, 16, 16, generator=rng) * 2 - 1
    lq = (hq + 0.1).clamp(-1, 1)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :8] = 1  # sample 0 has HMB on its top half, sample 1 none
    batch = {"hq": hq, "lq": lq, "mask": mask}
    logits = torch.full_like(mask, -5.0)
    logits[0, :, :4] = 5.0  # half of the HMB found, nothing called HMB elsewhere
    logits[1, :, :2] = 5.0  # 2 of 16 rows called HMB where there is none
    m = head_metrics(batch, [hq.clone(), lq - hq, logits])
    lq_mse = ((lq - hq) / 2).pow(2).flatten(1).mean(1)
    assert m["psnr_lq"] == pytest.approx((10 * torch.log10(1 / lq_mse)).mean().item(), rel=1e-5)
    assert m["psnr_hq_head"] > 100 and m["psnr_lq_minus_res"] > 100  # exact heads
    assert m["mask_iou"] == pytest.approx(0.5) and m["mask_dice"] == pytest.approx(2 / 3)
    assert m["mask_pos_rate_no_hmb"] == pytest.approx(2 / 16)
    assert math.isnan(head_metrics({**batch, "mask": torch.zeros_like(mask)}, [hq, lq - hq, logits])["mask_iou"])


def test_the_best_validation_keeps_its_weights(tmp_path: Path) -> None:
    train_dir = _shards(tmp_path / "train", "t", ["hmb", "generic", "hmb", "clean", "generic", "hmb"])
    val = _shards(tmp_path / "val", "v", ["hmb", "generic", "clean"])
    out = tmp_path / "run"
    cfg = _config(train_dir, val, out, best_metric="val/psnr_hq_head")
    train(cfg, log=lambda _: None, ctx=DistContext())
    records = [r for r in read_metrics(out / "metrics.jsonl") if "val/psnr_hq_head" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("val/psnr_lq", "val/psnr_lq_minus_res", "val/mask_iou", "val/mask_dice", "val/mask_pos_rate_no_hmb",
                "val/l1_hq", "val/l1_residual"):
        assert all(math.isfinite(r[key]) for r in records), key
    best = max(records, key=lambda r: r["val/psnr_hq_head"])
    saved = json.loads((out / "best" / "best.json").read_text())
    assert saved == {"step": best["step"], "metric": "val/psnr_hq_head", "value": best["val/psnr_hq_head"]}
    assert (out / "best" / "dpg.json").is_file() and not (out / "best.tmp").exists()
    final, kept = (torch.load(f, weights_only=True) for f in (out / "dpg.pth", out / "best" / "dpg.pth"))
    same = all(torch.equal(final[k], kept[k]) for k in final)
    assert same == (best["step"] == 4)  # the final weights are kept only when the last validation is the best


@pytest.mark.parametrize("metric, values, kept", [("val/psnr", [20.0, 23.0, 22.0, 23.0], [1, 2]),
                                                   ("val/hmb/lpips", [0.4, 0.3, 0.35, 0.1], [1, 2, 4]),
                                                   ("val/mask_iou", [math.nan, 0.2, math.nan, 0.3], [2, 4])])
def test_best_is_replaced_only_by_a_strictly_better_value(tmp_path: Path, metric, values, kept) -> None:
    cfg = _config(tmp_path, tmp_path, tmp_path / "run", best_metric=metric)
    run = Run(cfg, DistContext(), "dpg", [], log=lambda _: None)
    run.start(0, resumed=False)
    written = []

    def write_outputs(folder: Path) -> None:
        written.append(step)
        (folder / "weights").write_text(str(step))

    for step, value in enumerate(values, 1):
        run.log_validation(step, {"val/loss": 1.0, metric: value}, np.zeros((4, 4, 3), np.uint8), write_outputs)
    assert written == kept
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == kept[-1]
    assert (tmp_path / "run" / "best" / "weights").read_text() == str(kept[-1])


def test_best_metric_names_must_say_their_direction() -> None:
    assert best_direction("val/hmb/lpips") == -1 and best_direction("val/psnr_hq_head") == 1
    assert best_direction("val/dice") == -1 and best_direction("val/mask_dice") == 1  # a loss term, a score
    with pytest.raises(ValueError, match="best_metric='val/sharpness'"):
        ValSettings(best_metric="val/sharpness")


def test_an_unknown_best_metric_is_named_at_the_first_validation(tmp_path: Path) -> None:
    train_dir = _shards(tmp_path / "train", "t", ["hmb", "generic", "clean", "hmb"])
    cfg = _config(train_dir, _shards(tmp_path / "val", "v", ["hmb"]), tmp_path / "run", best_metric="val/lpips")
    with pytest.raises(ConfigError, match=r"val\.best_metric='val/lpips' is not among"):
        train(cfg, log=lambda _: None, ctx=DistContext())
