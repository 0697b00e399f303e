"""The networks' from_pretrained / save_pretrained: a saved network comes back with the same
architecture, state and outputs without retyping its config, and a file of another architecture
fails with CheckpointMismatchError / LoraFileError naming the file."""

import dataclasses
import json

import pytest
import torch

from haodiff_model.io.official import DPG_FILE, IMG_ENCODER_FILE, CheckpointMismatchError, save_dpg
from haodiff_model.nets.dpg import DPGConfig, DPGFeatureExtractor, DPGNetwork
from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig

TINY_DPG = DPGConfig(img_size=32, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(3, 3, 2, 2), drop_path_rate=0.0)
TINY_PROMPT = PromptEmbedderConfig(dim_head=16, embed_dim=32, out_tokens=5, num_layers=1, num_heads_performer=2,
                                   num_heads_pool=4, pool_patch=4)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct branch weights and non-trivial norms, so a wrong key mapping changes the outputs."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(seed)))
    return module.eval()


def _x() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=_gen(1)) * 2 - 1


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_dpg_network_round_trip_rebuilds_architecture_state_and_outputs(tmp_path):
    cfg = dataclasses.replace(TINY_DPG, window_size=4, mlp_ratio=3.0)  # not the defaults
    net = _perturbed(DPGNetwork(cfg, _gen(3)), 4)
    path = net.save_pretrained(tmp_path / "run")
    assert path == tmp_path / "run" / DPG_FILE
    assert json.loads((tmp_path / "run" / "dpg.json").read_text())["swinir_kwargs"]["window_size"] == 4

    back, report = DPGNetwork.from_pretrained(tmp_path / "run", output_loading_info=True)
    assert type(back) is DPGNetwork and back.cfg == cfg
    assert report.ok
    _same_state(net, back)
    back.eval()
    with torch.no_grad():
        for ours, theirs in zip(net(_x()), back(_x())):
            assert torch.equal(ours, theirs)

    # the feature extractor of the same file: the trunk and branches, the heads reported and skipped
    fe = DPGFeatureExtractor.from_pretrained(path).eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fe(_x()), DPGFeatureExtractor.forward(net, _x())))


def test_official_dpg_file_takes_the_config_and_rejects_a_contradicting_one(tmp_path):
    net = _perturbed(DPGNetwork(TINY_DPG, _gen(3)), 4)
    path = save_dpg(net, tmp_path / "official.pth")  # the official layout: weights only
    with pytest.raises(CheckpointMismatchError, match=r"official\.pth carries no architecture"):
        DPGNetwork.from_pretrained(path)
    _same_state(net, DPGNetwork.from_pretrained(path, TINY_DPG))

    net.save_pretrained(path)  # now with dpg.json beside it
    with pytest.raises(CheckpointMismatchError, match=r"official\.json: dpg\.mlp_ratio \(settings 4\.0, weights 2\.0\)"):
        DPGNetwork.from_pretrained(path, dataclasses.replace(TINY_DPG, mlp_ratio=4.0))


def test_dpg_file_of_another_architecture_names_the_file(tmp_path):
    wide = DPGNetwork(dataclasses.replace(TINY_DPG, embed_dim=18), _gen(0))
    path = save_dpg(wide, tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatchError, match=r"wide\.pth: shape mismatch: .*conv_first\.conv_last\.weight: "
                       r"checkpoint \(18, 18, 3, 3\) vs model \(12, 12, 3, 3\)"):
        DPGNetwork.from_pretrained(path, TINY_DPG)
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        DPGNetwork.from_pretrained(tmp_path / "nothing.pth", TINY_DPG)


def test_prompt_encoder_round_trip_and_wrong_architecture(tmp_path):
    enc = _perturbed(DualPromptEncoder(TINY_DPG, TINY_PROMPT, _gen(5)), 6)
    path = enc.save_pretrained(tmp_path)
    assert path == tmp_path / IMG_ENCODER_FILE
    back = DualPromptEncoder.from_pretrained(tmp_path).eval()
    assert back.dpg_config == TINY_DPG and back.prompt_config == TINY_PROMPT
    _same_state(enc, back)
    with torch.no_grad():
        for ours, theirs in zip(enc(_x()), back(_x())):
            assert torch.equal(ours, theirs)

    # the kwargs of one architecture over the weights of another: caught by shape, file named
    obj = torch.load(path, weights_only=True)
    obj["performer_kwargs"] = {**obj["performer_kwargs"], "dim_head": 8}
    torch.save(obj, tmp_path / "tampered.pth")
    with pytest.raises(CheckpointMismatchError, match=r"tampered\.pth: shape mismatch: .*to_q\.weight"):
        DualPromptEncoder.from_pretrained(tmp_path / "tampered.pth")


def test_restorer_lora_round_trip_and_wrong_rank(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from haodiff_model.bench.osd import TINY_UNET_CONFIG, TINY_VAE_CONFIG
    from haodiff_model.io.official import LORA_FILE, LoraFileError
    from haodiff_model.nets.restorer import OneStepRestorer

    def restorer(seed: int, rank: int = 4) -> OneStepRestorer:
        torch.manual_seed(0)  # diffusers draws the base weights from the global RNG: same base for all
        r = OneStepRestorer.from_configs(TINY_UNET_CONFIG, TINY_VAE_CONFIG, lora_rank=rank, lora_alpha=8.0,
                                         generator=_gen(seed)).eval()
        with torch.no_grad():  # trained-looking adapters: B != 0
            for name, p in r.unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=_gen(seed + 7)))
        return r

    def eps(r: OneStepRestorer) -> torch.Tensor:
        z, ctx = torch.randn(1, 4, 8, 8, generator=_gen(2)), torch.randn(1, 5, 32, generator=_gen(3))
        with torch.no_grad():
            return r.predict_eps(z, ctx, -ctx)

    trained, fresh = restorer(1), restorer(2)
    path = trained.save_lora_weights(tmp_path)
    assert path == tmp_path / LORA_FILE
    assert not torch.equal(eps(fresh), eps(trained))
    assert fresh.load_lora_weights(path).ok
    torch.testing.assert_close(eps(fresh), eps(trained), rtol=0, atol=1e-6)  # alpha/r folded in and out
    with pytest.raises(LoraFileError, match=r"pytorch_lora_weights\.safetensors: shape mismatch"):
        restorer(3, rank=2).load_lora_weights(tmp_path)
