import numpy as np
import pytest
from PIL import Image

from haodiff_data.segment import make_segmenter


def _save(path, array):
    Image.fromarray(array).save(path)


@pytest.fixture()
def folders(tmp_path):
    sources, labels = tmp_path / "src", tmp_path / "labels"
    sources.mkdir()
    labels.mkdir()
    return sources, labels


def test_loads_the_map_named_after_the_source_stem(folders):
    sources, labels_dir = folders
    source = sources / "person_01.jpg"
    _save(source, np.zeros((30, 40, 3), np.uint8))
    ids = np.arange(30 * 40, dtype=np.int64).reshape(30, 40) % 28
    _save(labels_dir / "person_01.png", ids.astype(np.uint8))
    seg = make_segmenter("labels", labels_dir=str(labels_dir))
    assert seg.name == "labels" and seg.per_source and seg.model_id == "labels:labels"
    out = seg.load(str(source))
    assert out.dtype == np.uint8 and np.array_equal(out, ids)
    # A source that is not a file (an archive member) is matched by stem, size given by the caller.
    assert np.array_equal(seg.load("shards.tar/person_01.jpg", size_hw=(30, 40)), ids)


def test_size_follows_exif_orientation(folders):
    sources, labels_dir = folders
    source = sources / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: a 40x30 file decodes to 30x40
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(source, exif=exif)
    _save(labels_dir / "rotated.png", np.zeros((40, 30), np.uint8))
    seg = make_segmenter("labels", labels_dir=str(labels_dir))
    assert seg.load(str(source)).shape == (40, 30)


def test_clear_errors(folders):
    sources, labels_dir = folders
    seg = make_segmenter("labels", labels_dir=str(labels_dir))
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        seg.load(str(sources / "missing.jpg"))
    _save(sources / "a.png", np.zeros((30, 40, 3), np.uint8))
    _save(labels_dir / "a.png", np.zeros((31, 40), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png: size 40x31 .* size 40x30"):
        seg.load(str(sources / "a.png"))
    _save(labels_dir / "b.png", np.full((30, 40), 28, np.uint8))
    with pytest.raises(ValueError, match=r"b\.png: id 28 is not a Goliath-28 class"):
        seg.load("b.jpg", size_hw=(30, 40))
    _save(labels_dir / "c.png", np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"c\.png: expected an 8-bit single-channel PNG, got mode RGB"):
        seg.load("c.jpg")
    with pytest.raises(RuntimeError, match="per source"):
        seg.segment([np.zeros((30, 40, 3), np.uint8)])


def test_make_segmenter_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="needs labels_dir"):
        make_segmenter("labels")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        make_segmenter("labels", labels_dir=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="unknown name 'yolo'"):
        make_segmenter("yolo")
    with pytest.raises(ValueError, match="takes no checkpoint"):
        make_segmenter("mediapipe", checkpoint="x.pt2")
    with pytest.raises(ValueError, match="takes no labels_dir"):
        make_segmenter("sapiens", checkpoint="x.pt2", labels_dir=str(tmp_path))
