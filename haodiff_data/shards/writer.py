"""Atomic, resumable, byte-reproducible shard writing for one node.

A shard is written under a temporary name, fsynced, then renamed: readers never see a partial
tar. After each rename the node's state file (also written atomically) records how far the run
got; it is the single commit point. A crash between the rename and the state write leaves a
shard the state does not know: ``--resume`` deletes it and regenerates the same bytes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from haodiff_data.atomic import atomic_write_bytes, fsync_dir, write_failed

# Fixed tar metadata: the same samples always give the same shard bytes.
_TAR_META = dict(user="haodiff", group="haodiff", mode=0o444, mtime=0)


def shard_name(prefix: str, node_rank: int, shard: int) -> str:
    return f"{prefix}-r{node_rank:03d}-{shard:06d}.tar"


@dataclass
class NodeState:
    """Progress of one node, committed after every shard."""

    config: dict[str, Any]
    next_shard: int = 0
    next_task: int = 0  # index into the node's ordered task list
    written: int = 0
    rejects: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False


class ShardSink:
    """Collects encoded samples in order and commits numbered shards of ``samples_per_shard``."""

    def __init__(self, out_dir: Path, prefix: str, node_rank: int, samples_per_shard: int, state: NodeState):
        self.out_dir = out_dir
        self.prefix = prefix
        self.node_rank = node_rank
        self.samples_per_shard = samples_per_shard
        self.state = state
        self._tar: wds.TarWriter | None = None
        self._file = None
        self._count = 0
        self._pending_rejects: list[dict[str, Any]] = []
        self.shards_written: list[Path] = []

    @property
    def state_path(self) -> Path:
        return state_path(self.out_dir, self.prefix, self.node_rank)

    def _tmp_path(self) -> Path:
        return self.out_dir / f".{shard_name(self.prefix, self.node_rank, self.state.next_shard)}.tmp"

    def add(self, sample: dict[str, Any]) -> None:
        try:
            if self._tar is None:
                self._file = open(self._tmp_path(), "wb")
                self._tar = wds.TarWriter(self._file, encoder=False, **_TAR_META)
            self._tar.write(sample)
        except OSError as exc:
            raise write_failed(self._tmp_path(), exc) from exc
        self._count += 1

    def reject(self, record: dict[str, Any]) -> None:
        self._pending_rejects.append(record)

    def task_done(self, next_task: int) -> None:
        """Called after all samples of a task were added; commits a shard when it is full."""
        self._next_task = next_task
        if self._count >= self.samples_per_shard:
            self._commit_shard()

    def _commit_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        final = self.out_dir / shard_name(self.prefix, self.node_rank, self.state.next_shard)
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp_path(), final)
            fsync_dir(self.out_dir)
        except OSError as exc:
            raise write_failed(final, exc) from exc
        self.shards_written.append(final)
        self.state.next_shard += 1
        self.state.written += self._count
        self._tar, self._file, self._count = None, None, 0
        self._commit_state()

    def _commit_state(self) -> None:
        self.state.next_task = self._next_task
        self.state.rejects.extend(self._pending_rejects)
        self._pending_rejects = []
        atomic_write_bytes(self.state_path, json.dumps(asdict(self.state), indent=1).encode())

    def finish(self, next_task: int) -> None:
        self._next_task = next_task
        if self._count:
            self._commit_shard()
        self.state.done = True
        self._commit_state()

    def abort(self) -> None:
        """Drop the open temporary shard (its tasks are redone on resume)."""
        if self._file is not None:
            # Closing flushes, which fails again on a full disk; the file is deleted anyway, and a
            # closed tar stream does not retry the write when it is garbage-collected.
            for close in (self._tar.close, self._file.close):
                try:
                    close()
                except (OSError, ValueError):
                    pass
            self._tmp_path().unlink(missing_ok=True)
        self._tar, self._file = None, None


def state_path(out_dir: Path, prefix: str, node_rank: int) -> Path:
    return out_dir / f".{prefix}-r{node_rank:03d}.state.json"


def load_state(out_dir: Path, prefix: str, node_rank: int) -> NodeState | None:
    path = state_path(out_dir, prefix, node_rank)
    if not path.exists():
        return None
    return NodeState(**json.loads(path.read_text()))


def clean_uncommitted(out_dir: Path, prefix: str, node_rank: int, next_shard: int) -> list[Path]:
    """Delete temp files and shards at or past ``next_shard`` (written but never committed)."""
    removed = []
    pattern = re.compile(rf"^\.?{re.escape(prefix)}-r{node_rank:03d}-(\d{{6}})\.tar(\.tmp)?$")
    for path in sorted(out_dir.iterdir()):
        m = pattern.match(path.name)
        if m and (m.group(2) or int(m.group(1)) >= next_shard):
            path.unlink()
            removed.append(path)
    return removed
