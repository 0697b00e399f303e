"""haodiff-eval: metrics against known values and an independent implementation, the LPIPS
backbone loader, pairing errors, and the files the command writes."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from haodiff_model.eval.cli import main
from haodiff_model.eval.metrics import PerceptualMetrics, load_lpips, pixel_metrics, psnr, rgb_to_y, ssim
from haodiff_model.losses.dists import DISTS, DISTS_TOTAL_CHANNELS
from haodiff_model.losses.vgg import vgg16_features

ASSETS = Path(__file__).resolve().parent.parent / "haodiff_data" / "assets"
pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(size=(96, 80)) -> np.ndarray:
    return np.asarray(Image.open(ASSETS / "zidane.jpg").convert("RGB").resize(size, Image.BILINEAR)).copy()


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(img + noise, 0, 255).round().astype(np.uint8)


def test_psnr_of_a_known_mse():
    a = np.full((20, 30, 3), 100, np.uint8)
    assert psnr(a, a + 5) == pytest.approx(10 * math.log10(255**2 / 25))  # MSE 25: 34.1514 dB
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[0, 0, 0] = 110  # MSE = 100 / 1800
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 * 1800 / 100))


def test_ssim_known_values_and_an_independent_implementation():
    img = _photo()
    assert ssim(img, img) == pytest.approx(1.0)
    # constant images: the structure term is 1, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    c1 = (0.01 * 255) ** 2
    a, b = np.full((16, 16, 1), 100.0), np.full((16, 16, 1), 120.0)
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))
    # Wang et al.'s Gaussian SSIM computed another way: scipy's separable Gaussian filter (11 taps
    # at truncate 3.5), borders then cropped by the window radius (scikit-image's recipe)
    from scipy.ndimage import gaussian_filter

    noisy = _noisy(img, 20)
    ref = []
    for ch in range(3):
        x, y = img[..., ch].astype(np.float64), noisy[..., ch].astype(np.float64)

        def blur(v):
            return gaussian_filter(v, 1.5, truncate=3.5)[5:-5, 5:-5]

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        c2 = (0.03 * 255) ** 2
        ref.append((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    assert ssim(img, noisy) == pytest.approx(np.mean(ref), abs=1e-9)
    assert 0.2 < ssim(img, noisy) < 0.95


def test_y_channel_and_border_crop():
    assert rgb_to_y(np.array([[[255, 255, 255], [0, 0, 0]]], np.uint8))[..., 0].tolist() == [[235.0, 16.0]]
    img = _photo()
    noisy = img.copy()
    noisy[:4] = 0  # damage confined to a 4-pixel band at the top
    full, cropped = pixel_metrics(noisy, img), pixel_metrics(noisy, img, crop_border=4)
    assert full["psnr"] < 30 and cropped["psnr"] == math.inf and cropped["psnr_y"] == math.inf
    assert set(full) == {"psnr", "ssim", "psnr_y", "ssim_y"}
    with pytest.raises(ValueError, match="differ in size"):
        pixel_metrics(img, img[:-1])


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Torchvision-format AlexNet and VGG16 files (random weights), DISTS alpha/beta."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    # torchvision's AlexNet `features` layout (the classifier, which LPIPS ignores, is left out)
    convs = {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3), 8: (384, 256, 3), 10: (256, 256, 3)}
    alex = {}
    for i, (cin, cout, k) in convs.items():
        conv = torch.nn.Conv2d(cin, cout, k)
        alex[f"features.{i}.weight"], alex[f"features.{i}.bias"] = conv.weight.detach(), conv.bias.detach()
    torch.save(alex, root / "alexnet.pth")
    torch.save({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, root / "vgg16.pth")
    g = torch.Generator().manual_seed(1)
    shape = (1, DISTS_TOTAL_CHANNELS, 1, 1)
    torch.save({"alpha": torch.rand(shape, generator=g) + 0.1, "beta": torch.rand(shape, generator=g) + 0.1},
               root / "dists.pt")
    return root


@pytest.fixture(scope="module")
def alex_lpips(backbones):
    return load_lpips("alex", backbones / "alexnet.pth")


def test_lpips_loads_the_backbone_file_and_the_wheels_heads(backbones, alex_lpips):
    import lpips

    model = alex_lpips
    state = torch.load(backbones / "alexnet.pth", weights_only=True)
    assert torch.equal(getattr(model.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, state["features.10.bias"])
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu",
                       weights_only=True)
    assert torch.equal(model.lin0.model[1].weight, heads["lin0.model.1.weight"])
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*alexnet-owt-7be5be79\.pth"):
        load_lpips("alex", backbones / "nowhere.pth")
    with pytest.raises(ValueError, match="not a torchvision alex state dict"):
        load_lpips("alex", backbones / "vgg16.pth")


def test_lpips_and_dists_are_zero_for_identical_images_and_grow_with_noise(backbones, alex_lpips):
    metrics = PerceptualMetrics(alex_lpips,
                                DISTS.from_files(backbones / "vgg16.pth", backbones / "dists.pt"))
    img = _photo((64, 64))
    same = metrics(img, img)
    assert same["lpips"] == pytest.approx(0, abs=1e-6) and same["dists"] == pytest.approx(0, abs=1e-5)
    scores = [metrics(_noisy(img, s), img) for s in (4, 16, 64)]
    for name in ("lpips", "dists"):
        values = [s[name] for s in scores]
        assert values == sorted(values) and values[0] > 0, (name, values)


def _write(folder: Path, images: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        Image.fromarray(img).save(folder / name)


def test_cli_pairs_by_name_and_writes_csv_json_sheet(backbones, tmp_path, capsys):
    img = _photo((64, 48))
    refs = {f"im{i}.png": np.roll(img, 8 * i, axis=1) for i in range(3)}
    _write(tmp_path / "ref", refs)
    _write(tmp_path / "out", {n: _noisy(v, 4 + 10 * i) for i, (n, v) in enumerate(refs.items())})
    _write(tmp_path / "lq", {n.replace(".png", ".jpg"): v for n, v in refs.items()})
    args = ["--restored", str(tmp_path / "out"), "--reference", str(tmp_path / "ref"), "--inputs", str(tmp_path / "lq"),
            "--lpips-backbone", str(backbones / "alexnet.pth"), "--vgg16", str(backbones / "vgg16.pth"),
            "--dists-weights", str(backbones / "dists.pt"), "--no-progress", "--sheet-rows", "1"]
    assert main(args) == 0
    out = tmp_path / "out-eval"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["image"] for r in rows] == ["im0", "im1", "im2", "mean"]
    assert list(rows[0]) == ["image", "psnr", "ssim", "psnr_y", "ssim_y", "lpips", "dists"]
    report = json.loads((out / "metrics.json").read_text())
    assert report["count"] == 3 and report["settings"]["crop_border"] == 0
    per = report["per_image"]
    assert per[0]["psnr"] > per[1]["psnr"] > per[2]["psnr"]  # more noise, lower PSNR
    assert report["mean"]["psnr"] == pytest.approx(np.mean([p["psnr"] for p in per]))
    assert float(rows[1]["psnr"]) == pytest.approx(per[1]["psnr"], abs=1e-4)
    sheet = Image.open(out / "sheet.png")
    assert sheet.height > 2 * 256  # best and worst rows
    printed = capsys.readouterr().out
    assert "mean" in printed and "3 pairs" in printed

    (tmp_path / "out" / "extra.png").write_bytes((tmp_path / "out" / "im0.png").read_bytes())
    (tmp_path / "ref" / "im1.png").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "restored image(s) without a reference: extra, im1" in err


def test_cli_errors_name_what_is_missing(tmp_path, capsys):
    _write(tmp_path / "a", {"x.png": _photo((32, 32))})
    assert main(["--restored", str(tmp_path / "a")]) == 2
    assert "nothing to measure: give --reference" in capsys.readouterr().err
    assert main(["--restored", str(tmp_path / "a"), "--reference", str(tmp_path / "a"), "--detector",
                 str(tmp_path / "det.pt")]) == 2
    assert "--detector needs --inputs" in capsys.readouterr().err
    assert main(["--restored", str(tmp_path / "a"), "--inputs", str(tmp_path / "a"), "--detector",
                 str(tmp_path / "det.pt"), "--no-progress"]) == 2
    assert "det.pt" in capsys.readouterr().err
    assert main(["--restored", str(tmp_path / "a"), "--reference", str(tmp_path / "a"), "--vgg16",
                 str(tmp_path / "v.pth"), "--dists-weights", str(tmp_path / "d.pt")]) == 2
    assert "DISTS weights not found" in capsys.readouterr().err


def test_validation_helpers_psnr_and_mask_overlap():
    from haodiff_model.eval.metrics import batch_psnr, mask_dice_iou

    x = torch.full((2, 3, 8, 8), 0.5)
    y = x.clone()
    y[1] += 0.1  # MSE 0.01 -> 20 dB
    assert batch_psnr(x, y)[1].item() == pytest.approx(20.0, abs=1e-4) and batch_psnr(x, y)[0] > 100
    logits = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]]).view(2, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    dice, iou = mask_dice_iou(logits, target)
    assert dice.tolist() == pytest.approx([2 / 3, 1.0]) and iou.tolist() == pytest.approx([0.5, 1.0])
