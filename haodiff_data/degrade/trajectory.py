"""Random camera/limb trajectories and their point spread functions.

The Markov trajectory follows DeblurGAN's port of Boracchi & Foi (IEEE TIP 2012), described in
``reference/data_spec.md`` B.1-B.2. Two deliberate departures from that code: the PSF is normalised
to unit sum and moved so that its centroid is the kernel origin (the blurred part stays in place),
and the bilinear splat has no index clipping (the re-centred support provably fits the canvas).
"""

from __future__ import annotations

import math

import numpy as np


def markov_trajectory(
    rng: np.random.Generator, canvas: int, iters: int, max_len: float, expl: float
) -> tuple[np.ndarray, dict]:
    """Positions (complex: real = x column, imag = y row) of a random 2-D motion of length ``max_len``.

    Returns the ``iters`` positions, centred in a ``canvas`` x ``canvas`` square as in B.1, and the
    trajectory's own drawn scalars. Draw order (fixed, for replay): centripetal, big-shake
    probability, gaussian shake, initial angle, then per-step arrays (shake test, shake jitter,
    two normals).
    """
    if canvas < 2 or iters < 2:
        raise ValueError(f"markov_trajectory: canvas ({canvas}) and iters ({iters}) must be >= 2")
    if not max_len > 0:
        raise ValueError(f"markov_trajectory: max_len must be > 0, got {max_len}")
    if expl < 0:
        raise ValueError(f"markov_trajectory: expl must be >= 0, got {expl}")
    centripetal = 0.7 * rng.random()
    big_shake_prob = 0.2 * rng.random()
    gaussian_shake = 10.0 * rng.random()
    theta0_deg = 360.0 * rng.random()
    steps = iters - 1
    shake_u = rng.random(steps)
    jitter_u = rng.random(steps)
    normals = rng.standard_normal((steps, 2))

    step = max_len / steps
    # A big shake reverses the velocity (+-0.5 rad jitter) and doubles it: v <- v + 2 v e^{i(pi+j)}.
    shakes = shake_u < big_shake_prob * expl
    gain = np.ones(steps, dtype=np.complex128)
    gain[shakes] += 2.0 * np.exp(1j * (np.pi + jitter_u[shakes] - 0.5))
    kick = (expl * gaussian_shake * step) * (normals[:, 0] + 1j * normals[:, 1])
    pull = expl * centripetal * step

    v0 = complex(math.cos(math.radians(theta0_deg)), math.sin(math.radians(theta0_deg)))
    v = expl * v0 if expl > 0 else v0
    x = 0j
    path = [x]
    # Sequential by nature (each step is renormalised and pulled toward the start), so a plain
    # loop over Python complex scalars; every random number is drawn above.
    for g, k in zip(gain.tolist(), kick.tolist()):
        v = g * v + k - pull * x
        v *= step / abs(v)
        x += v
        path.append(x)
    traj = np.array(path, dtype=np.complex128)

    traj -= complex(traj.real.min(), traj.imag.min())
    traj += complex(1.0 - traj[0].real % 1.0, 1.0 - traj[0].imag % 1.0)
    traj += complex(
        math.ceil((canvas - traj.real.max()) / 2), math.ceil((canvas - traj.imag.max()) / 2)
    )
    info = {
        "centripetal": float(centripetal),
        "big_shake_prob": float(big_shake_prob),
        "gaussian_shake": float(gaussian_shake),
        "theta0_deg": float(theta0_deg),
        "big_shakes": int(shakes.sum()),
    }
    return traj, info


def exposure_weights(iters: int, fraction: float) -> np.ndarray:
    """Per-sample exposure: overlap of [t-1, t] with (0, fraction * iters]; sample 0 gets 0 (B.2)."""
    t = np.arange(iters, dtype=np.float64)
    end = fraction * iters
    return np.clip(end - (t - 1.0), 0.0, 1.0) * (t > 0)


def trajectory_extent(traj: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Larger side of the bounding box of the (exposed, if ``weights`` given) positions, in px."""
    pts = traj if weights is None else traj[weights > 0]
    return float(max(np.ptp(pts.real), np.ptp(pts.imag)))


def trajectory_psf(traj: np.ndarray, canvas: int, fraction: float) -> np.ndarray:
    """Unit-sum PSF of the first ``fraction`` of ``traj``, centroid at pixel (canvas//2, canvas//2).

    Centring is exact and interpolates once: a bilinear splat preserves first moments, so the
    PSF centroid equals the exposure-weighted mean position; the positions are translated by
    (centre - mean) and then splatted. Every exposed point lies within half the exposed path length
    of that mean, so the splat fits the canvas whenever canvas // 2 >= path/2 + 2 px.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"trajectory_psf: fraction must be in (0, 1], got {fraction}")
    traj = np.asarray(traj, dtype=np.complex128)
    if traj.ndim != 1 or traj.size < 2:
        raise ValueError(f"trajectory_psf: expected a 1-D trajectory of >= 2 points, got {traj.shape}")
    weights = exposure_weights(traj.size, fraction)
    keep = weights > 0
    pts, w = traj[keep], weights[keep]
    w = w / w.sum()
    centre = canvas // 2
    pts = pts + (complex(centre, centre) - complex(np.dot(w, pts.real), np.dot(w, pts.imag)))

    col, row = pts.real, pts.imag
    c0, r0 = np.floor(col), np.floor(row)
    if min(c0.min(), r0.min()) < 0 or max(c0.max(), r0.max()) + 1 > canvas - 1:
        span = trajectory_extent(traj, weights)
        raise ValueError(
            f"trajectory_psf: exposed path (extent {span:.1f} px) does not fit a {canvas} px canvas "
            "around its centroid; use a larger psf_canvas or a smaller psf_max_len"
        )
    fc, fr = col - c0, row - r0
    c0, r0 = c0.astype(np.int64), r0.astype(np.int64)
    top, bottom = r0 * canvas + c0, (r0 + 1) * canvas + c0
    index = np.concatenate([top, top + 1, bottom, bottom + 1])
    mass = np.concatenate([w * (1 - fr) * (1 - fc), w * (1 - fr) * fc, w * fr * (1 - fc), w * fr * fc])
    psf = np.bincount(index, weights=mass, minlength=canvas * canvas).reshape(canvas, canvas)
    return psf / psf.sum()
