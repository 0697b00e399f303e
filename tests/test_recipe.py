import pytest

from haodiff_data.recipe import Recipe, RecipeError, load_recipe


def test_default_yaml_equals_dataclass_defaults():
    # The YAML is the documented face of the defaults; they must not drift apart.
    assert load_recipe("haodiff").to_dict() == Recipe().to_dict()


@pytest.mark.parametrize("name", ["haodiff", "realesrgan", "s3diff-mild"])
def test_bundled_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.name == name


def test_hash_follows_what_shapes_a_sample():
    base = load_recipe("haodiff")
    assert load_recipe("haodiff", ["name=renamed", "shards.samples_per_shard=7"]).sha256() == base.sha256()
    assert load_recipe("haodiff", ["hmb.psf_iters=1999"]).sha256() != base.sha256()
    assert load_recipe("realesrgan").sha256() != base.sha256()


def test_overrides_reach_any_depth_and_are_type_checked():
    recipe = load_recipe("haodiff", ["generic.first.noise.sigma_range=[2, 20]", "crop.mode=center"])
    assert recipe.generic.first.noise.sigma_range == (2.0, 20.0) and recipe.crop.mode == "center"
    assert recipe.generic.second == Recipe().generic.second  # untouched siblings keep their values
    with pytest.raises(RecipeError, match=r"generic\.first\.noise\.sigma_rnage"):
        load_recipe("haodiff", ["generic.first.noise.sigma_rnage=[2, 20]"])
    with pytest.raises(RecipeError, match=r"first_order\.require_person: expected true or false, got 'yes please'"):
        load_recipe("haodiff", ["first_order.require_person=yes please"])
    with pytest.raises(RecipeError, match="crop.mode"):
        load_recipe("haodiff", ["crop.mode=diagonal"])


def test_realesrgan_has_no_hmb_and_s3diff_is_milder():
    r, s = load_recipe("realesrgan"), load_recipe("s3diff-mild")
    assert r.first_order.p_hmb == 0 and r.first_order.p_generic == 1
    assert s.generic.first.noise.sigma_range[1] < r.generic.first.noise.sigma_range[1]
    assert s.generic.final.jpeg_range[0] > r.generic.final.jpeg_range[0]


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("generic:\n  first:\n    noise:\n      sigma_rnage: [1, 2]\n")
    with pytest.raises(RecipeError, match=r"generic\.first\.noise\.sigma_rnage"):
        load_recipe(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hmb:\n  psf_iters: many\n")
    with pytest.raises(RecipeError, match=r"hmb\.psf_iters: expected an integer"):
        load_recipe(path)


def test_wrong_length_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("generic:\n  first:\n    resize:\n      probs: [0.5, 0.5]\n")
    with pytest.raises(RecipeError, match=r"generic\.first\.resize\.probs: expected 3 values"):
        load_recipe(path)


def test_cross_field_checks(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("crop:\n  mode: diagonal\n")
    with pytest.raises(RecipeError, match="crop.mode"):
        load_recipe(path)
    path.write_text("hmb:\n  groups: [head, tail]\n  group_weights: [1, 1]\n")
    with pytest.raises(RecipeError, match="unknown group.*tail"):
        load_recipe(path)
    path.write_text("generic:\n  final:\n    resize_back: false\n")
    with pytest.raises(RecipeError, match="resize_back"):
        load_recipe(path)


def test_missing_recipe_names_path():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no-such-recipe")
