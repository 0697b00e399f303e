"""What a person looks at before training on a shard set: the run summary (counts, throughput,
who was segmented, how often HMB happened, histograms of the drawn parameters) and
``haodiff-data inspect`` (a contact sheet and parameter plots).

The contact sheet samples every source (a shard set sorted by source would otherwise show the
first source's K crops and nothing else), as a grid a screen can show whole.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from haodiff_data import __version__
from haodiff_data.recipe import Recipe
from haodiff_data.shards import writer
from haodiff_data.shards.reader import expand_shards, iter_members
from haodiff_data.shards.schema import Sample, check_meta, decode_sample

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
    persons = sample.meta.get("segmenter", {}).get("persons")
    tiles[0] = _label(tiles[0], sample.key if persons is None else f"{sample.key} persons {persons}")
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


def parameter_plots(table: dict[str, list], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    if title:
        fig.suptitle(title, fontsize=9)
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
    parameter_plots(parameter_table(metas), plots_path, segmentation_line(segmentation_stats(metas, None)))
    return [sheet_path, plots_path]


# ---- statistics over a shard set -------------------------------------------------------------


def read_metas(shards: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(m["json"]) for path in shards for m in iter_members(path)]


def node_shards(out: Path, prefix: str, node_rank: int) -> list[Path]:
    return sorted(out.glob(f"{prefix}-r{node_rank:03d}-*.tar"))


def _histogram(values: list[float], bins: int = 10) -> dict[str, list[float]]:
    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values, float), bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def parameter_table(metas: list[dict[str, Any]]) -> dict[str, list]:
    """Flatten the drawn parameters and segmenter results worth plotting, one list per name."""
    table: dict[str, list] = {
        "first_order": [], "hmb_group": [], "psf_extent_px": [], "kernel_type_1": [], "kernel_type_2": [],
        "jpeg_quality_1": [], "jpeg_quality_final": [], "noise_1": [], "noise_2": [], "final_order": [],
        "persons": [], "person_area": [],
    }
    for m in metas:
        table["first_order"].append(m["first_order"])
        seg = m.get("segmenter", {})
        if "persons" in seg:
            table["persons"].append(seg["persons"])
            table["person_area"].append(seg["person_area"])
        if m.get("hmb"):
            table["hmb_group"].append(m["hmb"]["group"])
            if "psf_extent_px" in m["hmb"]:
                table["psf_extent_px"].append(m["hmb"]["psf_extent_px"])
        for tag, order in (("1", m.get("generic_first")), ("2", m.get("generic_second"))):
            if not order:
                continue
            if order.get("blur"):
                table[f"kernel_type_{tag}"].append(order["blur"]["type"])
            table[f"noise_{tag}"].append(order["noise"]["kind"])
            if tag == "1" and order.get("jpeg_quality") is not None:
                table["jpeg_quality_1"].append(order["jpeg_quality"])
        final = m["final"]
        table["final_order"].append(final["order"])
        table["jpeg_quality_final"].append(final["jpeg_quality"])
    return table


def repeated_crops(metas: list[dict[str, Any]]) -> int:
    """Samples whose HQ is the same crop of the same source as an earlier sample: a source at the
    crop size leaves no room to move, so its K samples share one HQ (and differ in degradation)."""
    crops = Counter(json.dumps([m["source"]["sha256"], m["source"].get("working_size"), m["source"]["crop"]["box"]])
                    for m in metas)
    return sum(n - 1 for n in crops.values())


def summarize_table(table: dict[str, list]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in table.items():
        if values and isinstance(values[0], str):
            out[name] = dict(sorted(Counter(values).items()))
        elif name == "persons":
            out[name] = {str(k): v for k, v in sorted(Counter(values).items())}
        else:
            out[name] = _histogram(values)
    return out


def segmentation_stats(metas: list[dict[str, Any]], recipe: Recipe | None) -> dict[str, Any]:
    """Share of samples showing a person, and the realised HMB share beside the recipe's."""
    n = len(metas)
    with_person = sum(1 for m in metas if m.get("segmenter", {}).get("person_found"))
    hmb = [m for m in metas if m["first_order"] == "hmb"]
    stats: dict[str, Any] = {
        "samples": n,
        "samples_with_person": with_person,
        "person_share": round(with_person / n, 4) if n else None,
        "hmb_samples": len(hmb),
        "hmb_share": round(len(hmb) / n, 4) if n else None,
        "hmb_share_of_samples_with_person": round(len(hmb) / with_person, 4) if with_person else None,
        "hmb_per_group": dict(sorted(Counter(m["hmb"]["group"] for m in hmb).items())),
    }
    if recipe is not None:
        fo = recipe.first_order
        stats["recipe_p_hmb"] = round(fo.p_hmb / (fo.p_none + fo.p_hmb + fo.p_generic), 4)
        stats["recipe_p_hmb_over"] = fo.p_hmb_over
    return stats


def segmentation_line(stats: dict[str, Any]) -> str:
    if not stats["samples"]:
        return "no samples"
    line = (f"a person in {stats['samples_with_person']}/{stats['samples']} samples ({100 * stats['person_share']:.0f}%); "
            f"HMB in {stats['hmb_samples']} ({100 * stats['hmb_share']:.0f}% of all")
    if stats["hmb_share_of_samples_with_person"] is not None:
        line += f", {100 * stats['hmb_share_of_samples_with_person']:.0f}% of those with a person"
    line += ")"
    if "recipe_p_hmb" in stats:
        over = "of samples with a person" if stats["recipe_p_hmb_over"] == "person" else "of all samples"
        line += f"; recipe p_hmb {100 * stats['recipe_p_hmb']:.0f}% {over}"
    return line


def write_summary(out: Path, prefix: str, node_rank: int, state: writer.NodeState, recipe: Recipe,
                  run_info: dict[str, Any], wall: float, made_now: int, timings: Counter,
                  seg_forwards: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``rejects-rNNN.jsonl`` and ``summary-rNNN.json`` (counts, throughput, segmentation and
    HMB shares, parameter histograms over every sample of this node's shards, resumed parts included).
    ``seg_forwards``: how this invocation's Sapiens forwards were filled (synth with Sapiens only)."""
    shards = node_shards(out, prefix, node_rank)
    metas = read_metas(shards)
    summary = {
        "haodiff_version": __version__,
        "prefix": prefix,
        "node_rank": node_rank,
        **run_info,
        "recipe": recipe.to_dict(),
        "shards": [p.name for p in shards],
        "samples_written": len(metas),
        "samples_rejected": sum(len(r["samples"]) for r in state.rejects),
        "sources_rejected": len({r["source"] for r in state.rejects}),
        "rejects_by_reason": dict(Counter(r["reason"].split(":")[0] for r in state.rejects)),
        "samples_repeating_a_crop": repeated_crops(metas),
        "this_invocation": {
            "samples": made_now,
            "wall_s": round(wall, 3),
            "samples_per_s": round(made_now / wall, 3) if wall > 0 else None,
            "stage_ms_per_sample": {k: round(1000 * v / max(made_now, 1), 2) for k, v in sorted(timings.items())
                                    if k not in ("cpu", "peak_rss_mib")},
            # Worker CPU time per sample: a shared machine inflates it far less than wall time;
            # W idle cores make about W * 1000 / cpu_ms_per_sample samples/s.
            "cpu_ms_per_sample": round(1000 * timings.get("cpu", 0.0) / max(made_now, 1), 2),
            "worker_peak_rss_mib": round(timings.get("peak_rss_mib", 0.0), 1),
            **({"sapiens_forwards": seg_forwards} if seg_forwards else {}),
        },
        "segmentation": segmentation_stats(metas, recipe),
        "parameters": summarize_table(parameter_table(metas)),
    }
    rejects = "".join(json.dumps(r, sort_keys=True) + "\n" for r in state.rejects)
    writer.atomic_write_bytes(out / f"rejects-r{node_rank:03d}.jsonl", rejects.encode())
    writer.atomic_write_bytes(out / f"summary-r{node_rank:03d}.json", json.dumps(summary, indent=1).encode())
    return summary


def print_summary(summary: dict[str, Any], out: Path, command: str = "synth", file=None) -> None:
    file = file or sys.stderr  # looked up at call time, so redirected streams are honoured
    inv = summary["this_invocation"]
    print(
        f"haodiff-data {command}: {summary['samples_written']} samples in {len(summary['shards'])} shard(s) "
        f"in {out}, {summary['samples_rejected']} rejected ({summary['sources_rejected']} sources); "
        f"this run {inv['samples']} samples in {inv['wall_s']} s ({inv['samples_per_s']} samples/s, "
        f"{summary['workers']} workers)",
        file=file,
    )
    print(f"  {segmentation_line(summary['segmentation'])}", file=file)
    forwards = inv.get("sapiens_forwards")
    if forwards and forwards["forwards"]:
        print(f"  sapiens ({forwards['process']}): {forwards['forwards']} forwards, {forwards['images_per_forward']} "
              f"images per forward (--seg-batch {forwards['seg_batch']})", file=file)
    if summary.get("samples_repeating_a_crop"):
        print(f"  note: {summary['samples_repeating_a_crop']} samples repeat the HQ crop of an earlier sample of the "
              "same source (sources at the crop size); they differ only in degradation", file=file)
