"""FAVOR+ Performer and prompt embedders: the formula (direct einsum re-computation), state
handling of the random features, pooling order, shapes and parameter counts of the paper config."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_DPG, TINY_PROMPT
from haodiff_model.nets.performer import FastAttention, Performer, add_official_duplicates, gaussian_orthogonal_random_matrix
from haodiff_model.nets.prompt import (
    AttentionPool,
    DualPromptEncoder,
    PerformerWithAttentionPool,
    PromptEmbedderConfig,
    prepare_dpg_input,
)

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "dpg.yaml"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ref_favor(q, k, v, proj, eps=1e-4):
    """performer-pytorch's softmax_kernel + linear_attention, written out (non-causal)."""
    d, m = q.shape[-1], proj.shape[0]
    dn, ratio = d ** -0.25, m ** -0.5

    def feature(x, is_query):
        dash = torch.einsum("bhnd,jd->bhnj", dn * x, proj)
        diag = (x ** 2).sum(-1, keepdim=True) / 2 * dn ** 2
        stab = (dash.amax(-1, keepdim=True) if is_query else dash.amax((-1, -2), keepdim=True)).detach()
        return ratio * (torch.exp(dash - diag - stab) + eps)

    qp, kp = feature(q, True), feature(k, False)
    d_inv = 1.0 / torch.einsum("bhnd,bhd->bhn", qp, kp.sum(-2))
    ctx = torch.einsum("bhnd,bhne->bhde", kp, v)
    return torch.einsum("bhde,bhnd,bhn->bhne", ctx, qp, d_inv)


def ref_performer(model: Performer, x):
    for attn_block, ff_block in model.net.layers:
        sa = attn_block.fn
        h, d = sa.heads, sa.dim_head
        y = attn_block.norm(x)
        q, k, v = (lin(y).view(*y.shape[:2], h, d).transpose(1, 2) for lin in (sa.to_q, sa.to_k, sa.to_v))
        out = ref_favor(q, k, v, sa.fast_attention.projection_matrix.to(x.dtype))
        x = x + sa.to_out(out.transpose(1, 2).reshape(*y.shape[:2], h * d))
        ff = ff_block.fn.fn
        x = x + ff.w2(F.gelu(ff.w1(ff_block.norm(x))))
    return x


@pytest.mark.parametrize("nb_features", [None, 48])  # 44 features (padded to 48) and an aligned count
def test_fast_attention_matches_the_formula(nb_features):
    fa = FastAttention(16, nb_features).double()
    fa.redraw_projection_matrix(_gen(0))
    g = _gen(1)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64) * s for s in (1.5, 1.5, 1.0))
    ours = fa(torch.stack([q, k]), v)
    ref = ref_favor(q, k, v, fa.projection_matrix)
    assert fa.nb_features == (nb_features or int(16 * math.log(16)))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # gradients too (stage-2 training back-propagates through the feature map)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    trained = fa(torch.stack([qg, kg]), vg)
    # one memory layout, with and without autograd: (B, N, H, D), so merging the heads is a view
    assert ours.transpose(1, 2).is_contiguous() and trained.transpose(1, 2).is_contiguous()
    (trained * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    (ref_favor(qr, kr, vr, fa.projection_matrix) * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
    for a, b in ((qg, qr), (kg, kr), (vg, vr)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def test_fast_attention_stabilisers_when_every_feature_is_negative():
    """Padding repeats feature 0, so the maxima stay those of the real features even if all are < 0."""
    fa = FastAttention(8, 12).double()  # 12 features, padded to 16
    with torch.no_grad():
        fa.projection_matrix.copy_(torch.rand(12, 8, generator=_gen(2), dtype=torch.float64) + 0.1)
    q = -torch.linspace(0.5, 2, 6, dtype=torch.float64)[:, None].expand(6, 8).reshape(1, 1, 6, 8)
    assert torch.einsum("bhnd,jd->bhnj", q, fa.projection_matrix).max() < 0
    v = torch.randn(1, 1, 6, 8, generator=_gen(3), dtype=torch.float64)
    torch.testing.assert_close(fa(torch.stack([q, q]), v), ref_favor(q, q, v, fa.projection_matrix),
                               rtol=1e-10, atol=1e-12)


def test_in_place_and_functional_feature_maps_agree():
    """The eager (in-place) feature map and the functional form that torch.compile fuses on GPU."""
    from haodiff_model.nets.performer import _exp_features, _exp_features_

    a = torch.randn(2, 2, 3, 40, 48, generator=_gen(20), dtype=torch.float64) * 4
    sq = torch.rand(2, 2, 3, 40, 1, generator=_gen(21), dtype=torch.float64) * 30
    functional = _exp_features(a, sq, 16)
    in_place = _exp_features_(a.clone(), sq, 16)
    torch.testing.assert_close(functional, in_place, rtol=1e-12, atol=0)
    assert functional[0].amax(-1).sub(torch.exp(-sq[0, ..., 0] / 8)).abs().max() < 1e-12  # q rows: max -> e^-diag
    assert functional[1].amax((-1, -2)).le(1).all()


def test_performer_matches_reference_and_float32_agrees():
    model = Performer(24, 2, 2, 16).double().eval()
    g = _gen(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(2, 50, 24, generator=_gen(5), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_performer(model, x), rtol=1e-10, atol=1e-10)
        out32 = model.float()(x.float())
        torch.testing.assert_close(out32, ref_performer(model.double(), x).float(), rtol=1e-4, atol=1e-4)


def test_projection_matrix_is_orthogonal_deterministic_and_redrawn_only_on_request():
    w = gaussian_orthogonal_random_matrix(20, 8, _gen(6))
    assert torch.equal(w, gaussian_orthogonal_random_matrix(20, 8, _gen(6)))
    assert not torch.equal(w, gaussian_orthogonal_random_matrix(20, 8, _gen(7)))
    for block in (w[:8], w[8:16]):
        unit = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(8), atol=1e-5, rtol=0)
    model = Performer(16, 2, 2, 8, feature_redraw_interval=3).train()
    before = [fa.projection_matrix.clone() for fa in model.fast_attentions()]
    torch.manual_seed(123)  # the global RNG is never used: nothing below may depend on it
    for _ in range(5):
        model(torch.randn(1, 10, 16, generator=_gen(8)))
    assert all(torch.equal(a, fa.projection_matrix) for a, fa in zip(before, model.fast_attentions()))
    redrawn = [model.step_redraw(_gen(9)) for _ in range(5)]
    assert redrawn == [False, False, False, True, False]  # performer-pytorch: redraw on call interval+1
    assert int(model.proj_updater.calls_since_last_redraw) == 1
    assert not any(torch.equal(a, fa.projection_matrix) for a, fa in zip(before, model.fast_attentions()))
    state = model.state_dict()
    assert "net.layers.1.0.fn.fast_attention.projection_matrix" in state
    other = Performer(16, 2, 2, 8)
    other.load_state_dict(state)
    assert all(torch.equal(a.projection_matrix, b.projection_matrix)
               for a, b in zip(model.fast_attentions(), other.fast_attentions()))


def test_official_duplicate_names_load_and_are_checked():
    model = Performer(16, 1, 2, 8)
    sd = add_official_duplicates(model, model.state_dict())
    assert "proj_updater.instance.layers.0.0.fn.fast_attention.projection_matrix" in sd
    assert "proj_updater.calls_since_last_redraw" in sd
    other = Performer(16, 1, 2, 8)
    other.load_state_dict(sd)  # strict: the duplicates are consumed, not unexpected
    only_dups = {k: v for k, v in sd.items() if not k.startswith("net.")}
    Performer(16, 1, 2, 8).load_state_dict(only_dups)  # duplicates alone stand in for net.*
    sd["proj_updater.instance.layers.0.0.fn.to_q.weight"] = sd["net.layers.0.0.fn.to_q.weight"] + 1
    with pytest.raises(RuntimeError, match="to_q.weight differs"):
        other.load_state_dict(sd)


def test_attention_pool_matches_multihead_attention():
    pool = AttentionPool(32, 4)
    pool_ref = nn.MultiheadAttention(32, 4, batch_first=True)
    g = _gen(10)
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pool_ref.load_state_dict(pool.state_dict())
    query = torch.randn(1, 5, 32, generator=g)
    tokens = torch.randn(3, 16, 32, generator=g)
    ref, _ = pool_ref(query.expand(3, -1, -1), tokens, tokens)
    torch.testing.assert_close(pool(query, tokens), ref, rtol=1e-5, atol=1e-5)


def test_pooler_patches_follow_nn_unfold_order():
    pooler = PerformerWithAttentionPool(12, 12, (16, 16), TINY_PROMPT, _gen(11)).eval()
    x = torch.randn(2, 256, 12, generator=_gen(12))
    with torch.no_grad():
        ours = pooler(x)
        y = pooler.encoder(pooler.proj1(x) + pooler.pos_embed)
        y = nn.Unfold(4, stride=4)(y.permute(0, 2, 1).reshape(2, 12, 16, 16)).permute(0, 2, 1)
        y = pooler.linear_embed(y)
        q = pooler.query_tokens.expand(2, -1, -1)
        ref = pooler.norm(pooler.attn_pool(q, y))
    assert ours.shape == (2, 5, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        pooler(torch.randn(1, 255, 12))


def test_dual_encoder_prompts_frozen_dpg_and_gradients():
    enc = DualPromptEncoder(TINY_DPG, TINY_PROMPT, _gen(13))
    x = torch.rand(2, 3, 64, 64, generator=_gen(14)) * 2 - 1
    enc.train()
    assert not enc.feature_extractor.training and enc.main_performer.training
    pos, neg = enc(x)
    assert pos.shape == neg.shape == (2, 5, 32)
    assert enc.aux_performer.proj1.in_features == 24  # branches 1 and 2 concatenated
    (pos.square().mean() + neg.square().mean()).backward()
    assert all(p.grad is None for p in enc.feature_extractor.parameters())
    assert all(p.grad is not None for p in enc.main_performer.parameters())
    assert all(p.grad is not None for p in enc.aux_performer.parameters())
    with torch.no_grad():
        feats = enc.feature_extractor(x)
        torch.testing.assert_close(enc.eval()(x)[1], enc.aux_performer(torch.cat(feats[1:], 2)))


def test_paper_config_shapes_and_parameter_counts():
    cfg = PromptEmbedderConfig.from_yaml(PIPELINE)
    assert cfg == PromptEmbedderConfig() and cfg.num_layers == 6
    main = PerformerWithAttentionPool(150, 150, (128, 128), cfg)
    aux = PerformerWithAttentionPool(300, 150, (128, 128), cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(main) == 20_458_594 and count(aux) == 20_481_094  # model_spec A.4
    assert main.pos_embed.shape == (1, 16384, 150) and main.linear_embed.weight.shape == (1024, 9600)
    assert main.query_tokens.shape == (1, 77, 1024) and main.attn_pool.in_proj_weight.shape == (3072, 1024)
    fa = main.encoder.net.layers[0][0].fn.fast_attention
    assert fa.projection_matrix.shape == (621, 128)
    assert cfg.to_performer_kwargs() == {"dim_head": 128, "embed_dim": 1024, "mid_tokens": 256, "out_tokens": 77,
                                         "num_layers": 6, "num_heads_performer": 6, "num_heads_pool": 8,
                                         "light_changer": False}


def test_prepare_dpg_input_resizes_like_the_official_inference():
    lq = torch.rand(1, 3, 40, 60, generator=_gen(15)) * 2 - 1
    out = prepare_dpg_input(lq, 64)
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out, F.interpolate(lq, (64, 64), mode="bilinear", align_corners=False))
    assert prepare_dpg_input(out, 64) is out


def test_performer_pytorch_state_dict_loads_and_gives_the_same_output():
    pp = pytest.importorskip("performer_pytorch")
    torch.manual_seed(0)  # performer-pytorch initialises from the global RNG
    theirs = pp.Performer(dim=24, depth=2, heads=2, dim_head=16, causal=False).eval()
    ours = Performer(24, 2, 2, 16).eval()
    sd = theirs.state_dict()
    assert set(add_official_duplicates(ours, ours.state_dict())) == set(sd)
    ours.load_state_dict(sd)
    x = torch.randn(2, 50, 24, generator=_gen(16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        ours.redraw_projections(_gen(17))
        theirs.load_state_dict(add_official_duplicates(ours, ours.state_dict()))  # strict, into theirs
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
