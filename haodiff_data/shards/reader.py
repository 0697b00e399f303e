"""Reading shards with the standard library only (no webdataset needed)."""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from haodiff_data.shards.schema import Sample, decode_sample


class SampleNotFoundError(LookupError):
    """No sample with the requested key in the given shards."""


def expand_shards(specs: Sequence[str]) -> list[Path]:
    """Shard paths from files, folders (their ``*.tar``) and globs, sorted, de-duplicated."""
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            paths.extend(sorted(p.glob("*.tar")))
        elif p.is_file():
            paths.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(spec))
            if not matches:
                raise FileNotFoundError(f"no shards match {spec!r}")
            paths.extend(matches)
    seen: dict[Path, None] = {}
    for p in paths:
        seen.setdefault(p.resolve(), None)
    return list(seen)


def iter_members(path: Path) -> Iterator[dict[str, bytes]]:
    """Group consecutive tar members by key (the part of the basename before its first dot)."""
    current: dict[str, bytes] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key  # type: ignore[assignment]
            f = tar.extractfile(info)
            assert f is not None
            current[ext] = f.read()
    if current:
        yield current


def iter_samples(shards: Sequence[str | Path]) -> Iterator[Sample]:
    for path in expand_shards([str(s) for s in shards]):
        for members in iter_members(path):
            yield decode_sample(members, where=f"{path}:{members['__key__']}")


def find_sample(shards: Sequence[str | Path], key: str) -> tuple[Path, Sample]:
    for path in expand_shards([str(s) for s in shards]):
        for members in iter_members(path):
            if members["__key__"] == key:
                return path, decode_sample(members, where=f"{path}:{key}")
    raise SampleNotFoundError(f"sample {key!r} not found in the given shards")
