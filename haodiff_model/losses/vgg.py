"""VGG16 `features` stack in plain torch.nn, loadable from torchvision-format state dicts.

torchvision is not part of the CPU environment, so the convolutional trunk is rebuilt here with
the same module indices as `torchvision.models.vgg16().features`; a state dict saved from
torchvision (`features.{i}.weight` / `features.{i}.bias`, optionally with `classifier.*`) loads
into it unchanged.
"""

from pathlib import Path

import torch
from torch import nn

# Output channels per conv, "M" for a 2x2 max-pool: torchvision's configuration "D" (VGG16).
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)

# Indices of the ReLUs that close each of the five blocks (relu1_2, relu2_2, relu3_3, relu4_3,
# relu5_3) inside the features stack; each is followed by a max-pool.
VGG16_STAGE_RELU_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)


def vgg16_features() -> nn.Sequential:
    """Randomly initialised VGG16 feature stack, indexed exactly like torchvision's."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=True))
            in_channels = int(v)
    return nn.Sequential(*layers)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ValueError(f"{path}: not a torch state dict file ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (torchvision vgg16 format)")
    return state


def load_vgg16_features(path: str | Path) -> nn.Sequential:
    """Build the VGG16 feature stack and load its weights from a local file.

    Accepts a full torchvision vgg16 state dict (`features.*` plus `classifier.*`, the latter
    ignored) or one holding only `features.*`, as `.pth`/`.pt` or `.safetensors`. Missing,
    unexpected or mis-shaped keys raise a ValueError that names them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights not found: {path}")
    state = _read_state_dict(path)

    features = vgg16_features()
    expected = {f"features.{k}": v for k, v in features.state_dict().items()}
    provided = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    mis_shaped = sorted(
        f"{k} {tuple(provided[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(provided)
        if provided[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatch: {', '.join(mis_shaped)}")
    if problems:
        raise ValueError(f"{path}: not a torchvision vgg16 state dict; " + "; ".join(problems))

    features.load_state_dict({k.removeprefix("features."): v for k, v in provided.items()})
    return features
