"""The parts of one training run, built once: process group and device, the data set drawing with the
model's own masker, the model (DDP / compile), optimiser, scaler and schedule; and resuming them."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from maelab.files import remove_stale_temps
from maelab.masking import MaskPlan
from maelab.paths import project_root
from maelab.pools import held_lock
from maelab.train import distributed as D
from maelab.train.checkpoint import (
    CHECKPOINT_FILE,
    TrainingState,
    checkpoint_path,
    latest_checkpoint,
    load_training_state,
)
from maelab.train.data import PretrainDataset, SampleExtra, read_manifest
from maelab.train.optim import build_optimizer
from maelab.train.precision import grad_scaler, resolve_precision
from maelab.train.schedule import CosineSchedule, base_lr, resolve_steps
from maelab.train.strategy import wrap_model

log = logging.getLogger(__name__)

CHECKPOINT = CHECKPOINT_FILE


@dataclass
class Run:
    """What one training run is made of (``setup_run``); ``model`` is what the step calls: ``raw`` itself
    (compiled in place, sharded in place under FSDP) or its DDP wrapper."""

    name: str
    recipe: dict[str, Any]
    dist: D.DistInfo
    precision: str
    out: Path
    raw: nn.Module
    model: nn.Module
    ddp: DDP | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: CosineSchedule
    dataset: PretrainDataset
    batch_size: int
    accum: int
    batches_per_epoch: int
    strategy: str = "ddp"

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def checkpoint(self) -> Path:
        """Where this run writes: ``checkpoint.pt`` or ``checkpoint.dcp`` (``train.checkpoint_format``;
        default ``dcp`` under FSDP, ``file`` under DDP)."""
        fmt = self.recipe["train"].get("checkpoint_format") or ("dcp" if self.strategy == "fsdp" else "file")
        return checkpoint_path(self.out, fmt)

    def meta(self) -> dict[str, Any]:
        s = self.schedule
        keys = {
            "total_steps": s.total_steps,
            "schedule": {"total": s.total_steps, "warmup": s.warmup_steps, "lr": s.lr, "min_lr": s.min_lr},
            "world_size": self.dist.world_size,
            "recipe": self.name,
        }
        return {**keys, "batches_per_epoch": self.batches_per_epoch, "batch_size": self.batch_size}


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (rank 0, for all ranks under torchrun) and remove the temp files killed runs left
    in ``out``; a second training on the same folder fails at once instead of interleaving writes."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(held_lock(out / ".lock"))
        except BlockingIOError:
            raise RuntimeError(
                f"{out}: another training writes to this output directory (lock {out / '.lock'})"
            ) from None
        for f in remove_stale_temps(out):
            log.info("removed %s, left by a killed run", f)
        yield


def setup_run(
    recipe: dict[str, Any],
    manifest: pd.DataFrame | None,
    out_dir: str | Path | None,
    build_model: Callable[[dict], nn.Module],
    extras: Sequence[SampleExtra],
) -> Run:
    """Device and process group, the data set with the model's masker, the model, optimiser and schedule."""
    tcfg, dcfg = recipe["train"], recipe.get("data", {})
    seed, batch_size, accum = (
        int(tcfg.get("seed", 0)),
        int(tcfg["batch_size"]),
        int(tcfg.get("accum_steps", 1)),
    )
    dist = D.setup(tcfg.get("device"))
    out = Path(out_dir) if out_dir else out_dir_for(recipe)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        path = Path(dcfg.get("manifest", "data/02_intermediate/manifest.parquet"))
        manifest = read_manifest(path if path.is_absolute() else project_root() / path)
    torch.manual_seed(seed)
    raw = build_model(recipe).to(dist.device)
    dataset = PretrainDataset(manifest, recipe, seed=seed, masker=getattr(raw, "masker", None), extras=extras)
    precision = resolve_precision(tcfg.get("precision", "auto"), dist.device)
    model, ddp = wrap_model(raw, tcfg, dist.world_size, dist.device, precision)
    lr = base_lr(tcfg, dist.world_size)
    optimizer = build_optimizer(raw, lr, tcfg)  # after sharding: FSDP's optimiser holds the shards
    batches_per_epoch = -(-len(dataset) // dist.world_size) // batch_size
    total, warmup = resolve_steps(tcfg, max(1, batches_per_epoch // accum))
    dataset.accum_steps, dataset.total_steps = accum, total
    schedule = CosineSchedule(lr, total, warmup, float(tcfg.get("min_lr", 0.0)))
    name = recipe.get("name", "recipe")
    if dist.is_main:
        log.info(
            "train %s: %d steps (warm-up %d), lr %.3g, batch %dx%dx%d, %s on %s, %d images",
            *(
                name,
                total,
                warmup,
                lr,
                batch_size,
                accum,
                dist.world_size,
                precision,
                dist.device,
                len(dataset),
            ),
        )
    scaler = grad_scaler(precision, dist.device)
    return Run(
        name,
        recipe,
        dist,
        precision,
        out,
        raw,
        model,
        ddp,
        optimizer,
        scaler,
        schedule,
        dataset,
        batch_size,
        accum,
        batches_per_epoch,
        str(tcfg.get("strategy") or "ddp"),
    )


def resume_state(run: Run, resume: bool) -> TrainingState:
    """The newest checkpoint in the output folder (``resume``; file or DCP, whichever strategy and world size
    wrote it), else the full state named by ``train.init_from``, else a fresh start. A resumed continuation
    thus picks up its own progress, not the state it started from."""
    found = latest_checkpoint(run.out) if resume else None
    if found is not None:
        state = load_training_state(found, run.raw, run.optimizer, run.scaler, run.meta())
        epoch = state.consumed // run.batches_per_epoch
        log.info("resumed %s at step %d (epoch %d)", found, state.step, epoch)
        return state
    if resume:
        log.warning("%s: no checkpoint, starting from scratch", run.checkpoint)
    init_from = run.recipe["train"].get("init_from")
    return continue_from(run, str(init_from)) if init_from else TrainingState()


def continue_from(run: Run, init_from: str) -> TrainingState:
    """Continue pre-training from another run's full state (``train.init_from``): weights of every head,
    optimiser, scaler, step, data position, history and RNG, as a resume does, but in a new MLflow run.
    ``train.steps`` is the total of the continued run, so it must exceed the state's step."""
    if "://" in init_from or init_from.startswith("models:/"):
        raise ValueError(
            f"train.init_from: {init_from!r} is a URI; the caller resolves it to a file first "
            "(maelab.orchestration.registry.resolve_init_from, as the pretrain node and "
            "`python -m maelab.train` do)"
        )
    path = Path(init_from)
    state = load_training_state(path, run.raw, run.optimizer, run.scaler, run.meta(), schedule_changes=True)
    if state.step >= run.schedule.total_steps:
        raise ValueError(
            f"train.init_from: {path} is at step {state.step}; train.steps ({run.schedule.total_steps}) "
            "is the continued run's total and must be larger"
        )
    state.run_id = None  # a new run: the registered one stays as it was
    log.info("continuing %s from %s at step %d", run.name, path, state.step)
    return state


def progress_bar(run: Run, progress: bool | None, initial: int) -> Any:
    if not run.dist.is_main or not (progress if progress is not None else sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=run.schedule.total_steps, initial=initial, desc=run.name, dynamic_ncols=True)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor | MaskPlan) else v
        for k, v in batch.items()
    }


def out_dir_for(recipe: dict[str, Any]) -> Path:
    base = Path(recipe["train"].get("out_dir") or "data/06_models/pretrain")
    base = base if base.is_absolute() else project_root() / base
    return base / recipe.get("name", "recipe")
