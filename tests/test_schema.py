import gzip
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from haodiff_data.shards.schema import decode_sample, encode_png, encode_sample


def _sample_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    hq = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    lq = np.clip(hq.astype(int) + rng.integers(-40, 41, hq.shape), 0, 255).astype(np.uint8)
    parts = np.zeros((96, 80), np.uint8)
    parts[10:60, 20:50] = 2
    parts[60:90, 5:70] = 14
    mask = np.where(parts == 2, 255, 0).astype(np.uint8)
    return hq, lq, mask, parts


def test_members_decode_to_the_exact_arrays():
    hq, lq, mask, parts = _sample_arrays()
    sample = decode_sample(encode_sample("s000000001", hq, lq, mask, parts, {"k": 1}))
    for got, want in ((sample.hq, hq), (sample.lq, lq), (sample.mask, mask), (sample.parts, parts)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(sample.residual, lq.astype(np.int16) - hq.astype(np.int16))


def test_label_members_are_small_and_read_by_any_png_reader():
    parts = np.zeros((512, 512), np.uint8)
    parts[100:300, 150:350] = 2
    parts[300:500, 100:400] = 14
    data = encode_png(parts, labels=True)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), parts)
    assert len(data) < 3000


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (33, 64, 3), (1, 9), (40, 17)])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("labels", [False, True])
def test_png_encoder_round_trips_through_pil_and_opencv(shape, level, labels):
    # Extreme values in every position exercise the Average filter's modulo-256 wrap.
    image = np.random.default_rng(sum(shape) + level).choice(np.array([0, 1, 127, 128, 254, 255], np.uint8), shape)
    data = encode_png(image, level, labels)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded[..., ::-1] if image.ndim == 3 else decoded, image)
    assert data == encode_png(image.copy(), level, labels)


def test_png_encoder_rejects_what_png_members_cannot_hold():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(ValueError, match="HxW or HxWx3"):
        encode_png(np.zeros((4, 4, 4), np.uint8))


def test_residual_member_is_plain_gzip():
    hq, lq, _, _ = _sample_arrays(3)
    empty = np.zeros(hq.shape[:2], np.uint8)
    data = encode_sample("s000000002", hq, lq, empty, empty, {})["residual.npy.gz"]
    np.testing.assert_array_equal(np.load(io.BytesIO(gzip.decompress(data))), lq.astype(np.int16) - hq.astype(np.int16))
