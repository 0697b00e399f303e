"""`haodiff-restore dpg`: what a stage-1 DPG sees in given images, one picture per image.

    haodiff-restore dpg INPUTS... --dpg runs/dpg/dpg.pth --out DIR [--dpg-config CONFIG] [--resize 512]

Each picture is LQ | HQ estimate | residual | HMB mask: the three heads of the stage-1 network
(inputs in [-1, 1] as stage 1 trains; residual shown as |LQ - HQ| x 4, mask as sigmoid of the
logits). The architecture comes from dpg.json beside the checkpoint (or --dpg-config).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from haodiff_model.log import EXIT_OK, EXIT_REJECTS, EXIT_USAGE, setup_logging
from haodiff_model.nets.dpg import DPGNetwork
from haodiff_model.restore.convert import dpg_config_for
from haodiff_model.restore.run import plan_jobs, run_restore, write_rejects

RESIDUAL_GAIN = 4.0
log = logging.getLogger(__name__)


@torch.no_grad()
def dpg_panels(model: DPGNetwork, images: list[np.ndarray], resize: int | None = None) -> list[np.ndarray]:
    """LQ | HQ | residual | mask panels (uint8) for same-size RGB uint8 images."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1
    if resize is not None:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    hq, residual, mask = model(x)

    def rgb(t: torch.Tensor) -> torch.Tensor:
        return ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    res = (residual.abs().mean(dim=1, keepdim=True) * 127.5 * RESIDUAL_GAIN).clamp(0, 255).round().to(torch.uint8)
    prob = (torch.sigmoid(mask) * 255).round().to(torch.uint8)
    panels = torch.cat([rgb(x), rgb(hq), res.expand(-1, 3, -1, -1), prob.expand(-1, 3, -1, -1)], dim=3)
    return [p.permute(1, 2, 0).cpu().numpy() for p in panels]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="haodiff-restore dpg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files, folders, .txt lists, globs, .tar shards")
    p.add_argument("--dpg", type=Path, required=True, help="stage-1 checkpoint (dpg.pth)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dpg-config", type=Path, default=None, help="training config whose dpg section describes --dpg")
    p.add_argument("--resize", type=int, default=None, help="square side the images are resized to (default: native)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    setup_logging("haodiff-restore dpg")
    from haodiff_model.io.official import CheckpointMismatchError
    from haodiff_model.config import ConfigError
    from haodiff_model.restore.settings import SettingsError

    try:
        model = DPGNetwork.from_pretrained(args.dpg, dpg_config_for(args.dpg, args.dpg_config))
        model = model.to(args.device).eval()
        jobs, rejects = plan_jobs(args.inputs, args.out)
    except (FileNotFoundError, SettingsError, ConfigError, CheckpointMismatchError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    summary = run_restore(lambda ims: dpg_panels(model, ims, args.resize), jobs, 1, args.overwrite,
                          not args.no_progress)
    summary.rejected = rejects + summary.rejected
    path = write_rejects(args.out, 0, summary.rejected)
    log.info(f"haodiff-restore dpg: {summary.line()}" + (f"; reasons in {path}" if path else ""))
    return EXIT_REJECTS if summary.rejected else EXIT_OK


__all__ = ["dpg_panels", "main"]
