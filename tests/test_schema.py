import numpy as np
from PIL import Image
import io

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


def test_label_members_are_run_length_coded_and_read_by_any_png_reader():
    parts = np.zeros((512, 512), np.uint8)
    parts[100:300, 150:350] = 2
    parts[300:500, 100:400] = 14
    data = encode_png(parts, labels=True)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), parts)
    # Photo settings (a fixed Average filter, Huffman only) would spend ~30 kB on this map.
    assert len(data) < 4000 < len(encode_png(parts))
