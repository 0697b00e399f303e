"""Layers and helpers shared by the networks: a LayerNorm with a compiled CUDA path, the
torch.compile runner and PyTorch's default Linear/Conv init from an explicit generator."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


# The torch.compile'd kernels are on unless the process starts with HAODIFF_COMPILE=0 (read once);
# `compiled_kernels(False)` switches them off for a block (the benchmark's eager baseline).
_COMPILED = [os.environ.get("HAODIFF_COMPILE", "1") != "0"]


def compiled_kernels_enabled(x: torch.Tensor) -> bool:
    """Whether to use the torch.compile'd (Triton) kernels: for CUDA tensors, unless switched off.

    They replace eager chains that are slow on GPU for this model's shapes (see LayerNorm and the
    FAVOR+ feature map); inside an enclosing torch.compile they are simply inlined.
    """
    return x.is_cuda and _COMPILED[0]


@contextlib.contextmanager
def compiled_kernels(enabled: bool) -> Iterator[None]:
    """Use (or not) the compiled kernels inside this block."""
    old, _COMPILED[0] = _COMPILED[0], enabled
    try:
        yield
    finally:
        _COMPILED[0] = old


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # One small kernel serves every width, dtype and grad mode of a run (training, validation, the
    # frozen prompt path): more variants than dynamo's default limit of 8, past which it silently
    # runs the slow eager code (seen on an H200 in the benchmark's prompt path).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=None)


def run_compiled(fn: Callable, *args):
    """fn(*args) through torch.compile, compiled on first use (importing the compiler takes seconds);
    plain fn inside an enclosing compile, which fuses it with its neighbours anyway."""
    if torch.compiler.is_compiling():
        return fn(*args)
    return _compiled(fn)(*args)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same state); on CUDA a compiled kernel when the width is not a multiple of 8.

    PyTorch's CUDA LayerNorm vectorises only widths divisible by its vector size; for C = 150 it
    falls back to a two-kernel path that took ~90 us per call on a (16384, 150) bf16 input on an
    H100, 44% of the DPG extractor's time. One fused Triton row kernel does it in a single pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalized_shape[0] % 8 and self.weight is not None and compiled_kernels_enabled(x):
            return run_compiled(_layer_norm, x, self.weight, self.bias, self.eps)
        return super().forward(x)


def init_default_(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv init (kaiming_uniform a=sqrt(5), bias U(+-1/sqrt(fan_in)))."""
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)


__all__ = ["LayerNorm", "compiled_kernels", "compiled_kernels_enabled", "init_default_", "run_compiled"]
