"""The one training loop for every variant (MAE, R-MAE, LoMaR, MR-MAE, long-seq, self-guided).

A variant is a recipe: the masker and the heads differ, the loop does not. Per optimiser step:
set the lr (warm-up + cosine), run ``accum_steps`` micro-batches (DDP syncs only on the last),
check the loss is finite, clip, step, log; checkpoint every ``ckpt_every`` steps and at the end.

Exact resume: the checkpoint holds model, optimiser, scaler, the step, every rank's RNG states
and the data position (epoch, batch in epoch); samples are drawn from per-sample seeds (see
``train/data.py``), so a resumed fp32 run on CPU is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from maelab.config import project_root
from maelab.masking import MaskContext, MaskPlan
from maelab.models import build_pretrainer
from maelab.train import distributed as D
from maelab.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_safetensors,
    set_rng_state,
)
from maelab.train.data import PretrainDataset, SampleExtra, build_loader, read_manifest
from maelab.train.optim import build_optimizer
from maelab.train.precision import autocast, grad_scaler, resolve_precision
from maelab.train.schedule import CosineSchedule, base_lr, resolve_steps
from maelab.train.tracking import Tracker, mlflow_settings

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.safetensors"
RESULT = "result.json"
AVERAGE_OVER = 20  # first/last loss in reports: mean of this many steps


class NonFiniteLossError(FloatingPointError):
    """The loss became nan/inf; the last good checkpoint on disk is left untouched."""


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
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """Summary for ``data/08_reporting/pretrain_<recipe>.json``: first/last loss are 20-step means."""

        def first_last(xs: list[float]) -> dict[str, float | None]:
            if not xs:
                return {"first_loss": None, "last_loss": None}
            k = min(AVERAGE_OVER, len(xs))
            return {"first_loss": sum(xs[:k]) / k, "last_loss": sum(xs[-k:]) / k}

        heads = {k.split("/", 1)[1]: first_last(v) for k, v in self.history.items() if k.startswith("loss/")}
        return {
            "recipe": self.recipe,
            "steps": self.steps,
            **first_last(self.history.get("loss", [])),
            "images_per_s": self.images_per_s,
            "wall_s": self.wall_s,
            "peak_mem_mb": self.peak_mem_mb,
            "precision": self.precision,
            "world_size": self.world_size,
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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor | MaskPlan):
            out[k] = v.to(device, non_blocking=nb)
        else:
            out[k] = v
    return out


def out_dir_for(recipe: dict[str, Any]) -> Path:
    base = Path(recipe["train"].get("out_dir") or "data/06_models/pretrain")
    base = base if base.is_absolute() else project_root() / base
    return base / recipe.get("name", "recipe")


def train(
    recipe: dict[str, Any],
    manifest: pd.DataFrame | None = None,
    *,
    resume: bool | None = None,
    out_dir: str | Path | None = None,
    mlflow: dict[str, Any] | None = None,
    env: str | None = None,
    stop_after: int | None = None,
    progress: bool | None = None,
    build_model: Callable[[dict], nn.Module] = build_pretrainer,
    extras: Sequence[SampleExtra] = (),
) -> TrainResult:
    """Train ``recipe`` (a resolved recipe dict, see ``maelab.config.resolve_recipe``).

    manifest: the image manifest (default: read ``data.manifest``); resume: continue from
    ``out_dir/checkpoint.pt`` (default ``train.resume``); mlflow: tracking settings (default
    ``conf/<env>/mlflow.yml``; ``{"enabled": False}`` turns tracking off); stop_after: stop (with a
    checkpoint) once this global step is done, keeping the schedule of the full run (pre-emption,
    tests). build_model: recipe -> model (``maelab.models.build_pretrainer``); its ``masker`` is the run's
    one masker (in the DataLoader workers or in the step); extras: sample extras for the dataset.
    """
    t_start = time.perf_counter()
    name = recipe.get("name", "recipe")
    tcfg, dcfg = recipe["train"], recipe.get("data", {})
    resume = bool(tcfg.get("resume", False)) if resume is None else resume
    seed = int(tcfg.get("seed", 0))
    batch_size, accum = int(tcfg["batch_size"]), int(tcfg.get("accum_steps", 1))

    dist = D.setup(tcfg.get("device"))
    device = dist.device
    precision = resolve_precision(tcfg.get("precision", "auto"), device)
    out = Path(out_dir) if out_dir else out_dir_for(recipe)
    ckpt_path = out / CHECKPOINT
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)

    # --- data: masks drawn in the workers, one generator per (seed, epoch, index)
    if manifest is None:
        path = Path(dcfg.get("manifest", "data/02_intermediate/manifest.parquet"))
        manifest = read_manifest(path if path.is_absolute() else project_root() / path)

    # --- model, optimiser, schedule
    torch.manual_seed(seed)
    raw = build_model(recipe).to(device)
    dataset = PretrainDataset(manifest, recipe, seed=seed, masker=getattr(raw, "masker", None), extras=extras)
    model: nn.Module = raw
    ddp: DDP | None = None
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        unused = bool(tcfg.get("find_unused_parameters", False))
        model = ddp = DDP(raw, device_ids=ids, find_unused_parameters=unused)
    if tcfg.get("compile"):
        model = torch.compile(model)
    lr = base_lr(tcfg, dist.world_size)
    optimizer = build_optimizer(raw, lr, tcfg)
    scaler = grad_scaler(precision, device)
    per_rank = -(-len(dataset) // dist.world_size)
    batches_per_epoch = per_rank // batch_size
    total, warmup = resolve_steps(tcfg, max(1, batches_per_epoch // accum))
    schedule = CosineSchedule(lr, total, warmup, float(tcfg.get("min_lr", 0.0)))
    dataset.accum_steps, dataset.total_steps = accum, total

    # --- resume
    start_step, consumed, run_id = 0, 0, None
    history: dict[str, list[float]] = {"loss": [], "lr": []}
    state = None
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step, consumed = int(state["step"]), int(state["data"]["consumed"])
        history, run_id = state["history"], state.get("mlflow_run_id")
        if state.get("world_size") != dist.world_size or state.get("batch_size") != batch_size:
            log.warning(
                "%s: saved with world_size=%s batch_size=%s, resuming with %s/%s: data order is not exact",
                ckpt_path,
                state.get("world_size"),
                state.get("batch_size"),
                dist.world_size,
                batch_size,
            )
        log.info("resumed %s at step %d (epoch %d)", ckpt_path, start_step, consumed // batches_per_epoch)
    elif resume:
        log.warning("%s: no checkpoint, starting from scratch", ckpt_path)
    start = (consumed // batches_per_epoch, consumed % batches_per_epoch)
    loader, _ = build_loader(
        dataset,
        batch_size,
        seed,
        dist.rank,
        dist.world_size,
        start=start,
        num_workers=int(dcfg.get("num_workers", 0)),
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    if state is not None:  # after building everything that might draw random numbers
        rngs = state["rng"]
        set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])

    settings = (mlflow if mlflow is not None else mlflow_settings(env)) if dist.is_main else None
    tracker = Tracker(settings, enabled=dist.is_main)
    run_id = tracker.start(name, recipe, run_id=run_id)
    if dist.is_main:
        log.info(
            "train %s: %d steps (warm-up %d), lr %.3g, batch %dx%dx%d, %s on %s, %d images",
            name,
            total,
            warmup,
            lr,
            batch_size,
            accum,
            dist.world_size,
            precision,
            device,
            len(dataset),
        )

    def save(step_done: int) -> None:
        rngs = D.all_gather_object(rng_state())  # every rank's RNG, for an exact resume under DDP
        if dist.is_main:
            save_checkpoint(
                ckpt_path,
                {
                    "model": raw.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "step": step_done,
                    "total_steps": total,
                    "data": {
                        "epoch": consumed // batches_per_epoch,
                        "batch": consumed % batches_per_epoch,
                        "consumed": consumed,
                    },
                    "rng": rngs,
                    "history": history,
                    "mlflow_run_id": run_id,
                    "world_size": dist.world_size,
                    "batch_size": batch_size,
                    "recipe": name,
                },
            )
        D.barrier()

    def log_grid(batch: dict[str, Any], outputs: Any, step_done: int) -> None:
        """Every head's picture (pixel reconstruction grid, region maps, ...) to the tracker."""
        if not (dist.is_main and tracker.enabled and hasattr(raw, "pictures")):
            return
        from maelab.analysis.viz import png_bytes

        with torch.no_grad(), autocast(precision, device):
            pictures = raw.pictures(batch, outputs)
        for name, array in pictures.items():
            tracker.log_png(png_bytes(array), f"{name}_step_{step_done:07d}.png")

    log_every = int(tcfg.get("log_every", 10))
    ckpt_every = int(tcfg.get("ckpt_every") or 0)
    image_every = int(tcfg.get("image_every") or 0)
    clip = tcfg.get("clip_grad")
    end = total if stop_after is None else min(total, int(stop_after))
    images_per_step = batch_size * accum * dist.world_size
    show = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if dist.is_main and show:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, desc=name, dynamic_ncols=True)
    step_times: list[float] = []
    status = "FAILED"
    batch, outputs = None, None
    model.train()
    try:
        for step in range(start_step, end):
            t0 = time.perf_counter()
            lr_now = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            loss_sum = torch.zeros((), device=device)
            head_sums: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                batch = to_device(next(batches), device)
                batch["context"] = MaskContext(step, consumed // batches_per_epoch, total)
                consumed += 1
                sync = micro == accum - 1
                ctx = ddp.no_sync() if (ddp is not None and not sync) else contextlib.nullcontext()
                with ctx:
                    with autocast(precision, device):
                        outputs = model(batch)
                    loss = outputs.loss.float() / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += outputs.loss.detach().float()
                for head, value in outputs.losses.items():
                    head_sums[head] = head_sums.get(head, 0) + value.detach().float()
            # one small all-reduce per step: logged values are global means, and every rank
            # sees a non-finite loss together (no rank steps while another raises)
            heads = sorted(head_sums)
            stats = torch.stack([loss_sum, *[head_sums[h] for h in heads]]) / accum
            stats = D.all_reduce_mean(stats).tolist()
            if not all(math.isfinite(v) for v in stats):
                detail = ", ".join(f"{h}={v:.4g}" for h, v in zip(heads, stats[1:], strict=True))
                raise NonFiniteLossError(
                    f"loss is {stats[0]} at step {step} (heads: {detail}); "
                    f"last good checkpoint kept: {ckpt_path if ckpt_path.is_file() else 'none'}"
                )
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), float(clip))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            step_done = step + 1
            history["loss"].append(stats[0])
            history["lr"].append(lr_now)
            for h, v in zip(heads, stats[1:], strict=True):
                history.setdefault(f"loss/{h}", []).append(v)
            step_times.append(time.perf_counter() - t0)
            ips = images_per_step / step_times[-1]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats[0]:.4f}", lr=f"{lr_now:.2e}", ips=f"{ips:.1f}")
            if dist.is_main and (step_done % log_every == 0 or step_done == end):
                metrics = {"loss": stats[0], "lr": lr_now, "images_per_s": ips}
                metrics.update({f"loss/{h}": v for h, v in zip(heads, stats[1:], strict=True)})
                metrics["peak_mem_mb"] = peak_memory_mb(device)
                tracker.log_metrics(metrics, step_done)
                if bar is None:
                    log.info(
                        "step %d/%d loss %.4f lr %.3e %.1f img/s", step_done, total, stats[0], lr_now, ips
                    )
            if image_every and step_done % image_every == 0 and step_done != total:
                log_grid(batch, outputs, step_done)
            if (ckpt_every and step_done % ckpt_every == 0) or step_done == end:
                save(step_done)
        status = "FINISHED"
    finally:
        if bar is not None:
            bar.close()
        if status != "FINISHED":
            tracker.end("FAILED")

    # --- end of run: encoder export, final picture, result
    done = end
    encoder_path = None
    if done == total and dist.is_main:
        encoder = getattr(raw, "encoder", raw)
        encoder_path = str(
            save_safetensors(
                out / ENCODER,
                encoder.state_dict(),
                {"recipe": name, "steps": str(done), "encoder_config": json.dumps(recipe["encoder"])},
            )
        )
        tracker.log_artifact(encoder_path, "encoder")
        if batch is not None:
            log_grid(batch, outputs, done)
    timed = step_times[2:] if len(step_times) > 4 else step_times
    result = TrainResult(
        recipe=name,
        steps=done,
        history=history,
        images_per_s=images_per_step * len(timed) / sum(timed) if timed else 0.0,
        wall_s=time.perf_counter() - t_start,
        peak_mem_mb=peak_memory_mb(device),
        out_dir=str(out),
        checkpoint_path=str(ckpt_path),
        encoder_path=encoder_path,
        mlflow_run_id=run_id,
        start_step=start_step,
        precision=precision,
        world_size=dist.world_size,
    )
    if dist.is_main:
        tracker.log_metrics({"wall_s": result.wall_s}, done)
        if done == total:
            write_json(out / RESULT, result.report())
        tracker.end("FINISHED" if done == total else "KILLED")
    D.barrier()
    return result


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def result_dict(result: TrainResult) -> dict[str, Any]:
    return asdict(result)
