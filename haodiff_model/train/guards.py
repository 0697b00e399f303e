"""Training-health checks for stage 1: saturated or dead heads and a diverging loss.

A stage-1 run can look fine in its loss while a head has stopped learning: at the paper's settings
the mask head's logits run to about +2000 within a few hundred steps, its sigmoid is exactly 1 and
its gradient ~1e-9 (issue #12), and stage 2 then gets no HMB guidance. `Stage1Guard.check` reads
the metrics the trainer logs (means over a log window) and returns the warnings to print.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# sigmoid'(30) = 9e-14: past this the mask head's output no longer moves whatever the loss says
SATURATED_LOGIT = 30.0
# a head whose gradient norm fell this far below its first logged value has stopped learning
VANISHED_GRAD_RATIO = 1e-3
# "all ones" / "all zeros": at most this fraction of pixels on the other side of 0.5
CONSTANT_RATE = 1e-3
# the loss is diverging when its window mean exceeds the best one so far by this factor
DIVERGED_LOSS_RATIO = 3.0

HEADS = ("hq", "residual", "mask")


class Stage1Guard:
    """Remembers each head's first gradient norm and the best loss; `check` is called per log record."""

    def __init__(self) -> None:
        self.first_grad: dict[str, float] = {}
        self.best_loss = math.inf

    def check(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """Warnings (without the step; the caller prefixes it) for the `train/*` metrics of `step`."""
        warnings = []
        for head in HEADS:
            norm = metrics[f"train/grad_norm_{head}"]
            first = self.first_grad.setdefault(head, norm)
            if norm == 0 or (first > 0 and norm < VANISHED_GRAD_RATIO * first):
                warnings.append(f"{head} head gradient vanished: |g| {norm:.2e} (first logged {first:.2e})")
        logit = metrics["train/mask_logit_absmax"]
        if logit > SATURATED_LOGIT:
            warnings.append(f"mask head saturated: |logit| up to {logit:.3g}, sigmoid gradient < 1e-13 "
                            "(try loss.mask_logit_bound, loss.dice_reduction=batch, bce_weight > 0 or a lower lr)")
        pos, true = metrics["train/mask_pos_rate"], metrics["train/mask_true_rate"]
        if CONSTANT_RATE < true < 1 - CONSTANT_RATE:
            if pos >= 1 - CONSTANT_RATE:
                warnings.append(f"mask head predicts all ones ({100 * pos:.1f}% positive, "
                                f"{100 * true:.1f}% of pixels are HMB)")
            elif pos <= CONSTANT_RATE:
                warnings.append(f"mask head predicts all zeros ({100 * pos:.2f}% positive, "
                                f"{100 * true:.1f}% of pixels are HMB)")
        loss = metrics["train/loss"]
        if loss > DIVERGED_LOSS_RATIO * self.best_loss:
            warnings.append(f"loss diverging: {loss:.4g} against a best of {self.best_loss:.4g}")
        self.best_loss = min(self.best_loss, loss)
        return warnings


__all__ = ["CONSTANT_RATE", "DIVERGED_LOSS_RATIO", "SATURATED_LOGIT", "Stage1Guard", "VANISHED_GRAD_RATIO"]
