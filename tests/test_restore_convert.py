"""haodiff-restore convert: stage-1 dpg.pth (+ dpg.json) and prompt embedders -> img_encoder_weights.pth."""

import pytest
import torch

from haodiff_model.bench.osd import TINY_DPG
from haodiff_model.bench.restore import write_tiny_folders
from haodiff_model.io.official import load_img_encoder, save_dpg
from haodiff_model.nets.dpg import DPGConfig, DPGNetwork
from haodiff_model.restore.convert import main
from haodiff_model.restore.settings import write_dpg_sidecar

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    cfg = DPGConfig.from_dict(TINY_DPG)
    net = DPGNetwork(cfg, torch.Generator().manual_seed(5))
    save_dpg(net, root / "dpg.pth")
    _, weights = write_tiny_folders(root)
    return root, net, weights


def test_convert_keeps_the_stage1_dpg_and_the_given_embedders(stage1, tmp_path, capsys):
    root, net, weights = stage1
    assert main(["--dpg", str(root / "dpg.pth"), "--out", str(tmp_path / "a"), "--prompt-from", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "carries no architecture" in err and "--dpg-config" in err
    write_dpg_sidecar(root / "dpg.pth", net.cfg.to_swinir_kwargs())
    assert main(["--dpg", str(root / "dpg.pth"), "--out", str(tmp_path / "a"), "--prompt-from", str(weights)]) == 0
    encoder, report = load_img_encoder(tmp_path / "a")
    source, _ = load_img_encoder(weights)
    assert report.ok and encoder.dpg_config == net.cfg
    own = encoder.feature_extractor.state_dict()
    for key, value in own.items():
        assert torch.equal(value, net.state_dict()[key]), key
    for key, value in encoder.main_performer.state_dict().items():
        assert torch.equal(value, source.main_performer.state_dict()[key]), key
    for key, value in encoder.aux_performer.state_dict().items():
        assert torch.equal(value, source.aux_performer.state_dict()[key]), key


def test_convert_with_fresh_embedders_and_a_contradicting_config(stage1, tmp_path, capsys):
    root, net, _ = stage1
    write_dpg_sidecar(root / "dpg.pth", net.cfg.to_swinir_kwargs())
    assert main(["--dpg", str(root / "dpg.pth"), "--out", str(tmp_path / "b"), "--seed", "3"]) == 0
    encoder, report = load_img_encoder(tmp_path / "b")
    assert report.ok and encoder.prompt_config.embed_dim == 1024
    (tmp_path / "c.yaml").write_text("dpg:\n  img_size: 64\n  embed_dim: 24\n  depths: [2, 2, 2, 2]\n"
                                     "  num_heads: [3, 3, 2, 2]\n")
    assert main(["--dpg", str(root / "dpg.pth"), "--out", str(tmp_path / "c"), "--dpg-config",
                 str(tmp_path / "c.yaml")]) == 2
    assert "dpg.embed_dim (settings 24, weights 12)" in capsys.readouterr().err


def test_dpg_prediction_pictures(stage1, tmp_path, capsys):
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from haodiff_model.restore.cli import main as restore_main

    root, net, _ = stage1
    write_dpg_sidecar(root / "dpg.pth", net.cfg.to_swinir_kwargs())
    photo = Path(__file__).resolve().parent.parent / "haodiff_data" / "assets" / "bus.jpg"
    Image.open(photo).resize((60, 80)).save(tmp_path / "bus.png")
    assert restore_main(["dpg", str(tmp_path / "bus.png"), "--dpg", str(root / "dpg.pth"), "--out",
                         str(tmp_path / "o"), "--no-progress"]) == 0
    panel = np.asarray(Image.open(tmp_path / "o" / "bus.png"))
    assert panel.shape == (80, 4 * 60, 3)
    lq = np.asarray(Image.open(tmp_path / "bus.png"))
    assert np.abs(panel[:, :60].astype(int) - lq).max() <= 1  # first panel: the input itself
    assert "restored 1" in capsys.readouterr().out
