"""haodiff-restore on tiny models written to disk as a real SD2.1-shaped folder: the CLI end to end
on the bundled photos (outputs, determinism, skip/overwrite, rejects), the tiling against the
untiled path, the colour fixes, the uint8 conversion and the settings stored beside the weights."""

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

from haodiff_model.bench.restore import TINY_VAE8_CONFIG, write_tiny_folders  # noqa: E402
from haodiff_model.restore.cli import main  # noqa: E402
from haodiff_model.restore.colorfix import adain_color_fix, color_fix, wavelet_decompose  # noqa: E402
from haodiff_model.restore.pipeline import HAODiffRestorer, RestoreOptions, to_uint8_truncated  # noqa: E402
from haodiff_model.restore.settings import (  # noqa: E402
    InferenceSettings, SettingsError, read_settings, write_settings,
)
from haodiff_model.restore.tiling import (  # noqa: E402
    LatentTiling, _cut, _resnet, decode_latent, encode_moments, gaussian_tile_weights, plan_tiles, tile_starts,
)

ASSETS = Path(__file__).resolve().parent.parent / "haodiff_data" / "assets"
pytestmark = pytest.mark.usefixtures("one_thread", "no_onednn")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_tiny_folders(tmp_path_factory.mktemp("restore"))


@pytest.fixture(scope="module")
def restorer(folders):
    return HAODiffRestorer.from_folders(*folders)[0]


def _photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    img = Image.open(ASSETS / name).convert("RGB")
    return np.asarray(img.resize(size, Image.BILINEAR) if size else img)


# ----------------------------------------------------------------------------- CLI end to end


def test_cli_restores_the_bundled_photos_deterministically_and_records_bad_inputs(folders, tmp_path, capsys):
    base, weights = folders
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("astronaut.png", "bus.jpg", "zidane.jpg"):  # the bundled photos at a third of their size
        img = Image.open(ASSETS / name)
        img.resize((img.width // 3, img.height // 3)).save(inputs / name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    args = [str(inputs), "--out", str(out), "--base", str(base), "--weights", str(weights), "--no-progress"]

    assert main(args) == 3
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["astronaut.png", "bus.png", "zidane.png"]
    for name, src in (("astronaut.png", "astronaut.png"), ("bus.png", "bus.jpg"), ("zidane.png", "zidane.jpg")):
        assert Image.open(out / name).size == Image.open(inputs / src).size
    rejects = [json.loads(line) for line in (out / "rejects-r000.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["input"].endswith("broken.png") and rejects[0]["reason"]
    assert "restored 3, skipped 0 (output exists), rejected 1" in capsys.readouterr().out

    first = {n: (out / n).read_bytes() for n in names}
    assert main(args) == 3
    assert "restored 0, skipped 3" in capsys.readouterr().out
    (inputs / "broken.png").unlink()
    assert main(args + ["--overwrite", "--batch-size", "2"]) == 0
    assert "restored 3, skipped 0 (output exists), rejected 0" in capsys.readouterr().out
    assert not (out / "rejects-r000.jsonl").exists()
    for n in names:  # the same seed gives the same bytes, whatever the batch size
        a = np.asarray(Image.open(out / n)).astype(int)
        b = np.asarray(Image.open(__import__("io").BytesIO(first[n]))).astype(int)
        assert np.abs(a - b).max() <= 1, n  # batched GEMMs may move a value across a uint8 step
        assert (a != b).mean() < 1e-3, n


def test_cli_names_missing_files_and_arguments(folders, tmp_path, capsys):
    base, weights = folders
    assert main([str(ASSETS / "astronaut.png"), "--out", str(tmp_path)]) == 2
    assert "missing --base, --weights" in capsys.readouterr().err
    assert main([str(ASSETS / "astronaut.png"), "--out", str(tmp_path), "--base", str(base),
                 "--weights", str(tmp_path / "nowhere")]) == 2
    assert "weights folder" in capsys.readouterr().err
    assert main([str(tmp_path / "no-such.png"), "--out", str(tmp_path), "--base", str(base),
                 "--weights", str(weights)]) == 2
    assert "input not found" in capsys.readouterr().err


def test_seed_and_latent_mode(restorer):
    img = _photo("astronaut.png", (96, 80))
    a, b = restorer.restore([img])[0], restorer.restore([img])[0]
    assert np.array_equal(a, b)
    restorer.settings = InferenceSettings(seed=115)
    c = restorer.restore([img])[0]
    restorer.settings = InferenceSettings(latent="mode")
    d1, d2 = restorer.restore([img])[0], restorer.restore([img])[0]
    restorer.settings = InferenceSettings()
    assert not np.array_equal(a, c)  # another seed, other latent noise
    assert np.array_equal(d1, d2) and not np.array_equal(a, d1)


def test_sizes_not_multiple_of_8_come_back_at_their_size(restorer):
    img = _photo("bus.jpg", (83, 61))
    out = restorer.restore([img])[0]
    assert out.shape == img.shape and out.dtype == np.uint8


# ----------------------------------------------------------------------------- latent tiling


def test_latent_tile_grid_matches_the_official_rule():
    assert tile_starts(64, 64, 5) == [0]
    assert tile_starts(100, 64, 5) == [0, 36]  # 2 tiles: 59 + 64 >= 100, last snapped to 100 - 64
    assert tile_starts(130, 64, 5) == [0, 59, 66]
    assert LatentTiling.plan(64, 64) is None  # area test: 64 x 64 is untiled
    assert LatentTiling.plan(32, 100) is None  # 3200 < 4096: untiled although wider than a tile
    plan = LatentTiling.plan(40, 150)
    assert plan.size == 40 and plan.origins == ((0, 0), (0, 35), (0, 70), (0, 105), (0, 110))
    w = gaussian_tile_weights(64)
    assert w.dtype == torch.float64
    assert int(w.sum(dim=0).argmax()) in (31, 32) and torch.allclose(w[:, 31], w[:, 32])  # x centre 31.5
    assert int(w.sum(dim=1).argmax()) == 32 and torch.allclose(w[31], w[33])  # y centre 32 (official)
    assert not torch.allclose(w[31], w[32]) and not torch.allclose(w[:, 31], w[:, 33])


def test_blending_identical_tiles_gives_back_the_latent():
    z = torch.randn(2, 4, 70, 90, generator=torch.Generator().manual_seed(0))
    plan = LatentTiling.plan(70, 90, tile=32, overlap=5)
    assert len(plan.origins) == 3 * 4
    torch.testing.assert_close(plan.blend(plan.split(z), 2, 70, 90), z, rtol=0, atol=1e-6)


def test_latent_tiling_agrees_with_the_untiled_unet(restorer):
    """Tiles see less context (the UNet's attention and receptive field), so they differ from the
    untiled prediction; on this 48x48 latent (tiles of 32, overlap 5) the relative error is < 0.5
    and far below the error of unrelated noise (~1.4)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 48, 48, generator=g)
    pos, neg = torch.randn(2, 1, 7, 32, generator=g).unbind(0)
    full = restorer.predict_eps(z, pos, neg)
    restorer.options = RestoreOptions(latent_tile=32)
    try:
        tiled = restorer.predict_eps(z, pos, neg)
    finally:
        restorer.options = RestoreOptions()
    rel = ((tiled - full).norm() / full.norm()).item()
    assert 0 < rel < 0.5


# ----------------------------------------------------------------------------- tiled VAE


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(3)
    return AutoencoderKL.from_config(TINY_VAE8_CONFIG).eval()


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@torch.no_grad()
def test_one_tile_is_the_untiled_vae(vae):
    x = torch.rand(2, 3, 64, 72, generator=torch.Generator().manual_seed(1)) * 2 - 1
    untiled = encode_moments(vae, x)
    one_tile = encode_moments(vae, x, tile=512, force_tiles=True)
    torch.testing.assert_close(one_tile, untiled, rtol=1e-4, atol=1e-5)
    z = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(decode_latent(vae, z, tile=64, force_tiles=True), decode_latent(vae, z),
                               rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_tiled_vae_is_exact_with_a_margin_as_wide_as_the_receptive_field(vae):
    """Shared GroupNorm statistics and whole-latent attention leave only the convolutions' context
    cut at the margin: with a margin beyond the receptive field (tiny VAE: about 78 px encoder,
    15 latents decoder) 24 encoder tiles and 8 decoder tiles reproduce the untiled VAE to float
    precision; with a narrow margin the mean error stays small."""
    x = _tensor(_photo("zidane.jpg", (512, 384)))
    full = encode_moments(vae, x)
    tiled = encode_moments(vae, x, tile=64, pad=80, force_tiles=True)
    assert ((tiled - full).abs().max() / full.std()).item() < 1e-4
    narrow = encode_moments(vae, x, tile=128, pad=32, force_tiles=True)
    assert ((narrow - full).abs().mean() / full.std()).item() < 0.03
    z = full[:, :4]
    img = decode_latent(vae, z)
    tiled = decode_latent(vae, z, tile=8, pad=16, force_tiles=True)
    assert ((tiled - img).abs().max() / img.std()).item() < 1e-3


@torch.no_grad()
def test_tiled_vae_layers_release_their_input_tiles(vae):
    """Memory bounds the image size (a 4096 px decoder layer is 4-8 GiB): a ResNet block and an
    upsampler free each input tile as they go (no tile outlives the call) and, with a margin that
    covers the block's two 3x3 convolutions, give the untiled block's result."""
    block, up = vae.decoder.up_blocks[0].resnets[0], vae.decoder.up_blocks[0].upsamplers[0]
    x = torch.randn(1, block.in_channels, 16, 20, generator=torch.Generator().manual_seed(4))
    tiles = plan_tiles(16, 20, 8, 2, 1)
    cut = _cut(x, tiles).map(torch.clone)
    inputs = [weakref.ref(t) for t in cut.tensors]
    out = _resnet(block, cut)
    assert len(tiles) == 4 and all(ref() is None for ref in inputs)
    torch.testing.assert_close(out.stitch(tiles, 1, (16, 20)), block(x, None), rtol=1e-5, atol=1e-5)
    middle = [weakref.ref(t) for t in out.tensors]
    upsampled = out.map(up, consume=True).rescale(2)
    assert all(ref() is None for ref in middle)
    assert upsampled.stitch(tiles, 2, (32, 40)).shape == (1, up.channels, 32, 40)


@torch.no_grad()
def test_large_input_is_encoded_tiled_without_seams(vae):
    """1104 x 216 crosses the encoder's tiling threshold (1088 px) with the default tile and margin:
    two tiles across the width meet at pixel 552. In the decoded image the step across that column
    is no larger than the usual column-to-column change (a seam would stand out), and next to the
    seam the result differs from the untiled encoder's by < 0.05 on average (range [-1, 1]; random
    tiny-VAE weights, whose receptive field outgrows the 32 px margin)."""
    x = _tensor(_photo("zidane.jpg", (1104, 216)))
    tiled = encode_moments(vae, x)
    untiled = encode_moments(vae, x, tile=4096)
    err = (tiled - untiled).abs().mean(dim=(0, 1, 2))
    assert int(err.argmax()) in (68, 69)  # the differences sit at the seam (latent column 69)
    img = decode_latent(vae, tiled[:, :4])
    steps = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))
    assert steps[551] <= torch.quantile(steps, 0.9)
    ref = decode_latent(vae, untiled[:, :4])
    assert (img - ref)[..., 544:560].abs().mean().item() < 0.05  # in [-1, 1]: about 6 uint8 levels


# ----------------------------------------------------------------------------- colour fix and uint8


def test_adain_gives_the_reference_statistics():
    g = torch.Generator().manual_seed(0)
    restored, ref = torch.rand(2, 3, 40, 50, generator=g), torch.rand(2, 3, 40, 50, generator=g) * 0.3 + 0.5
    out = adain_color_fix(restored, ref)
    torch.testing.assert_close(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.flatten(2).std(dim=2), ref.flatten(2).std(dim=2), rtol=1e-3, atol=1e-4)


def test_wavelet_keeps_restored_high_and_reference_low_frequencies():
    """restored = smooth content + fine checkerboard + colour cast; reference = the smooth content.
    The fix keeps the checkerboard (high band of the restored image) and drops the cast (low band
    from the reference)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    smooth = torch.stack([0.3 + 0.4 * xx, 0.2 + 0.5 * yy, 0.5 + 0.2 * xx * yy])[None]
    checker = (((torch.arange(128)[:, None] + torch.arange(128)[None]) % 2) * 2 - 1).float() * 0.05
    restored = smooth + checker + torch.tensor([0.1, -0.05, 0.08]).view(1, 3, 1, 1)
    out = color_fix(restored, smooth, "wavelet")
    high_out, low_out = wavelet_decompose(out)
    high_res, _ = wavelet_decompose(restored)
    _, low_ref = wavelet_decompose(smooth)
    inner = (slice(None), slice(None), slice(32, 96), slice(32, 96))  # beyond the blurs' reach (31 px) of the borders
    torch.testing.assert_close(out[inner], (smooth + checker)[inner], rtol=0, atol=1e-5)
    torch.testing.assert_close(high_out[inner], high_res[inner], rtol=0, atol=1e-4)
    torch.testing.assert_close(low_out[inner], low_ref[inner], rtol=0, atol=1e-4)
    assert torch.equal(color_fix(restored, smooth, "none"), restored)


def test_uint8_conversion_truncates_like_to_pil_image():
    x = torch.tensor([0.0, 0.5, 0.999, 1.0, 254.9 / 255])
    assert to_uint8_truncated(x).tolist() == [0, 127, 254, 255, 254]


# ----------------------------------------------------------------------------- settings beside the weights


def test_settings_file_is_read_checked_and_overridden(folders, tmp_path):
    base, weights = folders
    own = tmp_path / "w"
    own.mkdir()
    for f in weights.iterdir():
        (own / f.name).write_bytes(f.read_bytes())
    assert read_settings(own) is None
    r, notes = HAODiffRestorer.from_folders(base, own)
    assert r.settings == InferenceSettings() and "official inference defaults" in notes[-1]

    enc = r.encoder
    write_settings(own, InferenceSettings(timestep=150, cfg_scale=2.0, latent="mode", seed=7, lora_rank=4,
                                          dpg=enc.swinir_kwargs, prompt_embedder=enc.performer_kwargs))
    r, _ = HAODiffRestorer.from_folders(base, own)
    assert (r.settings.timestep, r.settings.cfg_scale, r.settings.latent, r.settings.seed) == (150, 2.0, "mode", 7)
    assert (r.restorer.timestep, r.restorer.cfg_scale) == (150, 2.0)
    r, _ = HAODiffRestorer.from_folders(base, own, overrides={"timestep": 199, "seed": None})
    assert (r.settings.timestep, r.settings.seed) == (199, 7)

    write_settings(own, InferenceSettings(lora_rank=16, dpg={**enc.swinir_kwargs, "embed_dim": 150}))
    with pytest.raises(SettingsError, match=r"dpg\.embed_dim \(settings 150, weights 12\).*lora_rank"):
        HAODiffRestorer.from_folders(base, own)
    (own / "haodiff.json").write_text(json.dumps({"format": "haodiff-restore-settings", "version": 1, "cfg": 3}))
    with pytest.raises(SettingsError, match=r"unknown key\(s\) \['cfg'\]"):
        HAODiffRestorer.from_folders(base, own)


def test_bf16_restores_close_to_fp32(folders):
    base, weights = folders
    img = _photo("astronaut.png", (64, 48))
    out32 = HAODiffRestorer.from_folders(base, weights)[0].restore([img])[0].astype(int)
    r16 = HAODiffRestorer.from_folders(base, weights, options=RestoreOptions(precision="bf16"))[0]
    assert r16.restorer.unet.dtype == torch.bfloat16 and r16.restorer.vae.dtype == torch.bfloat16
    out16 = r16.restore([img])[0].astype(int)
    assert np.abs(out16 - out32).mean() < 6  # uint8 levels; bf16 keeps 8 bits of mantissa
    r_half = HAODiffRestorer.from_folders(base, weights, options=RestoreOptions(precision="fp16"))[0]
    assert r_half.restorer.unet.dtype == torch.float16 and r_half.restorer.vae.dtype == torch.float32  # force_upcast
