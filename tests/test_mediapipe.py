import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from haodiff_data.segment import make_segmenter
from haodiff_data.segment.mediapipe_pose import part_labels

ASSETS = Path(__file__).resolve().parent.parent / "haodiff_data" / "assets"
LEFT_ARM, RIGHT_ARM = (10, 6, 5), (19, 15, 14)


def _photo(name: str, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    rgb = np.asarray(Image.open(ASSETS / name).convert("RGB"))
    if box is not None:
        x0, y0, x1, y1 = box
        rgb = rgb[y0:y1, x0:x1]
    return np.ascontiguousarray(rgb)


# 512x512 crops (x0, y0, x1, y1), each centred on one person (others may be in the crop too).
CASES = {
    "astronaut": ("astronaut.png", None),  # frontal upper body, full 512x512 image
    "bus_beige_coat": ("bus.jpg", (0, 400, 512, 912)),  # man in the beige coat, head to feet
    "bus_black_coat": ("bus.jpg", (150, 350, 662, 862)),  # man in the black coat, head to feet
    "zidane_right_man": ("zidane.jpg", (750, 50, 1262, 562)),  # the man on the right, upper body
    "zidane_left_man": ("zidane.jpg", (150, 208, 662, 720)),  # the leaning, shouting man
}


def _segment_one(image: np.ndarray) -> np.ndarray:
    return make_segmenter("mediapipe").segment([image])[0].parts


def _run_mediapipe(queue) -> None:
    """Everything that runs the pose models, in a fresh process, so that the pytest process
    never holds a TFLite runtime that later forking tests would inherit."""
    out = {}
    astronaut = _photo("astronaut.png")
    seg = make_segmenter("mediapipe")
    for case, (name, box) in CASES.items():
        out[case] = seg.segment([_photo(name, box)])[0].parts
    out["batch"] = [s.parts for s in seg.segment([np.full((256, 320, 3), 128, np.uint8), astronaut])]
    # A child forked after the parent ran the models builds its own and gets the same labels.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        out["forked"] = pool.apply(_segment_one, (astronaut,))
    queue.put(out)


@pytest.fixture(scope="module")
def results():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_mediapipe, args=(queue,))
    proc.start()
    out = queue.get(timeout=300)
    proc.join()
    return out


def _centroid(labels: np.ndarray, ids) -> tuple[float, float]:
    ys, xs = np.nonzero(np.isin(labels, ids))
    assert xs.size > 0, f"none of ids {ids} present"
    return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("case", sorted(CASES))
def test_photos_get_anatomical_parts(results, case):
    labels = results[case]
    assert labels.shape == (512, 512) and labels.dtype == np.uint8
    assert labels.max() <= 27
    assert (labels > 0).mean() > 0.08  # the person is found, not a speck
    # Facing the camera, the person's left arm is on the image's right.
    assert _centroid(labels, LEFT_ARM)[0] > _centroid(labels, RIGHT_ARM)[0]
    assert _centroid(labels, (2,))[1] < _centroid(labels, (21,))[1]  # head above torso


def test_full_body_crop_has_legs_on_the_right_sides(results):
    labels = results["bus_beige_coat"]
    left_leg, right_leg = _centroid(labels, (11, 7, 4)), _centroid(labels, (20, 16, 13))
    assert left_leg[0] > right_leg[0]
    assert left_leg[1] > _centroid(labels, (21,))[1] and right_leg[1] > _centroid(labels, (21,))[1]


def test_blank_image_gives_zeros_and_batches_match_singles(results):
    grey, astronaut = results["batch"]
    assert grey.shape == (256, 320) and grey.dtype == np.uint8 and not grey.any()
    assert np.array_equal(astronaut, results["astronaut"])  # deterministic, batch = one by one


def test_forked_worker_builds_its_own_models(results):
    assert np.array_equal(results["forked"], results["astronaut"])


def test_rejects_non_rgb_input():
    seg = make_segmenter("mediapipe")
    with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
        seg.segment([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(ValueError, match="HxWx3"):
        seg.segment([np.zeros((64, 64), np.uint8)])
    assert seg.name == "mediapipe" and seg.model_id.startswith("mediapipe-pose-full-") and not seg.per_source
    assert seg.model_id.endswith("-multi")


def _t_pose(height: int = 400, width: int = 300) -> np.ndarray:
    """Synthetic frontal T-pose in MediaPipe's 33-landmark layout: x, y (pixels), visibility."""
    pts = {
        0: (150, 60), 1: (155, 52), 2: (160, 52), 3: (165, 52), 4: (145, 52), 5: (140, 52), 6: (135, 52),
        7: (172, 58), 8: (128, 58), 9: (157, 72), 10: (143, 72),
        11: (190, 110), 12: (110, 110), 13: (240, 110), 14: (60, 110), 15: (280, 110), 16: (20, 110),
        17: (288, 116), 18: (12, 116), 19: (288, 104), 20: (12, 104), 21: (284, 100), 22: (16, 100),
        23: (175, 220), 24: (125, 220), 25: (178, 300), 26: (122, 300), 27: (180, 370), 28: (120, 370),
        29: (178, 382), 30: (122, 382), 31: (196, 388), 32: (104, 388),
    }
    return np.array([(*pts[k], 0.99) for k in range(33)], np.float64)


def test_part_labels_on_a_synthetic_t_pose():
    landmarks = _t_pose()
    labels = part_labels(landmarks, np.ones((400, 300), np.float32))
    # (x, y) at the middle of each part -> its Goliath id; left is the image's right.
    expected = {
        (150, 40): 2, (150, 90): 2, (150, 165): 21,
        (215, 110): 10, (260, 110): 6, (290, 110): 5,
        (85, 110): 19, (40, 110): 15, (10, 110): 14,
        (176, 260): 11, (179, 335): 7, (190, 386): 4,
        (124, 260): 20, (121, 335): 16, (110, 386): 13,
    }
    for (x, y), cid in expected.items():
        assert labels[y, x] == cid, (x, y, labels[y, x], cid)
    # A mask pixel far from every part is not this person.
    assert labels[399, 0] == 0 and labels[0, 299] == 0


def test_part_labels_follow_visibility_and_the_frame():
    mask = np.ones((400, 300), np.float32)
    hidden = _t_pose()
    hidden[13, 2] = 0.05  # left elbow occluded inside the frame: both left arm bones go
    labels = part_labels(hidden, mask)
    assert not np.isin(labels, (10, 6)).any() and (labels == 19).any()
    beyond = _t_pose()
    beyond[15, :] = (330, 110, 0.05)  # left wrist out of frame: low visibility is expected there
    beyond[[17, 19, 21], 2] = 0.05
    labels = part_labels(beyond, mask)
    assert labels[110, 270] == 6 and not (labels == 5).any()
    assert not part_labels(_t_pose(), np.zeros((400, 300), np.float32)).any()
    invisible = _t_pose()
    invisible[:, 2] = 0.0
    assert not part_labels(invisible, mask).any()
