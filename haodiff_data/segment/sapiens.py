"""Sapiens lite body-part segmentation (Goliath-28) with plain torch (data_spec C.1, C.4).

The user supplies the checkpoint: TorchScript (``*_torchscript.pt2``, run in fp32) or an exported
program (``*.pt2`` from ``torch.export``, run in bf16 on CUDA). ``precision`` overrides that:
``tf32`` lets CUDA matrix products use TF32 (a random-weight Sapiens-0.3B-sized TorchScript ran
18.1 instead of 11.0 images/s on an H200, 99.86% of pixels labelled as in fp32), ``bf16`` casts
the weights. torch is imported here only, so the rest of haodiff_data works without it.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from haodiff_data.segment import Segmentation, check_rgb, instances_from_parts
from haodiff_data.segment.goliath import NUM_CLASSES

INPUT_HW = (1024, 768)  # fixed by the export; the maintainers say not to change it
MEAN = (123.5, 116.5, 103.5)  # RGB, 0-255 scale
STD = (58.5, 57.0, 57.5)


PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str | None, device: str) -> None:
    if precision is None:
        return
    if precision not in PRECISIONS:
        raise ValueError(f"sapiens precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "tf32" and not device.startswith("cuda"):
        raise ValueError(f"sapiens precision tf32 applies to CUDA matrix products only, not to --device {device}")


def is_torchscript(path: str) -> bool:
    """TorchScript by name (the Sapiens convention) or by content (a ``constants.pkl`` record)."""
    if "_torchscript" in os.path.basename(path):
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())
    except zipfile.BadZipFile:
        return False


def check_checkpoint(checkpoint: str, device: str) -> None:
    """Fail fast, before a run starts, on what can be known without loading the model: a missing
    file, a file that is no torch archive, a device this machine does not have."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"sapiens checkpoint not found: {checkpoint}")
    if not zipfile.is_zipfile(checkpoint):
        raise ValueError(f"sapiens checkpoint {checkpoint}: not a TorchScript or torch.export archive; "
                         "pass a Sapiens lite *_torchscript.pt2 file")
    try:
        import torch
    except ImportError as exc:
        raise ImportError("segmenter 'sapiens' needs torch: pip install 'haodiff[sapiens]'") from exc
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: not a torch device (cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); use --device cpu or a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported")


def padded_size(height: int, width: int) -> tuple[int, int]:
    """Smallest 3:4 portrait (H:W = 4:3) size that contains ``height`` x ``width``."""
    num, den = INPUT_HW
    return max(height, math.ceil(width * num / den)), max(width, math.ceil(height * den / num))


def _static_batch(program: Any) -> int | None:
    """Batch size an exported program was specialised to, or None when it is dynamic."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs and "val" in node.meta:
            batch = node.meta["val"].shape[0]
            return batch if isinstance(batch, int) else None
    return None


class SapiensSegmenter:
    """Batched Sapiens inference; 512x512 crops are padded to 3:4, not stretched.

    Images of any sizes may share a batch. An exported program specialised to a fixed batch
    size runs in chunks of exactly that size (the last one padded with zero images).
    """

    name = "sapiens"
    per_source = False

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 4, precision: str | None = None) -> None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"sapiens checkpoint not found: {checkpoint}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        check_precision(precision, device)
        try:
            import torch
        except ImportError as exc:
            raise ImportError("segmenter 'sapiens' needs torch: pip install 'haodiff[sapiens]'") from exc
        self.checkpoint = checkpoint
        # The precision changes the labels, so it is part of what the samples record.
        self.model_id = os.path.basename(checkpoint) + (f"@{precision}" if precision else "")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.static_batch: int | None = None
        # What the run summary reports: how full the forwards were.
        self.forwards = 0
        self.images = 0
        try:
            if is_torchscript(checkpoint):
                with warnings.catch_warnings():
                    # Sapiens lite ships TorchScript; torch's deprecation notice is not actionable here.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.model = torch.jit.load(checkpoint, map_location=self.device).eval()
                self.dtype = torch.float32
            else:
                program = torch.export.load(checkpoint)
                self.static_batch = _static_batch(program)
                # bf16 is how the lite exports are meant to run on GPUs; CPUs run them in fp32.
                self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
                # Exported modules are already in inference form (and refuse .eval()).
                self.model = program.module().to(self.device, self.dtype)
            if precision in ("fp32", "tf32"):
                self.model = self.model.float()
                self.dtype = torch.float32
            elif precision == "bf16":
                self.model = self.model.to(torch.bfloat16)
                self.dtype = torch.bfloat16
            if precision == "tf32":
                # A process-wide switch: in synth's workers only the segmenter computes with torch.
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
        except Exception as exc:
            hint = ("" if is_torchscript(checkpoint) else
                    "; Sapiens' *_bfloat16.pt2 files are torch.export programs tied to the torch that wrote "
                    "them (2.3): use the *_torchscript.pt2 file of the same model")
            raise ValueError(f"sapiens checkpoint {checkpoint}: cannot load it with torch {torch.__version__}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{hint}") from exc
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)

    def _prepare(self, image: np.ndarray) -> Any:
        """Normalised 1x3x1024x768 input. The image is padded to 3:4 with the mean colour (zero
        after normalisation) before resizing: reflect padding would mirror limbs cut by the crop
        edge into extra anatomy that the model might label and that leaks back into the crop
        through its receptive field; a flat neutral border reads as plain background."""
        import torch
        import torch.nn.functional as F

        height, width = image.shape[:2]
        ph, pw = padded_size(height, width)
        top, left = (ph - height) // 2, (pw - width) // 2
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float()
        x = (x - self.mean) / self.std
        x = F.pad(x, (left, pw - width - left, top, ph - height - top), value=0.0)
        return F.interpolate(x, size=INPUT_HW, mode="bilinear", align_corners=False)

    def _run(self, batch: Any) -> Any:
        import torch

        n = batch.shape[0]
        if self.static_batch is not None and n < self.static_batch:
            batch = torch.cat([batch, batch.new_zeros((self.static_batch - n, *batch.shape[1:]))])
        with torch.inference_mode():
            logits = self.model(batch.to(self.dtype))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if logits.ndim != 4 or logits.shape[1] != NUM_CLASSES or logits.shape[0] < n:
            raise ValueError(
                f"sapiens checkpoint {self.checkpoint}: expected logits of shape ({n}, {NUM_CLASSES}, h, w) "
                f"(Goliath-28), got {tuple(logits.shape)}"
            )
        self.forwards += 1
        self.images += n
        return logits[:n].float()

    @property
    def forward_size(self) -> int:
        """Images per forward: the exported program's fixed batch, else ``batch_size``."""
        return self.static_batch or self.batch_size

    def labels(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Goliath part labels (uint8 HxW) of each image, ``forward_size`` images per forward."""
        import torch
        import torch.nn.functional as F

        check_rgb(images)
        if self.model is None:
            raise RuntimeError(f"sapiens segmenter for {self.checkpoint} is closed")
        step = self.forward_size
        out: list[np.ndarray] = []
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            logits = self._run(torch.cat([self._prepare(im) for im in chunk]))
            for image, logit in zip(chunk, logits):
                height, width = image.shape[:2]
                ph, pw = padded_size(height, width)
                top, left = (ph - height) // 2, (pw - width) // 2
                up = F.interpolate(logit[None], size=(ph, pw), mode="bilinear", align_corners=False)[0]
                crop = up[:, top : top + height, left : left + width]
                out.append(crop.argmax(dim=0).to(torch.uint8).cpu().numpy())
        return out

    def segment(self, images: Sequence[np.ndarray]) -> list[Segmentation]:
        # Sapiens labels parts, not people: instances are its connected regions.
        return [Segmentation(parts, instances_from_parts(parts)) for parts in self.labels(images)]

    def close(self) -> None:
        self.model = None
