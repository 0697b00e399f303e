import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from haodiff_data.intake.crop import plan_crop, working_size
from haodiff_data.intake.decode import RejectedInput, decode_image
from haodiff_data.intake.sources import list_sources
from haodiff_data.recipe import CropConfig


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w=300, h=200) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float64)
    y = np.linspace(0, 255, h, dtype=np.float64)
    return np.stack([np.add.outer(y * 0, x), np.add.outer(y, x * 0), np.full((h, w), 128.0)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_exactly(fmt):
    rgb = _gradient()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(_encode(Image.fromarray(rgb), fmt, **kw), min_side=10, max_pixels=10**8)
    assert out.dtype == np.uint8 and out.shape == (200, 300, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close():
    rgb = _gradient()
    out = decode_image(_encode(Image.fromarray(rgb), "JPEG", quality=95), 10, 10**8)
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 3


def test_exif_orientation_applied():
    rgb = _gradient(300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif), 10, 10**8)
    assert out.shape == (300, 200, 3)
    # The left column of the stored image becomes the top row after a clockwise turn.
    assert abs(int(out[0, :, 0].mean()) - int(rgb[:, 0, 0].mean())) < 4


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("L", lambda a: np.repeat(a[..., :1], 3, 2)),
        ("RGBA", lambda a: a),
        ("P", None),
        ("CMYK", None),
    ],
)
def test_modes_become_rgb_uint8(mode, expected):
    rgb = _gradient()
    img = Image.fromarray(rgb).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(_encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {})), 10, 10**8)
    assert out.dtype == np.uint8 and out.shape == (200, 300, 3)
    if expected is not None:
        np.testing.assert_array_equal(out, expected(np.asarray(img)[..., :3] if mode == "RGBA" else np.asarray(img)[..., None]))


def test_16bit_greyscale_scaled_not_clipped():
    arr = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (200, 1))
    out = decode_image(_encode(Image.fromarray(arr), "PNG"), 10, 10**8)
    assert out.shape == (200, 300, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and 120 < out[0, 150, 0] < 135


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not a picture", "not an image"),
        (_encode(Image.fromarray(_gradient()), "JPEG")[:400], "corrupt or truncated"),
        (_encode(Image.fromarray(_gradient()), "PNG")[:300], "corrupt or truncated"),
        (_encode(Image.fromarray(_gradient(40, 30)), "PNG"), "too small: 40x30"),
    ],
)
def test_rejections_carry_reasons(data, reason):
    with pytest.raises(RejectedInput, match=reason):
        decode_image(data, min_side=64, max_pixels=10**8)


def test_decompression_bomb_rejected_before_decoding():
    data = _encode(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(RejectedInput, match="decompression bomb: 4000x4000"):
        decode_image(data, min_side=10, max_pixels=1_000_000)


def test_sources_from_folders_lists_globs_and_tars(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ["a/1.jpg", "a/b/2.PNG", "a/notes.txt", "c.webp"]:
        (tmp_path / p).write_bytes(b"x")
    lst = tmp_path / "list.txt"
    lst.write_text("c.webp\n# comment\n\na/1.jpg\n")
    tar_path = tmp_path / "imgs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ["k2.jpg", "k1.png", "k1.json"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(name[1].encode()))
    folder = [s.path for s in list_sources([str(tmp_path / "a")]).sources]
    assert folder == [str(tmp_path / "a/1.jpg"), str(tmp_path / "a/b/2.PNG")]
    assert [s.path for s in list_sources([str(lst)]).sources] == [str(tmp_path / "c.webp"), str(tmp_path / "a/1.jpg")]
    assert [s.path for s in list_sources([str(tmp_path / "*.webp")]).sources] == [str(tmp_path / "c.webp")]
    in_tar = list_sources([str(tar_path)]).sources
    assert [s.member for s in in_tar] == ["k1.png", "k2.jpg"]
    assert [s.read_bytes() for s in in_tar] == [b"1", b"2"]
    # Duplicates across inputs are kept once.
    assert len(list_sources([str(tmp_path / "a"), str(lst)]).sources) == 3
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        list_sources([str(tmp_path / "nothing-here")])


def test_working_size_policy():
    cfg = CropConfig(size=512)
    assert working_size(1080, 810, cfg) is None  # both sides >= 512: crop at native size
    assert working_size(1024, 1024, cfg) == (512, 512)  # FFHQ-like square face: downsampled whole
    assert working_size(400, 600, cfg) == (512, 768)  # short side resized up to 512
    assert working_size(1024, 1024, CropConfig(size=512, square_downsample=False)) is None


def test_person_crop_keeps_person_centre_in_middle_half():
    cfg = CropConfig(size=512, mode="person")
    rng = np.random.default_rng(0)
    box = (900, 100, 1000, 600)  # person centre (950, 350) in a 1280x720 image
    for _ in range(50):
        x0, y0, x1, y1 = plan_crop((720, 1280), cfg, rng, box)["box"]
        assert x1 - x0 == 512 and y1 - y0 == 512
        assert 0 <= x0 and x1 <= 1280 and 0 <= y0 and y1 <= 720
        assert x0 + 128 <= 950 <= x0 + 384
    assert plan_crop((720, 1280), cfg, rng, None)["mode"] == "random"
    assert plan_crop((720, 1280), CropConfig(mode="center"), rng)["box"] == [384, 104, 896, 616]


def test_hostile_names_links_and_loops_become_sources_or_rejects(tmp_path, monkeypatch):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "locked").mkdir()
    odd = os.fsdecode(b"x\xff.jpg")  # not UTF-8: carried as a surrogate escape
    (d / odd).write_bytes(b"x")
    (d / "sub" / "a.jpg").write_bytes(b"x")
    os.symlink("/nonexistent/file.jpg", d / "dangling.jpg")
    os.symlink("self.jpg", d / "self.jpg")
    os.symlink("..", d / "sub" / "up")  # a folder loop
    os.symlink("sub/a.jpg", d / "alias.jpg")  # the same file twice
    real_scandir = os.scandir

    def scandir(path):  # tests may run as root, where chmod 000 does not stop reading
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = list_sources([str(d)])
    # alias.jpg comes first in sorted order; sub/a.jpg is the same file.
    assert [s.path for s in listing.sources] == [str(d / "alias.jpg"), str(d / odd)]
    assert [s.resolved for s in listing.sources] == [os.path.realpath(d / "sub/a.jpg"), os.path.realpath(d / odd)]
    reasons = {Path(r["source"]).name: r["reason"] for r in listing.rejects}
    assert reasons == {
        "dangling.jpg": "dangling symlink (points to /nonexistent/file.jpg)",
        "self.jpg": "symlink loop",
        "up": f"symlink loop (folder {os.path.realpath(d)} is already being listed)",
        "locked": "unreadable folder: Permission denied",
    }
    assert all(r["samples"] == [] for r in listing.rejects)
    # Named directly or through a glob, a dangling link is a reject, not an endless recursion.
    for spec in (str(d / "dangling.jpg"), str(d / "dang*.jpg")):
        named = list_sources([spec])
        assert named.sources == [] and named.rejects[0]["reason"].startswith("dangling symlink")


def test_one_file_reached_several_ways_is_one_source(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"x")
    os.symlink("a.jpg", tmp_path / "link.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\nlist.txt\nmissing.jpg\n")  # a list naming itself is not read again
    monkeypatch.chdir(tmp_path)
    listing = list_sources(["a.jpg", str(tmp_path / "a.jpg"), "link.jpg", "list.txt"])
    # The list itself, named inside it, is taken as an image (rejected when decoded), not re-read.
    assert [(s.path, s.resolved) for s in listing.sources] == [
        ("a.jpg", str(tmp_path / "a.jpg")), ("list.txt", str(tmp_path / "list.txt"))]
    assert listing.rejects == [{"source": "missing.jpg", "reason": "not found", "samples": []}]
