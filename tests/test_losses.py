import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haodiff_model.losses.dists import DISTS, DISTS_TOTAL_CHANNELS, L2Pool, hanning_filter_3x3, load_dists_weights
from haodiff_model.losses.losses import PAPER_LOSS, EdgeAwareDISTS, dice_loss, sobel_edges, stage1_loss, stage2_loss
from haodiff_model.losses.vgg import load_vgg16_features, vgg16_features

LN3 = math.log(3.0)


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A random VGG16 in torchvision naming (with classifier keys) and a random alpha/beta weights.pt."""
    root = tmp_path_factory.mktemp("weights")
    features = vgg16_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    # Full torchvision dicts also hold the classifier; small stand-ins keep the file light.
    state["classifier.0.weight"] = torch.zeros(4, 8)
    state["classifier.0.bias"] = torch.zeros(4)
    torch.save(state, root / "vgg16.pth")
    gen = torch.Generator().manual_seed(1)
    shape = (1, DISTS_TOTAL_CHANNELS, 1, 1)
    weights = {"alpha": 0.1 + torch.rand(shape, generator=gen), "beta": 0.1 + torch.rand(shape, generator=gen)}
    torch.save(weights, root / "weights.pt")
    return {"vgg": root / "vgg16.pth", "dists": root / "weights.pt", "state": state, "weights": weights}


@pytest.fixture(scope="module")
def dists(weight_files):
    return DISTS.from_files(weight_files["vgg"], weight_files["dists"])


# --- stage 1 ---------------------------------------------------------------------------------


def test_dice_loss_matches_hand_computed_2x2():
    logits = torch.tensor([[[0.0, LN3], [-LN3, LN3]]])  # sigmoid: 0.5, 0.75, 0.25, 0.75
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # sum(p t) = 1.25, sum(p) = 2.25, sum(t) = 2
    assert dice_loss(logits, target, eps=0.0).item() == pytest.approx(1 - 2.5 / 4.25, abs=1e-6)
    assert dice_loss(logits, target, eps=1.0).item() == pytest.approx(1 - 3.5 / 5.25, abs=1e-6)


def test_dice_loss_is_per_sample_mean_and_zero_for_empty_masks():
    logits = torch.stack([torch.tensor([[0.0, LN3], [-LN3, LN3]]), torch.full((2, 2), -60.0)])
    target = torch.stack([torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.zeros(2, 2)])
    # Second sample: empty target and empty prediction -> (0 + 1) / (0 + 0 + 1) -> loss 0.
    assert dice_loss(logits, target).item() == pytest.approx((1 / 3 + 0.0) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        dice_loss(logits, target[:, :1])


def test_stage1_loss_parts_are_weighted_terms():
    gen = torch.Generator().manual_seed(0)
    pred_hq, hq = _rand(gen, 2, 3, 4, 4), _rand(gen, 2, 3, 4, 4)
    pred_res, res = _rand(gen, 2, 3, 4, 4) - 0.5, _rand(gen, 2, 3, 4, 4) - 0.5
    logits = torch.tensor([[[[0.0, LN3], [-LN3, LN3]]]]).repeat(2, 1, 1, 1)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]).repeat(2, 1, 1, 1)
    total, parts = stage1_loss(pred_hq, pred_res, logits, hq, res, mask, PAPER_LOSS)
    assert parts["l1_hq"].item() == pytest.approx(np.abs(pred_hq.numpy() - hq.numpy()).mean(), abs=1e-6)
    assert parts["l1_residual"].item() == pytest.approx(np.abs(pred_res.numpy() - res.numpy()).mean(), abs=1e-6)
    assert parts["dice"].item() == pytest.approx(0.02 / 3, abs=1e-7) and parts["bce"].item() == 0.0
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), abs=1e-6)


# --- Sobel -----------------------------------------------------------------------------------


def test_sobel_vertical_step_edge():
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0  # columns 0-3 black, 4-7 white; luma of white is exactly 1
    edges = sobel_edges(img)
    assert edges.shape == (1, 1, 8, 8)
    expected_edge = math.sqrt(16 + 1e-6)  # (1 + 2 + 1) * (1 - 0)
    assert torch.allclose(edges[0, 0, :, 3:5], torch.full((8, 2), expected_edge), atol=1e-5)
    flat = torch.cat([edges[0, 0, :, :3], edges[0, 0, :, 5:]], dim=1)
    assert torch.allclose(flat, torch.full_like(flat, 1e-3), atol=1e-6)  # sqrt(1e-6), borders included


def test_sobel_uses_luma_and_both_directions():
    img = torch.zeros(1, 3, 8, 8)
    img[:, 1, 4:, :] = 1.0  # horizontal edge in the green channel only
    edges = sobel_edges(img)
    assert edges[0, 0, 3, 2].item() == pytest.approx(4 * 0.587, abs=1e-4)
    assert edges[0, 0, 0, 0].item() == pytest.approx(1e-3, abs=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        sobel_edges(img[:, :1])


# --- VGG16 loader ----------------------------------------------------------------------------


def test_vgg_loader_reads_torchvision_layout(weight_files, tmp_path):
    features = load_vgg16_features(weight_files["vgg"])
    assert len(features) == 31
    assert torch.equal(features[28].weight, weight_files["state"]["features.28.weight"])
    only_features = {k: v for k, v in weight_files["state"].items() if k.startswith("features.")}
    torch.save(only_features, tmp_path / "features_only.pth")
    assert torch.equal(load_vgg16_features(tmp_path / "features_only.pth")[0].bias, only_features["features.0.bias"])


def test_vgg_loader_names_missing_unexpected_and_misshaped_keys(weight_files, tmp_path):
    state = dict(weight_files["state"])
    del state["features.28.bias"]
    state["features.31.weight"] = torch.zeros(1)
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_vgg16_features(tmp_path / "bad.pth")
    message = str(err.value)
    assert "missing keys: features.28.bias" in message
    assert "unexpected keys: features.31.weight" in message
    assert "features.0.weight (64, 3, 5, 5) != (64, 3, 3, 3)" in message
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vgg16_features(tmp_path / "nope.pth")


# --- DISTS -----------------------------------------------------------------------------------


def test_l2pool_filter_is_normalised_hanning():
    f = hanning_filter_3x3()
    assert f.sum().item() == pytest.approx(1.0, abs=1e-7)
    assert torch.allclose(f, torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16)
    out = L2Pool(2)(torch.full((1, 2, 8, 8), 3.0))
    assert out.shape == (1, 2, 4, 4)
    # Interior windows see only 3^2 with unit weight sum; the top-left one loses the padded row and column.
    assert out[0, :, 1:, 1:].sub(3.0).abs().max().item() < 1e-5
    assert out[0, 0, 0, 0].item() == pytest.approx(3.0 * math.sqrt(9 / 16), abs=1e-5)


def test_dists_identity_positive_symmetric(dists):
    gen = torch.Generator().manual_seed(0)
    x, y = _rand(gen, 2, 3, 32, 32), _rand(gen, 2, 3, 32, 32)
    assert dists(x, x).abs().item() < 1e-6
    d_xy, d_yx = dists(x, y, reduction="none"), dists(y, x, reduction="none")
    assert d_xy.shape == (2,)
    assert (d_xy > 0).all()
    assert torch.allclose(d_xy, d_yx, atol=1e-6)
    assert dists(x, y).item() == pytest.approx(d_xy.mean().item(), abs=1e-7)


def _dists_with_weight_on(weight_files, stage: int, term: str) -> DISTS:
    """DISTS whose alpha (term 'alpha') or beta is 1 on one stage's channels and 0 elsewhere."""
    bounds = np.cumsum((0, 3, 64, 128, 256, 512, 512))
    w = torch.zeros(1, DISTS_TOTAL_CHANNELS, 1, 1)
    w[:, bounds[stage] : bounds[stage + 1]] = 1.0
    zero = torch.zeros_like(w)
    alpha, beta = (w, zero) if term == "alpha" else (zero, w)
    return DISTS(load_vgg16_features(weight_files["vgg"]), alpha, beta)


def test_dists_stage0_terms_match_closed_form_on_raw_pixels(weight_files):
    gen = torch.Generator().manual_seed(3)
    x, y = _rand(gen, 1, 3, 16, 16), _rand(gen, 1, 3, 16, 16)
    xs, ys = x[0].double().numpy().reshape(3, -1), y[0].double().numpy().reshape(3, -1)
    mx, my = xs.mean(1), ys.mean(1)
    s1 = (2 * mx * my + 1e-6) / (mx**2 + my**2 + 1e-6)
    cov = (xs * ys).mean(1) - mx * my
    s2 = (2 * cov + 1e-6) / (xs.var(1) + ys.var(1) + 1e-6)
    # Weights are normalised by their total (3 channels here): score = 1 - mean over channels.
    assert _dists_with_weight_on(weight_files, 0, "alpha")(x, y).item() == pytest.approx(1 - s1.mean(), abs=1e-6)
    assert _dists_with_weight_on(weight_files, 0, "beta")(x, y).item() == pytest.approx(1 - s2.mean(), abs=1e-6)


def test_dists_stage2_uses_l2pooled_relu1_2_into_vgg_block2(weight_files):
    gen = torch.Generator().manual_seed(4)
    x, y = _rand(gen, 1, 3, 16, 16), _rand(gen, 1, 3, 16, 16)
    vgg = load_vgg16_features(weight_files["vgg"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    win = (torch.tensor([0.5, 1.0, 0.5])[:, None] * torch.tensor([0.5, 1.0, 0.5])[None, :]) / 4.0

    def relu2_2(img):
        h = vgg[0:4]((img - mean) / std)
        h = torch.sqrt(F.conv2d(h**2, win.expand(64, 1, 3, 3), stride=2, padding=1, groups=64) + 1e-12)
        return vgg[5:9](h)

    with torch.no_grad():
        fx, fy = relu2_2(x).double(), relu2_2(y).double()
    mx, my = fx.mean((2, 3)), fy.mean((2, 3))
    vx, vy = fx.var((2, 3), unbiased=False), fy.var((2, 3), unbiased=False)
    cov = (fx * fy).mean((2, 3)) - mx * my
    s2 = ((2 * cov + 1e-6) / (vx + vy + 1e-6)).mean().item()
    assert _dists_with_weight_on(weight_files, 2, "beta")(x, y).item() == pytest.approx(1 - s2, abs=1e-5)


def test_dists_gradients_reach_input_and_not_weights(dists):
    gen = torch.Generator().manual_seed(5)
    x = _rand(gen, 1, 3, 32, 32).requires_grad_(True)
    y = _rand(gen, 1, 3, 32, 32)
    dists(x, y).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in dists.parameters())
    dists.train()
    assert not dists.training


def test_dists_single_channel_maps_equal_grey_rgb(dists):
    gen = torch.Generator().manual_seed(6)
    e1, e2 = 3 * _rand(gen, 2, 1, 32, 32), 3 * _rand(gen, 2, 1, 32, 32)  # edge maps may exceed 1
    rgb = dists(e1.repeat(1, 3, 1, 1), e2.repeat(1, 3, 1, 1))
    assert dists(e1, e2).item() == pytest.approx(rgb.item(), abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        dists(e1, e2[:1])


def test_dists_weights_file_checks(tmp_path):
    shape = (1, DISTS_TOTAL_CHANNELS, 1, 1)
    torch.save({"alpha": torch.ones(shape), "beta": torch.ones(1, 1474, 1, 1)}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"'beta' must be a tensor of shape \(1, 1475, 1, 1\), got \(1, 1474, 1, 1\)"):
        load_dists_weights(tmp_path / "short.pt")
    torch.save({"alpha": torch.ones(shape)}, tmp_path / "no_beta.pt")
    with pytest.raises(ValueError, match=r"missing \['beta'\]"):
        load_dists_weights(tmp_path / "no_beta.pt")


# --- stage 2 ---------------------------------------------------------------------------------


def _mean_term(x: np.ndarray, y: np.ndarray) -> float:
    """1 - mean over channels of DISTS' structure term (2 mx my + c) / (mx^2 + my^2 + c) on raw pixels: the
    whole score of a DISTS whose only weight is alpha on stage 0 (the input itself)."""
    mx, my = x.reshape(len(x), -1).mean(1), y.reshape(len(y), -1).mean(1)
    return float(1 - ((2 * mx * my + 1e-6) / (mx**2 + my**2 + 1e-6)).mean())


def _sobel_by_hand(img: np.ndarray) -> np.ndarray:
    """Paper Eq. 9's Sobel map of a (3, H, W) image: 601 luma, edge-replicated border, |(gx, gy)|."""
    grey = np.pad(0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2], 1, mode="edge")
    h, w = img.shape[1:]
    win = lambda dy, dx: grey[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    gx = (win(-1, 1) + 2 * win(0, 1) + win(1, 1)) - (win(-1, -1) + 2 * win(0, -1) + win(1, -1))
    gy = (win(1, -1) + 2 * win(1, 0) + win(1, 1)) - (win(-1, -1) + 2 * win(-1, 0) + win(-1, 1))
    return np.sqrt(gx**2 + gy**2 + 1e-6)[None]


def test_edge_aware_dists_is_image_term_plus_edge_term_by_hand(weight_files):
    """With alpha on the raw-pixel stage only, both DISTS terms have a closed form: EA-DISTS must
    equal the image's term plus the term of Sobel maps computed here in numpy."""
    ea = EdgeAwareDISTS(_dists_with_weight_on(weight_files, 0, "alpha"))
    gen = torch.Generator().manual_seed(7)
    x, y = _rand(gen, 1, 3, 16, 16), 0.4 + 0.1 * _rand(gen, 1, 3, 16, 16)
    x[..., 8:] += 0.5  # x has strong edges, y is nearly flat: the edge term is far from 0
    xs, ys = x[0].double().numpy(), y[0].double().numpy()
    image_term = _mean_term(xs, ys)
    edge_term = _mean_term(_sobel_by_hand(xs), _sobel_by_hand(ys))
    assert edge_term > 0.05 and image_term > 0.001
    assert ea(x, y).item() == pytest.approx(image_term + edge_term, abs=1e-5)
    assert ea(x, x).abs().item() < 2e-6


def test_stage2_loss_terms(weight_files):
    ea = EdgeAwareDISTS(_dists_with_weight_on(weight_files, 0, "alpha"))
    gen = torch.Generator().manual_seed(8)
    pred = (2 * _rand(gen, 1, 3, 16, 16) - 1).requires_grad_(True)
    target = 2 * _rand(gen, 1, 3, 16, 16) - 1
    g_loss = torch.tensor(0.7)
    total, parts = stage2_loss(pred, target, ea, gan_generator_loss=g_loss)
    p, t = pred[0].detach().double().numpy(), target[0].double().numpy()
    assert parts["mse"].item() == pytest.approx(((p - t) ** 2).mean(), abs=1e-6)
    # EA-DISTS sees [0, 1] images: (x + 1) / 2
    p01, t01 = (p + 1) / 2, (t + 1) / 2
    expected_ea = _mean_term(p01, t01) + _mean_term(_sobel_by_hand(p01), _sobel_by_hand(t01))
    assert parts["ea_dists"].item() == pytest.approx(expected_ea, abs=1e-5)
    assert parts["gan"].item() == pytest.approx(0.007, abs=1e-7)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), abs=1e-6)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    _, parts_no_gan = stage2_loss(pred, target, ea)
    assert set(parts_no_gan) == {"mse", "ea_dists"}
