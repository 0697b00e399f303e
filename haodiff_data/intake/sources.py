"""Where source images come from: folders, file lists, globs, or WebDataset shards of images."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_DEFAULT = ("astronaut.png", "bus.jpg", "zidane.jpg")


@dataclass(frozen=True)
class Source:
    """One input image: a file, or a member of a tar shard (``member`` set).

    ``path`` is the path as given (any bytes: undecodable ones are carried as surrogate escapes,
    Python's file-system encoding); ``resolved`` the absolute path with links resolved.
    """

    path: str
    member: str | None = None
    # Where the member's bytes start in the tar and how many: read with one seek, since looking a
    # member up by name rescans the archive (quadratic over a large shard).
    offset: int = 0
    size: int = 0
    resolved: str = ""

    @property
    def id(self) -> str:
        return f"{self.path}::{self.member}" if self.member else self.path

    @property
    def id_resolved(self) -> str:
        return f"{self.resolved}::{self.member}" if self.member else self.resolved

    @property
    def stem(self) -> str:
        name = self.member or self.path
        return Path(name).name.split(".")[0]

    def read_bytes(self) -> bytes:
        if self.member is None:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.id}: tar member cut short ({len(data)} of {self.size} bytes)")
        return data


def read_recorded_source(path: str, member: str | None) -> bytes:
    """The bytes of a source named in a sample's JSON (a file, or a member looked up by name)."""
    if member is None:
        return Path(path).read_bytes()
    with tarfile.open(path, "r") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise OSError(f"{path}::{member}: not a regular tar member")
        return f.read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def embedded_sources() -> list[Source]:
    """The bundled photos of people used when ``synth`` gets no inputs."""
    return [Source(str(ASSETS_DIR / name), resolved=str(ASSETS_DIR / name)) for name in EMBEDDED_DEFAULT]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _reject(given: str, reason: str) -> dict:
    return {"source": given, "reason": reason, "samples": []}


def _stat_failure(given: str, exc: OSError) -> dict:
    if exc.errno == errno.ELOOP:
        return _reject(given, "symlink loop")
    if exc.errno == errno.ENOENT and os.path.islink(given):
        return _reject(given, f"dangling symlink (points to {os.readlink(given)})")
    if exc.errno == errno.ENOENT:
        return _reject(given, "not found")
    return _reject(given, f"unreadable: {exc.strerror or exc}")


class Listing(NamedTuple):
    """The sources found, in order, and the inputs that cannot be sources (each with a reason)."""

    sources: list[Source]
    rejects: list[dict]


class _Lister:
    def __init__(self) -> None:
        self.sources: list[Source] = []
        self.rejects: list[dict] = []
        self._seen: set[str] = set()

    def add(self, source: Source) -> None:
        # One source per file however it was reached (relative and absolute path, links).
        if source.id_resolved not in self._seen:
            self._seen.add(source.id_resolved)
            self.sources.append(source)

    def entry(self, given: str, named: bool, lists: bool = True) -> None:
        """A path named by the user (``named``) or found in a folder; ``lists``: a ``.txt`` or
        ``.lst`` is a file list (not inside a list, so a list naming itself cannot loop)."""
        try:
            st = os.stat(given)
        except OSError as exc:
            if named or _is_image_name(given):
                self.rejects.append(_stat_failure(given, exc))
            return
        if stat.S_ISDIR(st.st_mode):
            self.folder(given, os.path.realpath(given), ())
        elif not stat.S_ISREG(st.st_mode):
            if named or _is_image_name(given):
                self.rejects.append(_reject(given, "not a regular file"))
        elif given.lower().endswith(".tar"):
            self.tar(given)
        elif named and lists and given.lower().endswith((".txt", ".lst")):
            self.file_list(given)
        elif named or _is_image_name(given):
            # A file named explicitly is taken as an image: a bad one is rejected, not skipped.
            self.add(Source(given, resolved=os.path.realpath(given)))

    def folder(self, given: str, real: str, ancestors: tuple[str, ...]) -> None:
        if real in ancestors:
            self.rejects.append(_reject(given, f"symlink loop (folder {real} is already being listed)"))
            return
        try:
            with os.scandir(given) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.rejects.append(_reject(given, f"unreadable folder: {exc.strerror or exc}"))
            return
        ancestors = (*ancestors, real)
        for e in entries:
            path = os.path.join(given, e.name)
            try:
                is_link = e.is_symlink()
                is_dir = e.is_dir()
                is_file = e.is_file()
            except OSError as exc:
                self.rejects.append(_stat_failure(path, exc))
                continue
            if is_dir:
                self.folder(path, os.path.realpath(path) if is_link else os.path.join(real, e.name), ancestors)
            elif is_file and _is_image_name(e.name):
                resolved = os.path.realpath(path) if is_link else os.path.join(real, e.name)
                self.add(Source(path, resolved=resolved))
            elif is_link and _is_image_name(e.name):
                self.entry(path, named=False)  # a link to nothing (or to itself): say which

    def tar(self, given: str) -> None:
        try:
            with tarfile.open(given, "r") as tar:
                members = [m for m in tar.getmembers() if m.isfile() and _is_image_name(m.name)]
        except (OSError, tarfile.TarError) as exc:
            self.rejects.append(_reject(given, f"unreadable tar: {exc}"))
            return
        resolved = os.path.realpath(given)
        for m in sorted(members, key=lambda m: m.name):
            self.add(Source(given, m.name, m.offset_data, m.size, resolved))

    def file_list(self, given: str) -> None:
        try:
            data = Path(given).read_bytes()
        except OSError as exc:
            self.rejects.append(_reject(given, f"unreadable file list: {exc.strerror or exc}"))
            return
        base = os.path.dirname(given)
        for raw in data.splitlines():
            line = os.fsdecode(raw.strip())
            if line and not line.startswith("#"):
                self.entry(line if os.path.isabs(line) else os.path.join(base, line), named=True, lists=False)


def list_sources(inputs: Sequence[str]) -> Listing:
    """Expand inputs in order; the same file reached twice is one source (its first occurrence).

    A folder contributes its image files recursively (sorted, folder links followed); a ``.tar``
    its image members; a ``.txt``/``.lst`` file one path per line (relative to the list); a glob
    its matches; any other file is taken as an image. Dangling links, link loops and unreadable
    folders or lists become rejects with a reason. A named input that does not exist (no file,
    folder or glob match) raises ``FileNotFoundError``: that is a typo, not a bad input.
    """
    lister = _Lister()
    for spec in inputs:
        if os.path.lexists(spec):
            lister.entry(spec, named=True)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input not found (no glob match): {spec}")
            for match in matches:
                lister.entry(match, named=True)
        else:
            raise FileNotFoundError(f"input not found (no file, folder or glob match): {spec}")
    # An input reached twice is rejected once.
    unique: dict[str, dict] = {}
    for r in lister.rejects:
        unique.setdefault(os.path.abspath(r["source"]), r)
    return Listing(lister.sources, list(unique.values()))
