import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from haodiff_model.nets.discriminator import (  # noqa: E402
    LatentDiscriminator,
    discriminator_gan_loss,
    generator_gan_loss,
    noise_to_random_t,
)

TINY = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=8,
)
# SD2.1-base topology (3 cross-attention down blocks + 1 plain, 3 downsamplers, linear
# projections) at toy width: a 64x64 latent must give an 8x8 bottleneck, as the real one does.
SD21_LIKE = dict(
    TINY,
    sample_size=64,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(2, 2, 4, 4),
    use_linear_projection=True,
)
# SDXL topology: plain block first, 2 downsamplers, text_time additional embedding.
SDXL_LIKE = dict(
    TINY,
    sample_size=64,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)
HEAD = dict(head_channels=32, head_norm_groups=8)


def _inputs(gen: torch.Generator, size: int, batch: int = 2):
    latents = torch.randn(batch, 4, size, size, generator=gen)
    ehs = torch.randn(batch, 7, 32, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return latents, ehs, t


def _sdxl_cond(gen: torch.Generator, batch: int = 2):
    return {
        "text_embeds": torch.randn(batch, 16, generator=gen),
        "time_ids": torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]]).repeat(batch, 1),
    }


def _unet_mid_output(unet, latents, ehs, t, added_cond_kwargs=None) -> torch.Tensor:
    captured = {}
    hook = unet.mid_block.register_forward_hook(lambda module, args, out: captured.setdefault("mid", out))
    with torch.no_grad():
        unet(latents, t, ehs, added_cond_kwargs=added_cond_kwargs)
    hook.remove()
    return captured["mid"]


@pytest.mark.parametrize("config, size, bottleneck", [(TINY, 32, 16), (SD21_LIKE, 64, 8)])
def test_logit_map_shape_and_bottleneck_matches_unet(config, size, bottleneck):
    unet = UNet2DConditionModel(**config)
    gen = torch.Generator().manual_seed(0)
    latents, ehs, t = _inputs(gen, size)
    expected_mid = _unet_mid_output(unet, latents, ehs, t)
    disc = LatentDiscriminator(unet, **HEAD)
    with torch.no_grad():
        assert torch.equal(disc.backbone(latents, ehs, t, None), expected_mid)
        assert disc(latents, ehs, t).shape == (2, 1, bottleneck, bottleneck)


def test_sdxl_like_backbone_uses_text_time_conditioning():
    unet = UNet2DConditionModel(**SDXL_LIKE)
    gen = torch.Generator().manual_seed(1)
    latents, ehs, t = _inputs(gen, 64)
    cond = _sdxl_cond(gen)
    expected_mid = _unet_mid_output(unet, latents, ehs, t, cond)
    disc = LatentDiscriminator(unet, **HEAD)
    with torch.no_grad():
        assert torch.equal(disc.backbone(latents, ehs, t, cond), expected_mid)
        assert disc(latents, ehs, t, added_cond_kwargs=cond).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="text_embeds"):
        disc(latents, ehs, t)


def test_frozen_backbone_trainable_head_and_grad_to_latents():
    disc = LatentDiscriminator(UNet2DConditionModel(**TINY), **HEAD)
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    assert all(p.requires_grad for p in disc.head.parameters())
    gen = torch.Generator().manual_seed(2)
    latents, ehs, t = _inputs(gen, 32)
    latents.requires_grad_(True)
    generator_gan_loss(disc(latents, ehs, t)).backward()
    assert all(p.grad is not None for p in disc.head.parameters())
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one per latent"):
        disc(latents, ehs, t[:1])


def test_lora_backbone_trains_only_adapters_and_starts_as_identity(tmp_path):
    UNet2DConditionModel(**TINY).save_pretrained(tmp_path / "unet")
    plain = LatentDiscriminator(UNet2DConditionModel.from_pretrained(tmp_path / "unet"), **HEAD)
    lora = LatentDiscriminator(UNet2DConditionModel.from_pretrained(tmp_path / "unet"), lora_rank=4, **HEAD)
    lora.head.load_state_dict(plain.head.state_dict())
    trainable = [n for n, p in lora.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("attn2.to_k.lora_A" in n for n in trainable) and any("resnets.0.conv1.lora_B" in n for n in trainable)
    frozen = [n for n, p in lora.backbone.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n for n in frozen)
    gen = torch.Generator().manual_seed(3)
    latents, ehs, t = _inputs(gen, 32)
    with torch.no_grad():
        # peft's gaussian init sets lora_B = 0: the adapted backbone starts as the pretrained one.
        assert torch.allclose(lora(latents, ehs, t), plain(latents, ehs, t), atol=1e-6)


def test_local_folder_round_trip_gives_same_logits(tmp_path):
    unet = UNet2DConditionModel(**TINY)
    unet.save_pretrained(tmp_path / "unet")
    original = LatentDiscriminator(unet, **HEAD)
    loaded = LatentDiscriminator(UNet2DConditionModel.from_pretrained(tmp_path / "unet"), **HEAD)
    loaded.head.load_state_dict(original.head.state_dict())
    gen = torch.Generator().manual_seed(4)
    latents, ehs, t = _inputs(gen, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(latents, ehs, t), original(latents, ehs, t), atol=1e-6)


def _sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def test_noise_to_random_t_same_t_and_forward_diffusion_formula():
    abar = _sd_alphas_cumprod()
    gen = torch.Generator().manual_seed(5)
    real, fake = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    replay = torch.Generator().set_state(gen.get_state())
    (real_t, fake_t), t = noise_to_random_t([real, fake], abar, gen, t_range=(100, 900))
    assert t.dtype == torch.int64 and t.shape == (3,) and ((t >= 100) & (t < 900)).all()
    # Replaying the same stream: one t draw shared by both, then one noise tensor per input.
    t_expected = torch.randint(100, 900, (3,), generator=replay)
    n_real, n_fake = torch.randn(3, 4, 8, 8, generator=replay), torch.randn(3, 4, 8, 8, generator=replay)
    assert torch.equal(t, t_expected)
    a = abar[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(real_t, a.sqrt() * real + (1 - a).sqrt() * n_real, atol=1e-6)
    assert torch.allclose(fake_t, a.sqrt() * fake + (1 - a).sqrt() * n_fake, atol=1e-6)
    assert not torch.allclose(n_real, n_fake)


def test_noise_to_random_t_fixed_t_and_errors():
    abar = _sd_alphas_cumprod()
    zeros = torch.zeros(2, 4, 4, 4)
    gen = torch.Generator().manual_seed(6)
    (noised,), t = noise_to_random_t([zeros], abar, gen, t_range=(999, 1000))
    assert t.tolist() == [999, 999]
    # A zero latent comes out as pure scaled noise; dividing by sqrt(1 - abar_999) recovers N(0, 1).
    unit = noised / (1 - abar[999]).sqrt().float()
    assert abs(unit.mean().item()) < 0.3 and 0.7 < unit.std().item() < 1.3
    with pytest.raises(ValueError, match="t_range"):
        noise_to_random_t([zeros], abar, torch.Generator(), t_range=(0, 1001))
    with pytest.raises(ValueError, match="differ in shape"):
        noise_to_random_t([zeros, zeros[:1]], abar, torch.Generator())


def test_gan_losses_on_known_logits():
    fake = torch.tensor([0.0, math.log(3.0)])
    real = torch.tensor([math.log(3.0), -math.log(3.0)])
    # softplus(-0) = ln 2, softplus(-ln 3) = ln(4/3), softplus(ln 3) = ln 4
    assert generator_gan_loss(fake).item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, abs=1e-6)
    expected_d = (math.log(2) + math.log(4)) / 2 + (math.log(4 / 3) + math.log(4)) / 2
    assert discriminator_gan_loss(real, fake).item() == pytest.approx(expected_d, abs=1e-6)
    # Same as the paper's Eq. 11 written with D = sigmoid(logit).
    paper_d = -(torch.log(1 - torch.sigmoid(fake)).mean() + torch.log(torch.sigmoid(real)).mean())
    assert discriminator_gan_loss(real, fake).item() == pytest.approx(paper_d.item(), abs=1e-6)
