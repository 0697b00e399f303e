"""``haodiff-data replay``: regenerate one sample from its JSON and check it byte for byte."""

from __future__ import annotations

import json
import tarfile
from typing import Any

import numpy as np

from haodiff_data.degrade.pipeline import apply_degradation, draw_degradation
from haodiff_data.intake.crop import apply_crop, resize_to
from haodiff_data.intake.decode import RejectedInput, decode_image
from haodiff_data.intake.sources import read_recorded_source, sha256
from haodiff_data.recipe import RecipeError, load_recipe
from haodiff_data.rng import DEGRADE_STREAM, sample_rng
from haodiff_data.segment.goliath import group_masks, people_by_group, person_groups
from haodiff_data.shards.reader import find_sample


def _differing(a: np.ndarray, b: np.ndarray) -> int:
    return int((a != b).reshape(a.shape[0], a.shape[1], -1).any(axis=2).sum())


def replay(shards: list[str], key: str) -> dict[str, Any]:
    """Re-run the sample's degradation from its recorded parameters and compare.

    Also re-crops the HQ from the source when the file is still there with the same sha256, and
    re-draws the parameters from (seed, index) when the recipe file still has the recorded hash.
    """
    path, sample = find_sample(shards, key)
    meta = sample.meta
    report: dict[str, Any] = {"shard": str(path), "key": key, "checks": {}}
    checks = report["checks"]

    src = meta["source"]
    data = None
    # The resolved absolute path works from any folder; the path as given is the fallback for
    # shards written before it was recorded.
    for where in dict.fromkeys(p for p in (src.get("resolved"), src["path"]) if p):
        try:
            data = read_recorded_source(where, src.get("member"))
            break
        except (OSError, KeyError, tarfile.TarError):
            continue
    if data is None or sha256(data) != src["sha256"]:
        checks["hq_from_source"] = "skipped: source file missing or changed"
    else:
        try:
            rgb = decode_image(data, min_side=1, max_pixels=2**62)
            ws = src.get("working_size")
            work = resize_to(rgb, None if ws is None else (ws[1], ws[0]))
            hq = apply_crop(work, src["crop"]["box"])
            checks["hq_from_source"] = "identical" if np.array_equal(hq, sample.hq) else f"DIFFERENT ({_differing(hq, sample.hq)} px)"
        except RejectedInput as exc:
            checks["hq_from_source"] = f"DIFFERENT: source no longer decodes ({exc.reason})"

    params = {k: meta[k] for k in ("first_order", "first_order_note", "hmb", "mask_threshold", "generic_first", "generic_second", "final")}
    part_mask = None
    hmb = params["hmb"]
    if hmb and "person" in hmb:
        part_mask = person_groups(sample.parts, sample.person_map(), hmb["min_group_fraction"])[hmb["person"]][hmb["group"]]
    elif hmb:  # shards from before person instances: the group over every labelled pixel
        part_mask = group_masks(sample.parts, hmb["min_group_fraction"])[hmb["group"]]
    lq, mask = apply_degradation(sample.hq, part_mask, params)
    checks["lq"] = "identical" if np.array_equal(lq, sample.lq) else f"DIFFERENT ({_differing(lq, sample.lq)} px)"
    checks["mask"] = "identical" if np.array_equal(mask, sample.mask) else f"DIFFERENT ({_differing(mask, sample.mask)} px)"

    try:
        recipe = load_recipe(meta["recipe"]["name"])
    except RecipeError:
        recipe = None
    if recipe is None or recipe.sha256() != meta["recipe"]["sha256"]:
        checks["params_from_seed"] = f"skipped: recipe {meta['recipe']['name']!r} not found with the recorded hash"
    else:
        rng = sample_rng(meta["seed"], meta["sample_index"], DEGRADE_STREAM)
        if sample.persons is None:
            groups = group_masks(sample.parts, recipe.hmb.min_group_fraction)
            redrawn = draw_degradation(rng, recipe, sample.hq.shape[:2], list(groups))
        else:
            people = person_groups(sample.parts, sample.persons, recipe.hmb.min_group_fraction)
            group_people = people_by_group(people)
            redrawn = draw_degradation(rng, recipe, sample.hq.shape[:2], list(group_people), group_people)
        checks["params_from_seed"] = "identical" if _json_equal(redrawn, params) else "DIFFERENT"
    report["identical"] = all(v == "identical" or v.startswith("skipped") for v in checks.values())
    return report


def _json_equal(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
