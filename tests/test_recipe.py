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


@pytest.mark.parametrize("yaml_text,key,expected", [
    ("first_order:\n  p_hmb: 1.5\n", "first_order.p_hmb", "a probability in [0, 1]"),
    ("generic:\n  first:\n    blur_prob: -0.1\n", "generic.first.blur_prob", "a probability in [0, 1]"),
    ("generic:\n  final:\n    sinc_prob: 2\n", "generic.final.sinc_prob", "a probability in [0, 1]"),
    ("hmb:\n  group_weights: [1, -1, 1, 1, 1, 1]\n", "hmb.group_weights", "weights >= 0"),
    ("generic:\n  second:\n    blur:\n      kernel_probs: [0.5, -0.5, 0, 0, 0, 1]\n",
     "generic.second.blur.kernel_probs", "weights >= 0"),
    ("generic:\n  first:\n    noise:\n      sigma_range: [30, 1]\n", "generic.first.noise.sigma_range", "low <= high"),
    ("hmb:\n  dilate_range: [31, 9]\n", "hmb.dilate_range", "low <= high"),
    ("generic:\n  final:\n    jpeg_range: [95, 30]\n", "generic.final.jpeg_range", "low <= high <= 100"),
    ("generic:\n  first:\n    jpeg_range: [0, 95]\n", "generic.first.jpeg_range", "1 <= low"),
    ("generic:\n  first:\n    blur:\n      kernel_sizes: [7, 8]\n", "generic.first.blur.kernel_sizes", "odd kernel sizes"),
    ("generic:\n  final:\n    kernel_sizes: [4]\n", "generic.final.kernel_sizes", "odd kernel sizes"),
    ("crop:\n  size: 510\n", "crop.size", "a multiple of 8 and of generic.scale"),
    ("crop:\n  size: 0\n", "crop.size", "at least 64"),
    ("generic:\n  scale: 3\n", "crop.size", "of generic.scale (3)"),
    ("generic:\n  first:\n    resize:\n      modes: [area, nearest]\n", "generic.first.resize.modes", "resize modes"),
    ("shards:\n  samples_per_shard: 0\n", "shards.samples_per_shard", "an integer >= 1"),
    ("shards:\n  png_compression: 9\n", "shards.png_compression", "an ISA-L deflate level in [0, 3]"),
    ("hmb:\n  psf_units: px\n", "hmb.psf_units", "lq or hq"),
])
def test_values_the_pipeline_cannot_use_are_named(tmp_path, yaml_text, key, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert f"{key}: expected" in str(exc.value) and expected in str(exc.value)


def test_a_bad_recipe_stops_synth_before_any_work(tmp_path, capsys):
    from haodiff_data.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("first_order:\n  p_none: -1\n")
    out = tmp_path / "out"
    assert main(["synth", "--recipe", str(path), "--out", str(out), "--no-progress"]) == 2
    assert "first_order.p_none: expected a probability in [0, 1], got -1.0" in capsys.readouterr().err
    assert not out.exists()


def test_a_key_given_twice_is_refused_with_file_key_and_line(tmp_path):
    # plain YAML keeps the last value silently: a pasted-twice line would hide the first
    path = tmp_path / "twice.yaml"
    path.write_text("hmb:\n  psf_iters: 500\n  psf_iters: 100\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert str(exc.value) == f"{path}, line 3: key 'psf_iters' given twice in one mapping"
    path.write_text("hmb:\n  psf_iters: 500\nhmb:\n  dilate_range: [9, 31]\n")
    with pytest.raises(RecipeError, match="line 3: key 'hmb' given twice"):
        load_recipe(path)
