"""The seam check of the tiled VAE (haodiff_model.bench.seams): its boundary band, and that it tells
a seam (no margin) from none (a margin as wide as the receptive field)."""

import numpy as np
import pytest
import torch

from haodiff_model.bench.seams import boundary_band, seam_check


def test_boundary_band_marks_the_inner_core_edges_only():
    band = boundary_band(20, 20, tile=10, pad=0, align=1, band=2)  # cores 0..10 and 10..20 per side
    rows, cols = np.nonzero(band)
    assert set(rows) | set(cols) >= {8, 9, 10, 11}
    assert band[8:12, :].all() and band[:, 8:12].all()
    assert not band[:8, :8].any() and not band[12:, 12:].any()  # nothing at the image border
    assert not boundary_band(20, 20, tile=32, pad=0, align=1).any()  # one tile: no boundary


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    from haodiff_model.bench.restore import TINY_VAE8_CONFIG

    torch.manual_seed(0)
    return AutoencoderKL.from_config(dict(TINY_VAE8_CONFIG)).eval()


def test_a_seam_shows_on_the_boundaries_and_a_wider_margin_shrinks_it(tiny_vae, tmp_path):
    no_margin = seam_check(tiny_vae, 192, tmp_path / "seams.png", encoder=(96, 0), decoder=(12, 0))
    assert no_margin["encoder_tiles"] == 4 and no_margin["decoder_tiles"] == 4
    for part in ("encoder", "decoder"):
        stats = no_margin[part]
        assert stats["mean_abs_error_at_boundaries"] > 2 * stats["mean_abs_error_elsewhere"] > 0
    assert (tmp_path / "seams.png").stat().st_size > 0
    wide = seam_check(tiny_vae, 192, None, encoder=(96, 40), decoder=(6, 6))
    assert wide["encoder_tiles"] == 4 and wide["decoder_tiles"] == 4
    for part in ("encoder", "decoder"):
        at_boundaries = wide[part]["mean_abs_error_at_boundaries"]
        assert at_boundaries < no_margin[part]["mean_abs_error_at_boundaries"] / 10
