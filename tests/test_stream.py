"""Streaming schema-v1 shards into training batches (haodiff_model.train.data)."""

from __future__ import annotations

import warnings
from collections import Counter
from itertools import islice, permutations
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from haodiff_data.shards.schema import encode_sample
from haodiff_model.train.data import DataSkipWarning, ShardStreamConfig, make_loader, resolve_urls

SIZE = 64
SHARDS, PER_SHARD = 4, 4


def _images(key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([ord(c) for c in key])
    hq = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    lq = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.where(rng.random((SIZE, SIZE)) < 0.3, 255, 0).astype(np.uint8)
    return hq, lq, mask


def _write_shard(path: Path, keys: list[str], schema: dict[str, int] | None = None, broken: str = "") -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as tar:
        for key in keys:
            hq, lq, mask = _images(key)
            meta = {"index": key} if schema is None or key not in schema else {"schema": schema[key]}
            sample = encode_sample(key, hq, lq, mask, np.zeros((SIZE, SIZE), np.uint8), meta)
            if key == broken:
                sample["hq.png"] = sample["hq.png"][:100]  # a valid tar member holding a cut PNG
            tar.write(sample)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS):
        _write_shard(root / f"train-r000-{s:06d}.tar", [f"s{s}k{i}" for i in range(PER_SHARD)])
    return root


def _cfg(urls: list[str], **kw) -> ShardStreamConfig:
    base = dict(urls=urls, batch_size=2, num_workers=2, seed=7, epoch_length=6, shuffle_buffer=4, timeout_s=60)
    return ShardStreamConfig(**{**base, **kw})


def _keys(loader, n: int | None = None) -> list[str]:
    batches = loader if n is None else islice(loader, n)
    return [k for b in batches for k in b["key"]]


def test_batches_shapes_ranges_and_exact_values(shard_dir: Path) -> None:
    loader = make_loader(_cfg([str(shard_dir)]))
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and loader.step == 6
    for b in batches:
        assert b["hq"].shape == b["lq"].shape == b["residual"].shape == (2, 3, SIZE, SIZE)
        assert b["mask"].shape == (2, 1, SIZE, SIZE)
        assert all(t.dtype == torch.float32 for t in (b["hq"], b["lq"], b["residual"], b["mask"]))
        assert b["hq"].min() >= -1 and b["hq"].max() <= 1 and b["lq"].min() >= -1 and b["lq"].max() <= 1
        assert set(b["mask"].unique().tolist()) <= {0.0, 1.0}
        for i, key in enumerate(b["key"]):
            hq, lq, mask = (torch.from_numpy(a) for a in _images(key))
            # Exact: the decoded tensors are the source uint8 images in the documented scale.
            assert torch.equal(b["hq"][i], (hq.permute(2, 0, 1).float() - 127.5) / 127.5)
            assert torch.equal(b["lq"][i], (lq.permute(2, 0, 1).float() - 127.5) / 127.5)
            diff = lq.permute(2, 0, 1).to(torch.int16) - hq.permute(2, 0, 1).to(torch.int16)
            assert torch.equal(b["residual"][i], diff.float() / 127.5)
            assert torch.equal(b["mask"][i, 0], (mask == 255).float())
        torch.testing.assert_close(b["residual"], b["lq"] - b["hq"], atol=2.5e-7, rtol=0)
    assert loader.skipped_total() == 0
    stats = loader.worker_stats
    assert set(stats) == {0, 1} and sum(s.samples for s in stats.values()) == 12


def test_crop_and_flip_move_all_targets_together(shard_dir: Path) -> None:
    loader = make_loader(_cfg([str(shard_dir)], crop_size=24, hflip=True, num_workers=0, epoch_length=8))
    flipped = 0
    for b in loader:
        assert b["hq"].shape == (2, 3, 24, 24) and b["mask"].shape == (2, 1, 24, 24)
        for i, key in enumerate(b["key"]):
            hq, lq, mask = (torch.from_numpy(a) for a in _images(key))
            hq = (hq.permute(2, 0, 1).float() - 127.5) / 127.5
            found = []
            for flip in (False, True):
                full = hq.flip(-1) if flip else hq
                for top in range(SIZE - 23):
                    for left in range(SIZE - 23):
                        if torch.equal(full[:, top:top + 24, left:left + 24], b["hq"][i]):
                            found.append((flip, top, left))
            assert len(found) == 1, key
            flip, top, left = found[0]
            flipped += flip
            window = (slice(top, top + 24), slice(left, left + 24))
            lq_full = (lq.permute(2, 0, 1).float() - 127.5) / 127.5
            mask_full = (mask == 255).float()
            if flip:
                lq_full, mask_full = lq_full.flip(-1), mask_full.flip(-1)
            assert torch.equal(b["lq"][i], lq_full[:, window[0], window[1]])
            assert torch.equal(b["mask"][i, 0], mask_full[window])
            torch.testing.assert_close(b["residual"][i], b["lq"][i] - b["hq"][i], atol=2.5e-7, rtol=0)
    assert 0 < flipped < 16  # probability 1/2 per sample


def test_channel_shuffle_puts_hq_and_lq_in_one_order(shard_dir: Path) -> None:
    loader = make_loader(_cfg([str(shard_dir)], channel_shuffle=True, num_workers=0, epoch_length=8))
    orders = Counter()
    for b in loader:
        for i, key in enumerate(b["key"]):
            hq_u8, lq_u8, mask = _images(key)
            hq, lq = (torch.from_numpy(a).permute(2, 0, 1).float().sub(127.5).div(127.5) for a in (hq_u8, lq_u8))
            found = [o for o in permutations(range(3)) if torch.equal(hq[list(o)], b["hq"][i])]
            assert len(found) == 1, key  # random images: exactly one order matches
            assert torch.equal(b["lq"][i], lq[list(found[0])])
            assert torch.equal(b["mask"][i, 0], torch.from_numpy(mask == 255).float())
            orders[found[0]] += 1
    assert len(orders) >= 4  # 16 samples over 6 orders


def test_rot90_turns_hq_lq_and_mask_by_one_quarter_count(shard_dir: Path) -> None:
    loader = make_loader(_cfg([str(shard_dir)], rot90=True, num_workers=0, epoch_length=8))
    turns = Counter()
    for b in loader:
        for i, key in enumerate(b["key"]):
            hq, lq, mask = (torch.from_numpy(a.copy()) for a in _images(key))
            hq, lq = ((a.permute(2, 0, 1).float() - 127.5) / 127.5 for a in (hq, lq))
            mask = (mask == 255).float()
            found = [k for k in range(4) if torch.equal(hq.rot90(k, (1, 2)), b["hq"][i])]
            assert len(found) == 1, key
            k = found[0]
            assert torch.equal(b["lq"][i], lq.rot90(k, (1, 2))) and torch.equal(b["mask"][i, 0], mask.rot90(k))
            turns[k] += 1
    assert len(turns) >= 3  # 16 samples over 4 turns


def test_ranks_and_workers_read_disjoint_slices_of_one_shard_stream(shard_dir: Path) -> None:
    # No shuffle and one whole shard per batch: batch j of a rank is one shard draw.
    cfg = _cfg([str(shard_dir)], batch_size=PER_SHARD, shuffle_buffer=1, epoch_length=6)
    single = [b["key"] for b in make_loader(cfg, rank=0, world_size=1)]
    per_rank = [[b["key"] for b in make_loader(cfg, rank=r, world_size=2)] for r in range(2)]
    assert all(len({k[:2] for k in keys}) == 1 for keys in single)  # whole shards, in order
    assert single[0::2] == per_rank[0][:3] and single[1::2] == per_rank[1][:3]


def test_epochs_differ_and_resume_is_exact(shard_dir: Path) -> None:
    cfg = _cfg([str(shard_dir)], epoch_length=5)
    loader = make_loader(cfg)
    full = [_keys(loader) for _ in range(3)]  # three epochs of 5 batches
    assert full[0] != full[1] != full[2]
    assert _keys(make_loader(_cfg([str(shard_dir)], epoch_length=5, seed=8))) != full[0]  # the seed sets the order
    flat = [k for epoch in full for k in epoch]
    for start in (3, 5, 7):  # mid-epoch (both worker phases) and an epoch boundary
        resumed = make_loader(cfg, start_step=start)
        tail = []
        while resumed.step < 15:  # passes end at epoch boundaries: the first one is partial
            tail += _keys(resumed)
        assert resumed.step == 15
        assert tail == flat[2 * start:], start


def test_corrupt_shards_and_unknown_schema_are_skipped_and_counted(tmp_path: Path) -> None:
    for s in range(2):
        _write_shard(tmp_path / f"good-{s}.tar", [f"g{s}k{i}" for i in range(PER_SHARD)])
    _write_shard(tmp_path / "schema.tar", ["v1a", "v99", "v1b", "cut"], schema={"v99": 99}, broken="cut")
    _write_shard(tmp_path / "whole.tar", [f"t{i}" for i in range(PER_SHARD)])
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.tar").unlink()
    (tmp_path / "garbage.tar").write_bytes(np.random.default_rng(0).bytes(5000))

    loader = make_loader(_cfg([str(tmp_path)], epoch_length=40, timeout_s=30))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = _keys(loader)
    assert len(keys) == 80 and "v99" not in keys and "cut" not in keys
    assert {"v1a", "v1b"} <= set(keys)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataSkipWarning)]
    assert any("schema.tar:v99" in m and "schema version 99" in m for m in messages)
    assert any("garbage.tar" in m and "unreadable tar" in m for m in messages)
    assert any("truncated.tar" in m for m in messages)
    assert any("schema.tar:cut: hq.png is not a readable PNG" in m for m in messages)
    counts = sum((s.skipped for s in loader.worker_stats.values()), Counter())
    assert counts["sample"] >= 1 and counts["decode"] >= 1 and counts["shard"] >= 2
    assert loader.skipped_total() == len(messages)


def test_only_bad_shards_fail_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "garbage.tar").write_bytes(b"not a tar" * 100)
    loader = make_loader(_cfg([str(tmp_path / "garbage.tar")], num_workers=0, max_failures=10))
    with pytest.raises(RuntimeError, match=r"10 failed shard reads or decodes in a row.*garbage\.tar"):
        next(iter(loader))


def test_too_few_shards_warns_but_still_streams(shard_dir: Path) -> None:
    one = str(shard_dir / "train-r000-000000.tar")
    with pytest.warns(UserWarning, match=r"1 shard\(s\) for 2 rank\(s\) x 2 worker\(s\) = 4 readers\. Not fatal"):
        loader = make_loader(_cfg([one], epoch_length=2), rank=1, world_size=2)
    assert len(_keys(loader)) == 4


def test_bad_arguments_are_named(shard_dir: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        _cfg([str(shard_dir)], batch_size=0)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        make_loader(_cfg([str(shard_dir)]), rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="nothing-\\*.tar"):
        make_loader(_cfg([str(shard_dir / "nothing-*.tar")]))


def test_urls_from_folders_globs_and_braces(shard_dir: Path) -> None:
    names = [f"train-r000-{s:06d}.tar" for s in range(SHARDS)]
    assert [Path(u).name for u in resolve_urls([str(shard_dir)])] == names
    assert [Path(u).name for u in resolve_urls([f"{shard_dir}/train-r000-{{000001..000002}}.tar"])] == names[1:3]
    assert [Path(u).name for u in resolve_urls([f"{shard_dir}/*-000003.tar", str(shard_dir / names[0])])] == [
        names[3], names[0]]
