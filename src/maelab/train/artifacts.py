"""What a pre-training run hands to the tracker and the disk besides its checkpoints: MLflow tags, the
manifest as a dataset, pictures, the encoder as safetensors and as an MLflow pytorch model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maelab.files import save_safetensors
from maelab.models.embedder import image_embedder
from maelab.paths import project_root
from maelab.train.checkpoint import TrainingState
from maelab.train.precision import autocast
from maelab.train.run import Run
from maelab.train.strategy import full_model_state
from maelab.train.tracking import Tracker

ENCODER = "encoder.safetensors"

# (model, batch, outputs) -> {name: PNG bytes}: logged every ``image_every`` steps and at the end
Pictures = Callable[[nn.Module, dict[str, Any], Any], dict[str, bytes]]


def log_pictures(
    run: Run, tracker: Tracker, pictures: Pictures | None, batch: Any, outputs: Any, step_done: int
) -> None:
    """The caller's pictures of this step (reconstruction grid, region maps, ...) to the tracker."""
    if pictures is None or not (run.dist.is_main and tracker.enabled):
        return
    with torch.no_grad(), autocast(run.precision, run.device):
        pngs = pictures(run.raw, batch, outputs)
    for name, png in pngs.items():
        tracker.log_image(png, name, step_done)


def start_tracking(
    run: Run,
    recipe: dict[str, Any],
    manifest: Any,
    mlflow: dict[str, Any] | None,
    state: TrainingState,
) -> Tracker:
    """The run's tracker (rank 0 only), started, or resumed on ``state.run_id``; a new run records its
    manifest as a dataset input."""
    tracker = Tracker(mlflow if run.dist.is_main else None, enabled=run.dist.is_main and mlflow is not None)
    new_run = state.run_id is None
    state.run_id = tracker.start(run.name, recipe, run_id=state.run_id, tags=run_tags(run))
    if new_run:
        tracker.log_dataset(manifest, manifest_source(recipe))
    return tracker


def run_tags(run: Run) -> dict[str, str]:
    """What identifies a run beyond its params: recipe, world size, precision and device type."""
    return {
        "maelab.recipe": run.name,
        "maelab.world_size": str(run.dist.world_size),
        "maelab.precision": str(run.precision),
        "maelab.device": run.device.type,
    }


def manifest_source(recipe: dict[str, Any]) -> Path:
    """Where the run's manifest comes from (``data.manifest``, relative to the project root)."""
    path = Path(recipe.get("data", {}).get("manifest", "data/02_intermediate/manifest.parquet"))
    return path if path.is_absolute() else project_root() / path


def log_encoder_model(run: Run, tracker: Tracker, batch: dict[str, Any], step: int) -> None:
    """The encoder as an MLflow pytorch model (``ImageEmbedder``: images -> CLS embeddings) with the first
    two images of the last batch as its input example."""
    encoder = getattr(run.raw, "encoder", run.raw)
    if not (tracker.active and hasattr(encoder, "forward_features")):
        return
    example = batch["image"][:2].detach().float().cpu()
    if example.shape[0] < 2:  # a batch of 2 lets torch.export keep the batch dimension dynamic
        example = example.repeat(2, 1, 1, 1)
    embedder = image_embedder(encoder)
    tracker.log_model(embedder, example, step, tags={"recipe": run.name})


def encoder_weights(run: Run) -> dict[str, torch.Tensor]:
    """The encoder's whole weights (gathered from FSDP shards; every rank calls it, rank 0 gets them)."""
    return full_model_state(run.raw, "encoder." if hasattr(run.raw, "encoder") else "")


def export_encoder(run: Run, steps: int, weights: dict[str, torch.Tensor]) -> str:
    meta = {"recipe": run.name, "steps": str(steps), "encoder_config": json.dumps(run.recipe["encoder"])}
    return str(save_safetensors(run.out / ENCODER, weights, meta))
