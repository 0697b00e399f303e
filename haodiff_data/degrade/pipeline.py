"""One sample's degradation: first order (none | HMB | generic) -> second order -> final stage.

``draw_degradation`` turns a generator into a plain JSON-able dict of every drawn value;
``apply_degradation`` is a pure function of (HQ, part mask, params). Replay and re-degradation
only need the dict.
"""

from __future__ import annotations

import numpy as np

from haodiff_data.degrade.generic import apply_final, apply_order, draw_final, draw_order
from haodiff_data.degrade.hmb import apply_hmb, draw_hmb
from haodiff_data.recipe import Recipe

FIRST_ORDER_KINDS = ("none", "hmb", "generic")


def first_order_probs(recipe: Recipe, hmb_possible: bool) -> dict[str, float]:
    """The first-order probabilities one sample draws from, normalised to sum to 1.

    With ``first_order.p_hmb_over: person`` the recipe's p_hmb is the HMB chance of a sample that
    shows a person; with ``all`` it is the share of all samples, reached by raising the chance
    of samples with a person to p_hmb / ``person_share`` (the expected share of samples with a
    person; the run summary measures it). A sample without a person cannot have HMB: its chance
    goes to none and generic in their ratio.
    """
    fo = recipe.first_order
    probs = {"none": fo.p_none, "hmb": fo.p_hmb, "generic": fo.p_generic}
    total = sum(probs.values())
    probs = {k: v / total for k, v in probs.items()} if total > 0 else probs
    if not hmb_possible:
        probs["hmb"] = 0.0
    elif fo.p_hmb_over == "all" and probs["hmb"] < 1:
        hmb = min(1.0, probs["hmb"] / fo.person_share)
        rest = (1.0 - hmb) / (1.0 - probs["hmb"])
        probs = {"none": probs["none"] * rest, "hmb": hmb, "generic": probs["generic"] * rest}
    total = sum(probs.values())
    return {k: v / total for k, v in probs.items()} if total > 0 else probs


def draw_degradation(
    rng: np.random.Generator,
    recipe: Recipe,
    hq_shape: tuple[int, int],
    available_groups: list[str],
    group_people: dict[str, list[int]] | None = None,
) -> dict:
    """Draw every parameter of one sample; ``available_groups`` are the non-empty HMB groups and
    ``group_people`` which people (instance ids) have each of them: the HMB sample blurs one
    part of one person."""
    # One child stream per component: the second order and final stage draw the same values
    # whatever the first order was, which keeps recipes comparable sample by sample.
    rng_kind, rng_hmb, rng_first, rng_second, rng_final, rng_person = rng.spawn(6)
    usable = [g for g, w in zip(recipe.hmb.groups, recipe.hmb.group_weights) if w > 0 and g in available_groups]
    note = None
    probs = first_order_probs(recipe, bool(usable))
    if not usable and recipe.first_order.p_hmb > 0:
        note = "no person part found: HMB impossible, first order drawn among none/generic (renormalised)"
    weights = np.array([probs[k] for k in FIRST_ORDER_KINDS])
    if weights.sum() == 0:
        kind = "none"
        note = (note or "") + "; recipe allows only HMB, so the first order is none"
    else:
        kind = FIRST_ORDER_KINDS[int(rng_kind.choice(3, p=weights / weights.sum()))]
    scale = recipe.generic.scale
    hmb = None
    if kind == "hmb":
        hmb = draw_hmb(rng_hmb, recipe.hmb, usable, recipe.psf_scale())
        hmb["min_group_fraction"] = recipe.hmb.min_group_fraction
        if group_people is not None:
            people = group_people[hmb["group"]]
            hmb["person"] = int(people[int(rng_person.integers(len(people)))])
    return {
        "first_order": kind,
        "first_order_note": note,
        "hmb": hmb,
        "mask_threshold": recipe.hmb.mask_threshold,
        "generic_first": draw_order(rng_first, recipe.generic.first, hq_shape, scale, second=False)
        if kind == "generic"
        else None,
        "generic_second": draw_order(rng_second, recipe.generic.second, hq_shape, scale, second=True),
        "final": draw_final(rng_final, recipe.generic.final, hq_shape, scale),
    }


def apply_degradation(
    hq: np.ndarray, part_mask: np.ndarray | None, params: dict
) -> tuple[np.ndarray, np.ndarray]:
    """(LQ uint8 HxWx3, M_HMB uint8 HxW in {0, 255}) from HQ uint8 and the drawn params."""
    img = hq.astype(np.float32) * np.float32(1 / 255)
    mask = np.zeros(hq.shape[:2], np.uint8)
    if params["first_order"] == "hmb":
        if part_mask is None:
            raise ValueError("HMB sample needs the moving part's mask")
        img, weight = apply_hmb(img, part_mask, params["hmb"])
        mask[weight >= params["mask_threshold"]] = 255
    elif params["first_order"] == "generic":
        img = apply_order(img, params["generic_first"])
    img = apply_order(img, params["generic_second"])
    return apply_final(img, params["final"]), mask
