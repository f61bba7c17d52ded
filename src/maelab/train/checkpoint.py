"""Checkpoints are data: tensors and plain python values, saved atomically (tmp + ``os.replace``)
and loaded with ``torch.load(weights_only=True)``. The encoder is also exported as safetensors.

A training checkpoint is the model, optimiser and scaler plus a :class:`TrainingState` (the step done,
the data position, the loss history, the MLflow run) and every rank's RNG states: what an exact resume
needs (see ``train/data.py`` for why the data position is enough for the data order).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maelab.files import atomic_write, torch_load_weights
from maelab.train import distributed as D

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, cuda, numpy, python) as weights_only-safe values."""
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global RNG is what we save)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np_state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    np.random.set_state(np_state)  # noqa: NPY002
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, required: Iterable[str] = ()) -> dict[str, Any]:
    """A checkpoint dict; ``required`` keys must be present (the error names the key and the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    state = torch_load_weights(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint has no {missing[0]!r} key (needed to resume: {list(required)})")
    return state


@dataclass
class TrainingState:
    """Where a run stands: ``step`` optimiser steps done, ``consumed`` micro-batches drawn by this rank,
    the per-step ``history`` and the MLflow ``run_id``; ``rng``: every rank's RNG states when resumed."""

    step: int = 0
    consumed: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "lr": []})
    run_id: str | None = None
    rng: list[dict[str, Any]] | None = None

    def restore_rng(self, rank: int) -> None:
        """This rank's saved RNG states (call after building everything that might draw random numbers)."""
        if self.rng:
            set_rng_state(self.rng[rank] if rank < len(self.rng) else self.rng[0])


def save_training_state(
    path: Path,
    state: TrainingState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    meta: dict[str, Any],
) -> None:
    """Every rank calls it (it gathers every rank's RNG for an exact resume under DDP); rank 0 writes.

    meta: ``batches_per_epoch``, ``total_steps``, ``schedule``, ``world_size``, ``batch_size``, ``recipe``."""
    rngs = D.all_gather_object(rng_state())
    if D.rank() == 0:
        bpe = meta["batches_per_epoch"]
        data = {"epoch": state.consumed // bpe, "batch": state.consumed % bpe, "consumed": state.consumed}
        save_checkpoint(
            path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": state.step,
                "total_steps": meta["total_steps"],
                "schedule": meta["schedule"],
                "data": data,
                "rng": rngs,
                "history": state.history,
                "mlflow_run_id": state.run_id,
                "world_size": meta["world_size"],
                "batch_size": meta["batch_size"],
                "recipe": meta["recipe"],
            },
        )
    D.barrier()


RESUME_KEYS = ("model", "optimizer", "step", "data", "history", "rng")


def load_training_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    meta: dict[str, Any],
    schedule_changes: bool = False,
) -> TrainingState:
    """Load weights, optimiser and scaler in place; return the run's state (RNG: ``restore_rng``).

    meta: this run's (as for :func:`save_training_state`); a changed world size, batch size or schedule
    is warned about, since the resumed run then no longer reproduces the saved one. schedule_changes: a
    new schedule is expected (a continuation with more steps), not warned about."""
    ckpt = load_checkpoint(path, required=RESUME_KEYS)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: field 'model' does not fit this recipe's model: {err}") from err
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    warn_changes(path, ckpt, {**meta, "schedule": ckpt.get("schedule")} if schedule_changes else meta)
    return TrainingState(
        int(ckpt["step"]),
        int(ckpt["data"]["consumed"]),
        ckpt["history"],
        ckpt.get("mlflow_run_id"),
        ckpt["rng"],
    )


def warn_changes(path: Path, ckpt: dict[str, Any], meta: dict[str, Any]) -> None:
    if ckpt.get("world_size") != meta["world_size"] or ckpt.get("batch_size") != meta["batch_size"]:
        log.warning(
            "%s: saved with world_size=%s batch_size=%s, resuming with %s/%s: data order is not exact",
            path,
            ckpt.get("world_size"),
            ckpt.get("batch_size"),
            meta["world_size"],
            meta["batch_size"],
        )
    saved, now = ckpt.get("schedule"), meta["schedule"]
    if saved is not None and saved != now:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
        log.warning(
            "%s: resuming with a different schedule (%s; train.steps / blr / lr / warm-up changed): the "
            "run continues on the new schedule and no longer reproduces the original one",
            path,
            changed,
        )
