"""`haodiff-train`: the trainers' command line.

    haodiff-train dpg --config pipelines/train_dpg.yaml [--resume] [--max-steps N] [--out DIR] [--set S.K=V ...]
    haodiff-train osd --config CONFIG [--resume] [--max-steps N] [--out DIR] [--set S.K=V ...]

Multi-GPU / multi-node: start it under a launcher (one process per GPU), e.g.
    torchrun --nproc-per-node 4 -m haodiff_model.cli dpg --config pipelines/train_dpg.yaml
    accelerate launch --multi_gpu --num_processes 4 -m haodiff_model.cli dpg --config pipelines/train_dpg.yaml
    torchrun --nnodes 2 --node-rank R --master-addr HOST0 --master-port 29500 --nproc-per-node 8 \
        -m haodiff_model.cli dpg --config pipelines/train_dpg.yaml      # on each node R = 0, 1
Only rank 0 writes (logs, checkpoints); it also reads the checkpoint on --resume and sends it to the
other ranks, so nodes need no shared disk for the run folder (shards must be readable everywhere).
Each stage's module is imported only when its subcommand runs. Output and exit codes: haodiff_model/log.py
(as haodiff-data: 0 success, 2 bad arguments or a run that cannot start).
"""

from __future__ import annotations

import argparse
import sys

from haodiff_data.config import ConfigError
from haodiff_model.log import EXIT_USAGE, setup_logging, sigterm_as_ctrl_c, stop_reason


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/latest (starts fresh, and says so, when there is none)")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--out", default=None, help="override output.dir")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", default=[],
                   help="override any config value (YAML syntax), repeatable, e.g. --set train.lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haodiff-train", description="HAODiff trainers")
    sub = parser.add_subparsers(dest="stage", required=True)
    _add_common(sub.add_parser("dpg", help="stage 1: the triple-branch DPG (paper Sec. 3.2)"))
    _add_common(sub.add_parser("osd", help="stage 2: one-step diffusion with dual prompts (paper Sec. 3.3)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = setup_logging(f"haodiff-train {args.stage}")
    from haodiff_model.io.official import CheckpointMismatchError

    try:
        with sigterm_as_ctrl_c():
            if args.stage == "dpg":
                from haodiff_model.train.dpg import main_dpg

                return main_dpg(args)
            from haodiff_model.train.osd import main_osd

            return main_osd(args)
    except (ConfigError, CheckpointMismatchError, FileNotFoundError, FileExistsError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        what, code = stop_reason(exc)
        log.error("%s: rerun with --resume to continue from the last checkpoint saved in the run folder", what)
        return code


if __name__ == "__main__":
    sys.exit(main())
