"""`haodiff-restore convert`: a stage-1 DPG checkpoint plus prompt embedders -> img_encoder_weights.pth.

    haodiff-restore convert --dpg runs/dpg/dpg.pth --out DIR [--prompt-from img_encoder_weights.pth]
                            [--dpg-config CONFIG.yaml] [--seed N]

The DPG architecture comes from `dpg.json` beside the checkpoint (haodiff-train dpg writes it), or
from the `dpg` section of a training config (--dpg-config) for older files. The prompt embedders
come from an existing img_encoder file (--prompt-from: the official release's or a stage-2 run's;
its DPG weights are replaced, its embedders kept), or are freshly initialised from --seed with the
paper's configuration (what stage 2 starts from). The result is written in the official layout,
so the official inference code, `haodiff-train osd` (model.init_img_encoder) and haodiff-restore
read it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from haodiff_model.io.official import IMG_ENCODER_FILE, CheckpointMismatchError, dpg_config_of, load_dpg_weights
from haodiff_model.nets.dpg import DPGConfig
from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig
from haodiff_model.log import EXIT_OK, EXIT_USAGE, setup_logging
from haodiff_model.restore.settings import SettingsError, diff_keys

log = logging.getLogger(__name__)


def dpg_config_for(dpg_path: Path, config_yaml: Path | None) -> DPGConfig:
    """The stage-1 architecture: the sidecar, else a training config's `dpg` section; both must agree."""
    given = DPGConfig.from_yaml(config_yaml) if config_yaml is not None else None
    try:
        return dpg_config_of(dpg_path, given)
    except CheckpointMismatchError as exc:
        where = f"--dpg-config {config_yaml}: " if given is not None else ""
        hint = "" if given is not None else " (the stage-1 training config, with --dpg-config)"
        raise SettingsError(f"{where}{exc}{hint}") from None


def convert(dpg_path: Path, out: Path, prompt_from: Path | None = None, config_yaml: Path | None = None,
            seed: int = 0) -> tuple[Path, list[str]]:
    dpg_cfg = dpg_config_for(dpg_path, config_yaml)
    notes = []
    if prompt_from is not None:
        encoder, report = DualPromptEncoder.from_pretrained(prompt_from, output_loading_info=True)
        notes.append(f"prompt embedders from {report.source}")
        problems = diff_keys({"embed_dim": dpg_cfg.embed_dim, "kept_branches": list(dpg_cfg.kept_branches)},
                             {"embed_dim": encoder.dpg_config.embed_dim,
                              "kept_branches": list(encoder.dpg_config.kept_branches)}, "dpg")
        if problems:
            raise SettingsError(f"the prompt embedders of {prompt_from} take another DPG's tokens: " + "; ".join(problems))
        fresh = DualPromptEncoder(dpg_cfg, encoder.prompt_config, torch.Generator().manual_seed(seed))
        fresh.main_performer.load_state_dict(encoder.main_performer.state_dict())
        fresh.aux_performer.load_state_dict(encoder.aux_performer.state_dict())
        encoder = fresh
    else:
        encoder = DualPromptEncoder(dpg_cfg, PromptEmbedderConfig(), torch.Generator().manual_seed(seed))
        notes.append(f"prompt embedders freshly initialised (paper configuration, seed {seed})")
    notes.append(str(load_dpg_weights(encoder.feature_extractor, dpg_path)).splitlines()[0])
    return encoder.save_pretrained(out), notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="haodiff-restore convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dpg", type=Path, required=True, help="stage-1 checkpoint (haodiff-train dpg's dpg.pth)")
    p.add_argument("--out", type=Path, required=True, help=f"folder for {IMG_ENCODER_FILE} (or a .pth path)")
    p.add_argument("--prompt-from", type=Path, default=None, help="img_encoder_weights.pth whose embedders to keep")
    p.add_argument("--dpg-config", type=Path, default=None, help="training config whose dpg section describes --dpg")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of fresh prompt embedders")
    args = p.parse_args(argv)
    setup_logging("haodiff-restore convert")
    from haodiff_model.config import ConfigError

    try:
        path, notes = convert(args.dpg, args.out, args.prompt_from, args.dpg_config, args.seed)
    except (FileNotFoundError, SettingsError, ConfigError, CheckpointMismatchError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    for note in notes:
        log.info(note)
    log.info(f"haodiff-restore convert: wrote {path}")
    return EXIT_OK


__all__ = ["convert", "dpg_config_for", "main"]
