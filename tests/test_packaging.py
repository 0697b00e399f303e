"""The wheel holds what an installed `haodiff-data` needs: the recipes and the bundled photos.

Cheap on purpose: the wheel is built without build isolation (no download) and installed with
--no-deps into a fresh folder; the dependencies come from the interpreter running the tests, and
the repository is not on the path, so only the wheel's files can satisfy `import haodiff_data`.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL_SKIP = {".git", ".venv", "build", "dist", "shards", "runs", "outputs", ".pytest_cache"}
# Every module the data CLI can reach, to check each comes from the wheel, not from a checkout.
IMPORT_ALL = """
import pkgutil, sys, haodiff_data, haodiff_data.recipe as r
for m in pkgutil.walk_packages(haodiff_data.__path__, "haodiff_data."):
    __import__(m.name)
print(r.PIPELINES_DIR)
print("\\n".join(m.__file__ for n, m in sys.modules.items() if n.startswith("haodiff_data") and m.__file__))
"""


def _skip(folder: str, names: list[str]) -> set[str]:
    top = TOP_LEVEL_SKIP if Path(folder) == REPO else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    src = tmp_path_factory.mktemp("src") / "haodiff"
    shutil.copytree(REPO, src, ignore=_skip, symlinks=True)
    dist = src.parent / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", str(src), "-w", str(dist)], check=True, capture_output=True)
    (built,) = dist.glob("haodiff-*.whl")
    return built


def test_the_wheel_carries_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.name for p in (REPO / "pipelines").glob("*.yaml"))
    assert recipes and {f"haodiff_data/pipelines/{r}" for r in recipes} <= names
    assert {"haodiff_data/assets/bus.jpg", "haodiff_data/assets/astronaut.png"} <= names


def test_an_installed_wheel_runs_synth_with_the_default_recipe(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    work = tmp_path / "elsewhere"  # no pipelines/ folder here or above
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", IMPORT_ALL], env=env, cwd=work, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    assert len(where) > 20 and all(Path(p).is_relative_to(target) for p in where), where
    script = target / "bin" / "haodiff-data"
    assert script.is_file()
    run = subprocess.run([str(script), "synth", "--out", "out", "--limit", "2", "-k", "1", "--workers", "1",
                          "--no-progress"], env=env, cwd=work, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((work / "out" / "summary-r000.json").read_text())
    assert summary["samples_written"] == 2 and summary["recipe"]["name"] == "haodiff"
