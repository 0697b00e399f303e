import dataclasses
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from haodiff_data.degrade import noise as noise_mod
from haodiff_data.degrade.generic import (
    FINAL_ORDERS,
    apply_final,
    apply_order,
    draw_final,
    draw_order,
    area_resize,
    jpeg,
    resize,
)
from haodiff_data.degrade.noise import add_noise, draw_noise, gaussian_field
from haodiff_data.recipe import FinalConfig, GenericConfig, NoiseConfig, OrderConfig

CFG = GenericConfig()
HQ_SHAPE = (128, 96)


def _hq(shape=HQ_SHAPE, seed=0) -> np.ndarray:
    """A smooth colourful test image in [0, 1]."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([0.5 + 0.4 * np.sin(x / 7 + c) * np.cos(y / 9 - c) for c in range(3)], axis=-1)
    img += 0.05 * rng.random(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _degrade(hq: np.ndarray, params: dict) -> np.ndarray:
    img = apply_order(hq, params["first"])
    img = apply_order(img, params["second"])
    return apply_final(img, params["final"])


def _draw(seed: int, cfg: GenericConfig = CFG, shape=HQ_SHAPE) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "first": draw_order(rng, cfg.first, shape, cfg.scale, second=False),
        "second": draw_order(rng, cfg.second, shape, cfg.scale, second=True),
        "final": draw_final(rng, cfg.final, shape, cfg.scale),
    }


def test_draw_apply_is_deterministic_and_json_replayable():
    hq = _hq()
    for seed in range(12):
        params = _draw(seed)
        assert _draw(seed) == params
        replayed = json.loads(json.dumps(params))
        assert replayed == params
        out = _degrade(hq, params)
        assert out.dtype == np.uint8 and out.shape == (*HQ_SHAPE, 3)
        assert _degrade(hq, replayed).tobytes() == out.tobytes()
    assert _degrade(hq, _draw(0)).tobytes() != _degrade(hq, _draw(1)).tobytes()


def test_params_are_plain_json_types():
    def walk(v):
        if isinstance(v, dict):
            assert all(isinstance(k, str) for k in v)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            assert v is None or type(v) in (bool, int, float, str), (v, type(v))

    for seed in range(20):
        walk(_draw(seed))


def test_apply_order_does_not_modify_its_input():
    hq = _hq()
    before = hq.copy()
    apply_order(hq, _draw(3)["first"])
    assert hq.tobytes() == before.tobytes()


def test_first_order_resize_is_relative_to_the_input_size():
    rng = np.random.default_rng(7)
    kinds = set()
    for _ in range(300):
        r = draw_order(rng, CFG.first, (512, 384), 4, second=False)["resize"]
        kinds.add(r["kind"])
        f = r["factor"]
        assert {"up": 1.0 <= f <= 1.5, "down": 0.15 <= f <= 1.0, "keep": f == 1.0}[r["kind"]]
        assert r["size"] == [int(512 * f), int(384 * f)]
        assert r["mode"] in ("area", "bilinear", "bicubic")
    assert kinds == {"up", "down", "keep"}


def test_second_order_resize_is_relative_to_hq_over_scale():
    rng = np.random.default_rng(8)
    for _ in range(300):
        r = draw_order(rng, CFG.second, (512, 384), 4, second=True)["resize"]
        f = r["factor"]
        assert {"up": 1.0 <= f <= 1.2, "down": 0.3 <= f <= 1.0, "keep": f == 1.0}[r["kind"]]
        assert r["size"] == [int(512 / 4 * f), int(384 / 4 * f)]
    # The target does not depend on what the first order left: any input size lands on it.
    params = draw_order(np.random.default_rng(9), CFG.second, HQ_SHAPE, 4, second=True)
    for shape in [(150, 77), (40, 31), HQ_SHAPE]:
        out = apply_order(_hq(shape), params)
        assert list(out.shape[:2]) == params["resize"]["size"]


def test_second_order_blur_coin_and_no_jpeg():
    rng = np.random.default_rng(10)
    orders = [draw_order(rng, CFG.second, HQ_SHAPE, 4, second=True) for _ in range(1000)]
    coins = np.array([o["blur_coin"] for o in orders])
    assert 0.75 < coins.mean() < 0.85  # second_blur_prob 0.8
    assert all((o["blur"] is None) == (not o["blur_coin"]) for o in orders)
    assert all(o["jpeg_quality"] is None for o in orders)


def test_apply_final_output_size_and_type():
    hq = _hq()
    small = apply_order(apply_order(hq, _draw(2)["first"]), _draw(2)["second"])
    params = draw_final(np.random.default_rng(11), CFG.final, HQ_SHAPE, 4)
    assert params["resize"]["size"] == [HQ_SHAPE[0] // 4, HQ_SHAPE[1] // 4]
    out = apply_final(small, params)
    assert out.dtype == np.uint8 and out.shape == (*HQ_SHAPE, 3)
    no_back = dataclasses.replace(CFG.final, resize_back=False)
    params = draw_final(np.random.default_rng(11), no_back, HQ_SHAPE, 4)
    assert params["resize_back"] is None
    out = apply_final(small, params)
    assert out.dtype == np.uint8 and out.shape == (HQ_SHAPE[0] // 4, HQ_SHAPE[1] // 4, 3)


def test_final_order_and_sinc_frequencies():
    rng = np.random.default_rng(12)
    finals = [draw_final(rng, CFG.final, (512, 512), 4) for _ in range(1000)]
    assert {f["order"] for f in finals} == set(FINAL_ORDERS)
    assert 0.45 < np.mean([f["order"] == "jpeg_resize_sinc" for f in finals]) < 0.55
    assert 0.75 < np.mean([f["sinc"] is not None for f in finals]) < 0.85
    assert all(f["resize_back"]["size"] == [512, 512] for f in finals)


def test_jpeg_quality_is_an_integer_in_range():
    rng = np.random.default_rng(13)
    qualities = [draw_order(rng, CFG.first, HQ_SHAPE, 4, second=False)["jpeg_quality"] for _ in range(400)]
    qualities += [draw_final(rng, CFG.final, HQ_SHAPE, 4)["jpeg_quality"] for _ in range(400)]
    assert all(type(q) is int and 30 <= q <= 95 for q in qualities)
    assert min(qualities) == 30 and max(qualities) == 95
    with pytest.raises(ValueError, match="jpeg_range"):
        draw_order(rng, dataclasses.replace(CFG.first, jpeg_range=(0.0, 50.0)), HQ_SHAPE, 4, second=False)


def test_jpeg_round_trip_is_8bit_and_lower_quality_loses_more():
    hq = _hq((96, 96))
    errors = []
    for q in (95, 30):
        out = jpeg(hq, q)
        assert out.dtype == np.float32 and out.shape == hq.shape
        levels = np.rint(out.astype(np.float64) * 255)
        np.testing.assert_array_equal(out, (levels / 255).astype(np.float32))
        errors.append(np.abs(out - hq).mean())
    assert errors[0] < errors[1] < 0.05
    with pytest.raises(ValueError, match="quality"):
        jpeg(hq, 70.5)


def _noise(kind, gray, value, seed=5):
    p = {"kind": kind, "gray": gray, "sigma": None, "poisson_scale": None, "noise_seed": seed}
    p["sigma" if kind == "gaussian" else "poisson_scale"] = value
    return p


@pytest.mark.parametrize("gray", [False, True])
def test_gaussian_noise_std_on_flat_grey(gray):
    flat = np.full((256, 256, 3), 0.5, np.float32)
    out = add_noise(flat, _noise("gaussian", gray, 20.0))
    diff = out.astype(np.float64) - 0.5
    assert diff.std() == pytest.approx(20 / 255, rel=0.02)
    assert abs(diff.mean()) < 1e-3
    if gray:
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
    else:
        assert abs(np.corrcoef(diff[..., 0].ravel(), diff[..., 1].ravel())[0, 1]) < 0.02
    assert out.tobytes() == add_noise(flat, _noise("gaussian", gray, 20.0)).tobytes()


def test_gaussian_field_is_standard_normal():
    z = gaussian_field(np.random.default_rng(0), 400_001, 1.0).astype(np.float64)
    assert z.shape == (400_001,)
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.01)
    assert abs(stats.skew(z)) < 0.02 and abs(stats.kurtosis(z)) < 0.05
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_noise_is_clipped_to_unit_range():
    flat = np.full((64, 64, 3), 0.98, np.float32)
    out = add_noise(flat, _noise("gaussian", False, 30.0))
    assert out.max() == 1.0 and out.min() >= 0.0


@pytest.mark.parametrize("gray", [False, True])
def test_poisson_noise_mean_and_variance_on_flat_image(gray):
    level = 128
    flat = np.full((256, 256, 3), level / 255, np.float32)
    scale = 0.1
    out = add_noise(flat, _noise("poisson", gray, scale))
    diff = out.astype(np.float64) - level / 255
    # One distinct level: vals = 1, so Var = img / vals * scale^2.
    assert abs(diff.mean()) < 3e-3
    assert diff.var() == pytest.approx(level / 255 * scale**2, rel=0.05)
    if gray:
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_poisson_vals_is_next_power_of_two_of_distinct_levels():
    # Three distinct levels -> vals = 4; each level's noise variance is l/255/4 * scale^2.
    img = np.zeros((300, 300, 3), np.float32)
    for i, level in enumerate((60, 120, 200)):
        img[i * 100 : (i + 1) * 100] = level / 255
    scale = 0.05
    out = add_noise(img, _noise("poisson", False, scale))
    for i, level in enumerate((60, 120, 200)):
        diff = out[i * 100 : (i + 1) * 100].astype(np.float64) - level / 255
        assert diff.var() == pytest.approx(level / 255 / 4 * scale**2, rel=0.06)


def test_poisson_sampler_is_the_exact_inverse_cdf():
    rng_levels = np.random.default_rng(1)
    levels = rng_levels.integers(0, 256, size=(300, 300), dtype=np.uint8)
    scale = 1.0
    got = noise_mod._poisson_noise(np.random.default_rng(99), levels, scale)
    vals = 256
    u = np.random.default_rng(99).integers(0, 2**32, size=levels.size, dtype=np.uint32) * 2.0**-32
    flat = levels.reshape(-1)
    rates = flat.astype(np.float64) * vals / 255
    k_got = np.rint(got.reshape(-1).astype(np.float64) * vals + rates).astype(np.int64)
    k_ref = np.empty_like(k_got)
    support = np.arange(700)
    for level in range(256):
        sel = flat == level
        cdf = stats.poisson.cdf(support, level * vals / 255)
        k_ref[sel] = np.searchsorted(cdf, u[sel], side="right")
    np.testing.assert_array_equal(k_got, k_ref)


def test_draw_noise_ranges_and_mix():
    rng = np.random.default_rng(14)
    cfg = NoiseConfig()
    draws = [draw_noise(rng, cfg) for _ in range(2000)]
    gauss = [d for d in draws if d["kind"] == "gaussian"]
    pois = [d for d in draws if d["kind"] == "poisson"]
    assert 0.45 < len(gauss) / len(draws) < 0.55
    assert all(1.0 <= d["sigma"] <= 30.0 and d["poisson_scale"] is None for d in gauss)
    assert all(0.05 <= d["poisson_scale"] <= 3.0 and d["sigma"] is None for d in pois)
    assert 0.35 < np.mean([d["gray"] for d in draws]) < 0.45
    assert len({d["noise_seed"] for d in draws}) == len(draws)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="float32 HxWx3"):
        apply_order(np.zeros((8, 8, 3), np.uint8), _draw(0)["first"])
    with pytest.raises(ValueError, match="scale"):
        draw_order(np.random.default_rng(0), CFG.first, HQ_SHAPE, 0, second=False)
    with pytest.raises(ValueError, match="resize_modes"):
        draw_final(np.random.default_rng(0), FinalConfig(resize_modes=("nearest",)), HQ_SHAPE, 4)
    with pytest.raises(ValueError, match="unknown order"):
        apply_final(_hq(), {**_draw(0)["final"], "order": "sinc_first"})
    bad_resize = OrderConfig(resize=dataclasses.replace(OrderConfig().resize, range=(1.2, 1.5)))
    with pytest.raises(ValueError, match="range"):
        draw_order(np.random.default_rng(0), bad_resize, HQ_SHAPE, 4, second=False)


# Allocates, touches and frees blocks of 1..16 MiB with the C library's malloc and prints the page
# faults taken. glibc's default serves each new larger block with a fresh mmap and returns it on free
# (every page faults once per block); tuned, the heap keeps the pages and only growth faults.
_FAULTS_SCRIPT = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "tuned":
    from haodiff_data.degrade.generic import tune_malloc
    assert tune_malloc() is True
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in range(1, 17):
    p = libc.malloc(mib << 20)
    libc.memset(p, 1, mib << 20)
    libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_keeps_freed_blocks_for_reuse():
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return int(done.stdout)

    page = os.sysconf("SC_PAGE_SIZE")
    largest, total = (16 << 20) // page, (136 << 20) // page  # 1 + 2 + ... + 16 MiB
    tuned, default = faults("tuned"), faults("default")
    assert tuned < 1.25 * largest, (tuned, largest)  # each page of the heap faulted about once
    assert default > 0.9 * total, (default, total)  # the control: without tuning every block faults anew


@pytest.mark.parametrize("src,dst", [
    ((512, 512), (128, 128)),  # integer shrink: OpenCV's path
    ((128, 128), (512, 512)),  # integer enlargement: OpenCV's path
    ((512, 512), (77, 300)),
    ((300, 217), (341, 129)),  # enlarge one axis, shrink the other
    ((128, 128), (153, 153)),  # Real-ESRGAN's second-order "up" at 128 * 1.2
    ((512, 512), (512, 1024)),
    ((512, 512), (700, 650)),  # enlarging by a non-integer factor
])
def test_area_resize_is_torch_adaptive_average_pooling(src, dst):
    import torch

    img = np.random.default_rng(0).random((*src, 3), dtype=np.float32)
    ours = resize(img, list(dst), "area")
    ref = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=dst, mode="area")
    assert ours.shape == (*dst, 3) and ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(area_resize(img, dst), ours)
