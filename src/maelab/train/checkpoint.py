"""Checkpoints are data: tensors and plain python values, saved atomically (tmp + ``os.replace``)
and loaded with ``torch.load(weights_only=True)``. The encoder is also exported as safetensors.

A training checkpoint is the model, optimiser and scaler plus a :class:`TrainingState` (the step done,
the data position, the loss history, the MLflow run) and every rank's RNG states: what an exact resume
needs (see ``train/data.py`` for why the data position is enough for the data order).

Two formats, either resumed by any strategy at any world size: ``checkpoint.pt`` (one file, rank 0 writes
the gathered state; what DDP writes by default) and ``checkpoint.dcp/`` (``torch.distributed.checkpoint``:
each rank writes its own shards; FSDP's default), chosen by ``train.checkpoint_format``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
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


CHECKPOINT_FILE = "checkpoint.pt"  # one torch file: the whole state, written by rank 0
CHECKPOINT_DCP = "checkpoint.dcp"  # a torch.distributed.checkpoint folder: every rank writes its shards
TRAIN_STATE = "train_state.pt"  # in a DCP folder: step, data position, RNGs, history (rank 0)
FORMATS = ("file", "dcp")


def checkpoint_path(out: Path, fmt: str) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"train.checkpoint_format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return out / (CHECKPOINT_FILE if fmt == "file" else CHECKPOINT_DCP)


def latest_checkpoint(out: Path) -> Path | None:
    """The newer of ``out/checkpoint.pt`` and ``out/checkpoint.dcp`` (either resumes any strategy)."""
    found = [p for p in (out / CHECKPOINT_FILE, out / CHECKPOINT_DCP / TRAIN_STATE) if p.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime_ns)
    return newest.parent if newest.name == TRAIN_STATE else newest


def save_training_state(
    path: Path,
    state: TrainingState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    meta: dict[str, Any],
) -> None:
    """Every rank calls it (it gathers every rank's RNG for an exact resume, and the shards under FSDP).

    ``path`` ending in ``.dcp``: a ``torch.distributed.checkpoint`` folder (every rank writes its shards;
    loadable at any world size); else one torch file written by rank 0. Model and optimiser state are keyed
    by parameter name, without wrapper prefixes (``maelab.train.strategy``), so DDP and FSDP runs resume
    each other's checkpoints. meta: ``batches_per_epoch``, ``total_steps``, ``schedule``, ``world_size``,
    ``batch_size``, ``recipe``."""
    from maelab.train.strategy import full_state, sharded_state

    rngs = D.all_gather_object(rng_state())
    bpe = meta["batches_per_epoch"]
    header = {
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": state.step,
        "total_steps": meta["total_steps"],
        "schedule": meta["schedule"],
        "data": {"epoch": state.consumed // bpe, "batch": state.consumed % bpe, "consumed": state.consumed},
        "rng": rngs,
        "history": state.history,
        "mlflow_run_id": state.run_id,
        "world_size": meta["world_size"],
        "batch_size": meta["batch_size"],
        "recipe": meta["recipe"],
    }
    if path.suffix == ".dcp":
        save_dcp(path, sharded_state(model, optimizer), header)
        return
    whole = full_state(model, optimizer)  # a collective under FSDP: every rank gathers
    if D.rank() == 0:
        save_checkpoint(path, {**whole, **header})
    D.barrier()


def save_dcp(path: Path, tensors: dict[str, Any], header: dict[str, Any]) -> None:
    """Write a DCP folder atomically: into ``.<name>.tmp`` (every rank), ``train_state.pt`` last (rank 0),
    then rename onto ``path``; the previous checkpoint is removed only once the new one is complete."""

    import torch.distributed.checkpoint as dcp

    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if D.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    dcp.save(tensors, checkpoint_id=tmp)
    if D.rank() == 0:
        save_checkpoint(tmp / TRAIN_STATE, header)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
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
    """Load weights, optimiser and scaler in place from a checkpoint file or DCP folder written by any
    strategy and world size; return the run's state (RNG: ``restore_rng``). Every rank calls it.

    meta: this run's (as for :func:`save_training_state`); a changed world size, batch size or schedule
    is warned about, since the resumed run then no longer reproduces the saved one. schedule_changes: a
    new schedule is expected (a continuation with more steps), not warned about."""
    from maelab.train.strategy import load_state, sharded_state, strip_prefixes

    try:
        if path.is_dir():
            import torch.distributed.checkpoint as dcp

            required = [k for k in RESUME_KEYS if k not in FORMAT_KEYS]
            ckpt = load_checkpoint(path / TRAIN_STATE, required=required)
            tensors = sharded_state(model, optimizer)  # the layout to fill (shards under FSDP)
            dcp.load(tensors, checkpoint_id=path)
            load_state(model, optimizer, tensors, full=False)
        else:
            ckpt = load_checkpoint(path, required=RESUME_KEYS)
            weights, optim = strip_prefixes(ckpt["model"]), ckpt["optimizer"]
            if legacy_optimizer_state(optim):  # written before name-keyed optimiser state: parameter order
                load_state(model, None, {"model": weights}, full=True)
                optimizer.load_state_dict(optim)
            else:
                load_state(model, optimizer, {"model": weights, "optimizer": optim}, full=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: field 'model' does not fit this recipe's model: {err}") from err
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


FORMAT_KEYS = ("model", "optimizer")  # in a DCP folder these are the shards, not train_state.pt


def legacy_optimizer_state(optim: dict[str, Any]) -> bool:
    """``optimizer.state_dict()`` as older checkpoints hold it: state keyed by parameter index."""
    groups = optim.get("param_groups") or [{}]
    return any(isinstance(p, int) for p in groups[0].get("params", []))


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


def set_aside_checkpoint(out: Path) -> None:
    """A fresh run moves an earlier run's checkpoints (file or DCP folder) to ``checkpoint.previous.*``: if
    this run dies before its first save, a resume (a Prefect retry) must start over, not continue the
    earlier run."""
    for checkpoint in (out / CHECKPOINT_FILE, out / CHECKPOINT_DCP):
        if checkpoint.exists():
            previous = checkpoint.with_name(f"{checkpoint.stem}.previous{checkpoint.suffix}")
            if previous.is_dir():
                shutil.rmtree(previous)
            checkpoint.replace(previous)
            log.info("fresh run: the earlier checkpoint is now %s", previous)
