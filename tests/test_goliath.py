import numpy as np
import pytest

from haodiff_data.segment.goliath import CLASSES, CLOTHING, GROUP_CLASSES, GROUPS, group_masks, person_box


def test_classes_order_and_groups_partition_the_body():
    assert len(CLASSES) == 28
    assert CLASSES[0] == "Background" and CLASSES[2] == "Face_Neck" and CLASSES[21] == "Torso"
    assert CLASSES[10] == "Left_Upper_Arm" and CLASSES[19] == "Right_Upper_Arm" and CLASSES[27] == "Tongue"
    assert GROUPS == ("head", "left_upper_limb", "right_upper_limb", "left_lower_limb", "right_lower_limb", "whole_body")
    parts = [set(GROUP_CLASSES[g]) for g in GROUPS[:-1]]
    assert sum(len(p) for p in parts) == len(set().union(*parts))  # no id in two part groups
    # whole_body adds exactly the side-less classes: apparel, clothing and torso.
    assert set(range(1, 28)) - set().union(*parts) == {1, 12, 21, 22}
    for name in GROUPS[:-1]:
        for cid in GROUP_CLASSES[name]:
            side = name.split("_")[0]
            if side in ("left", "right"):
                assert CLASSES[cid].lower().startswith(side)


@pytest.mark.parametrize("name", GROUPS[:-1])
def test_each_group_holds_exactly_its_classes(name):
    labels = np.arange(28, dtype=np.uint8).reshape(4, 7)
    labels[np.isin(labels, CLOTHING)] = 0  # clothing may join a limb; tested separately
    masks = group_masks(labels, 0.0)
    assert sorted(labels[masks[name]].tolist()) == sorted(GROUP_CLASSES[name])


def test_whole_body_covers_every_id_and_groups_come_in_order():
    labels = np.arange(28, dtype=np.uint8).reshape(4, 7)
    masks = group_masks(labels, 0.0)
    assert list(masks) == list(GROUPS)
    assert sorted(labels[masks["whole_body"]].tolist()) == list(range(1, 28))
    assert all(m.dtype == bool and m.shape == labels.shape for m in masks.values())


def test_empty_and_tiny_groups_are_dropped():
    labels = np.zeros((100, 100), np.uint8)
    assert group_masks(labels, 0.005) == {}
    labels[10:30, 10:30] = 2  # head, 4 % of the image
    labels[50:54, 50:54] = 5  # left hand, 0.16 %
    assert list(group_masks(labels, 0.005)) == ["head", "whole_body"]
    assert list(group_masks(labels, 0.001)) == ["head", "left_upper_limb", "whole_body"]
    assert list(group_masks(labels, 0.05)) == []
    clothes_only = np.zeros((50, 50), np.uint8)
    clothes_only[10:40, 10:40] = 22
    clothes_only[10:20, 10:20] = 21
    assert list(group_masks(clothes_only, 0.0)) == ["whole_body"]


def test_sleeve_next_to_the_left_arm_joins_it_but_far_clothing_does_not():
    labels = np.zeros((200, 200), np.uint8)
    labels[90:110, 100:140] = 6  # left forearm skin, 20 px thick
    labels[88:112, 140:170] = 22  # sleeve continuing the arm, touching the skin
    labels[20:60, 20:60] = 22  # shirt far from any limb
    labels[150:190, 150:190] = 12  # trousers, no leg skin anywhere
    masks = group_masks(labels, 0.0)
    arm = masks["left_upper_limb"]
    # The arm is 20 px thick, so the sleeve joins up to ~20 px beyond the skin.
    assert arm[88:112, 140:159].all()
    assert not arm[:, 162:].any()
    assert not arm[20:60, 20:60].any() and not arm[150:190, 150:190].any()
    assert "right_upper_limb" not in masks and "left_lower_limb" not in masks
    assert masks["whole_body"][20:60, 20:60].all()


def test_clothing_between_two_legs_joins_only_the_nearest():
    labels = np.zeros((100, 200), np.uint8)
    labels[:, 40:60] = 7  # left lower leg skin
    labels[:, 140:160] = 16  # right lower leg skin
    labels[:, 60:140] = 12  # trousers between them
    masks = group_masks(labels, 0.0)
    left, right = masks["left_lower_limb"], masks["right_lower_limb"]
    assert not (left & right).any()
    assert left[:, 60:75].all() and right[:, 125:140].all()
    assert not left[:, 85:].any() and not right[:, :115].any()


def test_group_masks_rejects_bad_input():
    with pytest.raises(ValueError, match="id 28"):
        group_masks(np.full((4, 4), 28, np.uint8), 0.0)
    with pytest.raises(ValueError, match="uint8"):
        group_masks(np.zeros((4, 4), np.int32), 0.0)
    with pytest.raises(ValueError, match="min_fraction"):
        group_masks(np.zeros((4, 4), np.uint8), 1.5)


def test_person_box():
    labels = np.zeros((50, 80), np.uint8)
    assert person_box(labels) is None
    labels[10:20, 30:45] = 21
    labels[25, 5] = 4
    assert person_box(labels) == (5, 10, 45, 26)
    labels[:] = 1
    assert person_box(labels) == (0, 0, 80, 50)
