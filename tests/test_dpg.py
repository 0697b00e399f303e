"""DPG network: official semantics (checked against straightforward re-computations written here
in the official style from the state dict alone: F.conv2d / F.linear on the named weights, roll +
window partition + explicit attention), shapes, the geometry cache, configs, the ape and 3conv variants."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_DPG
from haodiff_model.config import ConfigError
from haodiff_model.io.official import load_dpg_weights, save_dpg
from haodiff_model.nets import swin
from haodiff_model.nets.dpg import RGB_MEAN, DPGConfig, DPGFeatureExtractor, DPGNetwork
from haodiff_model.nets.swin import relative_position_index, shift_window_mask, window_order

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "dpg.yaml"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb(model: torch.nn.Module, seed: int = 5) -> None:
    """Randomise the LayerNorm affines and biases too, so that no parameter is a neutral 1 or 0."""
    g = _gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1.weight" in name or "norm2.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "relative_position_bias_table" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ---- straightforward official-style reference ---------------------------------------------------

def ref_rel_index(w: int) -> torch.Tensor:
    idx = torch.empty(w * w, w * w, dtype=torch.long)
    for i in range(w * w):
        for j in range(w * w):
            dy, dx = i // w - j // w + w - 1, i % w - j % w + w - 1
            idx[i, j] = dy * (2 * w - 1) + dx
    return idx


def ref_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def ref_reverse(win: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    b = win.shape[0] // (h * wd // (w * w))
    return win.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


def ref_mask(h: int, wd: int, w: int, s: int) -> torch.Tensor:
    img = torch.zeros(1, h, wd, 1)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    mw = ref_partition(img, w).squeeze(-1)
    diff = mw.unsqueeze(1) - mw.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def ref_block(sd, pre, x, h, wd, w, heads, s):
    """One Swin block from the state dict `sd` (official names under `pre`), shift s."""
    b, n_tok, c = x.shape
    hd = c // heads
    y = F.layer_norm(x, (c,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"]).view(b, h, wd, c)
    if s:
        y = torch.roll(y, (-s, -s), (1, 2))
    win = ref_partition(y, w)
    n = w * w
    qkv = F.linear(win, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
    qkv = qkv.reshape(-1, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
    table = sd[pre + "attn.relative_position_bias_table"]
    attn = attn + table[ref_rel_index(w).view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if s:
        mask = ref_mask(h, wd, w, s)
        attn = (attn.view(b, -1, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    out = F.linear(out, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
    y = ref_reverse(out, w, h, wd)
    if s:
        y = torch.roll(y, (s, s), (1, 2))
    x = x + y.reshape(b, n_tok, c)
    z = F.layer_norm(x, (c,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])
    z = F.gelu(F.linear(z, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    return x + F.linear(z, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])


def ref_conv(sd, pre, x, stride=1):
    """A conv given by its weight's shape: k x k kernels with 'same' padding (k // 2)."""
    weight = sd[pre + "weight"]
    return F.conv2d(x, weight, sd[pre + "bias"], stride=stride, padding=weight.shape[-1] // 2)


def ref_resi_conv(sd, pre, x, cfg):
    """model_spec A.1: 1conv = 3x3 C->C; 3conv = 3x3 C->C/4, LReLU .2, 1x1, LReLU .2, 3x3 C/4->C."""
    if cfg.resi_connection == "1conv":
        return ref_conv(sd, pre, x)
    x = F.leaky_relu(ref_conv(sd, pre + "0.", x), 0.2)
    x = F.leaky_relu(ref_conv(sd, pre + "2.", x), 0.2)
    return ref_conv(sd, pre + "4.", x)


def ref_rstb(sd, pre, x, h, wd, cfg, heads, depth):
    y = x
    for i in range(depth):
        y = ref_block(sd, f"{pre}residual_group.blocks.{i}.", y, h, wd, cfg.window, heads, cfg.shift if i % 2 else 0)
    b, _, c = x.shape
    y = ref_resi_conv(sd, pre + "conv.", y.transpose(1, 2).reshape(b, c, h, wd), cfg)
    return y.flatten(2).transpose(1, 2) + x


def ref_trunk(sd, cfg, x):
    """model_spec A.1 steps 1-5 and the branch RSTBs, from the state dict alone."""
    x = (x - torch.tensor(RGB_MEAN).view(1, 3, 1, 1)) * cfg.img_range
    f = F.leaky_relu(ref_conv(sd, "conv_first.conv_before_downsample.0.", x), 0.01)
    f = ref_conv(sd, "conv_first.conv_down1.", f, stride=2)
    f = ref_conv(sd, "conv_first.conv_down2.", f, stride=2)
    f = ref_conv(sd, "conv_first.conv_last.", f)
    h, wd = f.shape[2:]
    emb = F.layer_norm(f.flatten(2).transpose(1, 2), (cfg.embed_dim,), sd["patch_embed.norm.weight"],
                       sd["patch_embed.norm.bias"])
    t = emb + sd["absolute_pos_embed"] if cfg.ape else emb
    half = len(cfg.depths) // 2
    for i in range(half):
        t = ref_rstb(sd, f"layers.{i}.", t, h, wd, cfg, cfg.num_heads[i], cfg.depths[i])
    x_mid = t + emb
    outs = []
    for b in range(cfg.branch_num):
        bt = x_mid
        for j, i in enumerate(range(half, len(cfg.depths))):
            bt = ref_rstb(sd, f"branches.{b}.{j}.", bt, h, wd, cfg, cfg.num_heads[i], cfg.depths[i])
        outs.append(bt)
    return outs, x_mid, (h, wd)


def ref_norm(sd, t):
    return F.layer_norm(t, t.shape[-1:], sd["norm.weight"], sd["norm.bias"])


def ref_extractor(sd, cfg, x):
    outs, _, _ = ref_trunk(sd, cfg, x)
    return [ref_norm(sd, o) for o in outs]


def ref_network(sd, cfg, x):
    """model_spec A.2: per branch norm + x_mid, then the nearest+conv head; RGB mean back on 3-channel heads."""
    outs, x_mid, (h, wd) = ref_trunk(sd, cfg, x)
    results = []
    for i, o in enumerate(outs):
        pre = f"upsamplers.{i}."
        y = (ref_norm(sd, o) + x_mid).transpose(1, 2).reshape(o.shape[0], -1, h, wd)
        y = ref_resi_conv(sd, pre + "conv_after_body.", y, cfg)
        y = F.leaky_relu(ref_conv(sd, pre + "conv_before_upsample.0.", y), 0.01)
        y = F.leaky_relu(ref_conv(sd, pre + "conv_up1.", F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
        y = F.leaky_relu(ref_conv(sd, pre + "conv_up2.", F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
        y = ref_conv(sd, pre + "conv_last.", F.leaky_relu(ref_conv(sd, pre + "conv_hr.", y), 0.2))
        if y.shape[1] == 3:
            y = y + torch.tensor(RGB_MEAN).view(1, 3, 1, 1)
        results.append(y)
    return results


# ---- tests -------------------------------------------------------------------------------------

def test_window_tables_match_roll_and_partition():
    h, wd, w, s = 16, 24, 8, 4
    grid = torch.arange(h * wd).view(1, h, wd, 1)
    assert torch.equal(window_order(h, wd, w), ref_partition(grid, w).flatten())
    rolled = torch.roll(grid, (-s, -s), (1, 2))
    assert torch.equal(window_order(h, wd, w, s), ref_partition(rolled, w).flatten())
    assert torch.equal(shift_window_mask(h, wd, w, s), ref_mask(h, wd, w, s))
    assert torch.equal(relative_position_index(w), ref_rel_index(w))
    geom = swin.WindowGeometry.build(h, wd, w, s, torch.device("cpu"))
    x = torch.randn(2, h * wd, 3)
    win = x[:, geom.to_window]
    assert torch.equal(win[:, geom.to_raster], x)
    assert torch.equal(win[:, geom.to_shifted], x[:, window_order(h, wd, w, s)])
    assert torch.equal(win[:, geom.to_shifted][:, geom.from_shifted], win)


@pytest.mark.parametrize("mode", ["sdpa", "explicit"])
@pytest.mark.parametrize("shift", [0, 4])
def test_swin_block_matches_reference(mode, shift):
    torch.manual_seed(0)
    blk = swin.SwinTransformerBlock(12, 3, 8, shift, 2.0, attention=mode).eval()
    swin.init_swin_(blk, _gen(1))
    _perturb(blk)
    h, wd = 16, 24
    geom = swin.WindowGeometry.build(h, wd, 8, 4, torch.device("cpu"))
    x = torch.randn(3, h * wd, 12, generator=_gen(2))
    with torch.no_grad():
        ours = blk(x[:, geom.to_window], geom)[:, geom.to_raster]
        ref = ref_block(blk.state_dict(), "", x, h, wd, 8, 3, shift)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_extractor_and_network_match_reference():
    net = DPGNetwork(TINY_DPG, _gen(0)).eval()
    _perturb(net)
    fe = DPGFeatureExtractor(TINY_DPG).eval()
    missing = fe.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("upsamplers")})
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.rand(2, 3, 64, 64, generator=_gen(3)) * 2 - 1
    with torch.no_grad():
        feats, ref_feats = fe(x), ref_extractor(fe.state_dict(), TINY_DPG, x)
        outs, ref_outs = net(x), ref_network(net.state_dict(), TINY_DPG, x)
    assert [tuple(t.shape) for t in feats] == [(2, 256, 12)] * 3
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [tuple(t.shape) for t in outs] == [(2, 3, 64, 64), (2, 3, 64, 64), (2, 1, 64, 64)]
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sdpa", "explicit"])
def test_head_dim_multiple_of_eight_and_batch_independence(mode):
    cfg = dataclasses.replace(TINY_DPG, embed_dim=16, num_heads=(2, 2, 2, 2))  # head dim 8: no padding
    net = DPGNetwork(cfg, _gen(0)).eval()
    _perturb(net)
    net.set_attention(mode)
    x = torch.rand(3, 3, 64, 64, generator=_gen(6))
    with torch.no_grad():
        batched = net(x)
        single = [net(x[i:i + 1]) for i in range(3)]
        ref = ref_network(net.state_dict(), cfg, x)
    for k in range(3):
        torch.testing.assert_close(batched[k], torch.cat([s[k] for s in single]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[k], ref[k], rtol=1e-5, atol=1e-5)


def test_odd_input_is_padded_and_cropped():
    net = DPGNetwork(TINY_DPG, _gen(0)).eval()
    x = torch.rand(1, 3, 50, 70, generator=_gen(7))
    with torch.no_grad():
        outs = net(x)
        padded = net(F.pad(x, (0, 26, 0, 14), mode="reflect"))
    assert [tuple(o.shape) for o in outs] == [(1, 3, 50, 70), (1, 3, 50, 70), (1, 1, 50, 70)]
    for a, b in zip(outs, padded):
        assert torch.equal(a, b[:, :, :50, :70])
    with pytest.raises(ValueError, match="not a multiple of the window"):
        DPGFeatureExtractor(TINY_DPG)(torch.rand(1, 3, 48, 48))


def test_window_geometry_is_built_once_and_the_bias_follows_the_table(monkeypatch):
    net = DPGFeatureExtractor(TINY_DPG).eval()
    builds = []
    real_build = swin.WindowGeometry.build.__func__

    def counting_build(cls, *args):
        builds.append(args)
        return real_build(cls, *args)

    monkeypatch.setattr(swin.WindowGeometry, "build", classmethod(counting_build))
    x = torch.rand(1, 3, 64, 64)
    attn = net.layers[0].residual_group.blocks[1].attn
    with torch.no_grad():
        first = net(x)
        second = net(x)
        geom = net.geometry(16, 16, torch.device("cpu"))
        bias = attn.attention_bias(geom, True, torch.float32)
    assert len(builds) == 1
    assert bias.shape == (4, 3, 64, 64)  # 2x2 windows, 3 heads, shifted
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with torch.no_grad():  # an optimizer-style in-place update reaches the next forward
        attn.relative_position_bias_table.add_(1.0)
        third = net(x)
        assert torch.allclose(attn.attention_bias(geom, True, torch.float32), bias + 1.0)
    assert not torch.equal(third[0], first[0])


def test_drop_path_needs_a_generator_and_is_reproducible():
    cfg = dataclasses.replace(TINY_DPG, drop_path_rate=0.5)
    net = DPGNetwork(cfg, _gen(0)).train()
    x = torch.rand(4, 3, 64, 64, generator=_gen(8))
    with pytest.raises(RuntimeError, match="set_drop_path_generator"):
        net(x)
    net.set_drop_path_generator(_gen(11))
    a = net(x)
    net.set_drop_path_generator(_gen(11))
    b = net(x)
    net.set_drop_path_generator(_gen(12))
    c = net(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    sum(o.mean() for o in a).backward()
    assert all(p.grad is not None for p in net.parameters())
    dropout = DPGNetwork(dataclasses.replace(TINY_DPG, drop_rate=0.1), _gen(0))
    with pytest.raises(RuntimeError, match="not supported"):
        dropout.train()(x)
    with torch.no_grad():
        assert dropout.eval()(x)[0].shape == (4, 3, 64, 64)  # such checkpoints still run for inference


def test_training_step_changes_every_branch_and_keeps_branches_identical_at_init():
    net = DPGNetwork(TINY_DPG, _gen(0))
    b0, b1, b2 = (list(b.parameters()) for b in net.branches)
    assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(b0, b1, b2))  # official deepcopy init
    assert not torch.equal(net.upsamplers[0].conv_last.weight, net.upsamplers[1].conv_last.weight)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 64, 64, generator=_gen(9))
    outs = net(x)
    (outs[0].abs().mean() + 2 * outs[1].abs().mean() + outs[2].sigmoid().mean()).backward()
    opt.step()
    assert not torch.equal(b0[0], b1[0]) and not torch.equal(b1[0], b2[0])


def test_paper_config_from_pipeline_and_parameter_counts():
    cfg = DPGConfig.from_yaml(PIPELINE)
    assert cfg == DPGConfig()
    assert (cfg.grid, cfg.window, cfg.shift) == (128, 8, 4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(DPGFeatureExtractor(cfg)) == 7_711_800  # model_spec A.4, mlp_ratio 2
    assert count(DPGFeatureExtractor(dataclasses.replace(cfg, mlp_ratio=4.0))) == 10_420_800
    net = DPGNetwork(cfg)
    # official stage-1 SwinIR: 12,260,257 of which 1,499,250 in the dead layers.2-3 we do not build
    assert count(net) == 12_260_257 - 1_499_250
    assert count(net.upsamplers) == 3_049_207
    fe = DPGFeatureExtractor(cfg)
    shapes = {k: tuple(v.shape) for k, v in fe.state_dict().items()}
    assert shapes["conv_first.conv_before_downsample.0.weight"] == (150, 3, 3, 3)
    assert shapes["conv_first.conv_down2.weight"] == (150, 150, 3, 3)
    assert shapes["layers.1.residual_group.blocks.5.attn.relative_position_bias_table"] == (225, 6)
    assert shapes["branches.2.1.residual_group.blocks.2.attn.relative_position_bias_table"] == (225, 3)
    assert shapes["branches.0.1.conv.weight"] == (150, 150, 3, 3)
    assert "norm.weight" in shapes and "patch_embed.norm.bias" in shapes


def test_config_rejects_unknown_keys_and_round_trips_official_kwargs(tmp_path):
    bad = tmp_path / "dpg.yaml"
    bad.write_text("dpg:\n  embed_dimm: 150\n")
    with pytest.raises(ConfigError, match="embed_dimm"):
        DPGConfig.from_yaml(bad)
    kwargs = TINY_DPG.to_swinir_kwargs()
    assert "attention" not in kwargs and kwargs["depths"] == [2, 2, 2, 2]
    official = {**kwargs, "pretrained_swinir": "weights/dpg.pth", "upsampler": "nearest+conv"}
    assert DPGConfig.from_swinir_kwargs(official) == TINY_DPG
    with pytest.raises(ConfigError, match="window"):
        DPGConfig.from_swinir_kwargs({**kwargs, "window": 8})
    with pytest.raises(ValueError, match="divisible"):
        DPGConfig(embed_dim=100)
    assert math.isclose(DPGConfig.from_dict({"mlp_ratio": 4}).mlp_ratio, 4.0)


@pytest.mark.parametrize("variant, own_param", [({"ape": True}, "absolute_pos_embed"),
                                                ({"resi_connection": "3conv"}, "layers.0.conv.4.weight")])
def test_variants_match_the_reference_train_and_round_trip_the_official_layout(variant, own_param, tmp_path):
    cfg = dataclasses.replace(TINY_DPG, **variant)
    net = DPGNetwork(cfg, _gen(0))
    _perturb(net)
    params = dict(net.named_parameters())
    assert own_param in params and own_param not in dict(DPGNetwork(TINY_DPG, _gen(0)).named_parameters())
    if cfg.ape:  # std 0.02 at init: large enough here that a missing or misplaced embedding shows
        with torch.no_grad():
            params[own_param].normal_(0, 0.5, generator=_gen(4))
    x = torch.rand(2, 3, 64, 64, generator=_gen(3)) * 2 - 1
    with torch.no_grad():
        for a, b in zip(net.eval()(x), ref_network(net.state_dict(), cfg, x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    net.train()
    before = params[own_param].detach().clone()
    sum(o.square().mean() for o in net(x)).backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert not torch.equal(before, params[own_param])  # the variant's own weights train

    path = save_dpg(net, tmp_path / "dpg.pth")
    fresh = DPGNetwork(cfg, _gen(1))
    assert load_dpg_weights(fresh, path).ok
    net.eval(), fresh.eval()
    with torch.no_grad():
        for a, b in zip(net(x), fresh(x)):
            assert torch.equal(a, b)
