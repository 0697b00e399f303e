"""``haodiff-data inspect``: what a person looks at before training on a shard set.

The contact sheet samples every source (a shard set sorted by source would otherwise show the
first source's K crops and nothing else), as a grid a screen can show whole.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from haodiff_data.shards.reader import expand_shards, iter_members  # noqa: E402
from haodiff_data.shards.schema import Sample, check_meta, decode_sample  # noqa: E402
from haodiff_data.synth import parameter_table, read_metas  # noqa: E402

TILE = 192
COLUMNS = ("HQ", "LQ", "HMB mask over LQ", "residual (x4 + 128)")


def _tiles(sample: Sample) -> list[np.ndarray]:
    lq = sample.lq
    overlay = lq.copy()
    red = np.zeros_like(lq)
    red[..., 0] = 255
    m = sample.mask > 0
    overlay[m] = (0.5 * lq[m] + 0.5 * red[m]).astype(np.uint8)
    residual = np.clip(sample.residual.astype(np.int32) * 4 + 128, 0, 255).astype(np.uint8)
    return [cv2.resize(t, (TILE, TILE), interpolation=cv2.INTER_AREA) for t in (sample.hq, lq, overlay, residual)]


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    tile = tile.copy()
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _cell(sample: Sample) -> np.ndarray:
    """HQ | LQ | mask over LQ | residual of one sample, labelled with its key and first order."""
    tiles = _tiles(sample)
    hmb = sample.meta.get("hmb") or {}
    tiles[0] = _label(tiles[0], sample.key)
    tiles[1] = _label(tiles[1], f"{sample.meta['first_order']} {hmb.get('group', '')}".strip())
    return np.concatenate(tiles, axis=1)


def contact_sheet(samples: list[Sample]) -> np.ndarray:
    """A grid of samples (each HQ | LQ | mask over LQ | residual), column-major, about square."""
    columns = max(1, round(np.sqrt(len(samples) / len(COLUMNS))))
    per_column = -(-len(samples) // columns)
    cell_w = TILE * len(COLUMNS)
    header = np.full((24, cell_w, 3), 255, np.uint8)
    for c, name in enumerate(COLUMNS):
        cv2.putText(header, name, (c * TILE + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    sheet = np.full((24 + per_column * TILE, columns * cell_w, 3), 255, np.uint8)
    for col in range(columns):
        sheet[:24, col * cell_w:(col + 1) * cell_w] = header
    for n, sample in enumerate(samples):
        col, row = divmod(n, per_column)
        sheet[24 + row * TILE:24 + (row + 1) * TILE, col * cell_w:(col + 1) * cell_w] = _cell(sample)
    return sheet


def stratified_keys(index: list[tuple[str, str]], max_samples: int) -> list[str]:
    """Up to ``max_samples`` keys from ``(key, source)`` pairs, spread over the sources: the first
    sample of every source before any second one; with more sources than room, evenly spaced ones."""
    by_source: dict[str, list[str]] = {}
    for key, source in index:
        by_source.setdefault(source, []).append(key)
    groups = list(by_source.values())
    if len(groups) > max_samples:
        groups = [groups[i * len(groups) // max_samples] for i in range(max_samples)]
    picked = [g[k] for k in range(max(map(len, groups), default=0)) for g in groups if k < len(g)]
    return picked[:max_samples]


def parameter_plots(table: dict[str, list], path: Path) -> None:
    names = [n for n, v in table.items() if v]
    cols = 3
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = table[name]
        if isinstance(values[0], str):
            counts = Counter(values)
            keys = sorted(counts)
            ax.bar(range(len(keys)), [counts[k] for k in keys])
            ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=7)
        else:
            ax.hist(values, bins=20)
        ax.set_title(f"{name} (n={len(values)})", fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def inspect_shards(shards: list[str], out: Path | None, max_samples: int) -> list[Path]:
    paths = expand_shards(shards)
    if not paths:
        raise FileNotFoundError(f"no shards (*.tar) in {' '.join(shards)}")
    out = out or paths[0].parent
    out.mkdir(parents=True, exist_ok=True)
    metas = read_metas(paths)
    for meta in metas:
        check_meta(meta, f"sample {meta.get('key')}")
    index = [(m["key"], f"{m['source']['path']}::{m['source'].get('member')}") for m in metas]
    wanted = set(stratified_keys(index, max_samples))
    samples = sorted((decode_sample(members, f"{path}:{members['__key__']}")
                      for path in paths for members in iter_members(path) if members["__key__"] in wanted),
                     key=lambda s: s.key)
    sheet_path = out / "contact_sheet.png"
    cv2.imwrite(str(sheet_path), cv2.cvtColor(contact_sheet(samples), cv2.COLOR_RGB2BGR))
    plots_path = out / "parameters.png"
    parameter_plots(parameter_table(metas), plots_path)
    return [sheet_path, plots_path]
