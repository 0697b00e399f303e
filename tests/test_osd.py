"""One-step restorer (nets/restorer.py) and SDXL conditioning heads (nets/sdxl_cond.py): schedule value, the x0
and CFG math against a hand computation, one batched UNet call, the LoRA target rule, loading
from a diffusers folder, and the img_encoder_weights.pth round trip with embedding changers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402

from haodiff_model.bench.osd import TINY_DPG, TINY_SDXL_UNET_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG  # noqa: E402
from haodiff_model.io.official import CheckpointMismatchError, load_img_encoder  # noqa: E402
from haodiff_model.nets.dpg import DPGConfig  # noqa: E402
from haodiff_model.nets.restorer import (  # noqa: E402
    SD21_BASE_SCHEDULER_CONFIG,
    SD21_BASE_UNET_CONFIG,
    OneStepRestorer,
    add_unet_lora,
    alphas_cumprod_from_config,
    cast_frozen_,
    lora_target_modules,
)
from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig  # noqa: E402
from haodiff_model.nets.sdxl_cond import (  # noqa: E402
    SDXLConditioner,
    load_sdxl_conditioner,
    save_img_encoder_with_changers,
)

ABAR_199 = 0.7552381
TOKENS, DIM = 7, 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _restorer(seed: int = 0, **kw) -> OneStepRestorer:
    torch.manual_seed(seed)  # diffusers draws its own initial weights from the global RNG
    r = OneStepRestorer.from_configs(TINY_UNET_CONFIG, TINY_VAE_CONFIG, lora_rank=4, lora_alpha=4,
                                     generator=_gen(seed), **kw)
    with torch.no_grad():  # a non-zero LoRA so the adapter takes part in every check
        for name, p in r.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=_gen(seed + 1)))
    return r.eval()


def _inputs(seed: int = 3, batch: int = 2):
    g = _gen(seed)
    lq = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    return lq, torch.randn(batch, TOKENS, DIM, generator=g), torch.randn(batch, TOKENS, DIM, generator=g)


def test_abar_199_of_the_sd21_schedule():
    abar = alphas_cumprod_from_config(SD21_BASE_SCHEDULER_CONFIG)
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    closed = np.cumprod(1 - betas)
    assert abar.shape == (1000,) and abar.dtype == torch.float32
    assert abar[199].item() == pytest.approx(ABAR_199, abs=1e-7)
    np.testing.assert_allclose(abar.numpy(), closed, rtol=1e-6)
    with pytest.raises(ValueError, match="v_prediction"):
        alphas_cumprod_from_config({**SD21_BASE_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})


def test_shapes_and_batch_items_are_restored_independently():
    r = _restorer(sample_latent=False)  # the latent mode: no noise, so items can be compared one by one
    lq, pos, neg = _inputs(batch=3)
    with torch.no_grad():
        out = r(lq, pos, neg)
        alone = [r(lq[i:i + 1], pos[i:i + 1], neg[i:i + 1]) for i in range(3)]
        raw = r.vae.decode(out.latent / 0.18215).sample
    assert out.image.shape == (3, 3, 32, 32) and out.latent.shape == (3, 4, 16, 16)
    assert out.latent.dtype == torch.float32
    for i, single in enumerate(alone):
        torch.testing.assert_close(out.latent[i], single.latent[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.image[i], single.image[0], rtol=0, atol=1e-4)
    assert not torch.allclose(out.image[0], out.image[1], atol=1e-3)  # the items do differ
    # the decoder overshoots [-1, 1] here; the image is the decode clamped exactly there
    assert raw.abs().max() > 1 and torch.equal(out.image, raw.clamp(-1, 1))
    with pytest.raises(ValueError, match="prompts must both be"):
        r(lq, pos, neg[:1])


def test_x0_and_cfg_match_hand_computation_with_one_batched_unet_call():
    r = _restorer()
    lq, pos, neg = _inputs()
    calls = []
    hook = r.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        (args[0].shape[0], kwargs["encoder_hidden_states"].clone())), with_kwargs=True)
    with torch.no_grad():
        out = r(lq, pos, neg, generator=_gen(5))
    hook.remove()
    assert len(calls) == 1 and calls[0][0] == 4  # [z, z] in one call
    assert torch.equal(calls[0][1], torch.cat([neg, pos]))  # official order: negative first

    with torch.no_grad():  # separate, unbatched reference
        z = r.vae.encode(lq).latent_dist.sample(_gen(5)) * 0.18215
        t = torch.tensor([199])
        e_pos = r.unet(z, t, encoder_hidden_states=pos).sample
        e_neg = r.unet(z, t, encoder_hidden_states=neg).sample
    eps = (e_neg + 3.5 * (e_pos - e_neg)).double().numpy()
    x0 = (z.double().numpy() - math.sqrt(1 - ABAR_199) * eps) / math.sqrt(ABAR_199)
    np.testing.assert_allclose(out.latent.numpy(), x0, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        image = r.vae.decode(out.latent / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(out.image, image)


def test_cfg_off_runs_the_positive_prompt_only_and_mode_is_deterministic():
    r = _restorer(cfg_scale=1.0, sample_latent=False)
    lq, pos, neg = _inputs()
    with torch.no_grad():
        a = r(lq, pos, neg).latent
        b = r(lq, pos, torch.zeros_like(neg)).latent
        z = r.vae.encode(lq).latent_dist.mode() * 0.18215
        eps = r.unet(z, torch.tensor([199]), encoder_hidden_states=pos).sample
    assert torch.equal(a, b)
    torch.testing.assert_close(a, r.x0_from_eps(z, eps))


def _osediff_targets(unet: nn.Module) -> list[str]:
    """OSEDiff's rule, written as it is: parameter names (no bias/norm) containing a pattern."""
    patterns = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
                "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
    out = []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        if any(p in name for p in patterns):
            out.append(name.removesuffix(".weight"))
    return out


def test_lora_targets_follow_the_osediff_rule_and_full_sd21_counts():
    unet = UNet2DConditionModel.from_config(dict(TINY_UNET_CONFIG, use_linear_projection=False))
    targets = lora_target_modules(unet)
    assert sorted(targets) == sorted(_osediff_targets(unet))
    assert not any("time_emb" in t for t in targets) and "conv_in" in targets and "conv_out" in targets

    with torch.device("meta"):
        full = UNet2DConditionModel.from_config(SD21_BASE_UNET_CONFIG)
    targets = lora_target_modules(full)
    assert sorted(targets) == sorted(_osediff_targets(full))
    kinds = [type(full.get_submodule(t)) for t in targets]
    assert len(targets) == 258 and kinds.count(nn.Linear) == 192 and kinds.count(nn.Conv2d) == 66
    add_unet_lora(full, rank=16, alpha=16)
    lora = sum(p.numel() for n, p in full.named_parameters() if ".lora_" in n)
    assert lora == 16_222_848
    assert sum(p.numel() for p in full.parameters() if p.requires_grad) == lora


def test_fresh_lora_is_the_base_model_and_only_lora_trains():
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(TINY_UNET_CONFIG)
    adapted = UNet2DConditionModel.from_config(TINY_UNET_CONFIG)
    adapted.load_state_dict(base.state_dict())
    add_unet_lora(adapted, rank=4, alpha=4, generator=_gen(1))
    z, ehs = torch.randn(2, 4, 16, 16, generator=_gen(2)), torch.randn(2, TOKENS, DIM, generator=_gen(3))
    with torch.no_grad():
        assert torch.equal(adapted(z, 199, ehs).sample, base(z, 199, ehs).sample)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    a = adapted.get_submodule("conv_in").lora_A["default"].weight
    assert a.std().item() == pytest.approx(1 / 4, rel=0.3)  # peft "gaussian": N(0, 1/r)
    again = UNet2DConditionModel.from_config(TINY_UNET_CONFIG)
    add_unet_lora(again, rank=4, alpha=4, generator=_gen(1))
    assert torch.equal(again.get_submodule("conv_in").lora_A["default"].weight, a)  # from the generator only


def test_gradients_reach_lora_and_prompts_with_checkpointing_unchanged():
    lq, pos, neg = _inputs()
    grads = []
    for checkpointing in (False, True):
        r = _restorer().train()
        r.enable_gradient_checkpointing(checkpointing)
        p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        out = r(lq, p, n, generator=_gen(5))
        out.image.square().mean().backward()
        lora = {k: v.grad for k, v in r.unet.named_parameters() if v.requires_grad}
        assert all(g is not None for g in lora.values()) and p.grad is not None and n.grad is not None
        assert all(v.grad is None for v in r.vae.parameters())
        grads.append((lora, p.grad))
    for k in grads[0][0]:
        torch.testing.assert_close(grads[0][0][k], grads[1][0][k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_cast_frozen_keeps_lora_in_float32():
    r = _restorer()
    cast_frozen_(r, torch.bfloat16)
    for name, p in r.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name


def test_from_pretrained_reads_a_local_diffusers_folder(tmp_path):
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(TINY_UNET_CONFIG).save_pretrained(tmp_path / "sd" / "unet")
    AutoencoderKL.from_config(TINY_VAE_CONFIG).save_pretrained(tmp_path / "sd" / "vae")
    DDIMScheduler.from_config(SD21_BASE_SCHEDULER_CONFIG).save_pretrained(tmp_path / "sd" / "scheduler")
    r = OneStepRestorer.from_pretrained(tmp_path / "sd", lora_rank=4, lora_alpha=4, generator=_gen(0))
    assert r.abar.item() == pytest.approx(ABAR_199, abs=1e-7)
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet")
    torch.testing.assert_close(r.unet.get_submodule("conv_in").base_layer.weight, ref.conv_in.weight, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OneStepRestorer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks \['vae', 'scheduler'\]"):
        OneStepRestorer.from_pretrained(tmp_path / "partial")


# --- SDXL conditioning heads ------------------------------------------------------------------

DPG = DPGConfig.from_dict(TINY_DPG)


def _prompt(light: bool) -> PromptEmbedderConfig:
    return PromptEmbedderConfig(dim_head=16, embed_dim=DIM, out_tokens=TOKENS, num_layers=1, num_heads_performer=2,
                                num_heads_pool=4, pool_patch=4, light_changer=light)


def test_official_changer_names_shapes_and_sizes():
    with torch.device("meta"):
        full, light = SDXLConditioner(), SDXLConditioner(light=True)
    assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == {
        "embedding_changer1.linear1.weight": (512, 1024), "embedding_changer1.linear1.bias": (512,),
        "embedding_changer1.linear2.weight": (2048, 512), "embedding_changer1.linear2.bias": (2048,),
        "embedding_changer2.linear.weight": (1280, 77 * 1024)}
    assert sum(p.numel() for p in full.embedding_changer2.parameters()) == 100_925_440
    assert sum(p.numel() for p in full.embedding_changer1.parameters()) == 1_575_424
    assert {k for k in light.state_dict() if k.startswith("embedding_changer2")} == {
        "embedding_changer2.0.query_tokens", "embedding_changer2.0.attn_pool.in_proj_weight",
        "embedding_changer2.0.attn_pool.in_proj_bias", "embedding_changer2.0.attn_pool.out_proj.weight",
        "embedding_changer2.0.attn_pool.out_proj.bias", "embedding_changer2.1.linear.weight"}


@pytest.mark.parametrize("light", [False, True])
def test_changer_outputs_match_the_formula_and_feed_an_sdxl_unet(light):
    cond = SDXLConditioner.for_unet(TINY_SDXL_UNET_CONFIG, embed_dim=DIM, tokens=TOKENS, light=light,
                                    generator=_gen(0))
    x = torch.randn(2, TOKENS, DIM, generator=_gen(1), requires_grad=True)
    ehs, added = cond(x, image_size=(32, 48))
    assert ehs.shape == (2, TOKENS, 48) and added["text_embeds"].shape == (2, 24)
    assert torch.equal(added["time_ids"], torch.tensor([[32.0, 48, 0, 0, 32, 48]] * 2))
    c1 = cond.embedding_changer1
    silu = nn.functional.silu
    torch.testing.assert_close(ehs, silu(silu(x @ c1.linear1.weight.T + c1.linear1.bias) @ c1.linear2.weight.T
                                         + c1.linear2.bias))
    again = SDXLConditioner.for_unet(TINY_SDXL_UNET_CONFIG, embed_dim=DIM, tokens=TOKENS, light=light,
                                     generator=_gen(0))
    assert all(torch.equal(a, b) for a, b in zip(cond.state_dict().values(), again.state_dict().values()))
    if light:  # nn.MultiheadAttention's initial state: zero biases
        attn = cond.embedding_changer2[0].attn_pool
        assert not attn.in_proj_bias.any() and not attn.out_proj.bias.any()
        pool = nn.MultiheadAttention(DIM, 2, batch_first=True)
        pool.load_state_dict(cond.embedding_changer2[0].attn_pool.state_dict())
        pooled, _ = pool(cond.embedding_changer2[0].query_tokens.expand(2, -1, -1), x, x)
        expected = silu(pooled[:, 0] @ cond.embedding_changer2[1].linear.weight.T)
    else:
        expected = silu(x.reshape(2, -1) @ cond.embedding_changer2.linear.weight.T)
    torch.testing.assert_close(added["text_embeds"], expected)
    (ehs.sum() + added["text_embeds"].sum()).backward()
    assert x.grad is None  # detached: the discriminator never trains the prompt embedder
    unet = UNet2DConditionModel.from_config(TINY_SDXL_UNET_CONFIG)
    with torch.no_grad():
        assert unet(torch.randn(2, 4, 8, 8), 10, ehs, added_cond_kwargs=added).sample.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("light", [False, True])
def test_img_encoder_file_with_changers_round_trips(tmp_path, light):
    enc = DualPromptEncoder(DPG, _prompt(light), _gen(0)).eval()
    cond = SDXLConditioner(DIM, TOKENS, 48, 24, light=light, generator=_gen(1))
    path = save_img_encoder_with_changers(enc, cond, tmp_path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model_state_dict", "swinir_kwargs", "performer_kwargs"}
    assert raw["performer_kwargs"]["light_changer"] is light
    changer_keys = {k for k in raw["model_state_dict"] if k.startswith("embedding_changer")}
    assert changer_keys == set(cond.state_dict())

    loaded_enc, report = load_img_encoder(path)
    reasons = report.ignored_by_reason()
    changer_reasons = [r for r in reasons if r.startswith("official training-only")]
    assert report.ok and len(changer_reasons) == 1 and set(reasons[changer_reasons[0]]) == changer_keys
    loaded, creport = load_sdxl_conditioner(tmp_path)
    assert creport.ok and loaded.light is light
    x = torch.randn(2, 3, 64, 64, generator=_gen(2))
    with torch.no_grad():
        pos, _ = enc(x)
        assert torch.equal(loaded_enc.eval()(x)[0], pos)
        a, b = cond(pos), loaded(pos)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["text_embeds"], b[1]["text_embeds"])

    with pytest.raises(ValueError, match="light_changer"):
        save_img_encoder_with_changers(enc, SDXLConditioner(DIM, TOKENS, 48, 24, light=not light), tmp_path / "x")
    plain = save_img_encoder_with_changers(enc, None, tmp_path / "plain")
    with pytest.raises(CheckpointMismatchError, match="no embedding_changer1"):
        load_sdxl_conditioner(plain)
