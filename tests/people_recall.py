"""Recall of a segmenter on hand-counted people (tests/data/people.yaml), and where it leaks.

``python tests/people_recall.py [--segmenter mediapipe]`` prints one line per image and the totals.
A person is found when a person instance covers their point; two people covered by one instance
count once (the instances must separate them). A background point labelled as a person is a leak.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("HAODIFF_SAMPLES", "/work/shared/samples"))
CROP = 512
CROP_MARGIN = 32


@dataclass
class Case:
    name: str
    image: np.ndarray
    people: list[list[tuple[int, int]]]  # each person: one or more points on them
    background: list[tuple[int, int]]


def _path(key: str) -> Path:
    root, _, rest = key.partition("/")
    return REPO / "haodiff_data" / "assets" / rest if root == "assets" else SAMPLES / root / rest


def load_cases() -> list[Case]:
    spec = yaml.safe_load((REPO / "tests" / "data" / "people.yaml").read_text())
    cases = []
    for key, entry in spec["photos"].items():
        path = _path(key)
        if not path.is_file():
            continue
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        people = [[tuple(p) for p in person] for person in entry["people"]]
        background = [tuple(p) for p in entry["background"]]
        cases.append(Case(key, image, people, background))
        for x0, y0 in spec["crops"].get(key, []):
            def inside(p, margin):
                return x0 + margin <= p[0] < x0 + CROP - margin and y0 + margin <= p[1] < y0 + CROP - margin

            crop = np.ascontiguousarray(image[y0 : y0 + CROP, x0 : x0 + CROP])
            visible = [[(x - x0, y - y0) for x, y in person if inside((x, y), CROP_MARGIN)] for person in people]
            cases.append(Case(f"{key}@{x0},{y0}", crop, [points for points in visible if points],
                              [(x - x0, y - y0) for x, y in background if inside((x, y), 0)]))
    return cases


def score(case: Case, persons: np.ndarray) -> dict:
    """Found people (distinct instances at their points) and leaks at background points."""
    ids = [next((int(persons[y, x]) for x, y in points if persons[y, x] > 0), 0) for points in case.people]
    found = len({i for i in ids if i > 0})
    leaks = sum(int(persons[y, x] > 0) for x, y in case.background)
    return {"people": len(case.people), "found": found, "instances": int(persons.max(initial=0)), "leaks": leaks,
            "background": len(case.background)}


def evaluate(segmenter) -> list[tuple[Case, dict]]:
    out = []
    for case in load_cases():
        seg = segmenter.segment([case.image])[0]
        # Segmenters from before person instances returned a bare label map: one instance.
        persons = seg.persons if hasattr(seg, "persons") else (seg > 0).astype(np.uint8)
        out.append((case, score(case, persons)))
    return out


def main() -> None:
    from haodiff_data.segment import make_segmenter

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--segmenter", default="mediapipe")
    args = parser.parse_args()
    results = evaluate(make_segmenter(args.segmenter))
    totals = {"people": 0, "found": 0, "leaks": 0, "background": 0}
    for case, r in results:
        print(f"{case.name:<28} people {r['people']}  found {r['found']}  instances {r['instances']}  "
              f"leaks {r['leaks']}/{r['background']}")
        for k in totals:
            totals[k] += r[k]
    print(f"recall {totals['found']}/{totals['people']} = {totals['found'] / max(totals['people'], 1):.3f}; "
          f"leaks {totals['leaks']}/{totals['background']} background points; {len(results)} images")


if __name__ == "__main__":
    main()
