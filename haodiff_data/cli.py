"""``haodiff-data``: synthesize, re-degrade, replay, inspect and benchmark HAODiff training shards.

Exit codes: 0 success; 1 a check failed (replay mismatch); 2 bad arguments or a run that cannot
start; 3 the run finished but some inputs were rejected (see rejects-r*.jsonl); 4 writing the
output failed (disk full, ...): nothing partial is left, and --resume continues; 130 interrupted
(Ctrl-C) or 143 terminated (SIGTERM: `kill`, a scheduler's stop): the shards committed so far are
kept, and --resume continues.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_REJECTS, EXIT_WRITE_FAILED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: `kill`, a batch scheduler's stop or pre-emption


class Terminated(KeyboardInterrupt):
    """SIGTERM raised as an exception where the run is, so it stops as Ctrl-C stops it (committed
    work kept, temporary files removed, one line, no traceback) instead of dying mid-write."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within: SIGTERM raises `Terminated`; the previous handler is back afterwards (commands also run
    in-process, from tests and notebooks). Only the main thread may set handlers: elsewhere, no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_reason(exc: KeyboardInterrupt) -> tuple[str, int]:
    """(what stopped the run, exit code) for a Ctrl-C or a SIGTERM."""
    return ("terminated (SIGTERM)", EXIT_TERMINATED) if isinstance(exc, Terminated) else ("interrupted", EXIT_INTERRUPTED)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def seed_int(text: str) -> int:
    from haodiff_data.rng import JSON_SAFE_SEEDS

    value = non_negative_int(text)
    if value >= JSON_SAFE_SEEDS:  # the seed is written to every sample's JSON
        raise argparse.ArgumentTypeError(f"must be < 2^53 (exact in every JSON reader), got {value}")
    return value


def shard_prefix(text: str) -> str:
    # The prefix is part of a file name in --out: a separator would write elsewhere.
    if not text or "/" in text or os.sep in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"must be a plain file-name prefix (no '/'), got {text!r}")
    return text


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="haodiff",
                   help="recipe name in pipelines/ (haodiff, realesrgan, s3diff-mild) or a YAML path (default: haodiff)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="global seed in [0, 2^53); sample i draws only from (seed, i) (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (YAML syntax, dotted key), repeatable, e.g. --set hmb.psf_iters=500")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("shards"), help="output folder for shards (default: shards/)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes (default: all cores, fewer where memory would not fit them); "
                        "output bytes do not depend on it")
    p.add_argument("--prefix", type=shard_prefix, default="haodiff", help="shard file prefix: PREFIX-rNODE-SHARD.tar (default: haodiff)")
    p.add_argument("--samples-per-shard", type=positive_int, default=None,
                   help="samples per shard file; a shard closes at the first source-image boundary past it "
                        "(default: the recipe's shards.samples_per_shard)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out: no duplicated and no missing samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_segmenter_args(p: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    p.add_argument("--segmenter", choices=choices, default="mediapipe",
                   help="body-part segmenter: mediapipe (embedded, default), sapiens (needs --checkpoint)"
                        + (", labels (precomputed maps in --labels-dir)" if "labels" in choices else ""))
    p.add_argument("--checkpoint", help="Sapiens lite checkpoint (*_torchscript.pt2 or exported *.pt2)"
                   + ("; bench without it: a random-weight Sapiens-0.3B-sized stand-in" if "labels" not in choices else ""))
    p.add_argument("--device", default="cpu", help="device for the sapiens segmenter: cpu or cuda[:N] (default: cpu)")
    p.add_argument("--seg-precision", choices=("fp32", "tf32", "bf16"), default=None,
                   help="sapiens arithmetic: fp32, tf32 (CUDA; 1.65x on an H200) or bf16 weights (default: "
                        "fp32 for TorchScript, bf16 for exported programs on CUDA); recorded in every sample")


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
    p.add_argument("--samples-per-image", "-k", type=positive_int, default=None,
                   help="K samples (different crops and degradations) per source image "
                        "(default: 1, or 8 on the bundled photos)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="stop after the first N samples of the sample index space (all nodes together)")
    _add_segmenter_args(p, ("mediapipe", "sapiens", "labels"))
    p.add_argument("--labels-dir", help="folder of precomputed Goliath label maps named <source stem>.png")
    p.add_argument("--seg-batch", type=positive_int, default=None,
                   help="sapiens: images per forward in the one segmentation process of the device, packed from "
                        "all workers' crops (default: 16 on CUDA, 4 on the CPU); output bytes do not depend on it")
    p.add_argument("--num-nodes", type=positive_int, default=None,
                   help="number of independent nodes sharing the inputs (default: $WORLD_SIZE as set by "
                        "torchrun/accelerate, else 1)")
    p.add_argument("--node-rank", type=non_negative_int, default=None,
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
    p.add_argument("--max-samples", type=positive_int, default=16, help="rows in the contact sheet (default: 16)")

    p = sub.add_parser("bench", help="ms per stage at 512x512 on one core, and end-to-end samples/s")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--samples", type=positive_int, default=50, help="degradations timed per stage (default: 50)")
    p.add_argument("--workers", type=positive_int, default=None, help="workers for the end-to-end run (default: all cores)")
    p.add_argument("--end-to-end-samples", type=non_negative_int, default=48,
                   help="samples in the end-to-end synth run (default: 48; 0 skips it)")
    _add_segmenter_args(p, ("mediapipe", "sapiens"))
    _add_recipe_args(p)
    _add_detection_parsers(sub)
    return parser


def _add_detection_parsers(sub) -> None:
    """yolo-export, detect train|predict, hmbr, mpii-test (ultralytics, AGPL-3.0, only imported when run)."""
    p = sub.add_parser("yolo-export", help="shards -> ultralytics dataset: LQ images, one 'hmb' box per HMB instance",
                       description="LQ images with YOLO labels (class 0 hmb) from the HMB masks; samples without HMB "
                                   "are negatives with empty label files; train/val split by key hash.")
    p.add_argument("shards", nargs="+", help="shard files, folders or globs")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of samples in val (default: 0.1)")
    p.add_argument("--min-area", type=float, default=0.0005,
                   help="HMB mask regions smaller than this fraction of the image are ignored (default: 0.0005)")
    p.add_argument("--split-by", choices=("key", "source"), default="key",
                   help="hash the sample key (default) or the source image, so crops of a photo stay on one side")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    detect = sub.add_parser("detect", help="train or run the YOLO11 HMB detector (ultralytics)").add_subparsers(
        dest="detect_command", required=True)
    p = detect.add_parser("train", help="train YOLO11 on a yolo-export dataset; writes best.pt and metrics.json")
    p.add_argument("data", type=Path, help="yolo-export folder or its dataset.yaml")
    p.add_argument("--out", type=Path, required=True, help="run folder (best.pt, metrics.json, val_predictions.png)")
    p.add_argument("--model", default="yolo11n.yaml", help="architecture to build untrained (default: yolo11n.yaml)")
    p.add_argument("--weights", type=Path, default=None, help="local .pt to fine-tune instead (e.g. yolo11n.pt)")
    p.add_argument("--imgsz", type=int, default=512, help="training image size (default: 512)")
    p.add_argument("--epochs", type=int, default=100, help="epochs (default: 100)")
    p.add_argument("--hours", type=float, default=None, help="wall-clock budget; overrides --epochs")
    p.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    p.add_argument("--device", default="cpu", help="cpu, 0, 0,1 ... (default: cpu)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--patience", type=int, default=50, help="stop after N epochs without val gain (default: 50)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="CUDA precision (default: bf16)")
    p.add_argument("--no-plots", action="store_true", help="skip ultralytics' training plots")

    p = detect.add_parser("predict", help="detect HMB in images, folders, lists -> detections.jsonl + sheet")
    p.add_argument("inputs", nargs="+", help="images, folders (recursive), lists (.txt), globs, .tar shards of images")
    p.add_argument("--weights", type=Path, required=True, help="trained detector (best.pt)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _add_detector_args(p)
    p.add_argument("--max-sheet", type=int, default=48, help="images on the contact sheet (default: 48)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("hmbr", help="HMB-R: HMB detections on restored images / on their inputs",
                       description="Pairs images by file name without extension; HMB-R at --conf plus the curve "
                                   "over --thresholds; writes hmbr.json, CSVs and a sheet.")
    p.add_argument("--inputs", type=Path, required=True, help="folder of the degraded inputs")
    p.add_argument("--restored", type=Path, required=True, help="folder of the restored images (same names)")
    p.add_argument("--weights", type=Path, required=True, help="trained detector (best.pt)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: --restored/../hmbr)")
    _add_detector_args(p)
    p.add_argument("--thresholds", default="0.05:0.95:0.05",
                   help="curve thresholds, START:STOP:STEP or comma list (default: 0.05:0.95:0.05)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


    p = sub.add_parser("mpii-test", help="MPII Human Pose annotations + images -> MPII-Test crops, manifest, counts",
                       description="Crops of annotated people selected by the rules in pipelines/mpii_test.yaml; "
                                   "manifest.jsonl, summary.json with the persons each rule dropped; with --detector "
                                   "also hmb.jsonl and the HMB counts.")
    p.add_argument("--annotations", type=Path, required=True, help="mpii_human_pose_v1_u12_1.mat")
    p.add_argument("--images", type=Path, required=True, help="folder of MPII images (mpii_human_pose_v1/images)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--rules", default="mpii_test", help="rules YAML name in pipelines/ or a path (default: mpii_test)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="only the first N annotated images")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--detector", type=Path, default=None, help="HMB detector (best.pt): count HMB on the crops")
    _add_detector_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", type=float, default=0.25, help="confidence threshold (default: 0.25, ultralytics' default)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU (default: 0.7)")
    p.add_argument("--imgsz", type=int, default=512, help="inference size (default: 512)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] / N (default: cpu)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (default: 16)")


def _load_recipe(args: argparse.Namespace):
    from haodiff_data.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if getattr(args, "samples_per_shard", None):
        import dataclasses

        recipe = dataclasses.replace(
            recipe, shards=dataclasses.replace(recipe.shards, samples_per_shard=args.samples_per_shard)
        )
    return recipe


def _env_int(name: str, default: int) -> int:
    from haodiff_data.run import RunError

    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise RunError(f"${name} must be an integer, got {text!r}") from None


def _check_out(out: Path) -> None:
    from haodiff_data.run import RunError

    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")


def cmd_synth(args: argparse.Namespace) -> int:
    from haodiff_data.intake.sources import embedded_sources
    from haodiff_data.report import print_summary
    from haodiff_data.run import RunError
    from haodiff_data.synth import SynthConfig, default_workers, synth

    # Under torchrun/accelerate every process is a "node" of the partition, on its own GPU.
    num_nodes = args.num_nodes if args.num_nodes is not None else _env_int("WORLD_SIZE", 1)
    node_rank = args.node_rank if args.node_rank is not None else _env_int("RANK", 0)
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    embedded = not args.inputs
    inputs = [s.path for s in embedded_sources()] if embedded else args.inputs
    k = args.samples_per_image or (8 if embedded else 1)
    if num_nodes < 1:
        raise RunError(f"--num-nodes must be >= 1, got {num_nodes}")
    if not 0 <= node_rank < num_nodes:
        raise RunError(f"--node-rank must be in [0, {num_nodes}), got {node_rank}")
    if args.segmenter == "sapiens" and not args.checkpoint:
        raise RunError("--segmenter sapiens needs --checkpoint PATH (a Sapiens lite *_torchscript.pt2 or *.pt2)")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise RunError(f"--checkpoint {args.checkpoint}: file not found")
    if args.segmenter == "labels" and not args.labels_dir:
        raise RunError("--segmenter labels needs --labels-dir DIR")
    if args.labels_dir and not os.path.isdir(args.labels_dir):
        raise RunError(f"--labels-dir {args.labels_dir}: folder not found")
    _check_seg_precision(args, device)
    if args.seg_batch is not None and args.segmenter != "sapiens":
        raise RunError(f"--seg-batch applies to --segmenter sapiens only, not {args.segmenter}")
    _check_out(args.out)
    workers = args.workers or default_workers(args.segmenter, args.checkpoint, device)
    cfg = SynthConfig(
        inputs=inputs, out=args.out, recipe=_load_recipe(args), seed=args.seed, samples_per_image=k,
        limit=args.limit, workers=workers, segmenter=args.segmenter, checkpoint=args.checkpoint,
        seg_batch=args.seg_batch,
        device=device, seg_precision=args.seg_precision, labels_dir=args.labels_dir, num_nodes=num_nodes,
        node_rank=node_rank,
        prefix=args.prefix, resume=args.resume, progress=not args.no_progress,
    )
    summary = synth(cfg)
    print_summary(summary, args.out)
    return EXIT_REJECTS if summary["samples_rejected"] or summary["sources_rejected"] else EXIT_OK


def _check_seg_precision(args: argparse.Namespace, device: str) -> None:
    from haodiff_data.run import RunError
    from haodiff_data.segment.sapiens import check_precision

    if args.seg_precision is None:
        return
    if args.segmenter != "sapiens":
        raise RunError(f"--seg-precision applies to --segmenter sapiens only, not {args.segmenter}")
    try:
        check_precision(args.seg_precision, device)
    except ValueError as exc:
        raise RunError(f"--seg-precision: {exc}") from None


def cmd_degrade(args: argparse.Namespace) -> int:
    from haodiff_data.redegrade import DegradeConfig, redegrade
    from haodiff_data.report import print_summary
    from haodiff_data.synth import default_workers

    _check_out(args.out)
    cfg = DegradeConfig(
        shards=args.shards, out=args.out, recipe=_load_recipe(args), seed=args.seed,
        workers=args.workers or default_workers(),
        prefix=args.prefix, resume=args.resume, progress=not args.no_progress,
    )
    summary = redegrade(cfg)
    print_summary(summary, args.out, command="degrade")
    return EXIT_REJECTS if summary["samples_rejected"] or summary["sources_rejected"] else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from haodiff_data.replay import replay

    report = replay(args.shards, args.key)
    print(json.dumps(report, indent=1))
    return EXIT_OK if report["identical"] else EXIT_CHECK_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    from haodiff_data.report import inspect_shards

    if args.out is not None:
        _check_out(args.out)
    for path in inspect_shards(args.shards, args.out, args.max_samples):
        print(path)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from haodiff_data.bench import SegmenterChoice, format_table, run_bench

    _check_seg_precision(args, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if args.segmenter == "sapiens":
            from haodiff_data.segment.sapiens import check_checkpoint

            if checkpoint is None:
                from haodiff_data.segment.sapiens_standin import write_standin

                checkpoint = os.path.join(tmp, "sapiens_0.3b_random_torchscript.pt2")
                print(f"no --checkpoint: timing a random-weight Sapiens-0.3B-sized stand-in ({checkpoint})",
                      file=sys.stderr)
                write_standin(checkpoint, device=args.device)
            check_checkpoint(checkpoint, args.device)
        seg = SegmenterChoice(args.segmenter, checkpoint, args.device, args.seg_precision)
        result = run_bench(_load_recipe(args), args.samples, args.workers, args.end_to_end_samples, args.seed, seg)
    print(json.dumps(result) if args.json else format_table(result))
    return EXIT_OK


def _detection_errors(fn):
    """Detection commands report their own errors (kept apart from main's list to stay merge-friendly)."""
    def run(args: argparse.Namespace) -> int:
        from haodiff_data.detect.export import ExportError
        from haodiff_data.detect.yolo import DetectorError

        try:
            return fn(args)
        except (ExportError, DetectorError, ValueError) as exc:
            print(f"haodiff-data {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return run


@_detection_errors
def cmd_yolo_export(args: argparse.Namespace) -> int:
    from haodiff_data.detect.export import ExportConfig, export, format_counts

    cfg = ExportConfig(val_fraction=args.val_fraction, min_area=args.min_area, split_by=args.split_by)
    summary = export(args.shards, args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print(format_counts(summary, args.out))
    return EXIT_REJECTS if summary["skipped"] else EXIT_OK


@_detection_errors
def cmd_detect(args: argparse.Namespace) -> int:
    if args.detect_command == "train":
        from haodiff_data.detect.train import TrainConfig, train

        cfg = TrainConfig(data=args.data, out=args.out, model=args.model, weights=args.weights, imgsz=args.imgsz,
                          epochs=args.epochs, hours=args.hours, batch=args.batch, device=args.device,
                          workers=args.workers, seed=args.seed, patience=args.patience, precision=args.precision,
                          plots=not args.no_plots)
        metrics = train(cfg)
        print(f"best.pt on the synthetic val ({metrics['val_images']} images): mAP50 {metrics['mAP50']:.4f}  "
              f"mAP50-95 {metrics['mAP50-95']:.4f}  precision {metrics['precision']:.4f}  "
              f"recall {metrics['recall']:.4f}  (train {metrics['train_s']} s) -> {args.out}")
        return EXIT_OK
    from haodiff_data.detect.predict import PredictConfig, format_summary, predict

    cfg = PredictConfig(weights=args.weights, conf=args.conf, iou=args.iou, imgsz=args.imgsz, device=args.device,
                        batch=args.batch)
    summary = predict(args.inputs, args.out, cfg, max_sheet=args.max_sheet, progress=not args.no_progress)
    print(format_summary(summary, args.out))
    return EXIT_REJECTS if summary["unreadable"] else EXIT_OK


def _thresholds(text: str) -> list[float]:
    if ":" in text:
        start, stop, step = (float(v) for v in text.split(":"))
        if step <= 0 or stop < start:
            raise ValueError(f"--thresholds {text}: need START <= STOP and STEP > 0")
        n = int(round((stop - start) / step)) + 1
        return [round(start + i * step, 6) for i in range(n)]
    return [float(v) for v in text.split(",") if v.strip()]


@_detection_errors
def cmd_hmbr(args: argparse.Namespace) -> int:
    from haodiff_data.detect.hmbr import compute_hmbr

    result = compute_hmbr(args.inputs, args.restored, args.weights, conf=args.conf,
                          thresholds=_thresholds(args.thresholds), imgsz=args.imgsz, iou=args.iou,
                          device=args.device, batch=args.batch, progress=not args.no_progress)
    out = args.out or args.restored.resolve().parent / "hmbr"
    for path in result.write(out):
        print(path)
    print(result.summary_line())
    return EXIT_OK


@_detection_errors
def cmd_mpii_test(args: argparse.Namespace) -> int:
    from haodiff_data.mpii.annotations import AnnotationError
    from haodiff_data.mpii.crops import MPIIRun, MPIIRunError, detect_hmb, format_hmb, format_summary, run
    from haodiff_data.mpii.select import load_config

    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    try:
        cfg = MPIIRun(annotations=args.annotations, images=args.images, out=args.out, rules=load_config(args.rules),
                      workers=args.workers, resume=args.resume, limit=args.limit, progress=not args.no_progress)
        summary = run(cfg)
    except (AnnotationError, MPIIRunError) as exc:
        raise ValueError(str(exc)) from None
    print(format_summary(summary))
    if args.detector:
        counts = detect_hmb(args.out, args.detector, args.conf, args.imgsz, args.device, args.batch,
                            not args.no_progress)
        print(format_hmb(counts))
    return EXIT_REJECTS if summary["unreadable_images"] else EXIT_OK


COMMANDS = {"synth": cmd_synth, "degrade": cmd_degrade, "replay": cmd_replay, "inspect": cmd_inspect, "bench": cmd_bench,
            "yolo-export": cmd_yolo_export, "detect": cmd_detect, "hmbr": cmd_hmbr, "mpii-test": cmd_mpii_test}


def main(argv: list[str] | None = None) -> int:
    from haodiff_data.atomic import OutputWriteError
    from haodiff_data.recipe import RecipeError
    from haodiff_data.run import RunError
    from haodiff_data.shards.reader import SampleNotFoundError
    from haodiff_data.shards.schema import SchemaError

    # File names are bytes: print the undecodable ones as they are rather than fail on them.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_ctrl_c():
            return COMMANDS[args.command](args)
    except (RecipeError, RunError, FileNotFoundError, SchemaError, SampleNotFoundError) as exc:
        print(f"haodiff-data {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutputWriteError as exc:
        print(f"haodiff-data {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt as exc:
        what, code = stop_reason(exc)
        resumable = args.command in ("synth", "degrade")
        hint = f": the shards committed in {args.out} are kept, rerun with --resume to continue" if resumable else ""
        print(f"haodiff-data {args.command}: {what}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
