"""The one fine-tune loop of the transfer tasks (classification, detection, segmentation).

A task builds its model, its training loader and a ``loss_fn(batch) -> (loss, parts)``; :func:`fine_tune`
does the rest: layer-wise lr decay groups (BEiT §2.3, MAE §A.2), AdamW, warm-up then the task's decay
(cosine: MAE; poly: mmseg's BEiT/MAE UperNet; step: ViTDet), gradient accumulation, a stop on a non-finite
loss. Step counts come from :func:`maelab.train.schedule.resolve_steps`, as in pre-training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from maelab.progress import on_terminal, progress
from maelab.train.distributed import pick_device
from maelab.train.schedule import CosineSchedule, resolve_steps
from maelab.transfer.backbone import adamw, apply_lr, param_groups_lrd
from maelab.transfer.config import FineTuneLoopConfig, TaskConfig

log = logging.getLogger(__name__)

LossFn = Callable[[Any], tuple[Tensor, dict[str, Tensor] | None]]


def start(cfg: TaskConfig, seed: int | None = None) -> torch.device:
    """Seed torch's global RNG (``seed``, default ``cfg.seed``) and return the task's device."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    return pick_device(cfg.device)


def forever(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (``dataset.epoch`` set for per-epoch augmentation seeds)."""
    epoch = 0
    while True:
        if hasattr(loader.dataset, "epoch"):
            loader.dataset.epoch = epoch
        yield from loader
        epoch += 1


# ------------------------------------------------------------------------------------------ schedules
def poly_lr(
    step: int, base: float, total: int, warmup: int, power: float = 1.0, min_lr: float = 0.0
) -> float:
    """mmseg's MAE/BEiT schedule: linear warm-up (from 1e-6 x), then polynomial decay to ``min_lr``."""
    if step < warmup:
        return base * (1e-6 + (1 - 1e-6) * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (base - min_lr) * (1 - progress) ** power + min_lr


def step_lr(step: int, base: float, total: int, warmup: int, milestones: tuple[float, ...]) -> float:
    """ViTDet schedule: linear warm-up from 0.001x, then x0.1 at each milestone fraction of ``total``."""
    if step < warmup:
        return base * (0.001 + (1 - 0.001) * step / warmup)
    return base * 0.1 ** sum(step >= m * total for m in milestones)


def lr_schedule(cfg: FineTuneLoopConfig, lr: float, total: int, warmup: int) -> Callable[[int], float]:
    """The task's lr of optimiser step ``step``: ``cfg.SCHEDULE`` is cosine, poly or step."""
    if cfg.SCHEDULE == "cosine":
        return CosineSchedule(lr, total, warmup, cfg.min_lr)
    if cfg.SCHEDULE == "poly":
        return lambda step: poly_lr(step, lr, total, warmup, min_lr=cfg.min_lr)
    if cfg.SCHEDULE == "step":
        milestones = tuple(getattr(cfg, "lr_milestones", ()))
        return lambda step: step_lr(step, lr, total, warmup, milestones)
    raise ValueError(f"{cfg.TASK}: unknown schedule {cfg.SCHEDULE!r}")


def resolve_lr(cfg: FineTuneLoopConfig, batch: int) -> float:
    """``cfg.lr``, else ``cfg.blr x effective batch / 256`` (MAE's linear scaling rule)."""
    if cfg.lr is not None:
        return float(cfg.lr)
    return float(cfg.blr) * batch * cfg.accum_steps / 256


# ---------------------------------------------------------------------------------------------- loop
def check_finite(task: str, loss: Tensor, step: int, parts: dict[str, Tensor] | None = None) -> None:
    """Stop on a non-finite loss, naming the step and the loss ``parts``."""
    if not torch.isfinite(loss):
        detail = f" ({', '.join(f'{k}={v.item():.4g}' for k, v in parts.items())})" if parts else ""
        raise FloatingPointError(f"{task}: loss is {loss.item()} at step {step}{detail}")


@dataclass
class FitResult:
    steps: int
    final_loss: float | None
    seconds: float


def fine_tune(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    cfg: FineTuneLoopConfig,
    *,
    num_layers: int,
    prefix: str,
    batch: int | None = None,
) -> FitResult:
    """Train ``model`` for the task's schedule; ``loss_fn`` turns one loader batch into ``(loss, parts)``.

    num_layers / prefix: the encoder's depth and its parameter prefix in ``model`` (layer-wise lr decay;
    everything outside ``prefix`` is a head at scale 1). batch: the batch of the lr scaling rule (default
    the loader's).
    """
    t0 = time.perf_counter()
    task = cfg.TASK
    groups = param_groups_lrd(
        model,
        cfg.weight_decay,
        cfg.layer_decay,
        num_layers,
        no_weight_decay={"cls_token", "pos_embed"},
        prefix=prefix,
    )
    lr = resolve_lr(cfg, batch or loader.batch_size)
    opt = adamw(groups, lr, cfg.betas)
    steps_per_epoch = max(1, len(loader) // cfg.accum_steps)
    total, warmup = resolve_steps(step_fields(cfg), steps_per_epoch)
    schedule = lr_schedule(cfg, lr, total, warmup)

    model.train()
    batches, loss = forever(loader), None
    bar = progress(total, task, "step", enabled=on_terminal())  # a bar on a terminal; log lines elsewhere
    for step in range(total):
        apply_lr(opt, schedule(step))
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.accum_steps):
            loss, parts = loss_fn(next(batches))
            check_finite(task, loss, step, parts)
            (loss / cfg.accum_steps).backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), float(cfg.clip_grad))
        opt.step()
        bar.update(1)
        if step % max(1, total // 5) == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if not on_terminal():
                log.info("%s step %d/%d loss %.4f", task, step, total, loss.item())
    bar.close()
    final = round(float(loss.item()), 4) if loss is not None else None
    return FitResult(total, final, time.perf_counter() - t0)


def step_fields(cfg: FineTuneLoopConfig) -> dict[str, Any]:
    """The step fields ``resolve_steps`` reads."""
    return {k: getattr(cfg, k) for k in ("steps", "epochs", "warmup_steps", "warmup_epochs")}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], predict: Callable[[Any], None]) -> None:
    """Put ``model`` in eval mode and call ``predict(batch)`` on every batch without gradients."""
    model.eval()
    for batch in loader:
        predict(batch)
