"""Training bookkeeping (haodiff_model.train.state) and process-group helpers (haodiff_model.train.distributed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from haodiff_model.train.distributed import DistContext, init_distributed, mean_scalars, ranks_from_env, wrap_ddp
from haodiff_model.train.state import (
    CheckpointManager, MetricLogger, apply_state, capture_rng, collect_state, derive_seed, image_grid, plot_metrics,
    read_metrics, restore_rng, save_png, to_rgb_uint8,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _draw(g: torch.Generator) -> list:
    return [random.random(), float(np.random.random()), float(torch.rand(1)), float(torch.rand(1, generator=g))]


def test_rng_capture_restore_round_trip_through_weights_only_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    _draw(g)
    state = capture_rng({"drop": g})
    torch.save(state, tmp_path / "rng.pt")
    first = _draw(g)
    _draw(g)  # move every stream on
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), {"drop": g})
    assert _draw(g) == first
    with pytest.raises(KeyError, match=r"generators \['other'\]"):
        restore_rng(state, {"other": torch.Generator()})


def test_derive_seed_is_deterministic_and_distinct() -> None:
    seeds = {derive_seed(0, 101, rank, step) for rank in range(4) for step in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(3, 1, 2) == derive_seed(3, 1, 2)


def _tiny_training(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    return model, opt, sched, (x, y)


def test_model_optimizer_scheduler_state_round_trip(tmp_path: Path) -> None:
    model, opt, sched, (x, y) = _tiny_training(3)
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(3, collect_state(3, {"net": model}, {"adam": opt}, {"lr": sched}, note="hello"))
    state = CheckpointManager.load(mgr.latest())
    model2, opt2, sched2, _ = _tiny_training(0, seed=1)
    assert apply_state(state, {"net": model2}, {"adam": opt2}, {"lr": sched2}) == 3 and state["note"] == "hello"
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p2][k])
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):  # one more identical update on both
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match=r"no models \['other'\]"):
        apply_state(state, {"other": model2}, {}, {})


def test_checkpoint_manager_keep_last_latest_and_failed_save(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    for step in (10, 20, 30):
        mgr.save(step, {"step": step}, extra=lambda d, s=step: (d / "extra.txt").write_text(str(s)))
    assert [p.name for p in mgr.checkpoints()] == ["step-00000020", "step-00000030"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000030"
    assert (mgr.latest() / "extra.txt").read_text() == "30"

    def crash(folder: Path) -> None:
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        mgr.save(40, {"step": 40}, extra=crash)
    assert mgr.latest().name == "step-00000030"  # the previous checkpoint stays the resume point
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000020", "step-00000030"]

    mgr.save(30, {"step": 31})  # the same step again replaces it
    assert CheckpointManager.load(mgr.latest())["step"] == 31
    (tmp_path / "latest").write_text("step-00000099\n")  # stale pointer: fall back to the newest folder
    assert mgr.latest().name == "step-00000030"
    assert CheckpointManager(tmp_path / "off", enabled=False).save(1, {"step": 1}) is None
    assert not (tmp_path / "off").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointManager.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_metric_logger_jsonl_tensorboard_and_resume_truncation(tmp_path: Path) -> None:
    log = MetricLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3, 4):
        log.log(step, {"train/loss": 1.0 / step})
    log.close()
    assert [r["train/loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 0.5, 1 / 3, 0.25]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # torn line of a crashed run
    log = MetricLogger(tmp_path, tensorboard=False, resume_step=2)  # resumed from the step-2 checkpoint
    log.log(3, {"train/loss": 9.0})
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 9.0)]
    off = MetricLogger(tmp_path / "rank1", enabled=False)
    off.log(1, {"x": 1.0})
    off.close()
    assert not (tmp_path / "rank1").exists()
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(tmp_path / "bad.jsonl")


def test_images_grid_png_and_plot(tmp_path: Path) -> None:
    x = torch.tensor([[[-1.0, 0.0, 1.0, 3.0]]]).expand(3, 1, 4)
    assert to_rgb_uint8(x)[0, :, 0].tolist() == [0, 128, 255, 255]  # clipped above 1
    grey = to_rgb_uint8(torch.tensor([[[0.0, 0.25]]]), 0.0, 1.0)
    assert grey.shape == (1, 2, 3) and grey[0, 1].tolist() == [64, 64, 64]
    with pytest.raises(ValueError, match=r"\(1\|3, H, W\)"):
        to_rgb_uint8(torch.zeros(2, 4, 4))

    tiles = [[np.full((3, 5, 3), 10 * (r * 2 + c), np.uint8) for c in range(2)] for r in range(2)]
    grid = image_grid(tiles, pad=1, pad_value=200)
    assert grid.shape == (2 * 4 + 1, 2 * 6 + 1, 3)
    assert (grid[1:4, 1:6] == 0).all() and (grid[5:8, 7:12] == 30).all() and (grid[0] == 200).all()
    with pytest.raises(ValueError, match=r"image \(1, 0\)"):
        image_grid([tiles[0], [np.zeros((4, 5, 3), np.uint8), tiles[1][1]]])

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255  # red
    path = save_png(tmp_path / "sub" / "red.png", rgb)
    assert cv2.imread(str(path))[0, 0].tolist() == [0, 0, 255]  # OpenCV reads BGR

    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1 / s, "lr": 1}) + "\n"
                                              for s in range(1, 6)))
    png = plot_metrics(tmp_path / "m.jsonl", tmp_path / "loss.png")
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 100 and image.std() > 0


def test_env_ranks_and_single_process_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ranks_from_env({}) == (0, 1, 0)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert ranks_from_env(env) == (3, 4, 1)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        ranks_from_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        ranks_from_env({**env, "RANK": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        ranks_from_env({"WORLD_SIZE": "two"})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext() and ctx.is_main and not ctx.is_distributed
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, ctx) is model
    assert mean_scalars({"a": torch.tensor(1.5), "b": 2}, ctx.device) == {"a": 1.5, "b": 2.0}
