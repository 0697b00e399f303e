"""The loop closed on tiny models: stage 1 -> stage 2 -> haodiff-restore -> haodiff-eval, with the
DPG architecture typed once (stage 1's config) and read from the files after that."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

pytest.importorskip("diffusers")
from haodiff_data.shards.schema import encode_sample  # noqa: E402
from haodiff_model.bench.osd import TINY_PROMPT  # noqa: E402
from haodiff_model.bench.restore import write_tiny_folders  # noqa: E402
from haodiff_model.eval.cli import main as eval_main  # noqa: E402
from haodiff_model.losses.dists import DISTS_TOTAL_CHANNELS  # noqa: E402
from haodiff_model.losses.vgg import vgg16_features  # noqa: E402
from haodiff_model.restore.cli import main as restore_main  # noqa: E402
from haodiff_model.restore.settings import read_dpg_sidecar, read_settings  # noqa: E402
from haodiff_model.train.dpg import TrainDPGConfig  # noqa: E402
from haodiff_model.train.dpg import train as train_dpg  # noqa: E402
from haodiff_model.train.osd import TrainOSDConfig  # noqa: E402
from haodiff_model.train.osd import train as train_osd  # noqa: E402

SIZE = 32
DPG = {"img_size": SIZE, "embed_dim": 12, "depths": [2, 2, 1, 1], "num_heads": [3, 3, 2, 2], "window_size": 8,
       "drop_path_rate": 0.0}
pytestmark = pytest.mark.usefixtures("one_thread", "no_onednn")


def _shards(root: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "shards"
    folder.mkdir()
    for s in range(2):
        with wds.TarWriter(str(folder / f"train-r000-{s:06d}.tar"), encoder=False, mtime=0) as tar:
            for i in range(4):
                hq = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                lq = np.clip(hq.astype(np.int16) + rng.integers(-30, 31, hq.shape), 0, 255).astype(np.uint8)
                mask = np.zeros((SIZE, SIZE), np.uint8)
                tar.write(encode_sample(f"s{s}k{i}", hq, lq, mask, mask, {"index": i}))
    return folder


def test_train_then_restore_then_eval_without_retyping_the_architecture(tmp_path, capsys):
    shards = _shards(tmp_path)
    data = {"urls": [str(shards)], "batch_size": 2, "num_workers": 0, "epoch_length": 4, "shuffle_buffer": 4,
            "pin_memory": False}
    dpg_out = tmp_path / "dpg"
    train_dpg(TrainDPGConfig.from_dict({
        "dpg": DPG, "data": data, "train": {"max_steps": 2, "device": "cpu"}, "val": {"samples": 2, "every": 2},
        "output": {"dir": str(dpg_out), "log_every": 1, "ckpt_every": 2}}), log=lambda _: None)
    assert read_dpg_sidecar(dpg_out / "dpg.pth")["embed_dim"] == 12

    base, _ = write_tiny_folders(tmp_path / "base")
    torch.save({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, tmp_path / "vgg16.pth")
    shape = (1, DISTS_TOTAL_CHANNELS, 1, 1)
    torch.save({"alpha": torch.rand(shape) + 0.1, "beta": torch.rand(shape) + 0.1}, tmp_path / "dists.pt")
    osd_out = tmp_path / "osd"
    notes: list[str] = []
    cfg = TrainOSDConfig.from_dict({  # no dpg section: the architecture comes from dpg.json
        "prompt_embedder": TINY_PROMPT,
        "model": {"pretrained_model": str(base), "dpg_weights": str(dpg_out / "dpg.pth"), "lora_rank": 4,
                  "lora_alpha": 4.0, "gradient_checkpointing": False},
        "discriminator": {"backbone": "none"},
        "loss": {"vgg16_weights": str(tmp_path / "vgg16.pth"), "dists_weights": str(tmp_path / "dists.pt")},
        "data": data, "train": {"max_steps": 2, "device": "cpu", "precision": "fp32"}, "val": {"every": 2},
        "output": {"dir": str(osd_out), "log_every": 1, "ckpt_every": 2, "tensorboard": False}})
    train_osd(cfg, log=notes.append)
    assert any("DPG architecture from" in n and "dpg.embed_dim" in n for n in notes)
    settings = read_settings(osd_out)
    assert settings.dpg["embed_dim"] == 12 and settings.lora_rank == 4 and settings.timestep == 199

    photo = Path(__file__).resolve().parent.parent / "haodiff_data" / "assets" / "zidane.jpg"
    hq_dir, lq_dir = tmp_path / "hq", tmp_path / "lq"
    hq_dir.mkdir()
    lq_dir.mkdir()
    big = Image.open(photo).convert("RGB")
    rng = np.random.default_rng(1)
    for i in range(3):
        hq = np.asarray(big.crop((200 * i, 100, 200 * i + 240, 300)).resize((48, 40)))
        lq = np.clip(hq + rng.normal(0, 12, hq.shape), 0, 255).astype(np.uint8)
        Image.fromarray(hq).save(hq_dir / f"p{i}.png")
        Image.fromarray(lq).save(lq_dir / f"p{i}.png")
    restored = tmp_path / "restored"
    assert restore_main([str(lq_dir), "--out", str(restored), "--base", str(base), "--weights", str(osd_out),
                         "--no-progress"]) == 0
    assert sorted(p.name for p in restored.glob("*.png")) == ["p0.png", "p1.png", "p2.png"]
    assert eval_main(["--restored", str(restored), "--reference", str(hq_dir), "--inputs", str(lq_dir),
                      "--vgg16", str(tmp_path / "vgg16.pth"), "--dists-weights", str(tmp_path / "dists.pt"),
                      "--no-progress"]) == 0
    report = json.loads((tmp_path / "restored-eval" / "metrics.json").read_text())
    assert report["count"] == 3 and set(report["mean"]) == {"psnr", "ssim", "psnr_y", "ssim_y", "dists"}
    assert all(np.isfinite(v) for v in report["mean"].values())
    capsys.readouterr()
