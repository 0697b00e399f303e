"""HMB detector data (yolo-export), YOLO train/predict through the CLI offline, and HMB-R."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest

from haodiff_data.cli import main
from haodiff_data.detect.export import hmb_instance_box, split_of
from haodiff_data.detect.hmbr import ImagePair, PairingError, hmbr_from_pairs, pair_folders
from haodiff_data.detect.predict import Detection
from haodiff_data.intake.sources import ASSETS_DIR
from haodiff_data.shards.schema import encode_sample

SIZE = 128
REPO = Path(__file__).resolve().parent.parent


def _rect(mask: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
    mask[y0:y1, x0:x1] = 255


# key -> (first order, rectangles of M_HMB, expected box or None). Sizes at 128x128: the default
# min area is 0.0005 * 128 * 128 = 8.2 px.
CASES = {
    "s000000000": ("hmb", [(10, 20, 50, 90)], (10, 20, 50, 90)),
    "s000000001": ("hmb", [(5, 5, 30, 40), (80, 70, 120, 125)], (5, 5, 120, 125)),  # one part, two regions
    "s000000002": ("hmb", [(40, 40, 90, 60), (2, 120, 4, 123)], (40, 40, 90, 60)),  # + 6 px speckle, dropped
    "s000000003": ("hmb", [(60, 60, 62, 63)], None),  # only a sliver: negative, counted
    "s000000004": ("none", [], None),
    "s000000005": ("generic", [], None),
}


def _photo(rng: np.random.Generator) -> np.ndarray:
    base = cv2.cvtColor(cv2.imread(str(ASSETS_DIR / "astronaut.png")), cv2.COLOR_BGR2RGB)
    y, x = rng.integers(0, base.shape[0] - 256, size=2)
    return cv2.resize(base[y:y + 256, x:x + 256], (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def _sample(key: str, kind: str, rects, rng: np.random.Generator) -> dict:
    hq = _photo(rng)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for r in rects:
        _rect(mask, *r)
    blurred = cv2.blur(hq, (15, 1))
    lq = np.where(mask[..., None] > 0, blurred, hq).astype(np.uint8)
    meta = {"key": key, "first_order": kind, "source": {"sha256": f"src{int(key[1:]) % 3}"}}
    return encode_sample(key, hq, lq, mask, np.zeros_like(mask), meta)


def write_shard(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for name, data in s.items():
                if name == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{name}")
                info.size = len(data)
                tar.addfile(info, BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The hand-made cases plus 26 more single-rectangle positives and negatives (32 samples)."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    cases = dict(CASES)
    for i in range(6, 32):
        if i % 3:
            x0, y0 = (int(v) for v in rng.integers(0, 70, size=2))
            w, h = (int(v) for v in rng.integers(20, 55, size=2))
            cases[f"s{i:09d}"] = ("hmb", [(x0, y0, x0 + w, y0 + h)], (x0, y0, x0 + w, y0 + h))
        else:
            cases[f"s{i:09d}"] = ("none", [], None)
    samples = [_sample(k, kind, rects, rng) for k, (kind, rects, _) in cases.items()]
    write_shard(folder / "t-r000-000000.tar", samples[:20])
    write_shard(folder / "t-r000-000001.tar", samples[20:])
    (folder / "cases.json").write_text(json.dumps({k: v[2] for k, v in cases.items()}))
    return folder


@pytest.fixture(scope="module")
def dataset(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("yolo") / "data"
    assert main(["yolo-export", str(shards), "--out", str(out), "--val-fraction", "0.3", "--no-progress"]) == 0
    return out


def _labels(dataset: Path) -> dict[str, tuple[str, str]]:
    return {p.stem: (p.parent.name, p.read_text()) for p in dataset.glob("labels/*/*.txt")}


def test_instance_box_merges_one_parts_regions_and_drops_slivers():
    mask = np.zeros((64, 64), np.uint8)
    _rect(mask, 3, 4, 10, 20)
    _rect(mask, 40, 30, 60, 33)
    _rect(mask, 62, 62, 63, 63)  # 1 px
    # regions of 7x16 = 112, 20x3 = 60 and 1 px
    assert hmb_instance_box(mask, 2) == (3, 4, 60, 33)
    assert hmb_instance_box(mask, 60) == (3, 4, 60, 33)
    assert hmb_instance_box(mask, 61) == (3, 4, 10, 20)
    assert hmb_instance_box(mask, 200) is None
    assert hmb_instance_box(np.zeros((8, 8), np.uint8), 0) is None


def test_exported_labels_equal_the_mask_regions_boxes(shards, dataset):
    expected = json.loads((shards / "cases.json").read_text())
    labels = _labels(dataset)
    assert sorted(labels) == sorted(expected)
    for key, box in expected.items():
        text = labels[key][1]
        if box is None:
            assert text == "", key
            continue
        cls, cx, cy, w, h = text.split()
        assert cls == "0"
        x0, y0, x1, y1 = box
        got = ((float(cx) - float(w) / 2) * SIZE, (float(cy) - float(h) / 2) * SIZE,
               (float(cx) + float(w) / 2) * SIZE, (float(cy) + float(h) / 2) * SIZE)
        assert np.allclose(got, box, atol=2e-4), (key, got, box)
    summary = json.loads((dataset / "export.json").read_text())
    assert summary["hmb_below_min_area"] == 1
    positives = sum(b is not None for b in expected.values())
    assert sum(s["positives"] for s in summary["splits"].values()) == positives
    assert sum(s["negatives"] for s in summary["splits"].values()) == len(expected) - positives


def test_export_copies_lq_bytes_and_splits_by_key_hash(shards, dataset):
    with tarfile.open(shards / "t-r000-000000.tar") as tar:
        lq = tar.extractfile("s000000001.lq.png").read()
    (found,) = dataset.glob("images/*/s000000001.png")
    assert found.read_bytes() == lq
    for key, (split, _) in _labels(dataset).items():
        assert split == split_of(key, 0.3)
        assert (dataset / "images" / split / f"{key}.png").is_file()
    text = (dataset / "dataset.yaml").read_text()
    assert f"path: {dataset.resolve()}" in text and "0: hmb" in text


def test_export_split_by_source_keeps_a_photo_on_one_side(shards, tmp_path):
    out = tmp_path / "d"
    assert main(["yolo-export", str(shards), "--out", str(out), "--val-fraction", "0.5", "--split-by", "source",
                 "--no-progress"]) == 0
    sides: dict[str, set] = {}
    for key, (split, _) in _labels(out).items():
        sides.setdefault(f"src{int(key[1:]) % 3}", set()).add(split)
    assert all(len(s) == 1 for s in sides.values())


def test_export_never_overwrites_by_accident(shards, dataset, tmp_path, capsys):
    before = _labels(dataset)
    assert main(["yolo-export", str(shards), "--out", str(dataset), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["yolo-export", str(shards), "--out", str(tmp_path), "--overwrite", "--no-progress"]) == 2
    assert (tmp_path / "mine.txt").read_text() == "keep"
    assert _labels(dataset) == before


def test_export_records_a_corrupt_sample_and_goes_on(shards, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(shards / "t-r000-000000.tar", bad)
    rng = np.random.default_rng(1)
    broken = _sample("s000000099", "none", [], rng)
    broken["mask.png"] = b"not a png"
    write_shard(bad / "t-r000-000009.tar", [broken])
    out = tmp_path / "d"
    assert main(["yolo-export", str(bad), "--out", str(out), "--val-fraction", "0.3", "--no-progress"]) == 3
    summary = json.loads((out / "export.json").read_text())
    assert [s["sample"].rsplit(":", 1)[1] for s in summary["skipped"]] == ["s000000099"]
    assert sum(s["images"] for s in summary["splits"].values()) == 20


# ---------------------------------------------------------------- HMB-R arithmetic and pairing

def _dets(*confs: float) -> tuple[Detection, ...]:
    return tuple(Detection((0.0, 0.0, 1.0, 1.0), c, 0, "hmb") for c in confs)


def test_hmbr_is_restored_over_input_counts_at_each_threshold():
    pairs = [
        ImagePair("a", "in/a.png", "out/a.png", _dets(0.9, 0.6, 0.3), _dets(0.4)),
        ImagePair("b", "in/b.png", "out/b.png", _dets(0.8), _dets()),
        ImagePair("c", "in/c.png", "out/c.png", _dets(0.1), _dets(0.7, 0.2)),
    ]
    r = hmbr_from_pairs(pairs, conf=0.25, thresholds=[0.5, 0.05, 0.95])
    assert (r.input_detections, r.restored_detections) == (4, 2)
    assert r.hmbr == pytest.approx(0.5)
    assert [row["input_detections"] for row in r.per_image()] == [3, 1, 0]
    assert [row["restored_detections"] for row in r.per_image()] == [1, 0, 1]
    assert r.curve == [
        {"conf": 0.05, "inputs": 5, "restored": 3, "hmbr": 0.6},
        {"conf": 0.5, "inputs": 3, "restored": 1, "hmbr": pytest.approx(1 / 3)},
        {"conf": 0.95, "inputs": 0, "restored": 0, "hmbr": None},
    ]
    d = r.to_dict()
    assert d["images_with_input_detections"] == 2 and d["images_with_restored_detections"] == 2
    assert hmbr_from_pairs(pairs, conf=0.95).hmbr is None  # no HMB on the inputs: undefined, not 0


def test_hmbr_writes_json_and_csv(tmp_path):
    r = hmbr_from_pairs([ImagePair("a", "x.png", "y.png", _dets(0.5, 0.5), _dets(0.5))], conf=0.25,
                        thresholds=[0.25, 0.75])
    paths = r.write(tmp_path, sheet_rows=0)
    assert [p.name for p in paths] == ["hmbr.json", "hmbr_per_image.csv", "hmbr_curve.csv"]
    assert json.loads(paths[0].read_text())["hmbr"] == 0.5
    assert paths[1].read_text().splitlines() == [
        "name,input_file,restored_file,input_detections,restored_detections", "a,x.png,y.png,2,1"]
    assert paths[2].read_text().splitlines()[1:] == ["0.25,2,1,0.5", "0.75,0,0,"]


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / n), np.zeros((8, 8, 3), np.uint8))


def test_pairing_by_name_across_extensions_and_subfolders(tmp_path):
    _touch(tmp_path / "in", "a.jpg", "sub/b.png")
    _touch(tmp_path / "out", "a.png", "sub/b.png")
    pairs = pair_folders(tmp_path / "in", tmp_path / "out")
    assert [(n, a.name, b.name) for n, a, b in pairs] == [("a", "a.jpg", "a.png"), ("sub/b", "b.png", "b.png")]


def test_pairing_errors_name_the_missing_images(tmp_path, capsys):
    _touch(tmp_path / "in", "a.png", "b.png", "d.png")
    _touch(tmp_path / "out", "a.png", "c.png", "d.png")
    with pytest.raises(PairingError, match=r"no restored image for 1: b; no input image for 1: c"):
        pair_folders(tmp_path / "in", tmp_path / "out")
    _touch(tmp_path / "out", "a.jpg")
    with pytest.raises(PairingError, match=r"a.jpg and a.png share the name 'a'"):
        pair_folders(tmp_path / "in", tmp_path / "out")
    with pytest.raises(PairingError, match="restored folder not found"):
        pair_folders(tmp_path / "in", tmp_path / "nope")
    rc = main(["hmbr", "--inputs", str(tmp_path / "in"), "--restored", str(tmp_path / "out"),
               "--weights", str(tmp_path / "best.pt")])
    assert rc == 2 and "share the name" in capsys.readouterr().err


# ---------------------------------------------------------------- YOLO end to end, offline

GUARD = textwrap.dedent('''
    import os, runpy, socket, sys
    log = open(os.environ["NET_LOG"], "a")
    def refuse(name):
        def f(*args, **kwargs):
            log.write(f"{name} {args[:2]!r}\\n"); log.flush()
            raise OSError(f"network access attempted: {name}")
        return f
    socket.getaddrinfo = refuse("getaddrinfo")
    socket.create_connection = refuse("create_connection")
    socket.socket.connect = refuse("connect")
    socket.socket.connect_ex = refuse("connect_ex")
    sys.argv = ["haodiff-data", *sys.argv[1:]]
    if sys.argv[1] == "--import-ultralytics":
        import ultralytics
        sys.exit(0)
    runpy.run_module("haodiff_data.cli", run_name="__main__")
''')


def _guarded(tmp_path: Path, *args: str, env_extra: dict | None = None) -> tuple[int, str, str]:
    script = tmp_path / "guard.py"
    script.write_text(GUARD)
    log = tmp_path / "net.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env.update(NET_LOG=str(log), PYTHONPATH=str(REPO), YOLO_CONFIG_DIR=str(tmp_path / "yolo_cfg"),
               OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    return proc.returncode, log.read_text(), proc.stdout + proc.stderr


def test_the_network_guard_sees_ultralytics_default_probe(tmp_path):
    # Without the project's offline set-up, importing ultralytics resolves DNS names: the guard sees it.
    rc, net, out = _guarded(tmp_path, "--import-ultralytics")
    assert rc == 0, out
    assert "getaddrinfo" in net


def test_train_predict_hmbr_end_to_end_without_network(dataset, tmp_path):
    run = tmp_path / "run"
    rc, net, out = _guarded(tmp_path, "detect", "train", str(dataset), "--out", str(run), "--imgsz", "64",
                            "--epochs", "2", "--batch", "8", "--workers", "0", "--no-plots")
    assert rc == 0, out
    assert net == "", net
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"mAP50", "mAP50-95", "precision", "recall"}
    assert metrics["val_images"] == len(list((dataset / "images" / "val").glob("*.png")))
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("mAP50", "mAP50-95", "precision", "recall"))
    assert (run / "best.pt").is_file()
    assert cv2.imread(str(run / "val_predictions.png")) is not None
    assert "mAP50" in out

    # predict on a folder, a list file and a corrupt file: one line per image, the bad one with its reason
    val_images = sorted((dataset / "images" / "val").glob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in val_images[:2]))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    pred = tmp_path / "pred"
    rc, net, out = _guarded(tmp_path, "detect", "predict", str(dataset / "images" / "train"), str(listing),
                            str(corrupt), "--weights", str(run / "best.pt"), "--out", str(pred), "--imgsz", "64",
                            "--conf", "0.001", "--batch", "4", "--no-progress")
    assert rc == 3, out
    assert net == "", net
    lines = [json.loads(x) for x in (pred / "detections.jsonl").read_text().splitlines()]
    n_train = len(list((dataset / "images" / "train").glob("*.png")))
    assert len(lines) == n_train + 3
    assert lines[-1]["file"] == str(corrupt) and lines[-1]["error"] and lines[-1]["detections"] == []
    ok = lines[:-1]
    assert all(row["width"] == SIZE and row["height"] == SIZE for row in ok)
    dets = [d for row in ok for d in row["detections"]]
    assert dets, "an untrained-ish model still emits low-confidence boxes at conf 0.001"
    for d in dets:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= SIZE and 0 <= y0 <= y1 <= SIZE
        assert d["class"] == 0 and d["name"] == "hmb" and d["confidence"] >= 0.001
    assert cv2.imread(str(pred / "detections.png")) is not None

    # HMB-R of identical images is exactly 1; restored copies keep their names under another extension
    inputs, restored = tmp_path / "inputs", tmp_path / "restored"
    inputs.mkdir()
    restored.mkdir()
    for p in val_images:
        shutil.copy(p, inputs / p.name)
        cv2.imwrite(str(restored / f"{p.stem}.bmp"), cv2.imread(str(p)))
    rc, net, out = _guarded(tmp_path, "hmbr", "--inputs", str(inputs), "--restored", str(restored), "--weights",
                            str(run / "best.pt"), "--imgsz", "64", "--conf", "0.001", "--thresholds", "0.001,0.01",
                            "--out", str(tmp_path / "hmbr"), "--no-progress")
    assert rc == 0, out
    assert net == "", net
    result = json.loads((tmp_path / "hmbr" / "hmbr.json").read_text())
    assert result["images"] == len(val_images) and result["input_detections"] > 0
    assert result["hmbr"] == 1.0
    assert [c["conf"] for c in result["curve"]] == [0.001, 0.01]
    assert cv2.imread(str(tmp_path / "hmbr" / "hmbr_sheet.png")) is not None

    # haodiff-eval --detector reports the same HMB-R through the same function (HMB-R alone: no reference)
    from haodiff_model.eval.cli import main as eval_main

    assert eval_main(["--restored", str(restored), "--inputs", str(inputs), "--detector", str(run / "best.pt"),
                      "--detector-imgsz", "64", "--hmbr-conf", "0.001", "--out", str(tmp_path / "eval"),
                      "--no-progress"]) == 0
    via_eval = json.loads((tmp_path / "eval" / "hmbr.json").read_text())
    assert via_eval["hmbr"] == 1.0 and via_eval["input_detections"] == result["input_detections"]
