"""Exponential moving average of a model's weights: validated and exported in place of the raw
weights when a trainer's `train.ema_decay` is set."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from haodiff_model.io.official import CheckpointMismatchError


class EMA:
    """Exponential moving average of named parameters (float32 shadows on their device)."""

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float):
        self.decay = decay
        self.params = dict(params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        torch._foreach_lerp_([self.shadow[n] for n in names], [self.params[n].detach().float() for n in names],
                             1 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """The parameters take the EMA values for good (at the end of training)."""
        for n, p in self.params.items():
            p.copy_(self.shadow[n])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA values."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise CheckpointMismatchError("checkpoint EMA: parameter names differ from the model's")
        for n, v in state.items():
            self.shadow[n].copy_(v)


def maybe_swapped(ema: EMA | None) -> contextlib.AbstractContextManager:
    """The EMA weights within the block, or the raw ones without an EMA."""
    return ema.swapped() if ema is not None else contextlib.nullcontext()


def load_ema_state(ema: EMA | None, state: Mapping) -> None:
    """Restore the EMA of a checkpoint's state (its "ema" entry); an EMA run cannot resume a
    checkpoint saved without one."""
    if ema is None:
        return
    if state.get("ema") is None:
        raise CheckpointMismatchError("train.ema_decay is set but the checkpoint has no EMA; resume without EMA")
    ema.load_state_dict(state["ema"])
