"""MPII-Test: the RELEASE struct with its quirks (written here with scipy), selection rules, crops."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from haodiff_data.cli import main
from haodiff_data.intake.sources import ASSETS_DIR
from haodiff_data.mpii.annotations import read_annotations
from haodiff_data.mpii.select import MPIITestConfig, crop_box

REPO = Path(__file__).resolve().parent.parent
EMPTY = np.zeros((0, 0))


def points(xy0: list[tuple[float, float]], visible=None) -> dict:
    """annopoints with MATLAB 1-based points from 0-based ones; ``visible`` per point (number, char or EMPTY)."""
    fields = [("x", "O"), ("y", "O"), ("id", "O")] + ([("is_visible", "O")] if visible is not None else [])
    arr = np.empty((1, len(xy0)), dtype=fields)
    for k, (x, y) in enumerate(xy0):
        arr[0, k]["x"], arr[0, k]["y"], arr[0, k]["id"] = float(x + 1), float(y + 1), float(k)
        if visible is not None:
            arr[0, k]["is_visible"] = visible[k]
    return {"point": arr}


def rects(persons: list[dict], fields: list[str]) -> np.ndarray:
    arr = np.empty((1, len(persons)), dtype=[(f, "O") for f in fields])
    for i, p in enumerate(persons):
        for f in fields:
            arr[0, i][f] = p.get(f, EMPTY)
    return arr


def box_points(x0, y0, x1, y1, n=8) -> list[tuple[float, float]]:
    """n points whose extent is exactly (x0, y0, x1, y1)."""
    corners = [(x0, y0), (x1, y1), (x0, y1), (x1, y0)]
    inner = [(x0 + (x1 - x0) * (k + 1) / (n - 3), y0 + (y1 - y0) / 2) for k in range(n - 4)]
    return corners + inner


def head(x0, y0, x1, y1) -> dict:
    return {"x1": float(x0 + 1), "y1": float(y0 + 1), "x2": float(x1 + 1), "y2": float(y1 + 1)}


FULL = ["x1", "y1", "x2", "y2", "annopoints", "scale", "objpos"]


def write_release(path: Path) -> None:
    """Seven images with the quirks of the real file, persons designed to hit every rule once."""
    obj = {"x": 1.0, "y": 1.0}
    zidane = rects([
        {**head(280, 60, 320, 110), "annopoints": points(box_points(200, 100, 400, 500)), "scale": 2.0, "objpos": obj},
        {**head(600, 60, 640, 100), "annopoints": points(box_points(600, 100, 700, 300, 5)), "scale": 1.0},  # 5 joints
        {**head(1110, 300, 1120, 310), "annopoints": points(box_points(1100, 300, 1150, 360)), "scale": 0.3},  # small
        {**head(940, 0, 960, 20), "annopoints": points(box_points(900, 0, 1000, 700)), "scale": 3.5},  # tall: clip
    ], FULL)
    # no head fields at all; is_visible as characters, one empty
    vis = ["1", "0", EMPTY, "1", "1", "1", "1", "1"]
    astronaut = rects([{"annopoints": points(box_points(150, 100, 350, 400), vis), "scale": 1.5}],
                      ["annopoints", "scale"])
    bus = rects([
        {**head(180, 300, 220, 340), "annopoints": points(box_points(100, 300, 300, 800), [1] * 8)},
        {**head(280, 300, 320, 340), "annopoints": points(box_points(200, 300, 400, 800), [0] * 8)},
    ], FULL)
    candidate = rects([{**head(10, 10, 50, 50), "annopoints": points(box_points(10, 10, 300, 400))}], FULL)
    test_only = rects([{"scale": 2.0, "objpos": obj}, {"scale": 1.0, "objpos": obj}], ["scale", "objpos"])
    images = [("zidane.jpg", zidane, 1), ("astronaut.png", astronaut, 1), ("bus.jpg", bus, 1),
              ("missing.jpg", candidate, 1), ("corrupt.jpg", candidate, 1), ("test.jpg", test_only, 0),
              ("empty.jpg", EMPTY, 1)]
    annolist = np.empty((1, len(images)), dtype=[("image", "O"), ("annorect", "O"), ("frame_sec", "O"), ("vidx", "O")])
    acts = np.empty((len(images), 1), dtype=[("act_name", "O"), ("cat_name", "O"), ("act_id", "O")])
    single = np.empty((len(images), 1), dtype=object)
    for i, (name, ann, _) in enumerate(images):
        annolist[0, i]["image"] = {"name": name}
        annolist[0, i]["annorect"] = ann
        annolist[0, i]["frame_sec"] = EMPTY
        annolist[0, i]["vidx"] = EMPTY
        acts[i, 0]["act_name"], acts[i, 0]["cat_name"], acts[i, 0]["act_id"] = EMPTY, EMPTY, -1.0
        single[i, 0] = EMPTY
    acts[0, 0]["act_name"], acts[0, 0]["cat_name"], acts[0, 0]["act_id"] = "soccer", "sports", 7.0
    single[1, 0] = np.array([[1.0]])
    release = {"annolist": annolist, "img_train": np.array([[t for *_, t in images]], float), "version": "12",
               "single_person": single, "act": acts, "video_list": np.empty((1, 0), dtype=object)}
    savemat(str(path), {"RELEASE": release})


@pytest.fixture(scope="module")
def mpii(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mpii")
    write_release(root / "mpii_human_pose_v1_u12_1.mat")
    (root / "images").mkdir()
    for name in ("zidane.jpg", "astronaut.png", "bus.jpg"):
        shutil.copy(ASSETS_DIR / name, root / "images" / name)
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def run(mpii: Path, out: Path, *extra: str) -> int:
    return main(["mpii-test", "--annotations", str(mpii / "mpii_human_pose_v1_u12_1.mat"),
                 "--images", str(mpii / "images"), "--out", str(out), "--workers", "1", "--no-progress", *extra])


def test_reader_handles_the_struct_quirks(mpii):
    images = read_annotations(mpii / "mpii_human_pose_v1_u12_1.mat")
    assert [im.name for im in images] == ["zidane.jpg", "astronaut.png", "bus.jpg", "missing.jpg", "corrupt.jpg",
                                          "test.jpg", "empty.jpg"]
    z, a, b = images[0], images[1], images[2]
    assert z.train and not images[5].train
    assert (z.activity, z.category, z.act_id) == ("soccer", "sports", 7)
    assert a.activity is None and a.single_person == (0,)
    assert z.persons[0].head == (280, 60, 320, 110)  # 1-based file values, 0-based here
    assert [(k.x, k.y) for k in z.persons[0].keypoints[:2]] == [(200, 100), (400, 500)]
    assert a.persons[0].head is None  # rect without head fields
    assert [k.visible for k in a.persons[0].keypoints[:4]] == [True, False, None, True]  # '1', '0', [], '1'
    assert [k.visible for k in b.persons[0].keypoints] == [True] * 8
    assert z.persons[1].keypoints and len(z.persons[1].keypoints) == 5
    assert images[5].persons[0].keypoints == () and images[5].persons[0].center == (0.0, 0.0)
    assert images[6].persons == ()  # empty annorect


def test_crop_box_of_hand_made_keypoints():
    cfg = MPIITestConfig()
    # extent 200x440 (keypoints x 200-400, head top y 60), margin 0.15 * 440 = 66 -> square side 572
    # about (300, 280), shifted down into the image by 6 px
    assert crop_box((200, 60, 400, 500), 1280, 720, cfg) == ((14, 0, 586, 572), 0.0)
    # extent 200x300: margin 45, side 390 about (250, 250)
    assert crop_box((150, 100, 350, 400), 512, 512, cfg) == ((55, 55, 445, 445), 0.0)
    # larger than the image: shrunk to the image's height, area lost reported
    # (margin 105: a 910 px square about (950, 350)), shifted left to end at the right edge
    box, lost = crop_box((900, 0, 1000, 700), 1280, 720, cfg)
    assert box == (560, 0, 1280, 720) and lost == pytest.approx(1 - 720**2 / 910**2)
    unsquare = MPIITestConfig(square=False, margin=0.0)
    assert crop_box((10.0, 20.0, 110.0, 70.0), 640, 480, unsquare) == ((10, 20, 110, 70), 0.0)


def test_mpii_test_crops_manifest_and_counts(mpii, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(mpii, out) == 3  # two unreadable images: recorded, not fatal
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["persons"] == 11
    assert summary["dropped_by_rule"] == {"split": 2, "min_keypoints": 1, "single_person": 0, "min_side": 1,
                                          "max_clip": 1, "max_other_overlap": 2, "image_unreadable": 2}
    assert summary["crops"] == 2 and summary["images_with_crops"] == 2
    assert sorted(u["image"] for u in summary["unreadable_images"]) == ["corrupt.jpg", "missing.jpg"]
    assert "2 crops from 2 images" in printed
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["image"], m["person"], m["box"]) for m in manifest] == [
        ("zidane.jpg", 0, [14, 0, 586, 572]), ("astronaut.png", 0, [55, 55, 445, 445])]
    assert manifest[0]["activity"] == "soccer" and manifest[0]["split"] == "train"
    assert manifest[0]["rules"]["margin"] == 0.15 and manifest[0]["other_overlap"] == 0.0
    src = cv2.imread(str(mpii / "images" / "zidane.jpg"))
    crop = cv2.imread(str(out / manifest[0]["crop"]))
    assert crop.shape == (512, 512, 3)
    expected = cv2.resize(src[0:572, 14:586], (512, 512), interpolation=cv2.INTER_AREA)
    assert np.abs(crop.astype(int) - expected.astype(int)).mean() < 1.0
    assert cv2.imread(str(out / manifest[1]["crop"])).shape == (512, 512, 3)


def test_rules_are_knobs(mpii, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text((REPO / "pipelines" / "mpii_test.yaml").read_text()
                     .replace("single_person_only: false", "single_person_only: true")
                     .replace("max_other_overlap: 0.3", "max_other_overlap: 1.0"))
    # only astronaut's person is in single_person; the others passing the first rules stop there,
    # the missing and corrupt images' too, so those images are never read
    assert run(mpii, tmp_path / "o", "--rules", str(rules)) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["dropped_by_rule"]["single_person"] == 7 and summary["crops"] == 1
    rules.write_text("margin: 0.1\nmargni: 0.2\n")
    assert run(mpii, tmp_path / "p", "--rules", str(rules)) == 2


def test_resume_after_a_torn_write_gives_the_same_output(mpii, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(mpii, full) == 3
    assert run(mpii, full) == 2  # never overwritten without --resume
    shutil.copytree(full, part)
    lines = (part / "images.jsonl").read_bytes().splitlines(keepends=True)
    (part / "images.jsonl").write_bytes(b"".join(lines[:1]) + lines[1][:20])  # crash inside image 2's line
    for name in ("manifest.jsonl", "summary.json"):
        (part / name).unlink()
    (part / "crops" / "astronaut_00.png").unlink()
    assert run(mpii, part, "--resume") == 3
    for name in ("images.jsonl", "manifest.jsonl", "crops/zidane_00.png", "crops/astronaut_00.png"):
        assert (part / name).read_bytes() == (full / name).read_bytes(), name


def test_detector_counts_hmb_on_the_crops(mpii, tmp_path):
    weights = tmp_path / "untrained.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "YOLO_CONFIG_DIR": str(tmp_path / "cfg"), "OMP_NUM_THREADS": "1"}
    code = ("from haodiff_data.detect.yolo import load_model; "
            f"load_model('yolo11n.yaml').save({str(weights)!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "haodiff_data.cli", "mpii-test", "--annotations",
                           str(mpii / "mpii_human_pose_v1_u12_1.mat"), "--images", str(mpii / "images"), "--out",
                           str(out), "--workers", "1", "--no-progress", "--detector", str(weights), "--imgsz", "64",
                           "--conf", "0.0001"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    rows = [json.loads(x) for x in (out / "hmb.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["crops/zidane_00.png", "crops/astronaut_00.png"]
    counts = json.loads((out / "hmb_summary.json").read_text())
    assert counts["images"] == 2 and counts["instances"] == sum(len(r["detections"]) for r in rows)
    assert counts["paper"] == {"instances": 1765, "images_with_hmb": 1326, "images": 5427}
    assert f"HMB instances in {counts['images_with_hmb']} of 2 images" in proc.stdout
