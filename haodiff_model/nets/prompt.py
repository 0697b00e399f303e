"""Prompt embedders (paper Sec. 3.3, Fig. 4) and the dual-prompt encoder of stage 2.

`PerformerWithAttentionPool` (official name and state-dict layout): DPG tokens -> Linear + learned
positional embedding -> FAVOR+ Performer encoder -> 8x8 patches of the token grid -> Linear ->
77 learned queries attend over the patches -> LayerNorm = an SD2.1 cross-attention context
(B, 77, 1024). `DualPromptEncoder` (official `SwinIRWithDualPerformerAdapter`, inference part)
runs the frozen DPG once and feeds branch 0 to `main_performer` (positive prompt) and branches
1..n concatenated on channels to `aux_performer` (negative prompt).

The token grid comes from the DPG config (128x128 for the paper's 512 input and downscale 4,
hard-coded to 16384 tokens in the official module), so small configs work for tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from haodiff_data.config import ConfigError, from_dict
from haodiff_model.config import read_section
from haodiff_model.nets.dpg import DPGConfig, DPGFeatureExtractor
from haodiff_model.nets.layers import init_default_
from haodiff_model.nets.performer import Performer, init_performer_

if TYPE_CHECKING:
    from haodiff_model.io.official import LoadReport

# official performer_kwargs keys; the official constructor swallows any other key
OFFICIAL_PERFORMER_KWARGS = ("dim_head", "embed_dim", "mid_tokens", "out_tokens", "num_layers",
                             "num_heads_performer", "num_heads_pool", "light_changer")


@dataclass(frozen=True)
class PromptEmbedderConfig:
    """Prompt-embedder hyper-parameters; names are the official `performer_kwargs` keys.

    nb_features, feature_redraw_interval and pool_patch are fixed in the official code (defaults
    here); they are written to checkpoints only when changed.
    """

    dim_head: int = 128
    embed_dim: int = 1024
    mid_tokens: int = 256
    out_tokens: int = 77
    num_layers: int = 6
    num_heads_performer: int = 6
    num_heads_pool: int = 8
    light_changer: bool = False
    nb_features: int | None = None
    feature_redraw_interval: int | None = 1000
    pool_patch: int = 8

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads_pool:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads_pool {self.num_heads_pool}")
        if min(self.dim_head, self.embed_dim, self.out_tokens, self.num_layers, self.num_heads_performer,
               self.pool_patch) < 1:
            raise ValueError(f"prompt embedder sizes must be positive: {self}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "prompt_embedder") -> "PromptEmbedderConfig":
        return from_dict(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str = "prompt_embedder") -> "PromptEmbedderConfig":
        return cls.from_dict(read_section(path, section), f"{path}: {section}")

    @classmethod
    def from_performer_kwargs(cls, kwargs: Mapping[str, Any]) -> "PromptEmbedderConfig":
        for key in ("in_dim", "mid_dim"):
            if key in kwargs:
                raise ConfigError(f"performer_kwargs: {key} is derived from the DPG embed_dim and must not be given")
        return from_dict(cls, kwargs, "performer_kwargs")

    def to_performer_kwargs(self) -> dict[str, Any]:
        default = PromptEmbedderConfig()
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in OFFICIAL_PERFORMER_KWARGS or value != getattr(default, f.name):
                out[f.name] = value
        return out


class AttentionPool(nn.Module):
    """Learned queries attending over tokens: nn.MultiheadAttention(batch_first) math and names
    (in_proj_weight, in_proj_bias, out_proj), without dropout or returned weights. The query
    projection does not depend on the batch, so it is computed once per call for all images."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """query: (1 or B, Lq, E); tokens: (B, L, E) -> (B, Lq, E)."""
        e, h = self.embed_dim, self.num_heads
        b, length, _ = tokens.shape
        w, bias = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:e], bias[:e])
        q = q.view(q.shape[0], -1, h, e // h).transpose(1, 2).expand(b, -1, -1, -1)
        k, v = F.linear(tokens, w[e:], bias[e:]).view(b, length, 2, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, -1, e))


class PerformerWithAttentionPool(nn.Module):
    """Official prompt embedder: (B, gh*gw, in_dim) DPG tokens -> (B, out_tokens, embed_dim)."""

    def __init__(self, in_dim: int, mid_dim: int, grid: tuple[int, int], cfg: PromptEmbedderConfig,
                 generator: torch.Generator | None = None):
        super().__init__()
        gh, gw = grid
        p = cfg.pool_patch
        if gh % p or gw % p:
            raise ValueError(f"token grid {gh}x{gw} is not a multiple of pool_patch {p}")
        self.in_dim, self.mid_dim, self.embed_dim, self.grid, self.cfg = in_dim, mid_dim, cfg.embed_dim, (gh, gw), cfg
        with torch.device("meta"):
            self.proj1 = nn.Linear(in_dim, mid_dim)
            self.pos_embed = nn.Parameter(torch.empty(1, gh * gw, mid_dim))
            self.encoder = Performer(mid_dim, cfg.num_layers, cfg.num_heads_performer, cfg.dim_head,
                                     cfg.nb_features, cfg.feature_redraw_interval)
            self.linear_embed = nn.Linear(mid_dim * p * p, cfg.embed_dim)
            self.query_tokens = nn.Parameter(torch.empty(1, cfg.out_tokens, cfg.embed_dim))
            self.attn_pool = AttentionPool(cfg.embed_dim, cfg.num_heads_pool)
            self.norm = nn.LayerNorm(cfg.embed_dim)
        self.to_empty(device="cpu")
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Official initial state from `generator` (CPU; seed 0 when None): PyTorch defaults for
        Linear, randn pos_embed and query_tokens, MultiheadAttention's xavier in-projection."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        init_default_(self.proj1, g)
        nn.init.normal_(self.pos_embed, generator=g)
        init_performer_(self.encoder, g)
        init_default_(self.linear_embed, g)
        nn.init.normal_(self.query_tokens, generator=g)
        nn.init.xavier_uniform_(self.attn_pool.in_proj_weight, generator=g)
        nn.init.zeros_(self.attn_pool.in_proj_bias)
        init_default_(self.attn_pool.out_proj, g)
        nn.init.zeros_(self.attn_pool.out_proj.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        gh, gw = self.grid
        if n != gh * gw or c != self.in_dim:
            raise ValueError(f"prompt embedder expects (B, {gh * gw}, {self.in_dim}) tokens, got {tuple(x.shape)}")
        x = self.encoder(self.proj1(x) + self.pos_embed)
        p = self.cfg.pool_patch
        # nn.Unfold(p, stride p) order: patches row-major, each vector channel-major then p x p
        x = x.view(b, gh // p, p, gw // p, p, self.mid_dim).permute(0, 1, 3, 5, 2, 4)
        x = self.linear_embed(x.reshape(b, (gh // p) * (gw // p), self.mid_dim * p * p))
        return self.norm(self.attn_pool(self.query_tokens, x))


def prepare_dpg_input(lq: torch.Tensor, size: int = 512) -> torch.Tensor:
    """Official DPG input: the whole LQ image bilinearly resized to size x size (no antialias,
    aspect ratio not kept), in the range the caller uses (the official inference feeds [-1, 1])."""
    if lq.shape[-2:] == (size, size):
        return lq
    return F.interpolate(lq, size=(size, size), mode="bilinear", align_corners=False)


class DualPromptEncoder(nn.Module):
    """Frozen DPG + two prompt embedders -> (positive, negative) prompts, each (B, out_tokens, embed_dim).

    State-dict prefixes are the official ones: feature_extractor., main_performer., aux_performer.
    The DPG stays frozen and in eval mode whatever `train()` is called with (in the official
    adapter a later .train() re-enables its DropPath).
    """

    def __init__(self, dpg: DPGConfig, prompt: PromptEmbedderConfig, generator: torch.Generator | None = None):
        super().__init__()
        if len(dpg.kept_branches) < 2:
            raise ValueError("the dual-prompt encoder needs at least two DPG branches (positive and negative)")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.dpg_config, self.prompt_config = dpg, prompt
        self.feature_extractor = DPGFeatureExtractor(dpg, g)
        self.feature_extractor.requires_grad_(False)
        c, grid = dpg.embed_dim, (dpg.grid, dpg.grid)
        self.main_performer = PerformerWithAttentionPool(c, c, grid, prompt, g)
        self.aux_performer = PerformerWithAttentionPool(c * (len(dpg.kept_branches) - 1), c, grid, prompt, g)
        self.train(True)

    def train(self, mode: bool = True) -> "DualPromptEncoder":
        super().train(mode)
        self.feature_extractor.eval()
        return self

    @property
    def swinir_kwargs(self) -> dict[str, Any]:
        return self.dpg_config.to_swinir_kwargs()

    @property
    def performer_kwargs(self) -> dict[str, Any]:
        return self.prompt_config.to_performer_kwargs()

    @classmethod
    def from_pretrained(cls, path: str | Path, strict: bool = True, attention: str = "sdpa",
                        weights_only: bool = True, output_loading_info: bool = False
                        ) -> DualPromptEncoder | tuple[DualPromptEncoder, LoadReport]:
        """The encoder of an img_encoder_weights.pth (file or its folder), architecture from its
        swinir_kwargs / performer_kwargs. Returns the model, or (model, LoadReport) with output_loading_info."""
        from haodiff_model.io.official import load_img_encoder  # io builds on the nets: imported on use

        encoder, report = load_img_encoder(path, strict, attention, weights_only)
        return (encoder, report) if output_loading_info else encoder

    def save_pretrained(self, path: str | Path, official_layout: bool = True,
                        extra: Mapping[str, nn.Module] | None = None) -> Path:
        """Write `path`/img_encoder_weights.pth (or `path` if it ends in .pth) as the official adapter
        saves it; `extra` modules are stored under their names (the SDXL embedding changers)."""
        from haodiff_model.io.official import save_img_encoder

        return save_img_encoder(self, path, official_layout, extra)

    def performers(self) -> tuple[Performer, Performer]:
        return self.main_performer.encoder, self.aux_performer.encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, img_size, img_size) DPG input -> (pos, neg) prompt embeddings."""
        feats = self.feature_extractor(x)
        return self.main_performer(feats[0]), self.aux_performer(torch.cat(feats[1:], dim=2))


__all__ = ["AttentionPool", "DualPromptEncoder", "PerformerWithAttentionPool", "PromptEmbedderConfig",
           "prepare_dpg_input"]
