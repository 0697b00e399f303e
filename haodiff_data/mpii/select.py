"""MPII-Test selection: which annotated people become crops, and the crop box of each.

Every rule is a knob of ``pipelines/mpii_test.yaml`` (the paper gives no values). Rules run in the
order of ``RULES``; a person is dropped by the first rule it fails, so the counts per rule add up.
Geometry (0-based source pixels): the person box is the extent of the annotated keypoints and the
head rectangle; each side is extended by ``margin`` times the box's longer side; with ``square``
the box grows to a square about its centre; the square is shifted into the image, and shrunk
(about its centre, then shifted again) only when it is larger than the image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from haodiff_data.config import ConfigError
from haodiff_data.mpii.annotations import MPIIImage, Person
from haodiff_data.recipe import RecipeError, from_dict, read_pipeline_yaml

RULES = ("split", "min_keypoints", "single_person", "min_side", "max_clip", "max_other_overlap")


@dataclass(frozen=True)
class MPIITestConfig:
    split: str = "train"
    min_keypoints: int = 8
    use_head_rect: bool = True
    single_person_only: bool = False
    margin: float = 0.15
    square: bool = True
    min_side: int = 128
    max_clip: float = 0.2
    max_other_overlap: float = 0.3
    size: int = 512


def load_config(name_or_path: str | Path = "mpii_test") -> MPIITestConfig:
    """``pipelines/mpii_test.yaml`` by name, or a YAML path; unknown keys fail with their name."""
    path, data = read_pipeline_yaml(name_or_path, "MPII-Test rules file")
    try:
        cfg = from_dict(MPIITestConfig, data)
    except ConfigError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    if cfg.split not in ("train", "test", "all"):
        raise RecipeError(f"{path}: split must be train, test or all, got {cfg.split!r}")
    if cfg.margin < 0 or cfg.min_side < 1 or cfg.size < 16 or not 0 <= cfg.max_clip < 1:
        raise RecipeError(f"{path}: need margin >= 0, min_side >= 1, size >= 16, 0 <= max_clip < 1")
    return cfg


def person_extent(person: Person, use_head: bool) -> tuple[float, float, float, float] | None:
    """Min/max over the annotated keypoints (and the head rectangle): x0, y0, x1, y1."""
    xs = [k.x for k in person.keypoints]
    ys = [k.y for k in person.keypoints]
    if use_head and person.head is not None:
        xs += [person.head[0], person.head[2]]
        ys += [person.head[1], person.head[3]]
    if not xs:
        return None
    return min(xs), min(ys), max(xs), max(ys)


def _fit(lo: float, side: float, limit: int) -> float:
    """Shift an interval [lo, lo + side) into [0, limit)."""
    return min(max(lo, 0.0), limit - side)


def crop_box(extent: tuple[float, float, float, float], width: int, height: int, cfg: MPIITestConfig
             ) -> tuple[tuple[int, int, int, int], float]:
    """The integer crop box (x0, y0, x1, y1) inside the image, and the share of the wanted box's area lost."""
    x0, y0, x1, y1 = extent
    pad = cfg.margin * max(x1 - x0, y1 - y0)
    x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad
    w, h = x1 - x0, y1 - y0
    if cfg.square:
        w = h = max(w, h)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0, y0 = cx - w / 2, cy - h / 2
    wanted = w * h
    if cfg.square:
        side = min(w, width, height)
        cx, cy = x0 + w / 2, y0 + h / 2
        w = h = side
        x0, y0 = cx - side / 2, cy - side / 2
    else:
        x0, x1 = max(x0, 0.0), min(x0 + w, float(width))
        y0, y1 = max(y0, 0.0), min(y0 + h, float(height))
        w, h = x1 - x0, y1 - y0
    x0, y0 = _fit(x0, w, width), _fit(y0, h, height)
    lost = 1.0 - (w * h) / wanted if wanted > 0 else 1.0
    # Whole pixels: round the side once so a square stays square.
    iw, ih = max(1, round(w)), max(1, round(h))
    ix0 = min(max(math.floor(x0 + 0.5), 0), width - iw)
    iy0 = min(max(math.floor(y0 + 0.5), 0), height - ih)
    return (ix0, iy0, ix0 + iw, iy0 + ih), max(0.0, lost)


def _inside_fraction(box: tuple[float, float, float, float], crop: tuple[int, int, int, int]) -> float:
    area = (box[2] - box[0]) * (box[3] - box[1])
    if area <= 0:
        return 0.0
    ix = max(0.0, min(box[2], crop[2]) - max(box[0], crop[0]))
    iy = max(0.0, min(box[3], crop[3]) - max(box[1], crop[1]))
    return ix * iy / area


@dataclass
class Decision:
    person: int
    kept: bool
    dropped_by: str | None
    extent: tuple[float, float, float, float] | None = None
    box: tuple[int, int, int, int] | None = None
    keypoints: int = 0
    clip: float | None = None
    other_overlap: float | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        if out["extent"] is not None:
            out["extent"] = [round(v, 2) for v in out["extent"]]
        for k in ("clip", "other_overlap"):
            if out[k] is not None:
                out[k] = round(out[k], 4)
        return out


def select_persons(image: MPIIImage, width: int, height: int, cfg: MPIITestConfig) -> list[Decision]:
    """One decision per annotated person of ``image`` (of size ``width`` x ``height``)."""
    extents = [person_extent(p, cfg.use_head_rect) for p in image.persons]
    decisions = []
    for p, extent in zip(image.persons, extents):
        d = Decision(person=p.index, kept=False, dropped_by=None, extent=extent, keypoints=len(p.keypoints))
        decisions.append(d)
        if cfg.split != "all" and image.train != (cfg.split == "train"):
            d.dropped_by = "split"
            continue
        if len(p.keypoints) < cfg.min_keypoints or extent is None:
            d.dropped_by = "min_keypoints"
            continue
        if cfg.single_person_only and p.index not in image.single_person:
            d.dropped_by = "single_person"
            continue
        box, lost = crop_box(extent, width, height, cfg)
        d.box, d.clip = box, lost
        if min(box[2] - box[0], box[3] - box[1]) < cfg.min_side:
            d.dropped_by = "min_side"
            continue
        if lost > cfg.max_clip:
            d.dropped_by = "max_clip"
            continue
        others = [e for q, e in zip(image.persons, extents) if q.index != p.index and e is not None]
        d.other_overlap = max((_inside_fraction(e, box) for e in others), default=0.0)
        if d.other_overlap > cfg.max_other_overlap:
            d.dropped_by = "max_other_overlap"
            continue
        d.kept = True
    return decisions
