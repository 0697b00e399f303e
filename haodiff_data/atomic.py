"""Crash-safe file writes: a file appears complete or not at all, and survives a power loss once
written (temporary name, fsync, rename, fsync of the folder). Shards, run state, checkpoints and
metrics all go through here. A failed write (disk full, quota, I/O error) leaves no temporary file
and raises `OutputWriteError`, one message naming the file."""

from __future__ import annotations

import os
from pathlib import Path


class OutputWriteError(OSError):
    """Output could not be written (disk full, quota, I/O error); nothing partial was left."""


def write_failed(path: Path, exc: OSError) -> OutputWriteError:
    error = OutputWriteError(f"cannot write {path}: {exc.strerror or exc}")
    error.errno = exc.errno
    return error


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc) from exc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["OutputWriteError", "atomic_write_bytes", "fsync_dir", "write_failed"]
