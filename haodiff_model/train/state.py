"""Training bookkeeping shared by the trainers: RNG capture, atomic checkpoints, metrics, images.

Checkpoint layout under a run's `checkpoints/` folder::

    step-00002000/state.pt   torch.save of the training state (loads with weights_only=True)
    step-00002000/...        whatever the trainer adds (e.g. official-layout weights)
    latest                   text file naming the newest complete checkpoint folder

A checkpoint folder is written under a temporary name and renamed when complete, then `latest`
is replaced atomically, so a crash at any point leaves the previous checkpoint usable. Only the
newest `keep_last` folders are kept.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from haodiff_data.atomic import atomic_write_bytes, fsync_dir
from haodiff_model.train.distributed import unwrap

STATE_FILE = "state.pt"
LATEST_FILE = "latest"
METRICS_FILE = "metrics.jsonl"
_PREFIX = "step-"


# ----------------------------------------------------------------------------- RNG


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """States of Python's, NumPy's and torch's global RNGs (CUDA: the current device's, if in use),
    plus the explicit generators given by name. The result survives torch.load(weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np_state,
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng`; every named generator given must be present in `state`."""
    missing = sorted(set(generators or {}) - set(state["generators"]))
    if missing:
        raise KeyError(f"RNG state has no generators {missing} (has {sorted(state['generators'])})")
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"]).astype(np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])


def derive_seed(*words: int) -> int:
    """A 63-bit seed from integers (e.g. base seed, stream tag, rank, step), well mixed."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0]) >> 1


# ----------------------------------------------------------------------------- model / optimizer state


def collect_state(step: int, models: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
                  schedulers: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The resumable state: step, state dicts by name (models unwrapped from DDP), and `extra`."""
    return {
        "step": step,
        "models": {n: unwrap(m).state_dict() for n, m in models.items()},
        "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
        "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
        **extra,
    }


def apply_state(state: Mapping[str, Any], models: Mapping[str, nn.Module],
                optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any]) -> int:
    """Load the named state dicts (strictly) into the given objects; returns the saved step."""
    for kind, objects in (("models", models), ("optimizers", optimizers), ("schedulers", schedulers)):
        saved = state.get(kind, {})
        missing = sorted(set(objects) - set(saved))
        if missing:
            raise KeyError(f"checkpoint has no {kind} {missing} (has {sorted(saved)})")
        for name, obj in objects.items():
            target = unwrap(obj) if kind == "models" else obj
            target.load_state_dict(saved[name])
    return int(state["step"])


# ----------------------------------------------------------------------------- checkpoints


class CheckpointManager:
    """Atomic, numbered checkpoint folders with a `latest` pointer; keeps the newest `keep_last`.

    With enabled=False (ranks other than 0) `save` writes nothing; reading works everywhere.
    """

    def __init__(self, root: str | Path, keep_last: int = 3, enabled: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.enabled = enabled

    def path_for(self, step: int) -> Path:
        return self.root / f"{_PREFIX}{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
                 and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))

    def latest(self) -> Path | None:
        """The folder `latest` names, or the newest complete folder if the pointer is missing or stale."""
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            if (target / STATE_FILE).is_file():
                return target
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: Mapping[str, Any], extra: Callable[[Path], None] | None = None) -> Path | None:
        """Write `state` (and the files `extra(folder)` writes) as checkpoint `step`; returns its folder."""
        if not self.enabled:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            torch.save(state, tmp / STATE_FILE)
            if extra is not None:
                extra(tmp)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # the same step saved again (e.g. a resumed run ending where it started)
            old = self.root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_bytes(self.root / LATEST_FILE, (final.name + "\n").encode())
        for old in self.checkpoints()[:-self.keep_last]:
            shutil.rmtree(old)
        return final

    @staticmethod
    def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The state saved in checkpoint folder `path` (or a state.pt file)."""
        path = Path(path)
        file = path / STATE_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {file} does not exist")
        return torch.load(file, map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------- metrics


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file (a torn last line, from a crash mid-write, is dropped)."""
    records = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record") from None
    return records


class MetricLogger:
    """Scalars to `metrics.jsonl` (one {"step", "time", name: value} record per call) and TensorBoard.

    resume_step: continue a run; records after that step (written after its checkpoint, before
    the interruption) are dropped from the JSONL and purged from TensorBoard, so the curves show
    what the resumed run computes. None starts a new file. Disabled loggers do nothing (rank > 0).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self.writer = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            self._file = open(self.path, "a")
        else:
            self._file = open(self.path, "w")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, float(value), step)

    def log_image(self, tag: str, step: int, image: np.ndarray) -> None:
        """An HxWx3 uint8 RGB image to TensorBoard."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ----------------------------------------------------------------------------- images and plots


def to_rgb_uint8(x: torch.Tensor, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """(3 or 1, H, W) tensor with values in [low, high] -> HxWx3 uint8 RGB (clipped; 1 channel -> grey)."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1|3, H, W) image tensor, got {tuple(x.shape)}")
    if not high > low:
        raise ValueError(f"need high > low, got [{low}, {high}]")
    y = ((x.detach().float().cpu() - low) / (high - low)).clamp(0, 1).mul(255).round().to(torch.uint8)
    if y.shape[0] == 1:
        y = y.expand(3, -1, -1)
    return y.permute(1, 2, 0).contiguous().numpy()


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile equally sized HxWx3 uint8 images into rows x columns with `pad` px separators."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one row with one image")
    h, w = rows[0][0].shape[:2]
    cols = len(rows[0])
    for r, row in enumerate(rows):
        if len(row) != cols:
            raise ValueError(f"row {r} has {len(row)} images, row 0 has {cols}")
        for c, img in enumerate(row):
            if img.shape != (h, w, 3) or img.dtype != np.uint8:
                raise ValueError(f"image ({r}, {c}) is {img.dtype} {img.shape}, expected uint8 {(h, w, 3)}")
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), pad_value, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[top:top + h, left:left + w] = img
    return grid


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an HxWx3 uint8 RGB image as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"save_png expects an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1])):
        raise OSError(f"could not write {path}")
    return path


def plot_metrics(jsonl: str | Path, png: str | Path, keys: Iterable[str] | None = None,
                 log_y: bool = True) -> Path:
    """Curves of `keys` (default: every key ending in 'loss') against step, one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl)
    if keys is None:
        keys = sorted({k for r in records for k in r if k.endswith("loss")})
    keys = list(keys)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for key in keys:
        pts = [(r["step"], r[key]) for r in records
               if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, label=key, marker="." if len(pts) < 30 else None)
            plotted += 1
    ax.set_xlabel("step")
    if log_y and plotted and all(r[k] > 0 for r in records for k in keys if k in r):
        ax.set_yscale("log")
    if plotted:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(Path(jsonl).name)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png


__all__ = ["CheckpointManager", "LATEST_FILE", "METRICS_FILE", "MetricLogger", "STATE_FILE", "apply_state",
           "capture_rng", "collect_state", "derive_seed", "image_grid", "plot_metrics", "read_metrics",
           "restore_rng", "save_png", "to_rgb_uint8"]
