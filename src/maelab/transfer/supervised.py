"""The supervised reference: a small CNN trained from scratch with the labels, at the transfer budget.

It is the ceiling of the embedded task at this budget, shown beside the encoders in the report (a row
``supervised_reference``, its top-1 in ``finetune_top1``). If the reference sits near chance, the label is
not learnable at this budget and no encoder can be judged on it; if the encoders sit near the reference,
the task is too easy to tell them apart.

The network is a plain VGG-style stack (He et al. 2016's plain baseline, tiny): ``len(widths)`` stages of two
3x3 conv + BatchNorm + ReLU, 2x2 max-pooling between stages, global average pooling and a linear classifier.
Training: AdamW (or SGD with Nesterov momentum), linear warm-up then cosine, random resized crop + flip
(``crop_scale``), no label smoothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maelab.train.schedule import CosineSchedule
from maelab.transfer.backbone import apply_lr
from maelab.transfer.classification import classification_sets, evaluate_classifier, task_size
from maelab.transfer.config import SupervisedReferenceConfig
from maelab.transfer.data import train_loader
from maelab.transfer.loop import check_finite, forever, start
from maelab.transfer.probes import over_seeds

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Stages of (3x3 conv, BN, ReLU) x 2 with max-pooling between them; global average pool; linear."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [
                    nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                ]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))  # [B, 3, H, W] -> [B, C]


def optimizer(model: nn.Module, cfg: SupervisedReferenceConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.9; weight decay on every parameter."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def supervised_once(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict[str, Any], cfg: SupervisedReferenceConfig
) -> dict[str, Any]:
    """Train :class:`SmallCNN` for ``cfg.steps`` with seed ``cfg.seed`` -> ``{"top1", "top5", ...}`` in
    percent. ``encoder_ref`` must be None: the reference has no pre-trained encoder."""
    if encoder_ref is not None:
        raise ValueError(f"supervised reference: trains from scratch, got encoder {encoder_ref!r}")
    t0 = time.perf_counter()
    device = start(cfg)
    size = task_size(cfg, default_config)
    train_set, val_set, num_classes = classification_sets(manifest, cfg, size, train_aug=True)
    model = SmallCNN(num_classes, cfg.widths).to(device)
    opt = optimizer(model, cfg)
    sched = CosineSchedule(cfg.lr, cfg.steps, min(cfg.warmup_steps, cfg.steps))
    batches = forever(train_loader(train_set, cfg.batch_size, cfg.num_workers, cfg.seed))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(cfg.steps):
        x, y = next(batches)
        apply_lr(opt, sched(step))
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        check_finite(cfg.TASK, loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, cfg.steps // 5) == 0:
            log.info("supervised reference step %d/%d loss %.4f", step, cfg.steps, loss.item())
    metrics = evaluate_classifier(model, val_set, cfg.eval_batch_size, cfg.num_workers, device)
    metrics.update(
        model="SmallCNN",
        widths=list(cfg.widths),
        num_classes=num_classes,
        train_images=len(train_set),
        val_images=len(val_set),
        steps=cfg.steps,
        final_loss=round(float(loss.item()), 4),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return metrics


def run_supervised_reference(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict[str, Any], cfg: SupervisedReferenceConfig
) -> dict[str, Any]:
    """The supervised reference over ``cfg.seeds`` (``encoder_ref`` is None)."""
    return over_seeds(supervised_once, manifest, encoder_ref, default_config, cfg)
