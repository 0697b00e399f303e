"""``haodiff-data``: synthesize, re-degrade, replay, inspect and benchmark HAODiff training shards.

Exit codes: 0 success; 1 a check failed (replay mismatch); 2 bad arguments or a run that cannot
start; 3 the run finished but some inputs were rejected (see rejects-r*.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_REJECTS = 0, 1, 2, 3


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="haodiff",
                   help="recipe name in pipelines/ (haodiff, realesrgan, s3diff-mild) or a YAML path (default: haodiff)")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i draws only from (seed, i) (default: 0)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("shards"), help="output folder for shards (default: shards/)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all cores, fewer where the segmenter's memory would not "
                        "fit, at most 4 per GPU); output bytes do not depend on it")
    p.add_argument("--prefix", default="haodiff", help="shard file prefix: PREFIX-rNODE-SHARD.tar (default: haodiff)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per shard file; a shard closes at the first source-image boundary past it "
                        "(default: the recipe's shards.samples_per_shard)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out: no duplicated and no missing samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haodiff-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="photos of people -> HQ/LQ/mask/residual/parts WebDataset shards",
                       description="Synthesize training shards. With no INPUTS, runs on the bundled photos "
                                   "(astronaut, bus, zidane) with the MediaPipe segmenter: no download needed.")
    p.add_argument("inputs", nargs="*",
                   help="image folders (recursive), image files, file lists (.txt: one path per line), globs, "
                        "or .tar WebDataset shards of images")
    _add_recipe_args(p)
    _add_run_args(p)
    p.add_argument("--samples-per-image", "-k", type=int, default=None,
                   help="K samples (different crops and degradations) per source image "
                        "(default: 1, or 8 on the bundled photos)")
    p.add_argument("--limit", type=int, default=None,
                   help="stop after the first N samples of the sample index space (all nodes together)")
    p.add_argument("--segmenter", choices=("mediapipe", "sapiens", "labels"), default="mediapipe",
                   help="body-part segmenter: mediapipe (embedded, default), sapiens (needs --checkpoint), "
                        "labels (precomputed maps in --labels-dir)")
    p.add_argument("--checkpoint", help="Sapiens lite checkpoint (*_torchscript.pt2 or exported *.pt2)")
    p.add_argument("--device", default="cpu", help="device for the sapiens segmenter: cpu or cuda[:N] (default: cpu)")
    p.add_argument("--labels-dir", help="folder of precomputed Goliath label maps named <source stem>.png")
    p.add_argument("--num-nodes", type=int, default=None,
                   help="number of independent nodes sharing the inputs (default: $WORLD_SIZE as set by "
                        "torchrun/accelerate, else 1)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank in [0, num-nodes) (default: $RANK as set by torchrun/accelerate, else 0)")

    p = sub.add_parser("degrade", help="re-degrade existing shards (their stored HQ and part labels) with another recipe or seed")
    p.add_argument("shards", nargs="+", help="shard files, folders or globs")
    _add_recipe_args(p)
    _add_run_args(p)

    p = sub.add_parser("replay", help="regenerate one sample from its JSON and check it is byte-identical")
    p.add_argument("shards", nargs="+", help="shard files, folders or globs")
    p.add_argument("--key", required=True, help="sample key, e.g. s000000003")

    p = sub.add_parser("inspect", help="contact sheet (HQ | LQ | mask over LQ | residual) and parameter plots")
    p.add_argument("shards", nargs="+", help="shard files, folders or globs")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the first shard's folder)")
    p.add_argument("--max-samples", type=int, default=16, help="rows in the contact sheet (default: 16)")

    p = sub.add_parser("bench", help="ms per stage at 512x512 on one core, and end-to-end samples/s")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--samples", type=int, default=50, help="degradations timed per stage (default: 50)")
    p.add_argument("--workers", type=int, default=None, help="workers for the end-to-end run (default: all cores)")
    p.add_argument("--end-to-end-samples", type=int, default=48,
                   help="samples in the end-to-end synth run (default: 48; 0 skips it)")
    _add_recipe_args(p)
    return parser


def _load_recipe(args: argparse.Namespace):
    from haodiff_data.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if getattr(args, "samples_per_shard", None):
        import dataclasses

        recipe = dataclasses.replace(
            recipe, shards=dataclasses.replace(recipe.shards, samples_per_shard=args.samples_per_shard)
        )
    return recipe


def cmd_synth(args: argparse.Namespace) -> int:
    from haodiff_data.intake.sources import embedded_sources
    from haodiff_data.report import print_summary
    from haodiff_data.run import RunError
    from haodiff_data.synth import SynthConfig, cpu_count, default_workers, synth

    # Under torchrun/accelerate every process is a "node" of the partition, on its own GPU.
    num_nodes = args.num_nodes if args.num_nodes is not None else int(os.environ.get("WORLD_SIZE", 1))
    node_rank = args.node_rank if args.node_rank is not None else int(os.environ.get("RANK", 0))
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    embedded = not args.inputs
    inputs = [s.path for s in embedded_sources()] if embedded else args.inputs
    k = args.samples_per_image or (8 if embedded else 1)
    if not 0 <= node_rank < num_nodes:
        raise RunError(f"--node-rank must be in [0, {num_nodes})")
    if args.segmenter == "sapiens" and not args.checkpoint:
        raise RunError("--segmenter sapiens needs --checkpoint PATH (a Sapiens lite *_torchscript.pt2 or *.pt2)")
    if args.segmenter == "labels" and not args.labels_dir:
        raise RunError("--segmenter labels needs --labels-dir DIR")
    workers = args.workers or default_workers(args.segmenter, args.checkpoint, device)
    cfg = SynthConfig(
        inputs=inputs, out=args.out, recipe=_load_recipe(args), seed=args.seed, samples_per_image=k,
        limit=args.limit, workers=workers, segmenter=args.segmenter, checkpoint=args.checkpoint,
        threads=max(1, cpu_count() // workers),
        device=device, labels_dir=args.labels_dir, num_nodes=num_nodes, node_rank=node_rank,
        prefix=args.prefix, resume=args.resume, progress=not args.no_progress,
    )
    summary = synth(cfg)
    print_summary(summary, args.out)
    return EXIT_REJECTS if summary["samples_rejected"] else EXIT_OK


def cmd_degrade(args: argparse.Namespace) -> int:
    from haodiff_data.redegrade import DegradeConfig, redegrade
    from haodiff_data.report import print_summary
    from haodiff_data.synth import default_workers

    cfg = DegradeConfig(
        shards=args.shards, out=args.out, recipe=_load_recipe(args), seed=args.seed,
        workers=args.workers or default_workers(),
        prefix=args.prefix, resume=args.resume, progress=not args.no_progress,
    )
    summary = redegrade(cfg)
    print_summary(summary, args.out, command="degrade")
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from haodiff_data.replay import replay

    report = replay(args.shards, args.key)
    print(json.dumps(report, indent=1))
    return EXIT_OK if report["identical"] else EXIT_CHECK_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    from haodiff_data.report import inspect_shards

    for path in inspect_shards(args.shards, args.out, args.max_samples):
        print(path)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from haodiff_data.bench import format_table, run_bench

    result = run_bench(_load_recipe(args), args.samples, args.workers, args.end_to_end_samples, args.seed)
    print(json.dumps(result) if args.json else format_table(result))
    return EXIT_OK


COMMANDS = {"synth": cmd_synth, "degrade": cmd_degrade, "replay": cmd_replay, "inspect": cmd_inspect, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    from haodiff_data.recipe import RecipeError
    from haodiff_data.run import RunError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (RecipeError, RunError, FileNotFoundError, KeyError) as exc:
        print(f"haodiff-data {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
