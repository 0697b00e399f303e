"""Every person, labels only on people, HMB on one person: the default segmenter on hand-counted
real photos (tests/data/people.yaml) and the per-person HMB path."""

import dataclasses

import numpy as np
import pytest
from people_recall import evaluate

from haodiff_data.degrade.pipeline import draw_degradation, first_order_probs
from haodiff_data.recipe import Recipe, RecipeError, load_recipe, validate
from haodiff_data.rng import DEGRADE_STREAM, sample_rng
from haodiff_data.run import Timer
from haodiff_data.segment import Segmentation, instances_from_parts, make_segmenter, renumber
from haodiff_data.segment.goliath import people_by_group, person_groups
from haodiff_data.shards.schema import decode_sample
from haodiff_data.synth import make_sample


@pytest.fixture(scope="module")
def recall():
    return {case.name: (case, r) for case, r in evaluate(make_segmenter("mediapipe"))}


def _total(recall, prefix):
    rows = [r for name, (_, r) in recall.items() if name.startswith(prefix)]
    return sum(r["found"] for r in rows), sum(r["people"] for r in rows), sum(r["leaks"] for r in rows)


def test_recall_on_the_bundled_photos_and_their_crops(recall):
    found, people, leaks = _total(recall, "assets/")
    # Hand-counted: 19 people over 3 photos and 11 crops. The one-person Solutions segmenter this
    # replaced found 8 of them and leaked at none of the 20 background points; the multi-person
    # search finds 13, leaking at 2 (mask bleed onto a blurred stadium crowd).
    assert people == 19
    assert found >= 13, f"found {found}/{people}"
    assert leaks <= 2


def test_recall_on_real_degraded_photos(recall):
    if not any(name.startswith("real_lq/") for name in recall):
        pytest.skip("the shared real_lq photos are not on this machine (set HAODIFF_SAMPLES)")
    found, people, _ = _total(recall, "real_lq/")
    assert people == 13
    assert found >= 8, f"found {found}/{people}"  # the Solutions segmenter found 2


def test_both_men_are_separate_people(recall):
    case, result = recall["assets/zidane.jpg"]
    assert result["found"] == 2  # two distinct instances, one on each man


def test_no_labels_on_the_held_helmet_or_the_background(recall):
    case, result = recall["assets/astronaut.png"]
    assert result["found"] == 1 and result["leaks"] == 0 and result["background"] == 3


def _two_people() -> Segmentation:
    """Two people side by side, 100 px apart, each with a head, torso and left arm."""
    parts = np.zeros((256, 512), np.uint8)
    for x0 in (40, 300):
        parts[20:60, x0 + 40 : x0 + 90] = 2  # head
        parts[60:200, x0 + 20 : x0 + 110] = 21  # torso
        parts[70:190, x0 + 130 : x0 + 160] = 10  # left upper arm (separated by a gap)
    persons = np.zeros_like(parts)
    persons[:, :256][parts[:, :256] > 0] = 1
    persons[:, 256:][parts[:, 256:] > 0] = 2
    return Segmentation(parts, persons)


def test_groups_are_per_person():
    seg = _two_people()
    people = person_groups(seg.parts, seg.persons, 0.001)
    assert set(people) == {1, 2}
    for k, groups in people.items():
        assert set(groups) == {"head", "left_upper_limb", "whole_body"}
        for mask in groups.values():
            assert not (mask & (seg.persons != k)).any()
    assert people_by_group(people) == {"head": [1, 2], "left_upper_limb": [1, 2], "whole_body": [1, 2]}


def test_hmb_blurs_one_part_of_one_person_and_replays():
    seg = _two_people()
    recipe = dataclasses.replace(Recipe(), first_order=dataclasses.replace(Recipe().first_order, p_none=0, p_generic=0))
    hq = np.full((256, 512, 3), 128, np.uint8)
    hq[..., 0] = np.arange(512, dtype=np.uint8)[None, :] // 2  # texture, so a blur changes pixels
    hq[::7] = 30
    chosen = set()
    for index in range(12):
        sample = decode_sample(make_sample(hq, seg, index, 0, recipe, {}, {"name": "t", "model_id": "t"}, Timer({})))
        hmb = sample.meta["hmb"]
        chosen.add(hmb["person"])
        other = 3 - hmb["person"]
        assert np.array_equal(sample.persons, seg.persons)
        assert sample.meta["segmenter"]["persons"] == 2
        # M_HMB never reaches the other person.
        assert not (sample.mask[seg.persons == other] > 0).any(), (index, hmb["group"])
        # The drawn person is recorded and the draw replays from (seed, index).
        people = person_groups(sample.parts, sample.persons, recipe.hmb.min_group_fraction)
        again = draw_degradation(sample_rng(0, index, DEGRADE_STREAM), recipe, hq.shape[:2],
                                 list(people_by_group(people)), people_by_group(people))
        assert again["hmb"] == hmb
    assert chosen == {1, 2}


def test_instances_from_parts_separates_apart_and_bridges_small_gaps():
    parts = np.zeros((100, 200), np.uint8)
    parts[10:90, 10:60] = 21
    parts[10:90, 64:70] = 5  # a hand 4 px from its body: same person
    parts[10:90, 120:180] = 21  # someone 50 px away
    persons = instances_from_parts(parts)
    assert set(np.unique(persons)) == {0, 1, 2}
    assert (persons[parts == 5] == persons[50, 30]).all() and persons[50, 150] != persons[50, 30]
    assert not persons[parts == 0].any()
    assert np.array_equal(renumber(np.array([[0, 3, 7]], np.uint8)), np.array([[0, 1, 2]], np.uint8))


def test_hmb_probability_over_people_or_over_all_samples():
    recipe = load_recipe("haodiff")
    over_people = first_order_probs(recipe, True)
    assert over_people == pytest.approx({"none": 1 / 3, "hmb": 1 / 3, "generic": 1 / 3})
    assert first_order_probs(recipe, False) == pytest.approx({"none": 0.5, "hmb": 0.0, "generic": 0.5})
    fo = dataclasses.replace(recipe.first_order, p_hmb_over="all", person_share=0.5)
    over_all = dataclasses.replace(recipe, first_order=fo)
    # Half the samples show a person, so those get HMB twice as often: 1/3 of all samples.
    assert first_order_probs(over_all, True) == pytest.approx({"none": 1 / 6, "hmb": 2 / 3, "generic": 1 / 6})
    assert first_order_probs(over_all, False) == pytest.approx({"none": 0.5, "hmb": 0.0, "generic": 0.5})
    capped = dataclasses.replace(recipe, first_order=dataclasses.replace(fo, person_share=0.2))
    assert first_order_probs(capped, True)["hmb"] == pytest.approx(1.0)
    with pytest.raises(RecipeError, match="p_hmb_over"):
        validate(dataclasses.replace(recipe, first_order=dataclasses.replace(fo, p_hmb_over="some")))
    with pytest.raises(RecipeError, match="person_share"):
        validate(dataclasses.replace(recipe, first_order=dataclasses.replace(fo, person_share=0.0)))
