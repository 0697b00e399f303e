import dataclasses
import json

import numpy as np

from haodiff_data.degrade.pipeline import apply_degradation, draw_degradation
from haodiff_data.recipe import FirstOrderConfig, Recipe


def _recipe(**first_order) -> Recipe:
    return dataclasses.replace(Recipe(), first_order=FirstOrderConfig(**first_order))


def _hq(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.kron(rng.integers(0, 256, (32, 32, 3)), np.ones((16, 16, 1)))
    return base.astype(np.uint8)


def test_no_person_means_no_hmb_and_a_note():
    recipe = _recipe(p_none=1, p_hmb=1, p_generic=1)
    kinds = set()
    for i in range(60):
        params = draw_degradation(np.random.default_rng(i), recipe, (512, 512), [])
        kinds.add(params["first_order"])
        assert params["hmb"] is None
        assert "no person" in params["first_order_note"]
    assert kinds == {"none", "generic"}  # renormalised over the two that remain


def test_hmb_only_recipe_without_person_falls_back_to_none():
    params = draw_degradation(np.random.default_rng(0), _recipe(p_none=0, p_hmb=1, p_generic=0), (512, 512), [])
    assert params["first_order"] == "none" and "only HMB" in params["first_order_note"]


def test_hmb_draws_only_available_groups():
    recipe = _recipe(p_none=0, p_hmb=1, p_generic=0)
    groups = {draw_degradation(np.random.default_rng(i), recipe, (512, 512), ["head", "whole_body"])["hmb"]["group"] for i in range(40)}
    assert groups == {"head", "whole_body"}


def test_psf_size_is_in_lq_pixels_by_default():
    recipe = _recipe(p_none=0, p_hmb=1, p_generic=0)
    lq_units = draw_degradation(np.random.default_rng(3), recipe, (512, 512), ["head"])["hmb"]
    hq_recipe = dataclasses.replace(recipe, hmb=dataclasses.replace(recipe.hmb, psf_units="hq"))
    hq_units = draw_degradation(np.random.default_rng(3), hq_recipe, (512, 512), ["head"])["hmb"]
    assert recipe.generic.scale == 4 and lq_units["psf_scale"] == 4.0 and hq_units["psf_scale"] == 1.0
    assert lq_units["psf_seed"] == hq_units["psf_seed"]
    assert abs(lq_units["psf_extent_px"] - 4 * hq_units["psf_extent_px"]) < 0.01


def test_later_stages_do_not_depend_on_the_first_order_draw():
    a = draw_degradation(np.random.default_rng(5), _recipe(p_none=1, p_hmb=0, p_generic=0), (512, 512), ["head"])
    b = draw_degradation(np.random.default_rng(5), _recipe(p_none=0, p_hmb=0, p_generic=1), (512, 512), ["head"])
    assert a["first_order"] == "none" and b["first_order"] == "generic"
    assert a["generic_second"] == b["generic_second"] and a["final"] == b["final"]


def test_apply_is_deterministic_json_replayable_and_masks_only_hmb():
    hq = _hq()
    part = np.zeros((512, 512), bool)
    part[150:350, 200:300] = True
    for kind in ("none", "hmb", "generic"):
        recipe = _recipe(**{f"p_{k}": float(k == kind) for k in ("none", "hmb", "generic")})
        params = draw_degradation(np.random.default_rng(1), recipe, (512, 512), ["left_upper_limb"])
        lq, mask = apply_degradation(hq, part if kind == "hmb" else None, params)
        assert lq.shape == hq.shape and lq.dtype == np.uint8 and mask.dtype == np.uint8
        replayed, mask2 = apply_degradation(hq, part if kind == "hmb" else None, json.loads(json.dumps(params)))
        np.testing.assert_array_equal(replayed, lq)
        np.testing.assert_array_equal(mask2, mask)
        if kind == "hmb":
            assert set(np.unique(mask)) == {0, 255}
            assert mask[part].mean() > 250  # the moving part itself is inside M_HMB
            assert not mask[:, :100].any()  # far from the part nothing is marked
        else:
            assert not mask.any()
