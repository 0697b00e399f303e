"""The one door to ultralytics (AGPL-3.0): imported lazily, and never touching the network.

ultralytics probes DNS at import, downloads Arial.ttf when it checks a dataset (even with
``plots=False``), may ``pip install`` missing extras, and sends usage events when online. The
environment set here, before the first import, turns all of that off (deps.md section 6):
``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=False``, and a config dir with a font already in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


class DetectorError(RuntimeError):
    """A detection command that cannot run (bad weights, missing files, bad arguments)."""


def config_dir() -> Path:
    """ultralytics' settings dir: ``$YOLO_CONFIG_DIR`` if set, else ``~/.cache/haodiff/ultralytics``."""
    env = os.environ.get("YOLO_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "haodiff" / "ultralytics"


def _place_fonts(settings_dir: Path) -> None:
    import matplotlib

    # Any TTF does: ultralytics only needs a file under the name it looks for. matplotlib's
    # DejaVu Sans is installed with the project and covers the labels we draw.
    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    settings_dir.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        target = settings_dir / name
        if not target.exists():
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(dejavu, tmp)
            os.replace(tmp, target)


def load_ultralytics() -> Any:
    """The ``ultralytics`` module, set up offline. Call before anything imports ultralytics."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    cfg = config_dir()
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    _place_fonts(cfg / "Ultralytics")  # ultralytics appends this sub-folder to YOLO_CONFIG_DIR
    from PIL import Image

    pil_open = Image.open
    try:
        import ultralytics
        from ultralytics.utils import SETTINGS
    except ImportError as exc:
        raise DetectorError(
            f"the detection commands need ultralytics: pip install 'haodiff[detect]' ({exc})"
        ) from exc
    # ultralytics swaps PIL.Image.open for a wrapper that, on a file Pillow cannot identify, tries to
    # install and import pi-heif; the intake's "not an image" rejection must stay a rejection.
    Image.open = pil_open
    if SETTINGS.get("sync"):
        SETTINGS.update(sync=False)
    return ultralytics


def load_model(weights: str | Path) -> Any:
    """A YOLO model from a local ``.pt`` file or an architecture ``.yaml`` (built untrained)."""
    ultralytics = load_ultralytics()
    path = Path(weights)
    if path.suffix == ".pt" and not path.is_file():
        raise DetectorError(f"{path}: weights file not found (weights are never downloaded)")
    try:
        return ultralytics.YOLO(str(path), task="detect")
    except Exception as exc:  # ultralytics raises many types for a bad file
        raise DetectorError(f"{path}: cannot load YOLO model: {exc}") from exc
