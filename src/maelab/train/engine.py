"""The one training loop for every variant (MAE, R-MAE, LoMaR, MR-MAE, long-seq, self-guided).

A variant is a recipe: the masker and the heads differ, the loop does not. Per optimiser step:
set the lr (warm-up + cosine), run ``accum_steps`` micro-batches (DDP syncs only on the last),
check the loss is finite, take the optimiser step (``optim.optimizer_step``), log; save the
training state every ``ckpt_every`` steps and at the end.

Exact resume: the checkpoint holds model, optimiser, scaler, the step, every rank's RNG states
and the data position (see ``checkpoint.TrainingState``); samples are drawn from per-sample seeds
(see ``train/data.py``), so a resumed fp32 run on CPU is bit-identical to an uninterrupted one.
Pictures are drawn by the caller's ``pictures`` function (e.g. ``maelab.analysis.viz.training_pictures``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from maelab.files import atomic_write_text
from maelab.masking import MaskContext
from maelab.models import build_pretrainer
from maelab.schema import check_recipe
from maelab.train import distributed as D
from maelab.train.artifacts import (
    ENCODER,
    Pictures,
    encoder_weights,
    export_encoder,
    log_encoder_model,
    log_pictures,
    start_tracking,
)
from maelab.train.checkpoint import TrainingState, save_training_state, set_aside_checkpoint
from maelab.train.data import SampleExtra, build_loader
from maelab.train.metrics import StepMeter, forward_flops_per_image
from maelab.train.optim import optimizer_step
from maelab.train.precision import autocast
from maelab.train.result import TrainResult, peak_memory_mb
from maelab.train.run import (
    CHECKPOINT,
    Run,
    out_dir_for,
    output_lock,
    progress_bar,
    resume_state,
    setup_run,
    to_device,
)
from maelab.train.tracking import Tracker

log = logging.getLogger(__name__)

RESULT = "result.json"
__all__ = ["CHECKPOINT", "ENCODER", "RESULT", "NonFiniteLossError", "TrainResult", "out_dir_for", "train"]


class NonFiniteLossError(FloatingPointError):
    """The loss became nan/inf; the last good checkpoint on disk is left untouched."""


def train(
    recipe: dict[str, Any],
    manifest: pd.DataFrame | None = None,
    *,
    resume: bool | None = None,
    out_dir: str | Path | None = None,
    mlflow: dict[str, Any] | None = None,
    stop_after: int | None = None,
    progress: bool | None = None,
    build_model: Callable[[dict], nn.Module] = build_pretrainer,
    extras: Sequence[SampleExtra] = (),
    pictures: Pictures | None = None,
) -> TrainResult:
    """Train ``recipe`` (a resolved recipe dict, see ``maelab.config.resolve_recipe``).

    manifest: the image manifest (default: read ``data.manifest``); resume: continue from
    ``out_dir/checkpoint.pt`` (default ``train.resume``); mlflow: tracking settings, e.g.
    ``maelab.config.mlflow_settings(env)`` (None or ``{"enabled": False}``: no tracking);
    stop_after: stop (with a checkpoint) once this global step is done, keeping the schedule of the
    full run (pre-emption, tests); build_model: recipe -> model (``maelab.models.build_pretrainer``),
    whose ``masker`` is the run's one masker (in the DataLoader workers or in the step); extras:
    sample extras for the dataset; pictures: what to draw for the tracker (none by default).

    The recipe is checked first (a misspelt key fails naming it; encoder, masker and heads only with the
    default ``build_model``); the output directory's lock is held for the whole run (two trainings never
    write one folder) and the temp files killed runs left there are removed before anything is written.
    """
    check_recipe(recipe, components=build_model is build_pretrainer)
    out = Path(out_dir) if out_dir else out_dir_for(recipe)
    with output_lock(out):
        return _train(
            recipe, manifest, resume, out, mlflow, stop_after, progress, build_model, extras, pictures
        )


def _train(
    recipe: dict[str, Any],
    manifest: pd.DataFrame | None,
    resume: bool | None,
    out_dir: Path,
    mlflow: dict[str, Any] | None,
    stop_after: int | None,
    progress: bool | None,
    build_model: Callable[[dict], nn.Module],
    extras: Sequence[SampleExtra],
    pictures: Pictures | None,
) -> TrainResult:
    """The loop of :func:`train` (its arguments, checked and locked)."""
    t_start, tcfg = time.perf_counter(), recipe["train"]
    run = setup_run(recipe, manifest, out_dir, build_model, extras)
    resume = bool(tcfg.get("resume", False)) if resume is None else resume
    state = resume_state(run, resume)
    if not resume and run.dist.is_main:
        set_aside_checkpoint(run.out)
    bpe = run.batches_per_epoch
    loader, _ = build_loader(
        run.dataset,
        run.batch_size,
        int(tcfg.get("seed", 0)),
        run.dist.rank,
        run.dist.world_size,
        start=(state.consumed // bpe, state.consumed % bpe),
        num_workers=int(recipe.get("data", {}).get("num_workers", 0)),
        pin_memory=run.device.type == "cuda",
    )
    images_per_step = run.batch_size * run.accum * run.dist.world_size
    meter = StepMeter(images_per_step, run.device, run.dist.world_size)
    batches = meter.timed(iter(loader))  # data-loader wait per step
    state.restore_rng(run.dist.rank)  # after building everything that might draw random numbers
    tracker = start_tracking(run, recipe, manifest, mlflow, state)
    log_every, ckpt_every = int(tcfg.get("log_every", 10)), int(tcfg.get("ckpt_every") or 0)
    image_every, total = int(tcfg.get("image_every") or 0), run.schedule.total_steps
    end = total if stop_after is None else min(total, int(stop_after))
    bar = progress_bar(run, progress, state.step)
    start_step, batch, outputs, status = state.step, None, None, "FAILED"
    run.model.train()
    try:
        for step in range(start_step, end):
            t0 = time.perf_counter()
            lr_now = run.schedule(step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr_now
            stats, batch, outputs = accumulate(run, batches, step, state)
            check_finite(stats, step, run.checkpoint)
            optimizer_step(run.optimizer, run.raw.parameters(), run.scaler, tcfg.get("clip_grad"))
            state.step = step_done = step + 1
            for key, value in {"loss": stats["loss"], "lr": lr_now, **stats}.items():
                state.history.setdefault(key, []).append(value)
            seconds = time.perf_counter() - t0
            speed = {"images_per_s": images_per_step / seconds, **meter.step_done(seconds)}
            if step == start_step and run.dist.is_main:  # once: model FLOPs for MFU (meta device, free)
                meter.flops_per_image = forward_flops_per_image(build_model, recipe, batch)
            log_now = run.dist.is_main and (step_done % log_every == 0 or step_done == end)
            report_step(run, tracker, bar, log_now, {"lr": lr_now, **speed, **stats}, step_done)
            if image_every and step_done % image_every == 0 and step_done != total:
                log_pictures(run, tracker, pictures, batch, outputs, step_done)
            if (ckpt_every and step_done % ckpt_every == 0) or step_done == end:
                save_training_state(run.checkpoint, state, run.raw, run.optimizer, run.scaler, run.meta())
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM turned into an exit: killed, not failed
        status = "KILLED"
        raise
    finally:
        if bar is not None:
            bar.close()
        if status != "FINISHED":
            tracker.end(status)
    encoder_path = None
    weights = encoder_weights(run) if end == total else None  # every rank: a gather under FSDP
    if end == total and run.dist.is_main:
        encoder_path = export_encoder(run, end, weights)
        tracker.log_artifact(encoder_path, "encoder")
        if batch is not None:
            log_pictures(run, tracker, pictures, batch, outputs, end)
            log_encoder_model(run, tracker, batch, end)
    speed = meter.summary(compiled=bool(run.recipe["train"].get("compile")))
    result = TrainResult(
        recipe=run.name,
        steps=end,
        history=state.history,
        images_per_s=float(speed.pop("images_per_s") or 0.0),
        wall_s=time.perf_counter() - t_start,
        peak_mem_mb=peak_memory_mb(run.device),
        out_dir=str(run.out),
        checkpoint_path=str(run.checkpoint),
        encoder_path=encoder_path,
        mlflow_run_id=state.run_id,
        start_step=start_step,
        precision=run.precision,
        world_size=run.dist.world_size,
        speed=speed,
    )
    if run.dist.is_main:
        summary = {f"run/{k}": v for k, v in speed.items() if v is not None}
        tracker.log_metrics({"wall_s": result.wall_s, "run/peak_mem_mb": result.peak_mem_mb, **summary}, end)
        if end == total:
            write_json(run.out / RESULT, result.report())
        tracker.end("FINISHED" if end == total else "KILLED")
    D.barrier()
    return result


def accumulate(
    run: Run, batches: Iterator[dict[str, Any]], step: int, state: TrainingState
) -> tuple[dict[str, float], dict[str, Any], Any]:
    """Forward and backward of ``accum`` micro-batches (DDP syncs on the last one only); returns the
    global mean losses ``{"loss", "loss/<head>"}``, the last micro-batch and its outputs."""
    loss_sum, head_sums = torch.zeros((), device=run.device), {}
    for micro in range(run.accum):
        batch = to_device(next(batches), run.device)
        batch["context"] = MaskContext(
            step, state.consumed // run.batches_per_epoch, run.schedule.total_steps
        )
        state.consumed += 1
        sync = micro == run.accum - 1
        with run.ddp.no_sync() if (run.ddp is not None and not sync) else contextlib.nullcontext():
            with autocast(run.precision, run.device):
                outputs = run.model(batch)
            loss = outputs.loss.float() / run.accum
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        loss_sum += outputs.loss.detach().float()
        for head, value in outputs.losses.items():
            head_sums[head] = head_sums.get(head, 0) + value.detach().float()
    # one small all-reduce per step: logged values are global means, and every rank
    # sees a non-finite loss together (no rank steps while another raises)
    heads = sorted(head_sums)
    stats = D.all_reduce_mean(torch.stack([loss_sum, *[head_sums[h] for h in heads]]) / run.accum).tolist()
    return (
        {"loss": stats[0], **{f"loss/{h}": v for h, v in zip(heads, stats[1:], strict=True)}},
        batch,
        outputs,
    )


def report_step(
    run: Run, tracker: Tracker, bar: Any, log_now: bool, metrics: dict[str, float], step_done: int
) -> None:
    """The progress bar every step; with ``log_now``, the metrics (with peak memory and the masker's own)
    to the tracker, and to the log when there is no bar."""
    loss, lr, ips = metrics["loss"], metrics["lr"], metrics["images_per_s"]
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.1f}")
    if not log_now:
        return
    extra = {"peak_mem_mb": peak_memory_mb(run.device), **masker_metrics(run.raw)}
    tracker.log_metrics({**metrics, **extra}, step_done)
    if bar is None:
        total = run.schedule.total_steps
        log.info("step %d/%d loss %.4f lr %.3e %.1f img/s", step_done, total, loss, lr, ips)


def masker_metrics(model: nn.Module) -> dict[str, float]:
    """What the run's masker reports, if it does (self-guided MAE: phase, switch step, exploitation rates)."""
    report = getattr(getattr(model, "masker", None), "metrics", None)
    return report() if callable(report) else {}


def check_finite(stats: dict[str, float], step: int, checkpoint: Path) -> None:
    if all(math.isfinite(v) for v in stats.values()):
        return
    detail = ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in stats.items() if k != "loss")
    raise NonFiniteLossError(
        f"loss is {stats['loss']} at step {step} (heads: {detail}); "
        f"last good checkpoint kept: {checkpoint if checkpoint.exists() else 'none'}"
    )


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))
