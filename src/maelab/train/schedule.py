"""Learning-rate rule and schedule (MAE, He et al. 2022, §A.1 and its ``lr_sched``).

lr = blr x effective batch / 256 unless an absolute ``lr`` is given; per-iteration linear
warm-up from 0, then a half-cycle cosine from lr down to ``min_lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def base_lr(train_cfg: dict[str, Any], world_size: int = 1) -> float:
    """``train.lr`` if set, else ``blr * batch_size * accum_steps * world_size / 256`` (linear scaling)."""
    if train_cfg.get("lr") is not None:
        return float(train_cfg["lr"])
    effective = int(train_cfg["batch_size"]) * int(train_cfg.get("accum_steps", 1)) * world_size
    return float(train_cfg["blr"]) * effective / 256


@dataclass(frozen=True)
class CosineSchedule:
    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        """lr of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_steps(train_cfg: dict[str, Any], steps_per_epoch: int) -> tuple[int, int]:
    """``(total, warmup)`` optimiser steps; ``steps``/``warmup_steps`` win over ``(warmup_)epochs``."""
    if train_cfg.get("steps"):
        total = int(train_cfg["steps"])
    elif train_cfg.get("epochs"):
        total = int(train_cfg["epochs"]) * steps_per_epoch
    else:
        raise ValueError("recipe train: set train.steps or train.epochs")
    if train_cfg.get("warmup_steps") is not None:
        warmup = int(train_cfg["warmup_steps"])
    else:
        warmup = int(train_cfg.get("warmup_epochs") or 0) * steps_per_epoch
    return total, min(warmup, total)
