import json

import cv2
import numpy as np
import pytest
from scipy import special

from haodiff_data.degrade import kernels
from haodiff_data.degrade.kernels import (
    FILTER_TOL,
    build_kernel,
    draw_blur_kernel,
    draw_sinc,
    filter2d,
    gaussian_kernel,
    generalized_gaussian_kernel,
    plateau_kernel,
    sinc_kernel,
)
from haodiff_data.recipe import BlurConfig


def _kp(kind, size, sx=None, sy=None, theta=None, beta=None, omega=None) -> dict:
    """Kernel params in the draw_blur_kernel format."""
    geometry = {"sigma_x": sx, "sigma_y": sy, "theta": theta, "beta": beta, "omega_c": omega}
    return {"type": kind, "size": size, **geometry}


def _q(dx: float, dy: float, sx: float, sy: float, theta: float) -> float:
    """p^T Sigma^-1 p from an explicit covariance matrix (independent of the module)."""
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cov = rot @ np.diag([sx**2, sy**2]) @ rot.T
    p = np.array([dx, dy], dtype=np.float64)
    return float(p @ np.linalg.inv(cov) @ p)


POINTS = [(1, 0), (0, 2), (-3, 1), (2, -2), (4, 3)]  # (x = column offset, y = row offset)
CLOSED_FORMS = [
    ("iso", (2.0, 2.0, 0.0), None, lambda q, b: np.exp(-q / 2)),
    ("aniso", (2.5, 0.9, 0.7), None, lambda q, b: np.exp(-q / 2)),
    ("generalized_iso", (1.5, 1.5, 0.0), 0.6, lambda q, b: np.exp(-(q**b) / 2)),
    ("generalized_aniso", (1.2, 2.9, -1.1), 3.0, lambda q, b: np.exp(-(q**b) / 2)),
    ("plateau_iso", (1.5, 1.5, 0.0), 1.0, lambda q, b: 1 / (1 + q**b)),
    ("plateau_aniso", (1.2, 2.9, -1.1), 1.7, lambda q, b: 1 / (1 + q**b)),
]


@pytest.mark.parametrize("kind, geometry, beta, form", CLOSED_FORMS)
def test_mixed_kernels_sum_to_one_and_match_closed_form(kind, geometry, beta, form):
    sx, sy, theta = geometry
    k = build_kernel(_kp(kind, 15, sx, sy, theta, beta))
    assert k.dtype == np.float32 and k.shape == (15, 15)
    assert float(k.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6)
    c = 7
    unnormalised = np.array([form(_q(dx, dy, *geometry), beta) for dx, dy in POINTS])
    # The centre has q = 0, where every form is 1: ratios to it drop the normalisation.
    got = np.array([k[c + dy, c + dx] / k[c, c] for dx, dy in POINTS])
    np.testing.assert_allclose(got, unnormalised, rtol=1e-5)
    # And the normalisation constant is the sum of the form over the whole grid.
    total = sum(form(_q(x, y, *geometry), beta) for x in range(-7, 8) for y in range(-7, 8))
    assert k[c, c] == pytest.approx(1 / total, rel=1e-5)


def test_generalized_and_plateau_special_cases():
    # beta = 1 turns the generalized Gaussian into the Gaussian.
    np.testing.assert_allclose(
        generalized_gaussian_kernel(13, 2.0, 1.0, 0.5, 1.0), gaussian_kernel(13, 2.0, 1.0, 0.5), rtol=1e-12
    )
    # Plateau with beta = 1 at unit distance and sigma 1: 1 / (1 + 1) of the centre.
    k = plateau_kernel(13, 1.0, 1.0, 0.0, 1.0)
    assert k[6, 7] / k[6, 6] == pytest.approx(0.5, rel=1e-12)
    assert k[8, 6] / k[6, 6] == pytest.approx(0.2, rel=1e-12)


def test_iso_kernel_is_rotation_invariant():
    k = gaussian_kernel(21, 2.3, 2.3, 0.0)
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, np.rot90(k), atol=1e-15)
    for theta in (0.4, 1.3, -2.9):
        np.testing.assert_allclose(gaussian_kernel(21, 2.3, 2.3, theta), k, atol=1e-15)


def test_aniso_kernel_follows_theta():
    c = 10
    along_x = gaussian_kernel(21, 3.0, 0.6, 0.0)
    assert along_x[c, c + 4] > 100 * along_x[c + 4, c]  # long axis along columns (x)
    along_y = gaussian_kernel(21, 3.0, 0.6, np.pi / 2)
    np.testing.assert_allclose(along_y, along_x.T, atol=1e-15)
    # theta rotates the long axis: at 45 degrees it lies on the x = y diagonal.
    diag = gaussian_kernel(21, 3.0, 0.6, np.pi / 4)
    assert diag[c + 3, c + 3] > 100 * diag[c + 3, c - 3]
    # Reflection across the diagonal maps theta to pi/2 - theta.
    mirrored = gaussian_kernel(21, 3.0, 0.6, np.pi / 2 - 0.3)
    np.testing.assert_allclose(gaussian_kernel(21, 3.0, 0.6, 0.3).T, mirrored, atol=1e-15)


def test_sinc_centre_value_and_shape():
    omega, size, c = 1.3, 13, 6
    k = sinc_kernel(size, omega)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    r = np.hypot(*np.meshgrid(np.arange(size) - c, np.arange(size) - c))
    r[c, c] = 1.0
    raw = omega * special.j1(omega * r) / (2 * np.pi * r)
    raw[c, c] = omega**2 / (4 * np.pi)
    np.testing.assert_allclose(k, raw / raw.sum(), rtol=1e-12)
    # The centre value is the r -> 0 limit of the off-centre formula.
    tiny = 1e-7
    limit = omega * special.j1(omega * tiny) / (2 * np.pi * tiny)
    assert limit == pytest.approx(omega**2 / (4 * np.pi), rel=1e-9)
    np.testing.assert_allclose(k, k.T, atol=1e-15)


@pytest.mark.parametrize("omega", [np.pi / 2, 2.5])
def test_sinc_is_a_low_pass_at_omega(omega):
    k = sinc_kernel(21, omega)
    n = 256
    gain = np.abs(np.fft.fft2(k, (n, n)))
    f = np.fft.fftfreq(n) * 2 * np.pi
    radius = np.hypot(*np.meshgrid(f, f))
    inside = gain[radius < 0.6 * omega]
    assert inside.min() > 0.8 and inside.max() < 1.2
    outside = gain[radius > 1.4 * omega]
    assert outside.size > 0 and outside.max() < 0.1


def test_build_kernel_float32_sums_to_one_for_every_draw():
    rng = np.random.default_rng(0)
    cfg = BlurConfig(sinc_prob=0.3)
    seen = set()
    for _ in range(300):
        p = draw_blur_kernel(rng, cfg)
        seen.add(p["type"])
        k = build_kernel(p)
        assert k.dtype == np.float32 and k.shape == (p["size"], p["size"])
        assert float(k.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)
        again = build_kernel(json.loads(json.dumps(p)))
        assert again.tobytes() == k.tobytes()
    assert seen == set(kernels.KERNEL_TYPES)


def test_draw_blur_kernel_records_the_a2_rules():
    rng = np.random.default_rng(1)
    cfg = BlurConfig()
    for _ in range(300):
        p = draw_blur_kernel(rng, cfg)
        assert set(p) == {"type", "size", "sigma_x", "sigma_y", "theta", "beta", "omega_c"}
        assert p["size"] in cfg.kernel_sizes and isinstance(p["size"], int)
        if p["type"] == "sinc":
            assert p["sigma_x"] is None and p["beta"] is None
            continue
        assert p["omega_c"] is None
        assert 0.2 <= p["sigma_x"] <= 3.0 and 0.2 <= p["sigma_y"] <= 3.0
        if p["type"].endswith("aniso"):
            assert -np.pi <= p["theta"] <= np.pi
        else:
            assert p["sigma_y"] == p["sigma_x"] and p["theta"] == 0.0
        assert (p["beta"] is None) == (p["type"] in ("iso", "aniso"))


def test_sinc_cutoff_range_depends_on_kernel_size():
    rng = np.random.default_rng(2)
    cfg = BlurConfig(sinc_prob=1.0)
    small, large = [], []
    for _ in range(600):
        p = draw_blur_kernel(rng, cfg)
        assert p["type"] == "sinc"
        (small if p["size"] < 13 else large).append(p["omega_c"])
    assert min(small) >= np.pi / 3 and max(small) <= np.pi
    assert min(large) >= np.pi / 5 and min(large) < np.pi / 3 and max(large) <= np.pi
    finals = [draw_sinc(rng, (7, 21))["omega_c"] for _ in range(300)]
    assert min(finals) >= np.pi / 3 and max(finals) <= np.pi


def test_beta_draw_rule_half_below_one_half_above():
    rng = np.random.default_rng(3)
    plateau = BlurConfig(kernel_types=("plateau_iso",), kernel_probs=(1.0,), sinc_prob=0.0)
    betas = np.array([draw_blur_kernel(rng, plateau)["beta"] for _ in range(2000)])
    ones = np.mean(betas == 1.0)  # betap = [1, 2]: the lower branch is U[1, 1], exactly 1
    assert 0.45 < ones < 0.55
    assert betas.min() == 1.0 and betas.max() <= 2.0
    gen = BlurConfig(kernel_types=("generalized_aniso",), kernel_probs=(1.0,), sinc_prob=0.0)
    betas = np.array([draw_blur_kernel(rng, gen)["beta"] for _ in range(2000)])
    assert betas.min() >= 0.5 and betas.max() <= 4.0
    assert 0.45 < np.mean(betas < 1.0) < 0.55


def test_bad_kernel_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(8, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="unknown type"):
        build_kernel({"type": "box", "size": 7})
    bad_beta = BlurConfig(
        kernel_types=("plateau_iso",), kernel_probs=(1.0,), betap_range=(1.5, 2.0), sinc_prob=0.0
    )
    with pytest.raises(ValueError, match="betap_range"):
        draw_blur_kernel(np.random.default_rng(0), bad_beta)
    with pytest.raises(ValueError, match="odd square kernel"):
        filter2d(np.zeros((8, 8, 3), np.float32), np.ones((4, 4), np.float32))


def _reference(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


@pytest.mark.parametrize(
    "params, shape, path",
    [
        (_kp("iso", 21, 3.0, 3.0, 0.0), (96, 130), "sep"),
        (_kp("aniso", 21, 2.9, 2.2, 0.0), (64, 64), "sep"),  # axis-aligned: rank 1
        (_kp("aniso", 9, 1.5, 0.3, 0.8), (70, 50), "direct"),
        (_kp("sinc", 21, omega=1.1), (200, 150), "dft"),
        (_kp("plateau_aniso", 19, 2.0, 0.7, 2.0, beta=1.0), (33, 41), "dft"),
    ],
)
def test_filter2d_paths_match_full_cv2_filter2d(params, shape, path):
    kernel = build_kernel(params)
    assert kernels._plan(kernel, shape)[0] == path
    img = np.random.default_rng(4).random((*shape, 3), dtype=np.float32)
    out = filter2d(img, kernel)
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_allclose(out, _reference(img, kernel), atol=1e-5, rtol=0)
    single = filter2d(np.ascontiguousarray(img[..., 1]), kernel)
    np.testing.assert_allclose(single, _reference(img[..., 1], kernel), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (2, 30), (40, 3)])
def test_dft_path_handles_images_smaller_than_the_kernel(shape):
    kernel = sinc_kernel(21, 1.0).astype(np.float32)
    img = np.random.default_rng(6).random((*shape, 3), dtype=np.float32)
    out = kernels._filter_dft(img, kernel)
    np.testing.assert_allclose(out, _reference(img, kernel), atol=1e-5, rtol=0)


def test_low_rank_terms_reconstruct_the_kernel_within_tolerance():
    kernel = build_kernel(_kp("aniso", 15, 2.5, 0.8, 0.6))
    terms = kernels._low_rank(kernel, FILTER_TOL)
    recon = sum(np.outer(col, row).astype(np.float64) for col, row in terms)
    assert 1 < len(terms) < 15
    assert np.abs(recon - kernel).sum() <= FILTER_TOL + 1e-6  # float32 storage of the terms
    iso = build_kernel(_kp("iso", 15, 2.0, 2.0, 0.0))
    assert len(kernels._low_rank(iso, FILTER_TOL)) == 1


def test_filter2d_is_deterministic_and_leaves_input_alone():
    kernel = sinc_kernel(17, 1.0).astype(np.float32)
    img = np.random.default_rng(5).random((90, 70, 3), dtype=np.float32)
    before = img.copy()
    a, b = filter2d(img, kernel), filter2d(img, kernel)
    assert a.tobytes() == b.tobytes()
    assert img.tobytes() == before.tobytes()
