"""Stage-1 trainer (haodiff_model.train.dpg), the haodiff-train CLI and the GPU benchmark's CPU smoke path."""

from __future__ import annotations

import hashlib
import json
import os
import re
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from conftest import TINY_STAGE1_DPG, spawn_ranks
from haodiff_data.shards.schema import encode_sample
from haodiff_model.bench import gpu as bench_gpu
from haodiff_model.cli import main
from haodiff_model.config import ConfigError
from haodiff_model.io.official import CheckpointMismatchError, load_dpg_weights
from haodiff_model.losses.losses import PAPER_LOSS
from haodiff_model.nets.dpg import DPGConfig, DPGNetwork
from haodiff_model.train.distributed import DistContext
from haodiff_model.train.dpg import (
    TrainDPGConfig, TrainSettings, dpg_forward_loss, dpg_train_step, lr_factor, train,
)
from haodiff_model.train.loop import Run, build_train_loader, split_holdout, stream_settings
from haodiff_model.train.state import CheckpointManager, read_metrics

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(key: str) -> dict:
    rng = np.random.default_rng([ord(c) for c in key])
    hq = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    lq = np.clip(hq.astype(np.int16) + rng.integers(-25, 26, hq.shape), 0, 255).astype(np.uint8)
    mask = np.where(rng.random((SIZE, SIZE)) < 0.3, 255, 0).astype(np.uint8)
    return encode_sample(key, hq, lq, mask, np.zeros((SIZE, SIZE), np.uint8), {"index": key})


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    for s in range(3):
        with wds.TarWriter(str(root / f"train-r000-{s:06d}.tar"), encoder=False, mtime=0) as tar:
            for i in range(4):
                tar.write(_sample(f"s{s}k{i}"))
    return root


def _config(shards: Path, out: Path, **sections) -> dict:
    cfg = {
        "dpg": dict(TINY_STAGE1_DPG),
        "data": {"urls": [str(shards)], "batch_size": 2, "num_workers": 0, "epoch_length": 4, "shuffle_buffer": 4,
                 "pin_memory": False},
        "train": {"max_steps": 6, "device": "cpu"},
        "val": {"samples": 2, "every": 3},
        "output": {"dir": str(out), "log_every": 1, "ckpt_every": 3, "keep_last": 2},
    }
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(shards: Path) -> None:
    cfg = TrainDPGConfig.from_dict(_config(shards, Path("unused")))
    train_urls, _ = split_holdout(cfg)
    batch = next(iter(build_train_loader(cfg, train_urls, DistContext(), 0)))
    model = DPGNetwork(cfg.dpg, torch.Generator().manual_seed(0))
    model.set_drop_path_generator(torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)  # the paper's objective and lr
    cpu = torch.device("cpu")

    def evaluate() -> tuple[float, dict[str, float]]:
        model.eval()
        with torch.no_grad():
            loss, parts, _ = dpg_forward_loss(model, batch, PAPER_LOSS, None, cpu)
        model.train()
        return loss.item(), {k: v.item() for k, v in parts.items()}

    before, parts_before = evaluate()
    for _ in range(15):
        loss, parts, stats = dpg_train_step(model, opt, batch, PAPER_LOSS, 1.0)
        assert torch.isclose(loss, sum(parts.values())) and stats["grad_norm"] > 0
    after, parts_after = evaluate()
    assert after < 0.8 * before
    assert all(parts_after[k] < parts_before[k] for k in parts_before if parts_before[k] > 0)  # bce is 0


def test_config_file_defaults_and_validation(tmp_path: Path) -> None:
    shipped = ROOT / "pipelines" / "train_dpg.yaml"
    cfg = TrainDPGConfig.from_yaml(shipped)
    assert cfg == TrainDPGConfig()  # the shipped file shows the defaults, which are defined once
    assert cfg.dpg == DPGConfig.from_yaml(ROOT / "pipelines" / "dpg.yaml")  # referenced, not copied
    assert (cfg.train.lr, cfg.train.max_steps, cfg.data.batch_size, cfg.loss.dice_weight) == (1e-3, 20000, 16, 0.5)
    assert cfg.train.betas == (0.9, 0.999) and cfg.train.scheduler == "cosine"
    assert (cfg.loss.dice_reduction, cfg.loss.bce_weight) == ("batch", 0.1) and cfg.loss != PAPER_LOSS
    assert list(cfg.data.urls) == ["shards/*.tar"] and cfg.val.urls == () and cfg.data.pin_memory is True
    assert cfg.data.channel_shuffle is True and cfg.data.hflip is False
    assert TrainDPGConfig.from_dict(cfg.to_dict()) == cfg  # round trip

    base = cfg.to_dict()
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'"):
        TrainDPGConfig.from_dict({**base, "train": {**base["train"], "learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown key 'optim'"):
        TrainDPGConfig.from_dict({**base, "optim": {}})
    with pytest.raises(ConfigError, match="train.scheduler: expected one of constant, cosine, got 'linear'"):
        TrainDPGConfig.from_dict({**base, "train": {**base["train"], "scheduler": "linear"}})
    path = _write(tmp_path / "c.yaml", base)
    over = TrainDPGConfig.from_yaml(path, ["train.lr=1e-3", "data.hflip=true", "val.urls=[a.tar]", "dpg.embed_dim=60"])
    assert over.train.lr == 1e-3 and over.data.hflip is True and over.val.urls == ("a.tar",)
    assert over.dpg.embed_dim == 60
    over = TrainDPGConfig.from_yaml(shipped, ["dpg.embed_dim=60"])  # overrides reach a referenced section
    assert over.dpg.embed_dim == 60 and over.dpg.depths == (6, 6, 3, 3)
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'abc'"):
        TrainDPGConfig.from_yaml(path, ["train.lr=abc"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        TrainDPGConfig.from_yaml(path, ["lr"])
    with pytest.raises(ConfigError, match=r"unknown key 'dpg.depth'"):
        TrainDPGConfig.from_yaml(path, ["dpg.depth=3"])


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=2.5", "data.batch_size: expected an integer, got 2.5"),
    ("data.hflip='no'", "data.hflip: expected true or false, got 'no'"),
    ("dpg.qkv_bias='false'", "dpg.qkv_bias: expected true or false, got 'false'"),
    ("train.seed=1.5", "train.seed: expected an integer, got 1.5"),
    ("train.device=gpu", "train.device: expected one of cuda, cpu, got 'gpu'"),
    ("train.betas=[0.9]", "train.betas: expected 2 values, got 1"),
    ("val.every=true", "val.every: expected an integer, got True"),
    ("output.tensorboard=1", "output.tensorboard: expected true or false, got 1"),
    ("model.init_weights=3", "model.init_weights: expected a string, got 3"),
    ("loss.dice_weight=-1", "loss: dice_weight must be >= 0"),
])
def test_every_section_is_type_checked_with_the_dotted_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainDPGConfig.from_yaml(ROOT / "pipelines" / "train_dpg.yaml", [override])


def test_validation_shards_are_held_out(shards: Path) -> None:
    files = sorted(str(p.resolve()) for p in shards.glob("*.tar"))
    cfg = TrainDPGConfig.from_dict(_config(shards, Path("unused")))
    assert split_holdout(cfg) == (files[:2], files[2:])  # the last shard by default
    cfg = TrainDPGConfig.from_dict(_config(shards, Path("unused"), val={"urls": [files[0]]}))
    assert split_holdout(cfg) == (files[1:], files[:1])  # explicit validation shards leave training
    cfg = TrainDPGConfig.from_dict(_config(shards, Path("unused"), val={"every": 0}))
    assert split_holdout(cfg) == (files, [])
    cfg = TrainDPGConfig.from_dict(_config(shards, Path("unused"), data={"urls": [files[0]]}))
    with pytest.raises(ConfigError, match="gives 1 shard"):
        split_holdout(cfg)


def test_lr_schedule_closed_forms() -> None:
    t = TrainSettings(max_steps=110, warmup_steps=10, scheduler="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, t) == pytest.approx(0.1) and lr_factor(9, t) == pytest.approx(1.0)
    assert lr_factor(10, t) == pytest.approx(1.0) and lr_factor(110, t) == pytest.approx(0.1)
    assert lr_factor(60, t) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    constant = TrainSettings(scheduler="constant", warmup_steps=0)
    assert all(lr_factor(s, constant) == 1.0 for s in (0, 5000, 19999))


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], expected: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"haodiff-train {argv[0]}: error: "), err
    assert expected in err, err


def test_user_mistakes_get_a_one_line_message(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    config = _write(tmp_path / "c.yaml", _config(shards, run, train={"max_steps": 2, "device": "cpu"},
                                               val={"every": 0}, output={"ckpt_every": 1}))
    assert main(["dpg", "--config", str(config)]) == 0
    state_pt = run / "checkpoints" / "step-00000002" / "state.pt"

    # a resumable state given as starting weights, weights of another architecture
    _one_line_error(capsys, ["dpg", "--config", str(config), "--out", str(tmp_path / "a"),
                             "--set", f"model.init_weights={state_pt}"], "is a resumable training state (state.pt)")
    _one_line_error(capsys, ["dpg", "--config", str(config), "--out", str(tmp_path / "b"), "--set",
                             f"model.init_weights={run / 'dpg.pth'}", "--set", "dpg.embed_dim=6"],
                    "model.init_weights does not fit the dpg section")
    # resuming below the checkpoint's step, or a folder of the other stage
    _one_line_error(capsys, ["dpg", "--config", str(config), "--resume", "--max-steps", "1"],
                    "is at step 2, beyond train.max_steps=1")
    osd_run = tmp_path / "osd_run"
    CheckpointManager(osd_run / "checkpoints").save(5, {"step": 5, "models": {"prompt_encoder": {}}, "stage": "osd"})
    _one_line_error(capsys, ["dpg", "--config", str(config), "--resume", "--out", str(osd_run)],
                    f"{osd_run} holds a stage-2 run (osd): resume it with `haodiff-train osd --resume`")
    # a crop larger than the images: one message, not a hundred decode failures
    _one_line_error(capsys, ["dpg", "--config", str(config), "--out", str(tmp_path / "c"),
                             "--set", "data.crop_size=128"], "data.crop_size=128 is larger than the images")
    _one_line_error(capsys, ["dpg", "--config", str(config), "--out", str(tmp_path / "d"),
                             "--set", "data.crop_size=128", "--set", "data.num_workers=1"],
                    "data.crop_size=128 is larger than the images")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["dpg", "--config", str(config), "--out", str(tmp_path / "e"),
                                 "--set", "train.device=cuda"], "train.device=cuda but this torch build sees no CUDA")
    records = read_metrics(run / "metrics.jsonl")
    assert [r["train/skipped_samples"] for r in records if "train/loss" in r] == [0, 0]


def test_cli_end_to_end_outputs(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = _write(tmp_path / "c.yaml", _config(shards, tmp_path / "ignored"))
    assert main(["dpg", "--config", str(config), "--out", str(out), "--max-steps", "4"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val/loss" in r] == [3, 4]
    for r in records:
        if "train/loss" in r:
            parts = r["train/l1_hq"] + r["train/l1_residual"] + r["train/dice"] + r["train/bce"]
            t = TrainSettings(max_steps=4, device="cpu")
            assert r["train/loss"] == pytest.approx(parts, rel=1e-6)
            assert r["train/lr"] == pytest.approx(t.lr * lr_factor(r["step"], t))
    image = cv2.imread(str(out / "val" / "step-00000004.png"))
    assert image.shape == (2 * (SIZE + 2) + 2, 7 * (SIZE + 2) + 2, 3)  # 2 samples x 7 panels
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert (out / "loss.png").is_file() and yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert [p.name for p in CheckpointManager(out / "checkpoints").checkpoints()] == ["step-00000003", "step-00000004"]

    fresh = DPGNetwork(DPGConfig.from_dict(TINY_STAGE1_DPG))
    report = load_dpg_weights(fresh, out / "dpg.pth")  # official layout, strict
    assert report.ok and any("dead official" in reason for reason in report.ignored.values())
    trained = CheckpointManager.load(out / "checkpoints" / "step-00000004")["models"]["dpg"]
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, trained[name]), name

    assert main(["dpg", "--config", str(config), "--out", str(out)]) == 2  # would mix two runs


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(shards: Path, tmp_path: Path) -> None:
    # constant lr: a cosine schedule follows max_steps, which the split run changes with --max-steps
    cfg = _config(shards, tmp_path / "x",
                  train={"max_steps": 6, "device": "cpu", "warmup_steps": 2, "scheduler": "constant"})
    config = _write(tmp_path / "c.yaml", cfg)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["dpg", "--config", str(config), "--out", str(straight)]) == 0
    assert main(["dpg", "--config", str(config), "--out", str(split), "--max-steps", "3"]) == 0
    assert main(["dpg", "--config", str(config), "--out", str(split), "--resume"]) == 0
    expected = _losses(straight)
    assert [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert _losses(split) == expected  # bit-identical floats, drop path and warm-up included
    a = CheckpointManager.load(straight / "checkpoints" / "step-00000006")
    b = CheckpointManager.load(split / "checkpoints" / "step-00000006")
    for name, value in a["models"]["dpg"].items():
        assert torch.equal(value, b["models"]["dpg"][name]), name
    assert a["loader_step"] == b["loader_step"] == 6


def test_ema_is_the_running_average_of_every_step_exported_and_resumed(shards: Path, tmp_path: Path) -> None:
    cfg = _config(shards, tmp_path / "x", output={"ckpt_every": 1, "keep_last": 10},
                  train={"max_steps": 4, "device": "cpu", "warmup_steps": 1, "scheduler": "constant",
                         "ema_decay": 0.5})
    config = _write(tmp_path / "c.yaml", cfg)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["dpg", "--config", str(config), "--out", str(straight)]) == 0
    assert main(["dpg", "--config", str(config), "--out", str(split), "--max-steps", "2"]) == 0
    assert main(["dpg", "--config", str(config), "--out", str(split), "--resume"]) == 0

    initial = DPGNetwork(DPGConfig.from_dict(TINY_STAGE1_DPG), torch.Generator().manual_seed(0))
    expected = {n: p.detach().clone() for n, p in initial.named_parameters()}
    for step in range(1, 5):  # the shadow starts at the initial weights and halves towards each step's
        raw = CheckpointManager.load(straight / "checkpoints" / f"step-{step:08d}")["models"]["dpg"]
        expected = {n: 0.5 * v + 0.5 * raw[n] for n, v in expected.items()}
    final = CheckpointManager.load(straight / "checkpoints" / "step-00000004")
    assert any(not torch.equal(v, final["models"]["dpg"][n]) for n, v in final["ema"].items())
    for name, value in expected.items():
        torch.testing.assert_close(final["ema"][name], value, rtol=0, atol=1e-6)
    exported = DPGNetwork(DPGConfig.from_dict(TINY_STAGE1_DPG))
    assert load_dpg_weights(exported, straight / "dpg.pth").ok
    for name, value in exported.named_parameters():
        assert torch.equal(value, final["ema"][name]), name  # the file holds the EMA, not the raw weights
    resumed = CheckpointManager.load(split / "checkpoints" / "step-00000004")["ema"]
    assert all(torch.equal(resumed[n], v) for n, v in final["ema"].items())

    no_ema = _write(tmp_path / "n.yaml", _config(shards, tmp_path / "x", train={"max_steps": 1, "device": "cpu"}))
    assert main(["dpg", "--config", str(no_ema), "--out", str(tmp_path / "plain")]) == 0
    with pytest.raises(CheckpointMismatchError, match="has no EMA"):
        train(TrainDPGConfig.from_dict({**cfg, "output": {**cfg["output"], "dir": str(tmp_path / "plain")}}),
              resume=True, log=lambda m: None, ctx=DistContext())


def test_resume_check_reads_settings_added_since_the_checkpoint_as_their_defaults(tmp_path: Path) -> None:
    cfg = TrainDPGConfig.from_dict(_config(tmp_path, tmp_path / "run", data={"channel_shuffle": False}))
    lines: list[str] = []
    run = Run(cfg, DistContext(), "dpg", [], log=lines.append)
    saved = stream_settings(cfg.data, ["a.tar"])
    del saved["channel_shuffle"]  # a checkpoint written before the setting existed
    run.check_data_settings({"data": saved}, ["a.tar"])
    assert lines == []  # the setting's default (off) is what that run used
    run.check_data_settings({"data": {**saved, "channel_shuffle": True}}, ["a.tar"])
    run.check_data_settings({"data": saved}, ["b.tar"])
    assert len(lines) == 2 and all(line.startswith("data settings differ") for line in lines)


def _ddp_child(rank: int, world: int, port: int, cfg_dict: dict, report_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from haodiff_model.train.distributed import init_distributed, shutdown_distributed

    cfg = TrainDPGConfig.from_dict(cfg_dict)
    ctx = init_distributed("cpu")
    _, model = train(cfg, log=lambda m: None, ctx=ctx)
    keys = [k for b in islice(build_train_loader(cfg, split_holdout(cfg)[0], ctx, 0), 2) for k in b["key"]]
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps({"keys": keys, "params": digest,
                                                                "backend": ctx.backend}))
    shutdown_distributed()


def test_two_process_gloo_run_then_resume_on_one_process(shards: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ddp"
    cfg = _config(shards, out, train={"max_steps": 2, "device": "cpu"}, val={"samples": 2, "every": 2},
                  output={"dir": str(out), "log_every": 1, "ckpt_every": 2, "keep_last": 2})
    spawn_ranks(_ddp_child, (cfg, str(tmp_path)), 2, "2-process run")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["backend"] for r in reports] == ["gloo", "gloo"]
    assert reports[0]["keys"] != reports[1]["keys"]  # each rank reads its own slice of the stream
    assert reports[0]["params"] == reports[1]["params"]  # DDP kept the replicas identical
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r] == [1, 2]
    state = CheckpointManager.load(out / "checkpoints" / "step-00000002")
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    config = _write(tmp_path / "c.yaml", cfg)  # resume the 2-rank run on 1 process
    assert main(["dpg", "--config", str(config), "--resume", "--max-steps", "3"]) == 0
    assert "world size 2 -> 1" in capsys.readouterr().out
    final = CheckpointManager.load(out / "checkpoints" / "step-00000003")
    assert final["world_size"] == 1 and final["loader_step"] == 3
    assert all(int(s["step"]) == 3 for s in final["optimizers"]["adam"]["state"].values())
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3]


def test_bench_gpu_cpu_smoke(capsys: pytest.CaptureFixture) -> None:
    assert bench_gpu.main(["--json", "--steps", "1", "--warmup", "0", "--runs", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["smoke_test"] is True and report["train"]["pass"] is None
    for name in ("ours", "baseline", "baseline_tf32"):
        m = report["train"][name]
        assert m["batch"] == 2 and m["it_per_s"] > 0 and np.isfinite(m["final_loss"])
    assert report["train"]["ours"]["attention"] == "sdpa" and report["train"]["baseline"]["attention"] == "explicit"
    assert [report["train"][k]["precision"] for k in ("baseline", "baseline_tf32")] == ["fp32", "tf32"]
    faster = max(report["train"][k]["samples_per_s"] for k in ("baseline", "baseline_tf32"))
    assert report["train"]["speedup_per_sample"] == pytest.approx(report["train"]["ours"]["samples_per_s"] / faster)
    variants = report["prompt"]["variants"]
    assert variants["eager_bf16"]["median_ms"] > 0 and variants["cuda_graph_bf16"] == {"skipped": "needs CUDA"}
    batched = variants["eager_bf16_batch8"]
    assert batched["ms_per_image"] == pytest.approx(batched["median_ms"] / 8)
    assert report["prompt"]["best"] != "eager_bf16_batch8"  # the batch-1 target is judged on batch 1 only


def test_a_non_finite_loss_stops_the_run(shards: Path, tmp_path: Path) -> None:
    cfg = TrainDPGConfig.from_dict(_config(shards, tmp_path / "run", train={"max_steps": 6, "device": "cpu", "lr": 1e30,
                                                                           "grad_clip": None}, val={"every": 0}))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(cfg, log=lambda m: None, ctx=DistContext())
