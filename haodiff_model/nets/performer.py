"""FAVOR+ Performer encoder (non-causal, softmax kernel), state-dict compatible with performer-pytorch 1.1.4.

Module names reproduce `performer_pytorch.Performer` with its defaults (pre-LayerNorm, GELU
feed-forward x4, qkv bias): `net.layers.{i}.0.norm`, `net.layers.{i}.0.fn.{to_q,to_k,to_v,to_out}`,
`net.layers.{i}.0.fn.fast_attention.projection_matrix`, `net.layers.{i}.1.norm`,
`net.layers.{i}.1.fn.fn.{w1,w2}` and the buffer `proj_updater.calls_since_last_redraw`.
performer-pytorch also lists every `net.*` tensor a second time under `proj_updater.instance.*`
(its ProjectionUpdater holds the net as a submodule); `Performer` accepts and checks those
duplicates on load, and `add_official_duplicates` writes them for files the official code reads.

The random-feature projection matrices are persistent buffers: saved, loaded, and redrawn only
by an explicit call with an explicit generator (performer-pytorch redraws from the global RNG
every 1000 training forwards; `step_redraw` reproduces that schedule on request).

Feature map and attention (numerically the performer-pytorch formula, re-arranged for speed):
  q' = r * (exp(q.W^T*c - |q|^2 c^2/2 - max_j(q.W^T*c)) + eps),   c = d^-1/4, r = m^-1/2
  k' = r * (exp(k.W^T*c - |k|^2 c^2/2 - max_{n,j}(k.W^T*c)) + eps)
  out = q'(k'^T v) / (q' . sum_n k'_n)
q and k go through one GEMM; the stabilisers are folded into one in-place subtract and exp; r
cancels between numerator and denominator; eps is folded into the GEMM bias terms; and a ones
column appended to v makes the denominator come out of the same GEMMs as the numerator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from haodiff_model.nets.layers import LayerNorm, compiled_kernels_enabled, init_default_, run_compiled

FEATURE_EPS = 1e-4
_ALIGN = 8  # feature and value widths are padded to this for 16-byte aligned bf16 GEMM rows


def gaussian_orthogonal_random_matrix(nb_rows: int, nb_columns: int, generator: torch.Generator) -> torch.Tensor:
    """(nb_rows, nb_columns) float32: stacked orthogonal blocks (QR of Gaussian blocks), each row
    rescaled by the norm of an independent Gaussian row (performer-pytorch, ortho_scaling=0)."""
    blocks = []
    for start in range(0, nb_rows, nb_columns):
        q, _ = torch.linalg.qr(torch.randn(nb_columns, nb_columns, generator=generator, device="cpu"), mode="reduced")
        blocks.append(q.t()[: min(nb_columns, nb_rows - start)])
    multiplier = torch.randn(nb_rows, nb_columns, generator=generator, device="cpu").norm(dim=1)
    return multiplier[:, None] * torch.cat(blocks)


def _feature_offsets(a: torch.Tensor, sq_norm: torch.Tensor, d: int) -> torch.Tensor:
    """Exponent offsets |x|^2 d^-1/2 / 2 plus the row max (q) or the max over tokens and features (k).

    The maxima are detached, as in performer-pytorch 1.1.4.
    """
    row_max = a.detach().amax(dim=-1, keepdim=True).to(sq_norm.dtype)
    offset = sq_norm * (d ** -0.5 / 2)
    return torch.cat([offset[:1] + row_max[:1], offset[1:] + row_max[1:].amax(dim=-2, keepdim=True)])


def _exp_features_(a: torch.Tensor, sq_norm: torch.Tensor, d: int) -> torch.Tensor:
    """exp(a - offset), in place in a's dtype (eager: no float32 copy of the largest tensor)."""
    return a.sub_(_feature_offsets(a, sq_norm, d)).exp_()


def _exp_features(a: torch.Tensor, sq_norm: torch.Tensor, d: int) -> torch.Tensor:
    """Functional form, for torch.compile: row max, subtract and exp fuse into one pass over `a`."""
    return torch.exp(a.to(sq_norm.dtype) - _feature_offsets(a, sq_norm, d)).to(a.dtype)


class FastAttention(nn.Module):
    """Non-causal FAVOR+ attention with the softmax kernel; `projection_matrix` is a persistent buffer."""

    def __init__(self, dim_heads: int, nb_features: int | None = None):
        super().__init__()
        self.dim_heads = dim_heads
        self.nb_features = nb_features if nb_features is not None else int(dim_heads * math.log(dim_heads))
        self.register_buffer("projection_matrix", torch.empty(self.nb_features, dim_heads))

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator) -> None:
        """Draw a new gaussian orthogonal matrix from `generator` (a CPU generator)."""
        new = gaussian_orthogonal_random_matrix(self.nb_features, self.dim_heads, generator)
        self.projection_matrix.copy_(new)

    def feature_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Projection scaled by d^-1/4, padded to a multiple of 8 rows by repeating row 0.

        Repeated rows leave the row and global maxima unchanged; their features are removed by
        zeroing the matching rows of k'^T [v, 1] before q' meets it.
        """
        p = self.projection_matrix
        m, d = p.shape
        pad = (-m) % _ALIGN
        w = p * d ** -0.25
        if pad:
            w = torch.cat([w, w[:1].expand(pad, d)])
        return w.to(dtype).contiguous()

    def forward(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """qk: (2, B, H, N, D) contiguous stack of q and k; v: (B, H, N, D) any strides.

        Returns (B, H, N, D) whose memory is (B, N, H, D): merging the heads for the output Linear
        is then a view.
        """
        _, b, h, n, d = qk.shape
        m = self.nb_features
        autocast = torch.is_autocast_enabled(qk.device.type)
        w = self.feature_weight(torch.get_autocast_dtype(qk.device.type) if autocast else qk.dtype)
        a = torch.matmul(qk, w.t())  # (2, B, H, N, M) pre-activations of q and k, one GEMM
        sq_norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True,
                                           dtype=torch.promote_types(qk.dtype, torch.float32)).square()
        if compiled_kernels_enabled(a):
            e = run_compiled(_exp_features, a, sq_norm, d)
        else:
            e = _exp_features_(a, sq_norm, d)
        e_q, e_k = e[0].view(b * h, n, -1), e[1].view(b * h, n, -1)

        v_aug = F.pad(v, (0, _ALIGN)).view(b * h, n, d + _ALIGN)
        v_aug[:, :, d] = 1.0  # the ones column turns the normaliser into one more output column
        # k' = e_k + eps:  k'^T [v, 1] = e_k^T [v, 1] + eps * sum_n [v, 1]
        ctx = torch.baddbmm(v_aug.sum(dim=1, keepdim=True).mul_(FEATURE_EPS), e_k.transpose(1, 2), v_aug)
        if ctx.shape[1] > m:
            ctx[:, m:] = 0.0  # padding features (repeats of feature 0) must not count twice
        # q' = e_q + eps:  q' ctx = e_q ctx + eps * sum_j ctx_j
        out = torch.baddbmm(ctx.sum(dim=1, keepdim=True).mul_(FEATURE_EPS), e_q, ctx)
        num, den = out[:, :, :d].view(b, h, n, d), out[:, :, d:d + 1].view(b, h, n, 1)
        if out.requires_grad:  # autograd cannot write into `out=`: divide, then move into place
            return (num / den).transpose(1, 2).contiguous().transpose(1, 2)
        result = torch.empty(b, n, h, d, dtype=out.dtype, device=out.device).permute(0, 2, 1, 3)
        return torch.div(num, den, out=result)


class SelfAttention(nn.Module):
    """performer-pytorch `SelfAttention` (global heads only): to_q/to_k/to_v/to_out + FAVOR+."""

    def __init__(self, dim: int, heads: int, dim_head: int, nb_features: int | None = None,
                 qkv_bias: bool = True, attn_out_bias: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.fast_attention = FastAttention(dim_head, nb_features)
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=attn_out_bias)

    def _fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k and v weights (and biases) concatenated: one GEMM instead of three (rebuilt per call,
        see the note on caching in swin.WindowAttention)."""
        ws = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
        bs = (self.to_q.bias, self.to_k.bias, self.to_v.bias)
        return torch.cat(ws), None if bs[0] is None else torch.cat(bs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        w, bias = self._fused_qkv()
        qkv = F.linear(x, w, bias).view(b, n, 3, h, d)
        qk = qkv[:, :, :2].permute(2, 0, 3, 1, 4).contiguous()
        out = self.fast_attention(qk, qkv[:, :, 2].transpose(1, 2))
        return self.to_out(out.transpose(1, 2).view(b, n, h * d))


class FeedForward(nn.Module):
    """w1 -> act -> drop -> w2 (timm's `Mlp` signature; performer-pytorch names)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.w1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.w2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.drop(self.act(self.w1(x))))


class Chunk(nn.Module):
    """Name-compatible stand-in for performer-pytorch's `Chunk` with one chunk (its default)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PreLayerNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class SequentialSequence(nn.Module):
    """`layers[i] = [attention, feed-forward]`, each a pre-norm residual branch."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return x


class ProjectionUpdater(nn.Module):
    """Holds performer-pytorch's redraw counter; redraws themselves are explicit (`Performer.step_redraw`)."""

    def __init__(self, feature_redraw_interval: int | None):
        super().__init__()
        self.feature_redraw_interval = feature_redraw_interval
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))


class Performer(nn.Module):
    """performer-pytorch `Performer(dim, depth, heads, dim_head, causal=False)` with default options.

    Initialised from `generator` (CPU; seed 0 when None) as performer-pytorch initialises.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, nb_features: int | None = None,
                 feature_redraw_interval: int | None = 1000, ff_mult: int = 4,
                 generator: torch.Generator | None = None):
        super().__init__()
        with torch.device("meta"):
            self.net = SequentialSequence(nn.ModuleList([
                nn.ModuleList([
                    PreLayerNorm(dim, SelfAttention(dim, heads, dim_head, nb_features)),
                    PreLayerNorm(dim, Chunk(FeedForward(dim, hidden_features=dim * ff_mult))),
                ])
                for _ in range(depth)
            ]))
            self.proj_updater = ProjectionUpdater(feature_redraw_interval)
        self.to_empty(device="cpu")
        init_performer_(self, generator if generator is not None else torch.Generator().manual_seed(0))
        self.register_load_state_dict_pre_hook(_merge_official_duplicates)

    def fast_attentions(self) -> Iterator[FastAttention]:
        return (m for m in self.modules() if isinstance(m, FastAttention))

    @torch.no_grad()
    def redraw_projections(self, generator: torch.Generator) -> None:
        """Redraw every layer's projection matrix from `generator` (CPU) and reset the counter."""
        for fa in self.fast_attentions():
            fa.redraw_projection_matrix(generator)
        self.proj_updater.calls_since_last_redraw.zero_()

    @torch.no_grad()
    def step_redraw(self, generator: torch.Generator) -> bool:
        """performer-pytorch's training schedule, made explicit: call once per training forward.

        Redraws (from `generator`) when the counter has reached feature_redraw_interval, else
        counts the call. Returns whether it redrew. Reads the counter on the host.
        """
        interval = self.proj_updater.feature_redraw_interval
        counter = self.proj_updater.calls_since_last_redraw
        if interval is not None and int(counter) >= interval:
            self.redraw_projections(generator)
            return True
        counter += 1
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _merge_official_duplicates(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Consume `proj_updater.instance.*` (performer-pytorch's second name for every `net.*` tensor).

    A duplicate whose `net.*` twin is absent takes its place; one whose twin is present must be
    equal to it (the official code shares the storage), else the file is inconsistent.
    """
    dup_prefix = prefix + "proj_updater.instance."
    for key in [k for k in state_dict if k.startswith(dup_prefix)]:
        value = state_dict.pop(key)
        twin = prefix + "net." + key[len(dup_prefix):]
        if twin not in state_dict:
            state_dict[twin] = value
        elif state_dict[twin].shape != value.shape or not torch.equal(state_dict[twin], value):
            raise RuntimeError(f"state dict: {key} differs from {twin}; performer-pytorch stores one tensor "
                               "under both names, so the file is inconsistent")


def add_official_duplicates(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return `state_dict` with performer-pytorch's `proj_updater.instance.*` copies of each Performer net."""
    out = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, Performer):
            continue
        prefix = f"{name}." if name else ""
        for key, value in state_dict.items():
            if key.startswith(prefix + "net."):
                out[prefix + "proj_updater.instance." + key[len(prefix) + 4:]] = value
    return out


def init_performer_(model: nn.Module, generator: torch.Generator) -> None:
    """performer-pytorch's initial state from `generator`: default Linear init, LayerNorm (1, 0),
    fresh projection matrices, counter 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                init_default_(m, generator)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, FastAttention):
                m.redraw_projection_matrix(generator)
            elif isinstance(m, ProjectionUpdater):
                m.calls_since_last_redraw.zero_()
