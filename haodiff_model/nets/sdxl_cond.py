"""SDXL conditioning for the latent discriminator: the official training-only `embedding_changer`s.

The official `SwinIRWithDualPerformerAdapter` (training=True) maps the detached positive prompt
(B, 77, 1024) to the two inputs an SDXL UNet needs:
  embedding_changer1  TwoLayerLinear: Linear 1024->512, SiLU, Linear 512->2048, SiLU
                      -> encoder_hidden_states (B, 77, 2048)
  embedding_changer2  LinearTransform: flatten to (B, 77*1024), Linear -> 1280 (no bias), SiLU
                      -> added_cond_kwargs["text_embeds"] (B, 1280)
                      light_changer variant: one learned query attends over the 77 tokens
                      (2-head attention pooling) then Linear 1024 -> 1280 (no bias), SiLU.
Module and parameter names are the official ones, so these keys live at the top level of
`img_encoder_weights.pth` next to feature_extractor./main_performer./aux_performer.
`save_img_encoder_with_changers` / `load_sdxl_conditioner` write and read them; the prompt
encoder itself loads with `DualPromptEncoder.from_pretrained`, which reports them as ignored.

SDXL also needs `time_ids` (orig h, w, crop top, left, target h, w). The official adapter does not
make them; we ASSUME the constant SDXL default for uncropped images of the training size,
[H, W, 0, 0, H, W] ([512, 512, 0, 0, 512, 512] for the paper's crops).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haodiff_model.io.official import (
    IMG_ENCODER_FILE,
    CheckpointMismatchError,
    LoadReport,
    load_state_dict_checked,
)
from haodiff_model.nets.layers import init_default_
from haodiff_model.nets.prompt import AttentionPool, DualPromptEncoder

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (model_spec C.2)
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
NUM_TIME_IDS = 6
CHANGER_PREFIXES = ("embedding_changer1.", "embedding_changer2.")


class TwoLayerLinear(nn.Module):
    """Official embedding_changer1: Linear(in, in/2), SiLU, Linear(in/2, out), SiLU, per token
    (timm's `Mlp` signature; unlike an MLP the output is activated too, as in the official module)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.SiLU, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features // 2
        self.linear1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.linear2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear2(self.drop(self.act(self.linear1(x)))))


class LinearTransform(nn.Module):
    """Official LinearTransform: flatten all but the batch axis, Linear (no bias), SiLU."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.linear(x.reshape(x.shape[0], -1)))


class AttentionPoolingLayer(nn.Module):
    """Official AttentionPoolingLayer: one learned query over the tokens -> (B, 1, E)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.attn_pool = AttentionPool(embed_dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn_pool(self.query_tokens, x)


class SDXLConditioner(nn.Module):
    """Detached positive prompt -> SDXL (encoder_hidden_states, added_cond_kwargs).

    Official sizes by default (1024-dim, 77 tokens -> 2048 and 1280); `for_unet` reads the SDXL
    side from a UNet config (tiny test UNets). Initialised from `generator` as PyTorch initialises
    the official modules (Linear defaults; randn query; MultiheadAttention's xavier in-projection).
    """

    def __init__(self, embed_dim: int = 1024, tokens: int = 77, cross_attention_dim: int = 2048,
                 text_embed_dim: int = 1280, light: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        # the pooling variant accepts any token count; the flattening one exactly `tokens`
        self.embed_dim, self.tokens, self.light = embed_dim, (None if light else tokens), light
        self.embedding_changer1 = TwoLayerLinear(embed_dim, out_features=cross_attention_dim)
        if light:
            self.embedding_changer2 = nn.Sequential(AttentionPoolingLayer(embed_dim, 2),
                                                    LinearTransform(embed_dim, text_embed_dim))
        else:
            self.embedding_changer2 = LinearTransform(tokens * embed_dim, text_embed_dim)
        self.reset_parameters(generator)

    @classmethod
    def for_unet(cls, unet_config: Mapping[str, Any], embed_dim: int = 1024, tokens: int = 77, light: bool = False,
                 generator: torch.Generator | None = None) -> SDXLConditioner:
        if unet_config.get("addition_embed_type") != "text_time":
            raise ValueError("SDXLConditioner needs an SDXL-style UNet config (addition_embed_type='text_time')")
        text_dim = unet_config["projection_class_embeddings_input_dim"] - NUM_TIME_IDS * unet_config[
            "addition_time_embed_dim"]
        return cls(embed_dim, tokens, unet_config["cross_attention_dim"], text_dim, light, generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        init_default_(self.embedding_changer1.linear1, g)
        init_default_(self.embedding_changer1.linear2, g)
        if self.light:
            pool, transform = self.embedding_changer2
            nn.init.normal_(pool.query_tokens, generator=g)
            nn.init.xavier_uniform_(pool.attn_pool.in_proj_weight, generator=g)
            nn.init.zeros_(pool.attn_pool.in_proj_bias)
            init_default_(pool.attn_pool.out_proj, g)
            nn.init.zeros_(pool.attn_pool.out_proj.bias)
        else:
            transform = self.embedding_changer2
        init_default_(transform.linear, g)

    def forward(self, main_embed: torch.Tensor, image_size: tuple[int, int] = (512, 512)
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, tokens, embed_dim) positive prompt -> ((B, tokens, cross_dim), {text_embeds (B, text_dim),
        time_ids (B, 6)}). The prompt is detached: the discriminator never trains the prompt embedder."""
        b = main_embed.shape[0]
        if main_embed.ndim != 3 or main_embed.shape[2] != self.embed_dim or \
                (self.tokens is not None and main_embed.shape[1] != self.tokens):
            raise ValueError(f"SDXLConditioner expects (B, {self.tokens or 'N'}, {self.embed_dim}), "
                             f"got {tuple(main_embed.shape)}")
        x = main_embed.detach()
        ehs = self.embedding_changer1(x)
        text_embeds = self.embedding_changer2(x)
        h, w = image_size
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=text_embeds.dtype, device=x.device).expand(b, -1)
        return ehs, {"text_embeds": text_embeds, "time_ids": time_ids}


def save_img_encoder_with_changers(encoder: DualPromptEncoder, conditioner: SDXLConditioner | None,
                                   path: str | Path) -> Path:
    """`img_encoder_weights.pth` as the official adapter saves it in training mode: the official
    encoder layout plus the embedding_changer keys (none when `conditioner` is None)."""
    light = encoder.prompt_config.light_changer
    if conditioner is not None and conditioner.light != light:
        raise ValueError(f"conditioner light={conditioner.light} but the prompt config says light_changer={light}; "
                         "the official loader builds embedding_changer2 from light_changer")
    changers = None
    if conditioner is not None:
        names = [prefix.removesuffix(".") for prefix in CHANGER_PREFIXES]
        changers = {name: getattr(conditioner, name) for name in names}
    return encoder.save_pretrained(path, extra=changers)


def load_sdxl_conditioner(path: str | Path, strict: bool = True,
                          weights_only: bool = True) -> tuple[SDXLConditioner, LoadReport]:
    """Build an SDXLConditioner from the embedding_changer keys of an img_encoder_weights.pth (file
    or directory); sizes come from the tensor shapes, the variant from performer_kwargs.light_changer."""
    path = Path(path)
    if path.is_dir():
        path = path / IMG_ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"img_encoder file {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    if not isinstance(obj, Mapping) or "model_state_dict" not in obj:
        raise CheckpointMismatchError(f"{path}: no 'model_state_dict' entry; not an img_encoder_weights file")
    sd = {k: v for k, v in obj["model_state_dict"].items() if k.startswith(CHANGER_PREFIXES)}
    if not sd:
        raise CheckpointMismatchError(f"{path}: no embedding_changer1./embedding_changer2. keys (an inference-only "
                                      "file); start the SDXL conditioner from scratch instead")
    light = bool(obj.get("performer_kwargs", {}).get("light_changer", False))
    try:
        w1, w2 = sd["embedding_changer1.linear1.weight"], sd["embedding_changer1.linear2.weight"]
        proj = sd["embedding_changer2.1.linear.weight" if light else "embedding_changer2.linear.weight"]
    except KeyError as exc:
        raise CheckpointMismatchError(f"{path}: embedding_changer key {exc} missing (light_changer={light})") from None
    embed_dim = w1.shape[1]
    tokens = proj.shape[1] // embed_dim  # 1 for the pooling variant, where it is unused
    conditioner = SDXLConditioner(embed_dim, tokens, w2.shape[0], proj.shape[0], light)
    report = load_state_dict_checked(conditioner, sd, strict, str(path))
    return conditioner, report


__all__ = ["CHANGER_PREFIXES", "SDXL_BASE_UNET_CONFIG", "AttentionPoolingLayer", "LinearTransform", "SDXLConditioner",
           "TwoLayerLinear", "load_sdxl_conditioner", "save_img_encoder_with_changers"]
