"""Latent discriminator: a pretrained diffusion UNet's down path plus a trainable patch head.

Paper Sec. 3.3 / 4.1 (after D3SR): real and generated latents are forward-diffused to the same
random timestep t and judged by the encoder half of a pretrained UNet (SDXL in the paper; the
SD2.1 UNet is the lighter option). The backbone is frozen, or LoRA-trainable; a GroupNorm/SiLU/
conv head turns the bottleneck into a patch-wise logit map. Losses are DMD2-style
non-saturating softplus forms of the paper's Eq. 11.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from haodiff_model.nets.layers import init_default_
from haodiff_model.nets.restorer import init_lora_

# Linear/conv layers of the down blocks and mid block that get LoRA when the backbone trains.
LORA_TARGET_MODULES: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "conv",
)


class _Backbone(nn.Module):
    """The parts of a UNet2DConditionModel that run before the up path."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        cfg = unet.config
        unsupported = {
            "class_embed_type": cfg.class_embed_type,
            "num_class_embeds": cfg.num_class_embeds,
            "encoder_hid_dim_type": cfg.encoder_hid_dim_type,
            "time_cond_proj_dim": cfg.time_cond_proj_dim,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"LatentDiscriminator: UNet config {name}={value!r} is not supported")
        if cfg.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"LatentDiscriminator: UNet addition_embed_type={cfg.addition_embed_type!r} is not supported "
                "(only None, as in SD2.1, or 'text_time', as in SDXL)"
            )
        if cfg.center_input_sample:
            raise ValueError("LatentDiscriminator: UNet config center_input_sample=True is not supported")
        self.addition_embed_type = cfg.addition_embed_type
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.time_embed_act = unet.time_embed_act
        if self.addition_embed_type == "text_time":
            self.add_time_proj = unet.add_time_proj
            self.add_embedding = unet.add_embedding
        self.conv_in = unet.conv_in
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        self.out_channels = cfg.block_out_channels[-1]
        self.norm_num_groups = cfg.norm_num_groups

    def forward(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timesteps: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        sample = sample.to(dtype)
        encoder_hidden_states = encoder_hidden_states.to(dtype)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        if self.addition_embed_type == "text_time":
            if added_cond_kwargs is None or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
                raise ValueError(
                    "LatentDiscriminator: an SDXL-style UNet (addition_embed_type='text_time') needs "
                    "added_cond_kwargs with 'text_embeds' and 'time_ids'"
                )
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        h = self.conv_in(sample)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h = self.mid_block(h, emb)
        return h


class LatentDiscriminator(nn.Module):
    """Patch-wise real/fake logits for noised latents, (B, 1, h, w) at the UNet bottleneck size.

    `unet` is a diffusers UNet2DConditionModel (loaded by the caller from a local folder); only
    its conv_in, time (and SDXL text-time) embeddings, down blocks and mid block are kept, so the
    caller can drop the UNet afterwards. SD2.1-base on 64x64 latents gives an 8x8 map, SDXL a
    16x16 one. The head keeps the resolution (3x3 convs, stride 1), so any latent size works.
    """

    def __init__(
        self,
        unet: nn.Module,
        head_channels: int = 256,
        head_layers: int = 2,
        head_norm_groups: int = 32,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        generator: torch.Generator | None = None,
    ):
        """`generator` draws the head's and the LoRA's initial weights (PyTorch's default Linear/Conv
        init, peft's gaussian LoRA init); without one they come from the global RNG."""
        super().__init__()
        if head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {head_layers}")
        if head_channels % head_norm_groups != 0:
            raise ValueError(f"head_channels={head_channels} is not divisible by head_norm_groups={head_norm_groups}")
        self.backbone = _Backbone(unet)
        self.backbone.requires_grad_(False)
        if lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGET_MODULES),
            )
            inject_adapter_in_model(config, self.backbone)
            for name, param in self.backbone.named_parameters():
                param.requires_grad_("lora_" in name)

        c = self.backbone.out_channels
        layers: list[nn.Module] = []
        for i in range(head_layers):
            in_c = c if i == 0 else head_channels
            groups = self.backbone.norm_num_groups if i == 0 else head_norm_groups
            layers += [nn.GroupNorm(groups, in_c), nn.SiLU(), nn.Conv2d(in_c, head_channels, 3, padding=1)]
        layers += [nn.GroupNorm(head_norm_groups, head_channels), nn.SiLU(), nn.Conv2d(head_channels, 1, 1)]
        self.head = nn.Sequential(*layers)
        if generator is not None:
            if lora_rank > 0:
                init_lora_(self.backbone, generator)
            for m in self.head:
                if isinstance(m, nn.Conv2d):
                    init_default_(m, generator)

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timesteps: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits for `latents` already noised to `timesteps` (B,); gradients reach `latents`."""
        if timesteps.ndim != 1 or timesteps.shape[0] != latents.shape[0]:
            raise ValueError(
                f"timesteps must have shape ({latents.shape[0]},), one per latent, got {tuple(timesteps.shape)}"
            )
        h = self.backbone(latents, encoder_hidden_states, timesteps, added_cond_kwargs)
        # The head may be kept in float32 next to a half-precision frozen backbone.
        return self.head(h.to(self.head[-1].weight.dtype))


def noise_to_random_t(
    latents: Sequence[torch.Tensor],
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    t_range: tuple[int, int] = (0, 1000),
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Forward-diffuse each tensor in `latents` (e.g. real and fake) to the SAME random t per sample.

    t ~ U{t_range[0], ..., t_range[1] - 1} per sample; each tensor gets its own Gaussian noise n:
    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) n. Draws come from `generator` on its own device.
    Returns the noised tensors (in input order) and t (int64, on the latents' device).
    """
    if len(latents) == 0:
        raise ValueError("noise_to_random_t: no latents given")
    shape = latents[0].shape
    if any(x.shape != shape for x in latents):
        raise ValueError(f"noise_to_random_t: latents differ in shape: {[tuple(x.shape) for x in latents]}")
    low, high = t_range
    if not 0 <= low < high <= alphas_cumprod.shape[0]:
        raise ValueError(f"t_range={t_range} must satisfy 0 <= low < high <= {alphas_cumprod.shape[0]}")
    device = latents[0].device
    gen_device = generator.device
    t = torch.randint(low, high, (shape[0],), generator=generator, device=gen_device).to(device)
    abar = alphas_cumprod.to(device=device, dtype=torch.float32)[t].view(-1, *([1] * (len(shape) - 1)))
    noised = []
    for x in latents:
        n = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
        noised.append((abar.sqrt() * x.float() + (1 - abar).sqrt() * n).to(x.dtype))
    return noised, t


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating L_G = -log sigmoid(D(fake)) = softplus(-logit), mean over patches and batch."""
    return F.softplus(-logits_fake).mean()


def discriminator_gan_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = -log(1 - sigmoid(D(fake))) - log sigmoid(D(real)) = softplus(fake) + softplus(-real)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
