"""Where training stands when a plan is made: what a masker may condition on.

Self-guided MAE (Shi et al. 2024, §4) masks at random for the first epochs and then from the model's own
token relations, so a masker needs the step, the epoch and the run's length; an in-step masker also gets
the model (``MaskContext.model``). Worker-side maskers get the same context without the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MaskContext:
    """step: the optimiser step the plan is for (0-based); epoch: the data epoch of the sample or batch;
    total_steps: the run's number of optimiser steps (0 when unknown, e.g. a plain call or FLOP counting);
    model: the model being trained, for in-step maskers only (None in the DataLoader workers)."""

    step: int = 0
    epoch: int = 0
    total_steps: int = 0
    model: nn.Module | None = None

    @property
    def progress(self) -> float:
        """``step / total_steps`` in [0, 1] (0 when the length is unknown)."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0
