"""pytorch_lora_weights.safetensors interchange: official key layout, save/load round trip, the
official merge path and diffusers' own loader giving the PEFT UNet's outputs, files written by
diffusers' save_lora_weights loading into ours, and mismatches reported by name."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from haodiff_model.bench.osd import TINY_UNET_CONFIG  # noqa: E402
from haodiff_model.io.official import (  # noqa: E402
    LORA_FILE,
    LoraFileError,
    load_lora_weights,
    lora_modules_in,
    merge_lora_into_unet,
    read_lora_file,
    save_lora_weights,
)
from haodiff_model.nets.restorer import add_unet_lora, lora_target_modules  # noqa: E402

RANK = 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(TINY_UNET_CONFIG).state_dict()


def _plain(base_state) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_config(TINY_UNET_CONFIG)
    unet.load_state_dict(base_state)
    return unet.eval()


def _lora_unet(base_state, alpha: float = RANK, seed: int = 1) -> UNet2DConditionModel:
    unet = _plain(base_state)
    add_unet_lora(unet, RANK, alpha, generator=_gen(seed))
    with torch.no_grad():  # trained-looking adapters: B != 0
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=_gen(seed + 7)))
    return unet


def _out(unet) -> torch.Tensor:
    z, ehs = torch.randn(2, 4, 16, 16, generator=_gen(11)), torch.randn(2, 7, 32, generator=_gen(12))
    with torch.no_grad():
        return unet(z, torch.tensor([199]), ehs).sample


def _peft_adapters(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A, B) read straight from PEFT's parameters (`<path>.lora_A.default.weight`)."""
    params = dict(unet.named_parameters())
    return {n[: -len(".lora_A.default.weight")]: (p, params[n.replace("lora_A", "lora_B")])
            for n, p in params.items() if n.endswith(".lora_A.default.weight")}


def test_written_file_has_the_official_layout_of_the_peft_adapters(tmp_path, base_state):
    """model_spec A.7: `unet.<module path>.lora_A/B.weight`, PEFT shapes (conv A (r, in, kh, kw), B (out, r, 1, 1)),
    float32, for exactly the adapted modules; read back with plain safetensors."""
    unet = _lora_unet(base_state)
    adapters = _peft_adapters(unet)
    path = save_lora_weights(unet, tmp_path)
    assert path == tmp_path / LORA_FILE
    sd = load_file(str(path))
    assert set(sd) == {f"unet.{m}.lora_{ab}.weight" for m in adapters for ab in "AB"}
    for module, (a, b) in adapters.items():
        assert torch.equal(sd[f"unet.{module}.lora_A.weight"], a) and torch.equal(sd[f"unet.{module}.lora_B.weight"], b)
    conv = "unet.down_blocks.0.resnets.0.conv1"
    assert sd[f"{conv}.lora_A.weight"].shape == (RANK, 32, 3, 3) and sd[f"{conv}.lora_B.weight"].shape == (32, RANK, 1, 1)
    lin_a = sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"]
    assert lin_a.shape == (RANK, 32)
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_a_hand_built_file_loads_as_the_hand_merged_unet(tmp_path, base_state):
    """A file made with plain torch + safetensors in the official layout gives, through our loader,
    the outputs of the base UNet with W + alpha/r * B A merged by hand (alpha = r: scale 1)."""
    modules = sorted(_peft_adapters(_lora_unet(base_state)))
    g = _gen(21)
    merged = _plain(base_state)
    hand = {}
    with torch.no_grad():
        for module in modules:
            weight = merged.get_submodule(module).weight
            out_ch, in_ch, *kernel = weight.shape
            a = 0.1 * torch.randn(RANK, in_ch, *kernel, generator=g)
            b = 0.1 * torch.randn(out_ch, RANK, *([1, 1] if kernel else []), generator=g)
            hand[f"unet.{module}.lora_A.weight"], hand[f"unet.{module}.lora_B.weight"] = a, b
            weight += (b.reshape(out_ch, RANK) @ a.reshape(RANK, -1)).reshape(weight.shape)
    save_file(hand, str(tmp_path / LORA_FILE))
    ours = _lora_unet(base_state, seed=5)
    report = load_lora_weights(ours, tmp_path)
    assert report.ok and sorted(report.loaded) == modules
    torch.testing.assert_close(_out(ours), _out(merged), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_out(_plain(base_state)), _out(merged), atol=1e-3)  # the adapters matter


@pytest.mark.parametrize("alpha", [RANK, 2 * RANK])
def test_official_merge_and_diffusers_loader_reproduce_the_peft_unet(tmp_path, base_state, alpha):
    unet = _lora_unet(base_state, alpha=alpha)
    expected = _out(unet)
    path = save_lora_weights(unet, tmp_path / "w.safetensors")
    # the official merge, with its own rank/alpha arguments (16/16 for the release: scale 1)
    merged = _plain(base_state)
    names = merge_lora_into_unet(merged, path, lora_rank=RANK, lora_alpha=RANK)
    assert len(names) == len(lora_target_modules(merged))
    torch.testing.assert_close(_out(merged), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_out(_plain(base_state)), expected, atol=1e-3)  # the LoRA matters
    # diffusers' non-merged path: alpha = r for files without alpha entries
    theirs = _plain(base_state)
    theirs.load_lora_adapter(read_lora_file(path), prefix="unet", adapter_name="haodiff")
    torch.testing.assert_close(_out(theirs), expected, rtol=1e-5, atol=1e-5)
    # and back into ours with the trained alpha
    ours = _lora_unet(base_state, alpha=alpha, seed=9)
    load_lora_weights(ours, path)
    torch.testing.assert_close(_out(ours), expected, rtol=1e-6, atol=1e-6)


def test_a_file_written_by_diffusers_loads_into_ours(tmp_path, base_state):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    unet = _lora_unet(base_state)
    StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    ours = _lora_unet(base_state, seed=3)
    assert load_lora_weights(ours, tmp_path).ok
    assert torch.equal(_out(ours), _out(unet))


def test_mismatches_are_reported_by_name(tmp_path, base_state):
    sd = load_file(str(save_lora_weights(_lora_unet(base_state), tmp_path)))
    dropped = "unet.conv_in.lora_B.weight"
    del sd[dropped]
    sd["unet.time_embedding.linear_1.lora_A.weight"] = torch.zeros(RANK, 32)
    with pytest.raises(LoraFileError, match=r"missing \(1\): unet\.conv_in\.lora_B\.weight") as err:
        load_lora_weights(_lora_unet(base_state), sd)
    assert "unexpected (1): unet.time_embedding.linear_1.lora_A.weight" in str(err.value)
    report = load_lora_weights(_lora_unet(base_state), sd, strict=False)
    assert not report.ok and "conv_in" not in report.loaded and len(report.loaded) == len(
        lora_target_modules(_plain(base_state))) - 1

    wrong_rank = load_file(str(tmp_path / LORA_FILE))
    wrong_rank["unet.conv_in.lora_A.weight"] = torch.zeros(RANK + 1, 4, 3, 3)
    with pytest.raises(LoraFileError, match="shape mismatch: unet.conv_in.lora_A.weight"):
        load_lora_weights(_lora_unet(base_state), wrong_rank)
    with pytest.raises(LoraFileError, match="mixes ranks"):
        lora_modules_in(wrong_rank)
    with pytest.raises(LoraFileError, match=r"conv LoRA must be A \(r=4"):
        merge_lora_into_unet(_plain(base_state), wrong_rank, lora_rank=RANK, lora_alpha=RANK)
    legacy = {"unet.conv_in.lora.down.weight": torch.zeros(RANK, 4, 3, 3)}
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    with pytest.raises(LoraFileError, match="not official-layout"):
        lora_modules_in(read_lora_file(tmp_path / "legacy.safetensors"))
    with pytest.raises(LoraFileError, match="does not process"):
        merge_lora_into_unet(_plain(base_state), legacy)


def test_a_unet_built_from_the_file_targets_loads_any_module_set(tmp_path, base_state):
    """Official weights whose module set differs from ours: build the adapters from the file."""
    subset = [t for t in lora_target_modules(_plain(base_state)) if "attn" in t]
    unet = _plain(base_state)
    add_unet_lora(unet, RANK, RANK, targets=subset, generator=_gen(2))
    path = save_lora_weights(unet, tmp_path)
    names, rank = lora_modules_in(read_lora_file(path))
    ours = _plain(base_state)
    add_unet_lora(ours, rank, rank, targets=names, generator=_gen(4))
    assert load_lora_weights(ours, path).ok
    with pytest.raises(ValueError, match="not in the UNet"):
        add_unet_lora(_plain(base_state), RANK, RANK, targets=["down_blocks.9.nothing"])
