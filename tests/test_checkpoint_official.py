"""Checkpoint interchange with the official release: key layout (model_spec A.5), round trips,
by-name reporting of mismatches, stage-1 -> extractor loading."""

import dataclasses
import math

import pytest
import torch

from conftest import TINY_DPG, TINY_PROMPT
from haodiff_model.io.official import (
    CheckpointMismatchError,
    load_dpg_weights,
    load_img_encoder,
    load_state_dict_checked,
    official_state_dict,
    save_dpg,
    save_img_encoder,
)
from haodiff_model.nets.dpg import DPGConfig, DPGFeatureExtractor, DPGNetwork
from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig



def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _encoder(seed: int) -> DualPromptEncoder:
    enc = DualPromptEncoder(TINY_DPG, TINY_PROMPT, _gen(seed)).eval()
    with torch.no_grad():  # distinct branch weights and non-trivial norms
        for p in enc.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(seed + 100)))
    return enc


def _x(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=_gen(seed)) * 2 - 1


def test_official_layout_of_the_paper_config():
    """The 894 keys of the official inference adapter (899 with the 5 training-only changer keys)."""
    enc = DualPromptEncoder(DPGConfig(), PromptEmbedderConfig())
    sd = official_state_dict(enc)
    assert len(sd) == 894
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "feature_extractor.conv_first.conv_before_downsample.0.weight": (150, 3, 3, 3),
        "feature_extractor.conv_first.conv_down1.weight": (150, 150, 3, 3),
        "feature_extractor.patch_embed.norm.weight": (150,),
        "feature_extractor.layers.0.residual_group.blocks.1.attn_mask": (256, 64, 64),
        "feature_extractor.layers.1.residual_group.blocks.0.attn.relative_position_index": (64, 64),
        "feature_extractor.layers.1.residual_group.blocks.5.mlp.fc1.weight": (300, 150),
        "feature_extractor.branches.2.1.residual_group.blocks.1.attn.qkv.weight": (450, 150),
        "feature_extractor.branches.2.1.conv.weight": (150, 150, 3, 3),
        "feature_extractor.norm.bias": (150,),
        "main_performer.proj1.weight": (150, 150),
        "aux_performer.proj1.weight": (150, 300),
        "main_performer.pos_embed": (1, 16384, 150),
        "main_performer.encoder.net.layers.5.0.fn.fast_attention.projection_matrix": (621, 128),
        "main_performer.encoder.net.layers.0.0.fn.to_k.weight": (768, 150),
        "main_performer.encoder.net.layers.0.0.fn.to_out.weight": (150, 768),
        "main_performer.encoder.net.layers.0.1.fn.fn.w1.weight": (600, 150),
        "main_performer.encoder.net.layers.0.1.norm.weight": (150,),
        "main_performer.encoder.proj_updater.calls_since_last_redraw": (),
        "aux_performer.encoder.proj_updater.instance.layers.5.1.fn.fn.w2.weight": (150, 600),
        "main_performer.linear_embed.weight": (1024, 9600),
        "main_performer.query_tokens": (1, 77, 1024),
        "main_performer.attn_pool.in_proj_weight": (3072, 1024),
        "main_performer.attn_pool.out_proj.bias": (1024,),
        "main_performer.norm.weight": (1024,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert sum(k.endswith("attn_mask") for k in sd) == 6 + 6  # odd blocks: 3 per trunk RSTB, 1 per branch RSTB
    assert sd["main_performer.encoder.proj_updater.calls_since_last_redraw"].dtype == torch.int64
    mask = sd["feature_extractor.layers.0.residual_group.blocks.1.attn_mask"]
    assert set(mask.unique().tolist()) == {-100.0, 0.0} and mask[0].eq(0).all() and mask[-1].ne(0).any()


# ---- an official img_encoder_weights.pth written by hand from model_spec A.1, A.3-A.5 ----------------

def _official_mask(grid: int, w: int, s: int) -> torch.Tensor:
    """SW-MSA attn_mask as the official SwinIR computes it: 9 regions, -100 between different ones."""
    img = torch.zeros(grid, grid)
    for n, (hs, ws) in enumerate((h, v) for h in (slice(0, -w), slice(-w, -s), slice(-s, None))
                                 for v in (slice(0, -w), slice(-w, -s), slice(-s, None))):
        img[hs, ws] = n
    windows = img.view(grid // w, w, grid // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


def _official_rel_index(w: int) -> torch.Tensor:
    idx = torch.empty(w * w, w * w, dtype=torch.long)
    for i in range(w * w):
        for j in range(w * w):
            idx[i, j] = (i // w - j // w + w - 1) * (2 * w - 1) + (i % w - j % w + w - 1)
    return idx


def _official_file_by_hand(seed: int) -> dict:
    """The official save() dict for the tiny config, every key and shape spelled from the spec."""
    g = _gen(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, *shape: int) -> None:
        sd[name] = 0.1 * torch.randn(*shape, generator=g)

    c, w, s, grid, hidden = 12, 8, 4, 16, 24  # embed_dim, window, shift, 64 / 4, mlp_ratio 2
    fe = "feature_extractor."
    put(fe + "conv_first.conv_before_downsample.0.weight", c, 3, 3, 3)
    put(fe + "conv_first.conv_before_downsample.0.bias", c)
    for conv in ("conv_down1", "conv_down2", "conv_last"):
        put(f"{fe}conv_first.{conv}.weight", c, c, 3, 3)
        put(f"{fe}conv_first.{conv}.bias", c)
    for norm in ("patch_embed.norm", "norm"):
        sd[f"{fe}{norm}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        put(f"{fe}{norm}.bias", c)
    rstbs = [(f"layers.{i}.", 2, 3) for i in range(2)]
    rstbs += [(f"branches.{b}.{j}.", 2, 2) for b in range(3) for j in range(2)]
    for rstb, depth, heads in rstbs:
        for k in range(depth):
            blk = f"{fe}{rstb}residual_group.blocks.{k}."
            for norm in ("norm1", "norm2"):
                sd[f"{blk}{norm}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
                put(f"{blk}{norm}.bias", c)
            put(blk + "attn.relative_position_bias_table", (2 * w - 1) ** 2, heads)
            sd[blk + "attn.relative_position_index"] = _official_rel_index(w)
            put(blk + "attn.qkv.weight", 3 * c, c)
            put(blk + "attn.qkv.bias", 3 * c)
            put(blk + "attn.proj.weight", c, c)
            put(blk + "attn.proj.bias", c)
            put(blk + "mlp.fc1.weight", hidden, c)
            put(blk + "mlp.fc1.bias", hidden)
            put(blk + "mlp.fc2.weight", c, hidden)
            put(blk + "mlp.fc2.bias", c)
            if k % 2:
                sd[blk + "attn_mask"] = _official_mask(grid, w, s)
        put(f"{fe}{rstb}conv.weight", c, c, 3, 3)
        put(f"{fe}{rstb}conv.bias", c)
    mid, dim_head, heads, embed, tokens, features = c, 16, 2, 32, 5, int(16 * math.log(16))
    for name, in_dim in (("main_performer.", c), ("aux_performer.", 2 * c)):
        put(name + "proj1.weight", mid, in_dim)
        put(name + "proj1.bias", mid)
        put(name + "pos_embed", 1, grid * grid, mid)
        for i in range(2):
            layer = f"{name}encoder.net.layers.{i}."
            for norm in ("0.norm", "1.norm"):
                sd[f"{layer}{norm}.weight"] = 1 + 0.1 * torch.randn(mid, generator=g)
                put(f"{layer}{norm}.bias", mid)
            put(layer + "0.fn.fast_attention.projection_matrix", features, dim_head)
            for proj in ("to_q", "to_k", "to_v"):
                put(f"{layer}0.fn.{proj}.weight", heads * dim_head, mid)
                put(f"{layer}0.fn.{proj}.bias", heads * dim_head)
            put(layer + "0.fn.to_out.weight", mid, heads * dim_head)
            put(layer + "0.fn.to_out.bias", mid)
            put(layer + "1.fn.fn.w1.weight", 4 * mid, mid)
            put(layer + "1.fn.fn.w1.bias", 4 * mid)
            put(layer + "1.fn.fn.w2.weight", mid, 4 * mid)
            put(layer + "1.fn.fn.w2.bias", mid)
        sd[name + "encoder.proj_updater.calls_since_last_redraw"] = torch.tensor(3)
        for key in [k for k in sd if k.startswith(name + "encoder.net.")]:  # the ProjectionUpdater's alias
            sd[key.replace("encoder.net.", "encoder.proj_updater.instance.", 1)] = sd[key]
        put(name + "linear_embed.weight", embed, mid * 4 * 4)  # pool_patch 4: a 16x16 grid gives 4x4 patches
        put(name + "linear_embed.bias", embed)
        put(name + "query_tokens", 1, tokens, embed)
        put(name + "attn_pool.in_proj_weight", 3 * embed, embed)
        put(name + "attn_pool.in_proj_bias", 3 * embed)
        put(name + "attn_pool.out_proj.weight", embed, embed)
        put(name + "attn_pool.out_proj.bias", embed)
        sd[name + "norm.weight"] = 1 + 0.1 * torch.randn(embed, generator=g)
        put(name + "norm.bias", embed)
    swinir_kwargs = {"img_size": 64, "patch_size": 1, "in_chans": 3, "embed_dim": c, "depths": [2, 2, 2, 2],
                     "num_heads": [3, 3, 2, 2], "window_size": w, "mlp_ratio": 2.0, "upscale": 4, "img_range": 1.0,
                     "drop_path_rate": 0.0, "ape": False, "resi_connection": "1conv", "branch_num": 3,
                     "skip_branch": [], "pretrained_swinir": "weights/dpg.pth", "upsampler": "nearest+conv"}
    performer_kwargs = {"dim_head": dim_head, "embed_dim": embed, "out_tokens": tokens, "num_layers": 2,
                        "num_heads_performer": heads, "num_heads_pool": 4, "pool_patch": 4}
    return {"model_state_dict": sd, "swinir_kwargs": swinir_kwargs, "performer_kwargs": performer_kwargs}


def test_a_hand_built_official_file_loads_by_name_and_is_written_back_in_the_same_layout(tmp_path):
    official = _official_file_by_hand(20)
    sd = official["model_state_dict"]
    (tmp_path / "hand").mkdir()
    torch.save(official, tmp_path / "hand" / "img_encoder_weights.pth")
    enc, report = load_img_encoder(tmp_path / "hand")
    assert report.ok and not report.missing and not report.unexpected
    ours = enc.state_dict()
    for name, value in ours.items():  # every tensor came from the official key of the same name
        assert torch.equal(value, sd[name]), name
    assert int(enc.main_performer.encoder.proj_updater.calls_since_last_redraw) == 3
    ignored = set(sd) - set(ours)
    assert all(k.endswith(("attn_mask", "relative_position_index")) or ".proj_updater.instance." in k for k in ignored)

    written = torch.load(save_img_encoder(enc.eval(), tmp_path / "out"), weights_only=True)
    assert written["swinir_kwargs"]["embed_dim"] == 12 and written["performer_kwargs"]["num_layers"] == 2
    back = written["model_state_dict"]
    assert set(back) == set(sd)
    for name, value in sd.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name


def test_save_load_round_trip_is_bit_identical(tmp_path):
    enc = _encoder(0)
    with torch.no_grad():
        for perf in enc.performers():
            perf.redraw_projections(_gen(7))
            perf.proj_updater.calls_since_last_redraw.fill_(17)
    path = save_img_encoder(enc, tmp_path / "weights")
    assert path.name == "img_encoder_weights.pth"
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model_state_dict", "swinir_kwargs", "performer_kwargs"}
    assert raw["swinir_kwargs"]["embed_dim"] == 12 and raw["performer_kwargs"]["num_layers"] == 2
    loaded, report = load_img_encoder(tmp_path / "weights")
    assert report.ok and not report.missing and not report.unexpected
    assert set(report.ignored_by_reason()) == {"shift mask, recomputed per token grid",
                                               "derived index, recomputed (checked)",
                                               "performer-pytorch duplicate of net.* (checked equal)"}
    loaded.eval()
    with torch.no_grad():
        a, b = enc(_x()), loaded(_x())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int(loaded.main_performer.encoder.proj_updater.calls_since_last_redraw) == 17
    plain = save_img_encoder(enc, tmp_path / "plain.pth", official_layout=False)
    again, report = load_img_encoder(plain)
    assert report.ok and not report.ignored
    with torch.no_grad():
        assert torch.equal(again.eval()(_x())[0], a[0])


def test_official_training_file_loads_with_changers_reported(tmp_path):
    enc = _encoder(1)
    sd = official_state_dict(enc)
    sd["embedding_changer1.linear1.weight"] = torch.zeros(512, 1024)
    sd["embedding_changer2.linear.weight"] = torch.zeros(1280, 78848)
    fresh = DualPromptEncoder(TINY_DPG, TINY_PROMPT, _gen(2)).eval()
    report = load_state_dict_checked(fresh, sd, source="official")
    assert report.ok
    assert report.ignored["embedding_changer2.linear.weight"].startswith("official training-only")
    with torch.no_grad():
        assert torch.equal(fresh(_x())[1], enc(_x())[1])


def test_renamed_and_reshaped_keys_are_reported_by_name():
    enc = _encoder(3)
    sd = official_state_dict(enc)
    sd["main_performer.attn_pool.in_proj_wieght"] = sd.pop("main_performer.attn_pool.in_proj_weight")
    fresh = DualPromptEncoder(TINY_DPG, TINY_PROMPT, _gen(4)).eval()
    before = fresh.main_performer.proj1.weight.clone()
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_checked(fresh, sd)
    assert "main_performer.attn_pool.in_proj_wieght" in str(err.value)
    assert "main_performer.attn_pool.in_proj_weight" in str(err.value)
    assert torch.equal(fresh.main_performer.proj1.weight, before)  # nothing loaded on failure
    report = load_state_dict_checked(fresh, sd, strict=False)
    assert report.missing == ["main_performer.attn_pool.in_proj_weight"]
    assert report.unexpected == ["main_performer.attn_pool.in_proj_wieght"]
    assert torch.equal(fresh.main_performer.proj1.weight, enc.main_performer.proj1.weight)
    sd = enc.state_dict()
    sd["aux_performer.proj1.weight"] = sd["aux_performer.proj1.weight"][:, :12]
    with pytest.raises(CheckpointMismatchError, match=r"aux_performer\.proj1\.weight: checkpoint \(12, 12\)"):
        load_state_dict_checked(fresh, sd, strict=False)


def test_stage1_checkpoint_loads_into_the_extractor(tmp_path):
    net = DPGNetwork(TINY_DPG, _gen(5)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(6)))
    path = save_dpg(net, tmp_path / "dpg_stage1.pth")
    sd = torch.load(path, weights_only=True)
    assert "layers.2.residual_group.blocks.0.attn.qkv.weight" in sd and "upsamplers.2.conv_last.weight" in sd
    assert sd["upsamplers.2.conv_last.weight"].shape == (1, 12, 3, 3)
    fe = DPGFeatureExtractor(TINY_DPG).eval()
    report = load_dpg_weights(fe, path)
    assert report.ok
    reasons = report.ignored_by_reason()
    dead = next(keys for reason, keys in reasons.items() if reason.startswith("dead official stage-1 RSTB"))
    assert all(k.startswith(("layers.2.", "layers.3.")) for k in dead)
    heads = next(keys for reason, keys in reasons.items() if reason.startswith("stage-1 upsampler"))
    assert len(heads) == len(net.upsamplers.state_dict())
    x = _x(8)
    with torch.no_grad():
        outs, _, geom = net.forward_trunk(x)
        expected = [net.norm(o)[:, geom.to_raster] for o in outs]
        for a, b in zip(fe(x), expected):
            assert torch.equal(a, b)
    back = DPGNetwork(TINY_DPG).eval()
    assert load_dpg_weights(back, path).ok  # the dead layers are reported, everything else loads
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(back(x), net(x)))
    # the extractor part of an img_encoder file is a valid DPG source too
    enc = DualPromptEncoder(TINY_DPG, TINY_PROMPT, _gen(9))
    enc_path = save_img_encoder(enc, tmp_path / "enc")
    report = load_dpg_weights(DPGFeatureExtractor(TINY_DPG), enc_path)
    assert report.ok and any("feature_extractor" in n for n in report.notes)


def test_wrapped_stage1_files_are_unwrapped_or_refused():
    net = DPGNetwork(TINY_DPG, _gen(10))
    sd = net.state_dict()
    fe = DPGFeatureExtractor(TINY_DPG)
    report = load_dpg_weights(fe, {"params": sd})
    assert report.ok and "took the 'params' entry" in report.notes
    with pytest.raises(CheckpointMismatchError, match="param_key"):
        load_dpg_weights(fe, {"params": sd, "params_ema": sd})
    assert load_dpg_weights(fe, {"params": sd, "params_ema": sd}, param_key="params_ema").ok
    assert load_dpg_weights(fe, {f"module.{k}": v for k, v in sd.items()}).ok
    wrong = dataclasses.replace(TINY_DPG, window_size=4)
    with pytest.raises(CheckpointMismatchError, match="relative_position_bias_table"):
        load_dpg_weights(DPGFeatureExtractor(wrong), official_state_dict(net))


def test_inconsistent_performer_duplicate_is_refused():
    enc = _encoder(11)
    sd = official_state_dict(enc)
    key = "main_performer.encoder.proj_updater.instance.layers.0.0.fn.fast_attention.projection_matrix"
    sd[key] = sd[key] * 2
    with pytest.raises(RuntimeError, match="differs"):
        load_state_dict_checked(DualPromptEncoder(TINY_DPG, TINY_PROMPT).eval(), sd)


def test_unknown_official_kwargs_are_refused_by_name(tmp_path):
    enc = _encoder(12)
    path = save_img_encoder(enc, tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["performer_kwargs"]["num_layer"] = 3
    torch.save(raw, path)
    with pytest.raises(ValueError, match="num_layer"):
        load_img_encoder(path)
