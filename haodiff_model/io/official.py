"""The official HAODiff release's file formats: reading and writing them.

`img_encoder_weights.pth` (stage 2) is a torch.save dict {model_state_dict, swinir_kwargs,
performer_kwargs}, as the official `SwinIRWithDualPerformerAdapter.save` writes it. A stage-1
DPG checkpoint is a plain state dict of the official multi-branch `SwinIR`, which the official
adapter loads into its feature extractor by name; ours carry their architecture in `dpg.json`
beside them (haodiff's own file, restore/settings.py), since the official file has none.

The networks' `from_pretrained` / `save_pretrained` (and the restorer's LoRA methods) are the
entry points; they call the functions here, the one place that knows these layouts.

Loading never ignores a key silently: every key is loaded, or listed in the report as ignored
with the reason (a by-design official extra: derived buffers, the performer-pytorch duplicate
names, dead or training-only official modules), or reported as missing/unexpected, which raises
`CheckpointMismatchError` naming the keys unless strict=False. Shape mismatches always raise.
Official-layout saving writes the official key set, so the official code loads these files
even with strict=True.

`pytorch_lora_weights.safetensors`: the UNet LoRA file of the official HAODiff release.

Layout (what the official `merge_unet` and diffusers' `load_lora_weights` read): one tensor per
LoRA factor, `unet.<module path>.lora_A.weight` (r, in[, kh, kw]) and `.lora_B.weight`
(out, r[, 1, 1]), no alpha entries, so the file means scale 1: W' = W + B @ A. The official
merge uses lora_alpha / lora_rank = 16 / 16 and diffusers sets alpha = r for such files, so a
model trained with another alpha / r has that scale folded into B when saved (and divided out
when loaded): the file always reproduces the trained UNet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from haodiff_model.nets.dpg import DPGConfig, DPGFeatureExtractor, DPGNetwork
from haodiff_model.nets.performer import Performer, add_official_duplicates
from haodiff_model.nets.prompt import DualPromptEncoder, PromptEmbedderConfig
from haodiff_model.nets.restorer import ADAPTER, lora_layers
from haodiff_model.nets.swin import SwinTransformerBlock, WindowAttention, relative_position_index
from haodiff_model.restore.settings import diff_keys, dpg_sidecar, read_dpg_sidecar, write_dpg_sidecar

IMG_ENCODER_FILE = "img_encoder_weights.pth"
DPG_FILE = "dpg.pth"
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "model_state_dict")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not match the model."""


@dataclass
class LoadReport:
    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> why it was not loaded
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def ignored_by_reason(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, reason in self.ignored.items():
            out.setdefault(reason, []).append(key)
        return out

    def __str__(self) -> str:
        lines = [f"{self.source}: {'ok' if self.ok else 'MISMATCH'}"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for reason, keys in self.ignored_by_reason().items():
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            lines.append(f"  ignored {len(keys)} ({reason}): {shown}")
        return "\n".join(lines)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def official_extra_keys(model: nn.Module, keys) -> dict[str, tuple[str, bool]]:
    """Keys of official files that `model` does not hold: key -> (reason, dropped before loading).

    Not dropped (the modules' load hooks consume them): derived Swin buffers and the
    performer-pytorch duplicates.
    """
    rules: list[tuple[re.Pattern, str, bool, int]] = []  # pattern, reason, drop, first matching layer index
    for name, m in model.named_modules():
        p = re.escape(_prefix(name))
        if isinstance(m, SwinTransformerBlock):
            rules.append((re.compile(p + r"attn_mask$"), "shift mask, recomputed per token grid", False, 0))
        elif isinstance(m, WindowAttention):
            rules.append((re.compile(p + r"relative_position_index$"), "derived index, recomputed (checked)",
                          False, 0))
        elif isinstance(m, Performer):
            rules.append((re.compile(p + r"proj_updater\.instance\."),
                          "performer-pytorch duplicate of net.* (checked equal)", False, 0))
        elif isinstance(m, DualPromptEncoder):
            rules.append((re.compile(p + r"(embedding_changer[12]|fusion)\."),
                          "official training-only SDXL-discriminator / text-fusion head, not a prompt-encoder part",
                          True, 0))
        if isinstance(m, DPGFeatureExtractor):
            trunk = m.cfg.num_trunk_layers
            rules.append((re.compile(p + r"layers\.(\d+)\."),
                          f"dead official stage-1 RSTB (layers.{trunk}+), never used in its forward", True, trunk))
            if not isinstance(m, DPGNetwork):
                rules.append((re.compile(p + r"upsamplers\."), "stage-1 upsampler head, not part of the feature "
                              "extractor", True, 0))
    out = {}
    for key in keys:
        for pattern, reason, drop, first in rules:
            match = pattern.match(key)
            if match is None or (match.groups() and match.group(1).isdigit() and int(match.group(1)) < first):
                continue
            out[key] = (reason, drop)
            break
    return out


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "state dict") -> LoadReport:
    """Load `state_dict` into `model` by name, reporting every key that is not loaded."""
    sd = dict(state_dict)
    report = LoadReport(source)
    extras = official_extra_keys(model, sd)
    for key, (reason, drop) in extras.items():
        report.ignored[key] = reason
        if drop:
            del sd[key]
    own = model.state_dict()
    provided = set()
    for key in sd:
        if key in extras:
            if "proj_updater.instance." in key:  # supplies its net.* twin when that is absent
                provided.add(key.replace("proj_updater.instance.", "net.", 1))
            continue
        provided.add(key)
    bad_shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(provided & set(own)) if k in sd and sd[k].shape != own[k].shape]
    if bad_shapes:
        raise CheckpointMismatchError(f"{source}: shape mismatch: " + "; ".join(bad_shapes))
    report.missing = [k for k in own if k not in provided]
    report.unexpected = sorted(provided - set(own))
    if strict and not report.ok:
        raise CheckpointMismatchError(str(report) + "\n(pass strict=False to load the matching keys anyway)")
    result = model.load_state_dict(sd, strict=False)
    if sorted(result.missing_keys) != sorted(report.missing) or sorted(result.unexpected_keys) != report.unexpected:
        raise CheckpointMismatchError(f"{source}: load disagreed with the key check: missing {result.missing_keys}, "
                                      f"unexpected {result.unexpected_keys}")
    return report


def _load_file(path: str | Path, weights_only: bool = True) -> Mapping:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name and the way out
        raise CheckpointMismatchError(f"{path}: cannot be read with weights_only={weights_only} ({exc}); "
                                      "for a trusted file pass weights_only=False") from exc


def _strip_common_prefix(sd: dict[str, torch.Tensor], prefix: str, report: LoadReport) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        report.notes.append(f"stripped the '{prefix}' prefix of every key")
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def unwrap_dpg_state_dict(obj: Mapping, report: LoadReport, param_key: str | None = None) -> dict[str, torch.Tensor]:
    """The DPG state dict inside a stage-1 file, a BasicSR-style wrapper or an img_encoder file."""
    if param_key is not None:
        if param_key not in obj:
            raise CheckpointMismatchError(f"{report.source}: no '{param_key}' entry (has {sorted(obj)[:8]})")
        obj = obj[param_key]
        report.notes.append(f"took the '{param_key}' entry")
    elif {"step", "models", "optimizers"} <= set(obj):
        raise CheckpointMismatchError(f"{report.source} is a resumable training state (state.pt), not a weights "
                                      "file: continue that run with --resume, or use the dpg.pth next to it")
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wrappers = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(wrappers) != 1:
            raise CheckpointMismatchError(f"{report.source}: not a plain state dict; wrapper entries found: "
                                          f"{wrappers or sorted(obj)[:8]}; choose one with param_key=")
        obj = obj[wrappers[0]]
        report.notes.append(f"took the '{wrappers[0]}' entry")
    sd = {k: v for k, v in obj.items()}
    sd = _strip_common_prefix(sd, "module.", report)
    fe = {k[len("feature_extractor."):]: v for k, v in sd.items() if k.startswith("feature_extractor.")}
    if fe:
        others = len(sd) - len(fe)
        report.notes.append(f"took the {len(fe)} feature_extractor.* entries" + (f", left {others} others" if others
                                                                                  else ""))
        sd = fe
    return sd


def load_dpg_weights(model: DPGFeatureExtractor, source: str | Path | Mapping, strict: bool = True,
                     param_key: str | None = None, weights_only: bool = True) -> LoadReport:
    """Load DPG weights (stage-1 file, its state dict, or an img_encoder file) into an extractor or network."""
    if not isinstance(model, DPGFeatureExtractor):
        raise TypeError(f"load_dpg_weights expects a DPGFeatureExtractor or DPGNetwork, got {type(model).__name__}")
    name = str(source) if not isinstance(source, Mapping) else "DPG state dict"
    obj = source if isinstance(source, Mapping) else _load_file(source, weights_only)
    report = LoadReport(name)
    sd = unwrap_dpg_state_dict(obj, report, param_key)
    loaded = load_state_dict_checked(model, sd, strict, name)
    loaded.notes = report.notes + loaded.notes
    return loaded


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` plus the keys only the official modules have: performer-pytorch
    duplicates, attn_mask / relative_position_index buffers, and the stage-1 network's dead
    `layers.{n/2..}` (written as copies of branch 0, which the official code initialises them
    equal to and never uses)."""
    sd = add_official_duplicates(model, model.state_dict())
    for name, m in model.named_modules():
        if not isinstance(m, DPGFeatureExtractor):
            continue
        p = _prefix(name)
        geom = m.geometry(m.cfg.grid, m.cfg.grid, torch.device("cpu"))
        for sub, block in m.named_modules():
            if isinstance(block, SwinTransformerBlock) and block.shift:
                sd[f"{p}{sub}.attn_mask"] = geom.shift_mask.clone()
            elif isinstance(block, WindowAttention):
                sd[f"{p}{sub}.relative_position_index"] = relative_position_index(block.window)
        if isinstance(m, DPGNetwork):
            trunk = m.cfg.num_trunk_layers
            for key, value in m.branches[0].state_dict().items():
                j, rest = key.split(".", 1)
                sd[f"{p}layers.{trunk + int(j)}.{rest}"] = value.clone()
    return sd


def _cpu_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies that keep shared tensors shared (the performer duplicates), so they are stored once."""
    moved: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in sd.items():
        if id(v) not in moved:
            moved[id(v)] = v.detach().cpu()
        out[k] = moved[id(v)]
    return out


def _target_file(path: str | Path, name: str, suffixes: tuple[str, ...]) -> Path:
    """`path` itself when it names a file (one of `suffixes`), else `path`/`name`; parents are created."""
    path = Path(path)
    if path.suffix in suffixes:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    return path / name


def save_img_encoder(encoder: DualPromptEncoder, path: str | Path, official_layout: bool = True,
                     extra: Mapping[str, nn.Module] | None = None) -> Path:
    """Write `img_encoder_weights.pth` into directory `path` (or to `path` if it ends in .pth).

    `extra` modules are stored next to the encoder's keys under `name.` (the official training-mode
    file holds the SDXL embedding_changer1/2 this way). The file appears complete or not at all.
    """
    sd = official_state_dict(encoder) if official_layout else encoder.state_dict()
    for name, module in (extra or {}).items():
        sd.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    target = _target_file(path, IMG_ENCODER_FILE, (".pth", ".pt"))
    # Written under its own name in a scratch folder (torch.save names the archive inside after the
    # file, as the official file has it), then moved into place.
    scratch = target.parent / f".tmp-{target.name}"
    scratch.mkdir(exist_ok=True)
    torch.save({"model_state_dict": _cpu_state(sd), "swinir_kwargs": encoder.swinir_kwargs,
                "performer_kwargs": encoder.performer_kwargs}, scratch / target.name)
    (scratch / target.name).replace(target)
    scratch.rmdir()
    return target


def load_img_encoder(path: str | Path, strict: bool = True, attention: str = "sdpa",
                     weights_only: bool = True) -> tuple[DualPromptEncoder, LoadReport]:
    """Build a DualPromptEncoder from an img_encoder_weights.pth (file or its directory) and load it."""
    path = Path(path)
    if path.is_dir():
        path = path / IMG_ENCODER_FILE
    obj = _load_file(path, weights_only)
    for key in ("model_state_dict", "swinir_kwargs", "performer_kwargs"):
        if key not in obj:
            raise CheckpointMismatchError(f"{path}: no '{key}' entry; not an img_encoder_weights file")
    encoder = DualPromptEncoder(DPGConfig.from_swinir_kwargs(obj["swinir_kwargs"], attention),
                                PromptEmbedderConfig.from_performer_kwargs(obj["performer_kwargs"]))
    report = load_state_dict_checked(encoder, obj["model_state_dict"], strict, str(path))
    return encoder, report


def save_dpg(model: DPGFeatureExtractor, path: str | Path, official_layout: bool = True,
             with_config: bool = False) -> Path:
    """Write a stage-1 DPG checkpoint as a plain state dict (the file the official adapter loads)
    to `path` (a .pth/.pt file) or `path`/dpg.pth; `with_config` adds its architecture as dpg.json
    beside it, which `load_dpg` reads back."""
    path = _target_file(path, DPG_FILE, (".pth", ".pt"))
    sd = official_state_dict(model) if official_layout else model.state_dict()
    torch.save(_cpu_state(sd), path)
    if with_config:
        write_dpg_sidecar(path, model.cfg.to_swinir_kwargs())
    return path


def dpg_config_of(path: str | Path, config: DPGConfig | None = None) -> DPGConfig:
    """The architecture of the stage-1 file `path`: its dpg.json, else `config`; both must agree."""
    stored = read_dpg_sidecar(path)
    if stored is None:
        if config is None:
            raise CheckpointMismatchError(f"{path} carries no architecture and there is no {dpg_sidecar(path).name} "
                                          "beside it; give the DPGConfig it was trained with")
        return config
    attention = config.attention if config is not None else "sdpa"
    cfg = DPGConfig.from_swinir_kwargs(stored, attention)
    if config is not None:
        problems = diff_keys(config.to_swinir_kwargs(), cfg.to_swinir_kwargs(), "dpg")
        if problems:
            raise CheckpointMismatchError(f"the given DPGConfig contradicts {dpg_sidecar(path)}: " + "; ".join(problems))
    return cfg


def load_dpg(cls: type[DPGFeatureExtractor], path: str | Path, config: DPGConfig | None = None, strict: bool = True,
             param_key: str | None = None, weights_only: bool = True) -> tuple[DPGFeatureExtractor, LoadReport]:
    """Build `cls` (DPGNetwork or DPGFeatureExtractor) for the stage-1 file `path` (or `path`/dpg.pth),
    its architecture from dpg.json beside it or `config`, and load the weights."""
    path = Path(path)
    if path.is_dir():
        path = path / DPG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    model = cls(dpg_config_of(path, config))
    return model, load_dpg_weights(model, path, strict, param_key, weights_only)


LORA_FILE = "pytorch_lora_weights.safetensors"
PREFIX = "unet."
_A, _B = ".lora_A.weight", ".lora_B.weight"


class LoraFileError(RuntimeError):
    """A LoRA file whose keys or shapes do not match the UNet."""


@dataclass
class LoraLoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # module paths
    missing: list[str] = field(default_factory=list)  # file keys the model expects but the file lacks
    unexpected: list[str] = field(default_factory=list)  # file keys with no LoRA module in the model

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"{self.source}: {'ok' if self.ok else 'MISMATCH'}, {len(self.loaded)} LoRA modules loaded"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def _scale(layer: nn.Module) -> float:
    return float(layer.scaling[ADAPTER])


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The official-layout LoRA tensors of `unet` (CPU, float32 copies, scale folded into B)."""
    out = {}
    for name, layer in lora_layers(unet):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        out[PREFIX + name + _A] = a.detach().float().cpu().contiguous()
        out[PREFIX + name + _B] = (b.detach().float() * _scale(layer)).cpu().contiguous()
    if not out:
        raise LoraFileError("the UNet has no LoRA layers to save")
    return out


def save_lora_weights(unet: nn.Module, path: str | Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` into directory `path` (or to `path` if it ends in .safetensors)."""
    from safetensors.torch import save_file

    target = _target_file(path, LORA_FILE, (".safetensors",))
    tmp = target.with_name(target.name + ".tmp")
    save_file(lora_state_dict(unet), str(tmp), metadata={"format": "pt"})
    tmp.replace(target)
    return target


def _lora_path(path: str | Path) -> Path:
    path = Path(path)
    return path / LORA_FILE if path.is_dir() else path


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (or of `pytorch_lora_weights.safetensors` inside a directory)."""
    from safetensors.torch import load_file

    path = _lora_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return load_file(str(path))


def lora_modules_in(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], int]:
    """Module paths that carry LoRA in an official-layout state dict, and its rank."""
    bad = [k for k in state_dict if not (k.startswith(PREFIX) and k.endswith((_A, _B)))]
    if bad:
        raise LoraFileError(f"not official-layout LoRA keys (unet.<module>.lora_A/lora_B.weight): {bad[:8]}")
    names = sorted({k[len(PREFIX):-len(_A)] for k in state_dict})
    unpaired = [n for n in names if PREFIX + n + _A not in state_dict or PREFIX + n + _B not in state_dict]
    if unpaired:
        raise LoraFileError(f"LoRA modules without both lora_A and lora_B: {unpaired[:8]}")
    ranks = {state_dict[PREFIX + n + _A].shape[0] for n in names}
    if len(ranks) != 1:
        raise LoraFileError(f"LoRA file mixes ranks {sorted(ranks)}")
    return names, ranks.pop()


def load_lora_weights(unet: nn.Module, source: str | Path | Mapping[str, torch.Tensor],
                      strict: bool = True) -> LoraLoadReport:
    """Copy an official-layout LoRA file into the LoRA layers of `unet` (peft, adapter "default").

    Every key is accounted for: loaded, or reported missing/unexpected by name (which raises
    LoraFileError unless strict=False). Shape mismatches always raise.
    """
    name = str(_lora_path(source)) if not isinstance(source, Mapping) else "LoRA state dict"
    sd = dict(source) if isinstance(source, Mapping) else read_lora_file(source)
    report = LoraLoadReport(name)
    layers = dict(lora_layers(unet))
    expected = {PREFIX + n + suffix for n in layers for suffix in (_A, _B)}
    report.missing = sorted(expected - set(sd))
    report.unexpected = sorted(set(sd) - expected)
    if strict and not report.ok:
        raise LoraFileError(str(report) + "\n(pass strict=False to load the matching keys anyway)")
    bad = []
    for module_name, layer in layers.items():
        for suffix, param in ((_A, layer.lora_A[ADAPTER].weight), (_B, layer.lora_B[ADAPTER].weight)):
            key = PREFIX + module_name + suffix
            if key in sd and sd[key].shape != param.shape:
                bad.append(f"{key}: file {tuple(sd[key].shape)} vs model {tuple(param.shape)}")
    if bad:
        raise LoraFileError(f"{name}: shape mismatch: " + "; ".join(bad))
    with torch.no_grad():
        for module_name, layer in layers.items():
            a_key, b_key = PREFIX + module_name + _A, PREFIX + module_name + _B
            if a_key not in sd or b_key not in sd:
                continue
            layer.lora_A[ADAPTER].weight.copy_(sd[a_key])
            layer.lora_B[ADAPTER].weight.copy_(sd[b_key].float() / _scale(layer))
            report.loaded.append(module_name)
    return report


@torch.no_grad()
def merge_lora_into_unet(unet: nn.Module, source: str | Path | Mapping[str, torch.Tensor],
                         lora_rank: int = 16, lora_alpha: float = 16.0) -> list[str]:
    """The official `merge_unet` math on a plain (no-peft) UNet: for each lora_A key, the base
    weight `<module>.weight` gets W += s * B @ A, s = lora_alpha / lora_rank, convs through
    their flattened factors (A (r, in, kh, kw), B (out, r, 1, 1)). Returns the merged weight names.
    The official code's default arguments (16, 16) are the ones a released file is merged with.
    """
    sd = dict(source) if isinstance(source, Mapping) else read_lora_file(source)
    params = dict(unet.named_parameters())
    s = lora_alpha / lora_rank
    merged, unprocessed = [], []
    for key, a in sd.items():
        if "lora_A" not in key:
            if "lora_B" not in key:
                unprocessed.append(key)
            continue
        b_key = key.replace("lora_A", "lora_B")
        base = key.replace(_A, ".weight").removeprefix(PREFIX)
        if b_key not in sd or base not in params:
            unprocessed.append(key)
            continue
        w, b = params[base], sd[b_key]
        if w.ndim == 4:
            if a.ndim != 4 or b.shape[2:] != (1, 1) or a.shape[0] != lora_rank:
                raise LoraFileError(f"{key}: conv LoRA must be A (r={lora_rank}, in, kh, kw) and B (out, r, 1, 1), "
                                    f"got {tuple(a.shape)} and {tuple(b.shape)}")
            delta = (b.flatten(1).float() @ a.flatten(1).float()).view(w.shape)
        else:
            delta = b.float() @ a.float()
        if delta.shape != w.shape:
            raise LoraFileError(f"{key}: B @ A has shape {tuple(delta.shape)}, weight {base} has {tuple(w.shape)}")
        w.add_((s * delta).to(w.dtype))
        merged.append(base)
    if unprocessed:
        raise LoraFileError(f"keys the official merge does not process: {unprocessed[:8]}")
    return merged


__all__ = ["CheckpointMismatchError", "DPG_FILE", "IMG_ENCODER_FILE", "LORA_FILE", "LoadReport", "LoraFileError",
           "LoraLoadReport", "dpg_config_of", "load_dpg", "load_dpg_weights", "load_img_encoder", "load_lora_weights", "load_state_dict_checked",
           "lora_modules_in", "lora_state_dict", "merge_lora_into_unet", "official_extra_keys",
           "official_state_dict", "read_lora_file", "save_dpg", "save_img_encoder", "save_lora_weights",
           "unwrap_dpg_state_dict"]
