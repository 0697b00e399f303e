"""Reading ``mpii_human_pose_v1_u12_1.mat`` (struct ``RELEASE``) with scipy, quirks included.

Layout (MPII's README): ``annolist(i).image.name``; ``annolist(i).annorect(r)`` per person with the
head rectangle ``x1 y1 x2 y2``, ``scale``, ``objpos.x/.y`` and ``annopoints.point(k)`` with ``x y
id is_visible``; ``img_train(i)`` 1 train / 0 test; ``single_person{i}`` the rect ids of
well-separated people; ``act(i)`` with ``act_name cat_name act_id``.

Quirks handled: a struct array of one element loads as a bare struct and an empty one as an empty
array; rects may lack fields (test rects have only ``scale``/``objpos``); ``annopoints`` may be
``[]``; ``is_visible`` may be missing, empty, numeric or the character '0'/'1'; names may be
empty. MATLAB coordinates are 1-based: everything returned here is 0-based (x - 1, y - 1), as
HRNet's MPII loader does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

JOINTS = ("r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax", "upper_neck",
          "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist")


class AnnotationError(ValueError):
    """An annotation file that is not MPII's RELEASE struct."""


@dataclass(frozen=True)
class Keypoint:
    joint: int  # 0-15, see JOINTS
    x: float
    y: float
    visible: bool | None  # None when the file does not say


@dataclass(frozen=True)
class Person:
    index: int  # 0-based position in the image's annorect (MPII's ridx - 1)
    head: tuple[float, float, float, float] | None  # x1, y1, x2, y2, 0-based
    keypoints: tuple[Keypoint, ...]
    scale: float | None  # person height is about 200 * scale px
    center: tuple[float, float] | None  # objpos, 0-based


@dataclass(frozen=True)
class MPIIImage:
    index: int  # 0-based position in annolist
    name: str
    train: bool
    persons: tuple[Person, ...]
    single_person: tuple[int, ...]  # 0-based person indices
    activity: str | None
    category: str | None
    act_id: int | None


def _items(value: Any) -> list:
    """A MATLAB array as a list: a bare struct is one item, an empty array none."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.flat)
    return [value]


def _field(struct: Any, name: str) -> Any:
    if struct is None or name not in getattr(struct, "_fieldnames", ()):
        return None
    value = getattr(struct, name)
    if isinstance(value, np.ndarray) and value.size == 0:
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _number(value: Any) -> float | None:
    """A scalar from a number, a one-element array or a numeric string; None for empty or missing."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else None
    if value is None:
        return None
    return str(value).strip() or None


def _person(index: int, rect: Any) -> Person:
    x1, y1, x2, y2 = (_number(_field(rect, k)) for k in ("x1", "y1", "x2", "y2"))
    head = None
    if None not in (x1, y1, x2, y2):
        head = (min(x1, x2) - 1, min(y1, y2) - 1, max(x1, x2) - 1, max(y1, y2) - 1)
    keypoints = []
    for point in _items(_field(_field(rect, "annopoints"), "point")):
        joint, x, y = (_number(_field(point, k)) for k in ("id", "x", "y"))
        if joint is None or x is None or y is None or not 0 <= joint < len(JOINTS):
            continue
        vis = _number(_field(point, "is_visible"))
        keypoints.append(Keypoint(int(joint), x - 1, y - 1, None if vis is None else vis > 0))
    objpos = _field(rect, "objpos")
    cx, cy = _number(_field(objpos, "x")), _number(_field(objpos, "y"))
    return Person(index=index, head=head, keypoints=tuple(sorted(keypoints, key=lambda k: k.joint)),
                  scale=_number(_field(rect, "scale")),
                  center=None if cx is None or cy is None else (cx - 1, cy - 1))


def read_annotations(path: str | Path) -> list[MPIIImage]:
    """Every image of the RELEASE struct, in file order."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except (OSError, ValueError, NotImplementedError) as exc:  # scipy raises NotImplementedError for v7.3 (HDF5) files
        raise AnnotationError(f"{path}: not a readable MATLAB file ({exc})") from None
    release = mat.get("RELEASE")
    if release is None or "annolist" not in getattr(release, "_fieldnames", ()):
        raise AnnotationError(f"{path}: no RELEASE struct with annolist (is this mpii_human_pose_v1_u12_1.mat?)")
    annolist = _items(release.annolist)
    train = [_number(v) for v in _items(_field(release, "img_train"))]
    singles = _items(_field(release, "single_person"))
    acts = _items(_field(release, "act"))
    images = []
    for i, anno in enumerate(annolist):
        name = _text(_field(_field(anno, "image"), "name"))
        rects = _items(_field(anno, "annorect"))
        persons = tuple(_person(r, rect) for r, rect in enumerate(rects))
        single_ids = [_number(x) for x in _items(singles[i])] if i < len(singles) else []
        single = tuple(int(v) - 1 for v in single_ids if v is not None)
        act = acts[i] if i < len(acts) else None
        act_id = _number(_field(act, "act_id"))
        images.append(MPIIImage(
            index=i, name=name or "", train=bool(train[i]) if i < len(train) and train[i] is not None else False,
            persons=persons, single_person=single, activity=_text(_field(act, "act_name")),
            category=_text(_field(act, "cat_name")), act_id=None if act_id is None else int(act_id),
        ))
    return images
