"""What a training run returns and reports (``data/08_reporting/pretrain_<recipe>.json``)."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any

import torch

AVERAGE_OVER = 20  # first/last loss in reports: mean of this many steps


@dataclass
class TrainResult:
    recipe: str
    steps: int
    history: dict[str, list[float]]  # "loss", "lr", "loss/<head>" per optimiser step since step 0
    images_per_s: float
    wall_s: float
    peak_mem_mb: float
    out_dir: str
    checkpoint_path: str
    encoder_path: str | None = None
    mlflow_run_id: str | None = None
    start_step: int = 0
    precision: str = "fp32"
    world_size: int = 1
    speed: dict[str, float | None] = field(default_factory=dict)  # step_ms, data_wait_ms, compile_s, mfu...

    def report(self) -> dict[str, Any]:
        """Summary for ``data/08_reporting/pretrain_<recipe>.json``: first/last loss are 20-step means."""

        def first_last(xs: list[float]) -> dict[str, float | None]:
            k = min(AVERAGE_OVER, len(xs))
            return {
                "first_loss": sum(xs[:k]) / k if xs else None,
                "last_loss": sum(xs[-k:]) / k if xs else None,
            }

        heads = {k.split("/", 1)[1]: first_last(v) for k, v in self.history.items() if k.startswith("loss/")}
        keep = ("images_per_s", "wall_s", "peak_mem_mb", "precision", "world_size")
        return {
            "recipe": self.recipe,
            "steps": self.steps,
            **first_last(self.history.get("loss", [])),
            **{k: getattr(self, k) for k in keep},
            **self.speed,
            "heads": heads,
            "mlflow_run_id": self.mlflow_run_id,
            "encoder_path": self.encoder_path,
            "checkpoint_path": self.checkpoint_path,
        }


def peak_memory_mb(device: torch.device) -> float:
    """CUDA ``max_memory_allocated``, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
