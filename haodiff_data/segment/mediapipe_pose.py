"""MediaPipe Pose (model shipped in the wheel, no download) turned into Goliath-28 part labels.

MediaPipe gives 33 landmarks and a person mask for at most one person. Each body part is
modelled as a simple primitive around its landmarks (a capsule around a bone, a capsule for the
head, the shoulder-hip quadrilateral for the torso); every person pixel takes the label of the
primitive whose signed distance is smallest, i.e. the part it lies deepest inside or closest to.
MediaPipe's "left" landmarks are the person's own left, which is Goliath's convention too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from haodiff_data.segment import check_rgb

MASK_THRESHOLD = 0.5
# A landmark is trusted when MediaPipe's visibility reaches this. MediaPipe is conservative
# (a forearm half hidden behind a held object scores ~0.3), and a wrongly dropped bone hands its
# pixels to a neighbouring part, which costs more than a slightly misplaced one.
MIN_VISIBILITY = 0.3
# Labels are derived on a grid this many times coarser, then upsampled and cut by the
# full-resolution mask: the silhouette stays exact, only part boundaries are quantised.
GRID_STEP = 2
# Person-mask pixels further than this (times the body scale) from every part are dropped:
# they are mask bleed onto a neighbour or the background, not this person.
MAX_GAP = 0.5

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


def part_labels(landmarks: np.ndarray, mask: np.ndarray, grid_step: int = GRID_STEP) -> np.ndarray:
    """Goliath ids for a person given MediaPipe landmarks and mask.

    ``landmarks``: (33, 3) array of x, y in pixels and visibility; ``mask``: HxW person
    probability. Returns uint8 HxW, all zeros when the pose gives no body scale.
    """
    height, width = mask.shape
    labels = np.zeros((height, width), np.uint8)
    fg = mask > MASK_THRESHOLD
    pose = _Pose.build(np.asarray(landmarks, np.float64), height, width)
    scale = pose.body_scale()
    if not fg.any() or scale <= 0:
        return labels

    # Work on the grid cells covering the mask's bounding box only.
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
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
        return labels
    stack = np.stack(sdfs)
    best = np.argmin(stack, axis=0)
    grid = np.asarray(ids, np.uint8)[best]
    grid[np.min(stack, axis=0) > MAX_GAP * scale] = 0
    y0, x0 = r0 * grid_step, c0 * grid_step
    full = np.repeat(np.repeat(grid, grid_step, axis=0), grid_step, axis=1)[: height - y0, : width - x0]
    window = labels[y0 : y0 + full.shape[0], x0 : x0 + full.shape[1]]
    inside = fg[y0 : y0 + full.shape[0], x0 : x0 + full.shape[1]]
    window[inside] = full[inside]
    return labels


_POSES: dict[int, Any] = {}
# Every process that ever built a Pose. MediaPipe cannot build a second graph in a process forked
# from one that built a graph (even a closed one): the child corrupts its heap and dies or hangs.
_BUILT_IN: set[int] = set()


def _pose_for_this_process() -> Any:
    """The process's Pose graph, created on first use (never at import, so workers forked from
    a parent that only imported this module each build their own)."""
    pid = os.getpid()
    pose = _POSES.get(pid)
    if pose is None:
        ancestors = _BUILT_IN - {pid}
        if ancestors:
            raise RuntimeError(
                f"MediaPipe Pose was already used in process {min(ancestors)}, and this process "
                f"({pid}) was forked from it; MediaPipe crashes in such a child. Use the segmenter only "
                "in worker processes, or start workers with the 'spawn' or 'forkserver' method."
            )
        from mediapipe.python.solutions import pose as mp_pose

        # model_complexity=1 is the landmark model bundled in the wheel; 0 and 2 try to download.
        pose = mp_pose.Pose(static_image_mode=True, enable_segmentation=True, model_complexity=1)
        _POSES[pid] = pose
        _BUILT_IN.add(pid)
    return pose


def _landmark_array(result: Any, height: int, width: int) -> np.ndarray:
    return np.array([(p.x * width, p.y * height, p.visibility) for p in result.pose_landmarks.landmark])


class MediaPipeSegmenter:
    """The embedded default: one MediaPipe Pose per process, labels from landmarks + mask."""

    name = "mediapipe"
    per_source = False

    def __init__(self) -> None:
        import mediapipe

        self.model_id = f"mediapipe-pose-full-{mediapipe.__version__}"

    def segment(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        check_rgb(images)
        out = []
        for image in images:
            height, width = image.shape[:2]
            result = _pose_for_this_process().process(np.ascontiguousarray(image))
            if result.pose_landmarks is None or result.segmentation_mask is None:
                out.append(np.zeros((height, width), np.uint8))
                continue
            out.append(part_labels(_landmark_array(result, height, width), result.segmentation_mask))
        return out

    def close(self) -> None:
        pose = _POSES.pop(os.getpid(), None)
        if pose is not None:
            pose.close()
