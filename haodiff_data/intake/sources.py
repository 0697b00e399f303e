"""Where source images come from: folders, file lists, globs, or WebDataset shards of images."""

from __future__ import annotations

import glob
import hashlib
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_DEFAULT = ("astronaut.png", "bus.jpg", "zidane.jpg")


@dataclass(frozen=True)
class Source:
    """One input image: a file, or a member of a tar shard (``member`` set)."""

    path: str
    member: str | None = None
    # Where the member's bytes start in the tar and how many: read with one seek, since looking a
    # member up by name rescans the archive (quadratic over a large shard).
    offset: int = 0
    size: int = 0

    @property
    def id(self) -> str:
        return f"{self.path}::{self.member}" if self.member else self.path

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
    return [Source(str(ASSETS_DIR / name)) for name in EMBEDDED_DEFAULT]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _tar_sources(path: Path) -> list[Source]:
    with tarfile.open(path, "r") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and _is_image_name(m.name)]
    return [Source(str(path), m.name, m.offset_data, m.size) for m in sorted(members, key=lambda m: m.name)]


def _file_list(path: Path) -> list[Source]:
    base = path.parent
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(Source(str(p if p.is_absolute() else base / p)))
    return out


def list_sources(inputs: Sequence[str]) -> list[Source]:
    """Expand inputs in order; duplicates are kept once (first occurrence).

    A folder contributes its image files recursively (sorted); a ``.tar`` its image members; a
    ``.txt``/``.lst`` file one path per line (relative to the list); a glob its matches; any
    other file is taken as an image, so a bad file named explicitly is rejected, not skipped.
    """
    found: list[Source] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            found.extend(Source(str(f)) for f in sorted(p.rglob("*")) if f.is_file() and _is_image_name(f.name))
        elif p.is_file() and p.suffix.lower() == ".tar":
            found.extend(_tar_sources(p))
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst"):
            found.extend(_file_list(p))
        elif p.is_file():
            found.append(Source(str(p)))
        else:
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input not found (no file, folder or glob match): {spec}")
            found.extend(list_sources(matches))
    unique: dict[str, Source] = {}
    for s in found:
        unique.setdefault(s.id, s)
    return list(unique.values())
