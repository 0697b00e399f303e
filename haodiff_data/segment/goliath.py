"""The Goliath-28 body-part classes and their mapping to HAODiff's six motion-blur groups.

Every segmenter returns uint8 label maps in these ids (``reference/data_spec.md`` C.2); the HMB
step draws its moving part from :func:`group_masks`. Left/right are the person's own side.
"""

from __future__ import annotations

import cv2
import numpy as np

CLASSES: tuple[str, ...] = (
    "Background",
    "Apparel",
    "Face_Neck",
    "Hair",
    "Left_Foot",
    "Left_Hand",
    "Left_Lower_Arm",
    "Left_Lower_Leg",
    "Left_Shoe",
    "Left_Sock",
    "Left_Upper_Arm",
    "Left_Upper_Leg",
    "Lower_Clothing",
    "Right_Foot",
    "Right_Hand",
    "Right_Lower_Arm",
    "Right_Lower_Leg",
    "Right_Shoe",
    "Right_Sock",
    "Right_Upper_Arm",
    "Right_Upper_Leg",
    "Torso",
    "Upper_Clothing",
    "Lower_Lip",
    "Upper_Lip",
    "Lower_Teeth",
    "Upper_Teeth",
    "Tongue",
)
NUM_CLASSES = len(CLASSES)
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

GROUPS: tuple[str, ...] = (
    "head",
    "left_upper_limb",
    "right_upper_limb",
    "left_lower_limb",
    "right_lower_limb",
    "whole_body",
)

# data_spec C.5. whole_body is every id 1-27 and is computed as labels > 0.
GROUP_CLASSES: dict[str, tuple[int, ...]] = {
    "head": (2, 3, 23, 24, 25, 26, 27),
    "left_upper_limb": (10, 6, 5),
    "right_upper_limb": (19, 15, 14),
    "left_lower_limb": (11, 7, 4, 9, 8),
    "right_lower_limb": (20, 16, 13, 18, 17),
    "whole_body": tuple(range(1, NUM_CLASSES)),
}
LIMB_GROUPS: tuple[str, ...] = GROUPS[1:5]
CLOTHING: tuple[int, ...] = (1, 12, 22)  # Apparel, Lower_Clothing, Upper_Clothing: no side


def _lookup(ids: tuple[int, ...]) -> np.ndarray:
    table = np.zeros(256, bool)  # indexed by any uint8, so the lookup itself never fails
    table[list(ids)] = True
    return table


_GROUP_TABLES = {name: _lookup(ids) for name, ids in GROUP_CLASSES.items()}
_CLOTHING_TABLE = _lookup(CLOTHING)


def check_labels(labels: np.ndarray, what: str = "labels") -> None:
    """Raise ValueError unless ``labels`` is a 2-D uint8 map of ids 0-27."""
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.dtype != np.uint8:
        desc = f"{labels.dtype} array of shape {labels.shape}" if isinstance(labels, np.ndarray) else type(labels)
        raise ValueError(f"{what}: expected a 2-D uint8 Goliath label map, got {desc}")
    top = int(labels.max(initial=0))
    if top >= NUM_CLASSES:
        raise ValueError(f"{what}: id {top} is not a Goliath-28 class (ids are 0-{NUM_CLASSES - 1})")


def _clothing_to_limbs(labels: np.ndarray, limbs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Clothing pixels that belong to each limb (sleeves, trouser legs).

    Goliath labels a sleeve or trouser leg as clothing with no side, so a clothed limb would be
    mostly missing from its group. Rule: a clothing pixel joins the limb whose skin is nearest,
    if that distance is at most the limb's width. The width is twice the largest distance from
    a skin pixel to the skin's edge (the diameter of the thickest inscribed disc), so a sleeve
    joins its arm up to about one arm-thickness away, while the shirt over the chest, further
    from the arm, does not. Taking only the nearest limb keeps trousers between two legs from
    joining both.
    """
    cloth = np.flatnonzero(_CLOTHING_TABLE[labels].ravel())
    if cloth.size == 0 or not limbs:
        return {}
    dists = []
    for skin in limbs.values():
        skin_u8 = skin.astype(np.uint8)
        inside = cv2.distanceTransform(skin_u8, cv2.DIST_L2, cv2.DIST_MASK_5)
        width = 2.0 * float(inside.max())
        # Distance of every clothing pixel to the nearest skin pixel of this limb.
        to_skin = cv2.distanceTransform(1 - skin_u8, cv2.DIST_L2, cv2.DIST_MASK_5).ravel()[cloth]
        to_skin[to_skin > width] = np.inf
        dists.append(to_skin)
    stack = np.stack(dists)  # (limbs, clothing pixels)
    nearest = np.argmin(stack, axis=0)
    reachable = np.isfinite(np.min(stack, axis=0))
    joined = {}
    for k, name in enumerate(limbs):
        mask = np.zeros(labels.size, bool)
        mask[cloth[reachable & (nearest == k)]] = True
        joined[name] = mask.reshape(labels.shape)
    return joined


def group_masks(labels: np.ndarray, min_fraction: float) -> dict[str, np.ndarray]:
    """Bool HxW masks of the non-empty HMB groups of a Goliath label map, in GROUPS order.

    A group is kept when its area is at least ``min_fraction`` of the image. Limb groups also
    take the clothing next to them (see ``_clothing_to_limbs``).
    """
    check_labels(labels)
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction: expected a value in [0, 1], got {min_fraction}")
    return _group_masks(labels, min_fraction * labels.size)


def person_groups(labels: np.ndarray, persons: np.ndarray, min_fraction: float) -> dict[int, dict[str, np.ndarray]]:
    """Per person id (1..n): bool HxW masks of that person's non-empty HMB groups.

    Each person's groups come from their own pixels only, so a limb group never reaches a
    neighbour's limb or clothing. The area threshold is relative to the whole image, as in
    :func:`group_masks`.
    """
    check_labels(labels)
    if persons.shape != labels.shape or persons.dtype != np.uint8:
        raise ValueError(f"persons: expected a uint8 map of shape {labels.shape}, got {persons.dtype} {persons.shape}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction: expected a value in [0, 1], got {min_fraction}")
    out = {}
    for person in range(1, int(persons.max(initial=0)) + 1):
        own = (persons == person) & (labels > 0)
        box = person_box(own.astype(np.uint8))
        if box is None:
            continue
        x0, y0, x1, y1 = box
        # Only the person's bounding box: the cost follows the person's size, not the image's.
        masks = _group_masks(np.where(own[y0:y1, x0:x1], labels[y0:y1, x0:x1], 0).astype(np.uint8),
                             min_fraction * labels.size)
        full = {}
        for name, mask in masks.items():
            full[name] = np.zeros(labels.shape, bool)
            full[name][y0:y1, x0:x1] = mask
        if full:
            out[person] = full
    return out


def people_by_group(people: dict[int, dict[str, np.ndarray]]) -> dict[str, list[int]]:
    """For each non-empty group, in GROUPS order, the people (ids) who have it."""
    by_group = {g: [k for k, groups in people.items() if g in groups] for g in GROUPS}
    return {g: ks for g, ks in by_group.items() if ks}


def _group_masks(labels: np.ndarray, min_area: float) -> dict[str, np.ndarray]:
    masks = {name: _GROUP_TABLES[name][labels] for name in GROUPS[:-1]}
    masks["whole_body"] = labels > 0
    limbs = {name: masks[name] for name in LIMB_GROUPS if masks[name].any()}
    for name, extra in _clothing_to_limbs(labels, limbs).items():
        masks[name] |= extra
    return {name: m for name, m in masks.items() if m.any() and m.sum() >= min_area}


def person_box(labels: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (exclusive) bounding all labelled pixels, or None when there are none."""
    fg = labels > 0
    cols = np.flatnonzero(fg.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(fg.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
