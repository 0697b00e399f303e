"""`haodiff-restore`: restore images with HAODiff weights (the official release's or ours).

    haodiff-restore INPUTS... --out DIR --base SD21_BASE_DIR --weights DIR [options]
    haodiff-restore convert --dpg dpg.pth --out DIR [--prompt-from img_encoder_weights.pth]
    haodiff-restore dpg INPUTS... --dpg dpg.pth --out DIR      (stage 1: HQ / residual / mask per image)
    haodiff-restore --bench [--precision bf16] [--device cpu] ...

Several GPUs: `torchrun --nproc-per-node 4 -m haodiff_model.restore.cli INPUTS... --device cuda ...`
(each rank restores its share of the inputs on its own GPU).

Exit codes (as haodiff-data): 0 success; 2 bad arguments or a run that cannot start; 3 the run
finished but some inputs were rejected (OUT/rejects-r*.jsonl says why).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from haodiff_model.log import EXIT_OK, EXIT_REJECTS, EXIT_USAGE, setup_logging, sigterm_as_ctrl_c, stop_reason

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    from haodiff_model.restore.colorfix import COLOR_FIXES
    from haodiff_model.restore.pipeline import PRECISIONS, RestoreOptions

    d = RestoreOptions()
    p = argparse.ArgumentParser(prog="haodiff-restore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive), .txt lists, globs, .tar shards")
    p.add_argument("--out", type=Path, help="output folder (PNGs named after the inputs)")
    p.add_argument("--base", type=Path, help="local diffusers folder of stabilityai/stable-diffusion-2-1-base")
    p.add_argument("--weights", type=Path,
                   help="folder with img_encoder_weights.pth and pytorch_lora_weights.safetensors")
    g = p.add_argument_group("inference (default: the weights folder's haodiff.json, else the official values)")
    g.add_argument("--seed", type=int, default=None, help="latent-sampling seed, the same for every image (official 114)")
    g.add_argument("--latent", choices=("sample", "mode"), default=None,
                   help="VAE posterior sample (official) or its deterministic mean")
    g.add_argument("--timestep", type=int, default=None, help="official 199")
    g.add_argument("--cfg-scale", type=float, default=None, help="official 3.5; <= 1 runs the positive prompt only")
    g.add_argument("--color-fix", choices=COLOR_FIXES, default=d.color_fix, help="against the LQ input (default wavelet)")
    r = p.add_argument_group("runtime")
    r.add_argument("--precision", choices=tuple(PRECISIONS), default=d.precision)
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--batch-size", type=int, default=1, help="images of one size restored together")
    r.add_argument("--unet-batch", type=int, default=d.unet_batch, help="latent tiles per UNet call")
    r.add_argument("--latent-tile", type=int, default=d.latent_tile)
    r.add_argument("--latent-overlap", type=int, default=d.latent_overlap)
    r.add_argument("--vae-encoder-tile", type=int, default=d.encoder_tile, help="pixels")
    r.add_argument("--vae-decoder-tile", type=int, default=d.decoder_tile, help="latents")
    r.add_argument("--overwrite", action="store_true", help="restore inputs whose output exists (default: skip them)")
    r.add_argument("--no-progress", action="store_true")
    b = p.add_argument_group("benchmark (full SD2.1-base architecture, random weights; no files needed)")
    b.add_argument("--bench", action="store_true", help="time the stages instead of restoring files")
    b.add_argument("--bench-size", type=int, default=512, help="image side")
    b.add_argument("--bench-batches", default="1,8", help="comma-separated batch sizes")
    b.add_argument("--bench-repeats", type=int, default=1, help="timed calls per batch size")
    b.add_argument("--bench-warmup", type=int, default=1, help="untimed calls before them (kernels, allocator)")
    b.add_argument("--bench-official", action="store_true",
                   help="also time the official-equivalent path: fp32, batch 1")
    b.add_argument("--json", action="store_true", help="benchmark: print one JSON object")
    return p


def _device(arg: str | None):
    import torch

    if arg is None:
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cuda" and "LOCAL_RANK" in os.environ:
        arg = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(arg)


def _options(args: argparse.Namespace):
    from haodiff_model.restore.pipeline import RestoreOptions

    return RestoreOptions(precision=args.precision, color_fix=args.color_fix, latent_tile=args.latent_tile,
                          latent_overlap=args.latent_overlap, encoder_tile=args.vae_encoder_tile,
                          decoder_tile=args.vae_decoder_tile, unet_batch=args.unet_batch)


def cmd_restore(args: argparse.Namespace) -> int:
    from haodiff_model.restore.pipeline import HAODiffRestorer
    from haodiff_model.restore.run import plan_jobs, rank_share, run_restore, write_rejects

    missing = [name for name, value in (("INPUTS", args.inputs), ("--out", args.out), ("--base", args.base),
                                        ("--weights", args.weights)) if not value]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (see --help)")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    jobs, rejects = plan_jobs(args.inputs, args.out)
    jobs, rank, world = rank_share(jobs)
    overrides = {"seed": args.seed, "latent": args.latent, "timestep": args.timestep, "cfg_scale": args.cfg_scale}
    restorer, notes = HAODiffRestorer.from_folders(args.base, args.weights, _device(args.device), _options(args),
                                                   overrides)
    for note in notes:
        log.info(note.splitlines()[0])
    s = restorer.settings
    log.info(f"t={s.timestep} cfg {s.cfg_scale} latent {s.latent} seed {s.seed} colour fix {args.color_fix} "
             f"{args.precision} on {restorer.device}" + (f", {world} ranks" if world > 1 else ""))
    summary = run_restore(restorer.restore, jobs, args.batch_size, args.overwrite,
                          not args.no_progress and rank == 0)  # one bar, not one per rank
    summary.rejected = (rejects if rank == 0 else []) + summary.rejected
    path = write_rejects(args.out, rank, summary.rejected)
    line = f"{summary.line()}" + (f"; reasons in {path}" if path else "")
    if summary.rejected and rank:  # the other ranks' rejections must not go unseen
        log.warning(line)
    else:
        log.info(f"haodiff-restore{f' rank {rank}' if world > 1 else ''}: {line}")
    return EXIT_REJECTS if summary.rejected else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        from haodiff_model.restore.convert import main as convert_main

        return convert_main(argv[1:])
    if argv[:1] == ["dpg"]:
        from haodiff_model.restore.predict_dpg import main as dpg_main

        return dpg_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging("haodiff-restore")
    from haodiff_model.config import ConfigError
    from haodiff_model.io.official import CheckpointMismatchError, LoraFileError
    from haodiff_model.restore.settings import SettingsError

    try:
        with sigterm_as_ctrl_c():
            if args.bench:
                from haodiff_model.bench.restore import main_bench

                return main_bench(args, _device(args.device))
            return cmd_restore(args)
    except (FileNotFoundError, ValueError, ConfigError, SettingsError, CheckpointMismatchError, LoraFileError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        what, code = stop_reason(exc)
        log.error("%s: the images written so far are kept; the same command continues (it skips them)", what)
        return code


if __name__ == "__main__":
    sys.exit(main())
