"""`pytorch_lora_weights.safetensors`: the UNet LoRA file of the official HAODiff release.

Layout (what the official `merge_unet` and diffusers' `load_lora_weights` read): one tensor per
LoRA factor, `unet.<module path>.lora_A.weight` (r, in[, kh, kw]) and `.lora_B.weight`
(out, r[, 1, 1]), no alpha entries, so the file means scale 1: W' = W + B @ A. The official
merge uses lora_alpha / lora_rank = 16 / 16 and diffusers sets alpha = r for such files, so a
model trained with another alpha / r has that scale folded into B when saved (and divided out
when loaded): the file always reproduces the trained UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from haodiff_model.osd import ADAPTER, lora_layers

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


def _target_file(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    return path / LORA_FILE


def save_lora_weights(unet: nn.Module, path: str | Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` into directory `path` (or to `path` if it ends in .safetensors)."""
    from safetensors.torch import save_file

    target = _target_file(path)
    tmp = target.with_name(target.name + ".tmp")
    save_file(lora_state_dict(unet), str(tmp), metadata={"format": "pt"})
    tmp.replace(target)
    return target


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (or of `pytorch_lora_weights.safetensors` inside a directory)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
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
    name = str(source) if not isinstance(source, Mapping) else "LoRA state dict"
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


__all__ = ["LORA_FILE", "LoraFileError", "LoraLoadReport", "load_lora_weights", "lora_modules_in",
           "lora_state_dict", "merge_lora_into_unet", "read_lora_file", "save_lora_weights"]
