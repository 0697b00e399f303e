import math

import numpy as np
import pytest

from haodiff_data.degrade.trajectory import exposure_weights, markov_trajectory, trajectory_extent, trajectory_psf

CANVAS, ITERS, MAX_LEN = 64, 2000, 60.0


def _traj(seed, expl=0.005):
    return markov_trajectory(np.random.default_rng(seed), CANVAS, ITERS, MAX_LEN, expl)


def _centroid(psf):
    rows, cols = np.indices(psf.shape)
    return (psf * rows).sum() / psf.sum(), (psf * cols).sum() / psf.sum()


def test_steps_have_equal_length_summing_to_max_len():
    traj, _ = _traj(1)
    steps = np.abs(np.diff(traj))
    assert traj.shape == (ITERS,) and traj.dtype == np.complex128
    np.testing.assert_allclose(steps, MAX_LEN / (ITERS - 1), rtol=1e-9)
    assert math.isclose(steps.sum(), MAX_LEN, rel_tol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_trajectory_is_centred_as_in_reference(seed):
    traj, _ = _traj(seed)
    # x[0] lands on integer coordinates; the bounding-box centre sits in (canvas/2, canvas/2 + 1.5).
    assert traj[0].real == int(traj[0].real) and traj[0].imag == int(traj[0].imag)
    for axis in (traj.real, traj.imag):
        offset = (axis.min() + axis.max()) / 2 - CANVAS / 2
        assert 0 < offset < 1.5
        assert axis.min() > 0 and axis.max() < CANVAS


def test_scalars_recorded_and_in_range():
    traj, info = _traj(3, expl=0.01)
    traj2, info2 = _traj(3, expl=0.01)
    assert np.array_equal(traj, traj2) and info == info2
    assert set(info) == {"centripetal", "big_shake_prob", "gaussian_shake", "theta0_deg", "big_shakes"}
    assert 0 <= info["centripetal"] < 0.7 and 0 <= info["big_shake_prob"] < 0.2
    assert 0 <= info["gaussian_shake"] < 10 and 0 <= info["theta0_deg"] < 360
    assert isinstance(info["big_shakes"], int) and info["big_shakes"] >= 0


def test_zero_expl_is_a_straight_line_at_the_initial_angle():
    traj, info = _traj(4, expl=0.0)
    theta = math.radians(info["theta0_deg"])
    expected = MAX_LEN * max(abs(math.cos(theta)), abs(math.sin(theta)))
    assert math.isclose(trajectory_extent(traj), expected, rel_tol=1e-9)
    assert info["big_shakes"] == 0


def test_extent_statistics_match_reference_generator():
    # data_spec B.4 (100 trajectories, canvas 64, max_len 60): mean extent 23.4 / 17.9 / 13.3 px and
    # mean big shakes 0.65 / 1.08 / 2.34 for expl 0.003 / 0.005 / 0.01.
    means, shakes = {}, {}
    for expl in (0.003, 0.005, 0.01):
        rng = np.random.default_rng(2024)
        runs = [markov_trajectory(rng, CANVAS, ITERS, MAX_LEN, expl) for _ in range(100)]
        means[expl] = np.mean([trajectory_extent(t) for t, _ in runs])
        shakes[expl] = np.mean([info["big_shakes"] for _, info in runs])
    assert 20.0 < means[0.003] < 27.0
    assert 15.0 < means[0.005] < 21.0
    assert 11.0 < means[0.01] < 16.0
    assert 0.3 < shakes[0.003] < 1.0 and 1.6 < shakes[0.01] < 3.2


def test_exposure_weights_cover_the_fraction_of_the_path():
    assert exposure_weights(ITERS, 1.0).sum() == ITERS - 1  # t = 0 gets no exposure
    w = exposure_weights(ITERS, 0.1)
    assert w.sum() == 200 and w[0] == 0 and w[1:201].min() == 1 and w[201:].max() == 0
    assert math.isclose(exposure_weights(ITERS, 0.0001).sum(), 0.2)


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.1, 0.5, 1.0])
def test_psf_unit_sum_and_centroid_at_canvas_centre(fraction):
    for seed in range(4):
        traj, _ = _traj(seed, expl=0.003)
        psf = trajectory_psf(traj, CANVAS, fraction)
        assert psf.shape == (CANVAS, CANVAS) and psf.dtype == np.float64
        assert psf.min() >= 0 and np.count_nonzero(psf) > 0
        assert math.isclose(psf.sum(), 1.0, rel_tol=1e-12)
        cy, cx = _centroid(psf)
        assert abs(cy - CANVAS // 2) < 0.05 and abs(cx - CANVAS // 2) < 0.05


def test_psf_matches_per_sample_bilinear_splat():
    traj, _ = _traj(7)
    psf = trajectory_psf(traj, CANVAS, 0.5)
    w = exposure_weights(ITERS, 0.5)
    w = w / w.sum()
    shift = complex(32, 32) - complex((w * traj.real).sum(), (w * traj.imag).sum())
    expected = np.zeros((CANVAS, CANVAS))
    for weight, p in zip(w, traj + shift):
        if weight == 0:
            continue
        c, r = math.floor(p.real), math.floor(p.imag)
        dc, dr = p.real - c, p.imag - r
        expected[r, c] += weight * (1 - dr) * (1 - dc)
        expected[r, c + 1] += weight * (1 - dr) * dc
        expected[r + 1, c] += weight * dr * (1 - dc)
        expected[r + 1, c + 1] += weight * dr * dc
    np.testing.assert_allclose(psf, expected / expected.sum(), atol=1e-12)


def test_shorter_exposure_gives_smaller_support():
    for seed in range(5):
        traj, _ = _traj(seed)
        short, full = trajectory_psf(traj, CANVAS, 0.1), trajectory_psf(traj, CANVAS, 1.0)
        assert np.count_nonzero(short) < np.count_nonzero(full)
        assert trajectory_extent(traj, exposure_weights(ITERS, 0.1)) < trajectory_extent(traj)


def test_psf_rejects_bad_input():
    traj, _ = _traj(0)
    with pytest.raises(ValueError, match="fraction"):
        trajectory_psf(traj, CANVAS, 0.0)
    with pytest.raises(ValueError, match="does not fit"):
        trajectory_psf(traj, 8, 1.0)
    with pytest.raises(ValueError, match="max_len"):
        markov_trajectory(np.random.default_rng(0), CANVAS, ITERS, 0.0, 0.005)
