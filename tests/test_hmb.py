import dataclasses
import json
import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from haodiff_data.degrade import hmb
from haodiff_data.degrade.hmb import apply_hmb, draw_hmb, motion_psf, weight_map
from haodiff_data.recipe import HMBConfig

SIZE = 160


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.random((SIZE, SIZE, 3), dtype=np.float32), (0, 0), 1.0)


def _disc(cy, cx, radius):
    yy, xx = np.indices((SIZE, SIZE))
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _ellipse_kernel(size):
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _params(seed=0, **overrides):
    params = draw_hmb(np.random.default_rng(seed), HMBConfig(psf_expl_choices=(0.005,), psf_fraction_choices=(1.0,)), ["head"])
    params.update(overrides)
    return params


def test_draw_records_every_value_and_round_trips_json():
    cfg = HMBConfig()
    params = draw_hmb(np.random.default_rng(5), cfg, ["head", "whole_body"])
    assert params["group"] in ("head", "whole_body")
    assert params["erode_ksize"] % 2 == 1 and cfg.erode_range[0] <= params["erode_ksize"] <= cfg.erode_range[1]
    assert params["dilate_ksize"] % 2 == 1 and cfg.dilate_range[0] <= params["dilate_ksize"] <= cfg.dilate_range[1]
    assert cfg.feather_sigma_range[0] <= params["feather_sigma"] <= cfg.feather_sigma_range[1]
    assert params["psf_expl"] in cfg.psf_expl_choices and params["psf_fraction"] in cfg.psf_fraction_choices
    assert (params["psf_canvas"], params["psf_iters"], params["psf_max_len"]) == (64, 2000, 60.0)
    traj = params["trajectory"]
    assert {"centripetal", "big_shake_prob", "gaussian_shake", "theta0_deg", "big_shakes"} <= set(traj)
    assert 0 < params["psf_extent_px"] <= traj["extent_px"] <= 60 and params["psf_support_px"] > 0
    assert json.loads(json.dumps(params)) == params
    assert draw_hmb(np.random.default_rng(5), cfg, ["whole_body", "head"]) == params  # list order is irrelevant


def test_motion_psf_rebuilds_from_params_alone():
    params = _params(3)
    psf = motion_psf(params)
    hmb.clear_psf_cache()
    again = motion_psf(json.loads(json.dumps(params)))
    assert np.array_equal(psf, again)
    assert math.isclose(psf.sum(), 1.0, rel_tol=1e-12)
    rows, cols = np.indices(psf.shape)
    assert abs((psf * rows).sum() - 32) < 0.05 and abs((psf * cols).sum() - 32) < 0.05
    assert np.count_nonzero(psf) == params["psf_support_px"]


def _spread(psf: np.ndarray) -> float:
    """Second moment of a PSF about its canvas centre."""
    rows, cols = np.indices(psf.shape) - psf.shape[0] // 2
    return float((psf * (rows**2 + cols**2)).sum())


def test_psf_scale_magnifies_the_same_trajectory():
    cfg = HMBConfig(psf_expl_choices=(0.005,), psf_fraction_choices=(1.0,))
    small = draw_hmb(np.random.default_rng(7), cfg, ["head"])
    large = draw_hmb(np.random.default_rng(7), cfg, ["head"], psf_scale=4)
    assert small["psf_scale"] == 1.0 and large["psf_scale"] == 4.0
    drawn = ("psf_seed", "psf_canvas", "psf_iters", "psf_max_len", "psf_expl", "psf_fraction")
    assert [small[k] for k in drawn] == [large[k] for k in drawn]
    assert large["psf_extent_px"] == pytest.approx(4 * small["psf_extent_px"], abs=0.01)
    psf = motion_psf(large)
    assert psf.shape == (256, 256) and math.isclose(psf.sum(), 1.0, rel_tol=1e-12)
    rows, cols = np.indices(psf.shape)
    assert abs((psf * rows).sum() - 128) < 0.05 and abs((psf * cols).sum() - 128) < 0.05
    # The same shape spread over 4x the length: the second moment grows 16-fold (up to the
    # bilinear splat's own width, which does not scale).
    assert _spread(psf) == pytest.approx(16 * _spread(motion_psf(small)), rel=0.05)
    with pytest.raises(ValueError, match="psf_scale must be > 0"):
        draw_hmb(np.random.default_rng(7), cfg, ["head"], psf_scale=0)


def test_params_without_psf_scale_rebuild_the_unmagnified_psf():
    params = _params(4)
    old = {k: v for k, v in params.items() if k != "psf_scale"}  # a sample written before the knob
    hmb.clear_psf_cache()
    assert np.array_equal(motion_psf(old), motion_psf(params))


def test_group_draw_uses_only_available_groups_with_renormalised_weights():
    cfg = HMBConfig(
        groups=("head", "left_upper_limb", "right_upper_limb", "whole_body"),
        group_weights=(3.0, 1.0, 5.0, 0.0),
        psf_iters=50,
        psf_max_len=10.0,
    )
    rng = np.random.default_rng(0)
    drawn = [draw_hmb(rng, cfg, ["whole_body", "left_upper_limb", "head"])["group"] for _ in range(600)]
    assert set(drawn) == {"head", "left_upper_limb"}  # right_upper_limb unavailable, whole_body weight 0
    assert 0.69 < drawn.count("head") / len(drawn) < 0.81  # 3 / (3 + 1)


def test_group_draw_errors_are_clear():
    cfg = HMBConfig()
    with pytest.raises(ValueError, match="no body-part group is available"):
        draw_hmb(np.random.default_rng(0), cfg, [])
    with pytest.raises(ValueError, match="not in hmb.groups"):
        draw_hmb(np.random.default_rng(0), cfg, ["tail"])
    zero = dataclasses.replace(cfg, group_weights=(0.0, 1.0, 1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="not all 0"):
        draw_hmb(np.random.default_rng(0), zero, ["head"])
    with pytest.raises(ValueError, match="hmb.erode_range"):
        draw_hmb(np.random.default_rng(0), dataclasses.replace(cfg, erode_range=(2, 2)), ["head"])


def test_weight_map_range_and_plateau():
    mask = _disc(80, 80, 50)
    for erode, dilate, sigma in ((7, 9, 8.0), (1, 31, 2.0), (3, 15, 5.0)):
        w = weight_map(mask, _params(erode_ksize=erode, dilate_ksize=dilate, feather_sigma=sigma))
        assert w.dtype == np.float32 and w.shape == mask.shape
        assert w.min() >= 0 and w.max() == 1
        assert (w[_disc(80, 80, 12)] == 1).all()  # beyond the (square) Gaussian support of any edge
        reach = 50 + dilate // 2 + math.sqrt(2) * math.ceil(3 * sigma) + 1  # dilation + square Gaussian support
        assert (w[~_disc(80, 80, reach)] == 0).all()
        assert (w[_disc(80, 80, 50 - erode // 2 + dilate // 2 + math.ceil(3 * sigma) - 2)] > 0).all()


@pytest.mark.parametrize("erode, dilate, sigma", [(7, 9, 8.0), (1, 31, 2.0), (5, 21, 4.0)])
def test_mask_threshold_lies_between_eroded_and_dilated_part(erode, dilate, sigma):
    part = _disc(70, 90, 45)
    w = weight_map(part, _params(erode_ksize=erode, dilate_ksize=dilate, feather_sigma=sigma))
    m = w >= 0.5
    eroded = cv2.erode(part.astype(np.uint8), _ellipse_kernel(erode)).astype(bool)
    dilated = cv2.dilate(part.astype(np.uint8), _ellipse_kernel(dilate)).astype(bool)
    assert m[eroded].all()
    assert not m[~dilated].any()


def test_weight_map_crop_equals_full_frame_computation():
    part = _disc(10, 150, 30) | _disc(120, 40, 12)  # touches two image borders
    params = _params(erode_ksize=5, dilate_ksize=17, feather_sigma=3.3)
    soft = cv2.erode(part.astype(np.uint8), _ellipse_kernel(5))
    soft = cv2.dilate(soft, _ellipse_kernel(17)).astype(np.float32)
    soft = cv2.GaussianBlur(soft, (2 * math.ceil(3 * 3.3) + 1,) * 2, 3.3)
    np.testing.assert_allclose(weight_map(part, params), soft / soft.max(), atol=1e-6)


def test_hmb_blends_only_inside_the_weight_map():
    img = _image()
    part = _disc(80, 80, 40)
    out, w = apply_hmb(img, part, _params(1))
    assert out.dtype == np.float32 and out.shape == img.shape
    assert np.array_equal(out[w == 0], img[w == 0])
    inside = _disc(80, 80, 30)
    assert np.abs(out[inside] - img[inside]).mean() > 0.01


def _blurred_reference(img, params):
    psf = motion_psf(params)
    return np.stack([ndimage.convolve(img[..., c].astype(np.float64), psf, mode="reflect") for c in range(3)], axis=-1)


@pytest.mark.parametrize("where", ["borders", "interior"])
def test_blur_equals_full_frame_reflect_convolution(where):
    img = _image(2)
    part = _disc(0, 0, 35) | _disc(159, 100, 20) if where == "borders" else _disc(80, 80, 22)
    params = _params(4, erode_ksize=3, dilate_ksize=11, feather_sigma=2.0)
    out, w = apply_hmb(img, part, params)
    ref = _blurred_reference(img, params)
    full = w == 1
    assert full.sum() > 1000
    np.testing.assert_allclose(out[full], ref[full], atol=2e-5)
    blend = (1 - w[..., None]) * img + w[..., None] * ref
    np.testing.assert_allclose(out, blend, atol=2e-5)


def test_constant_image_stays_constant_no_dark_borders():
    img = np.full((SIZE, SIZE, 3), 0.7, np.float32)
    part = _disc(5, 5, 60) | _disc(150, 150, 30)
    for seed in range(3):
        out, w = apply_hmb(img, part, _params(seed, psf_expl=0.003))
        assert w.max() == 1
        np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_apply_is_deterministic_and_replays_from_json():
    img = _image(3)
    part = _disc(90, 70, 35)
    params = draw_hmb(np.random.default_rng(11), HMBConfig(), ["head"])
    out1, w1 = apply_hmb(img, part, params)
    hmb.clear_psf_cache()
    out2, w2 = apply_hmb(img, part, json.loads(json.dumps(params)))
    assert out1.tobytes() == out2.tobytes() and w1.tobytes() == w2.tobytes()


def test_empty_mask_returns_input_and_zero_weights():
    img = _image(4)
    out, w = apply_hmb(img, np.zeros((SIZE, SIZE), bool), _params())
    assert np.array_equal(out, img) and out is not img and not w.any()


def test_bad_inputs_raise_clear_errors():
    img, part = _image(), _disc(80, 80, 20)
    with pytest.raises(ValueError, match="float32 HxWx3"):
        apply_hmb(img.astype(np.float64), part, _params())
    with pytest.raises(ValueError, match="shape"):
        apply_hmb(img, part[:-1], _params())
    with pytest.raises(ValueError, match="bool HxW"):
        weight_map(part.astype(np.uint8), _params())
    with pytest.raises(ValueError, match="dilate_ksize must be an odd int"):
        weight_map(part, _params(dilate_ksize=10))
    with pytest.raises(ValueError, match="missing key 'psf_seed'"):
        motion_psf({})
