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
from torch.utils.data import DataLoader

from maelab.train.schedule import CosineSchedule
from maelab.transfer.backbone import apply_lr
from maelab.transfer.classification import _loaders, evaluate_logits, forever, pick_device
from maelab.transfer.data import train_loader
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


def supervised_once(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    """Train :class:`SmallCNN` for ``cfg.steps`` with one seed -> ``{"top1", "top5", ...}`` in percent.
    ``encoder_ref`` must be None: the reference has no pre-trained encoder."""
    if encoder_ref is not None:
        raise ValueError(f"supervised reference: trains from scratch, got encoder {encoder_ref!r}")
    t0, seed = time.perf_counter(), int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    device = pick_device(cfg.get("device"))
    size = int(cfg.get("img_size", default_config.get("img_size", 64)))
    cfg = {"crop_scale": (0.5, 1.0), **cfg}
    train_set, val_set, num_classes, workers = _loaders(manifest, cfg, size, train_aug=True, seed=seed)
    model = SmallCNN(num_classes, tuple(cfg.get("widths", (16, 32, 64, 64)))).to(device)
    lr, total = float(cfg.get("lr", 2e-3)), int(cfg.get("steps", 1200))
    wd = float(cfg.get("weight_decay", 0.05))
    if cfg.get("optimizer", "adamw") == "sgd":  # SGD + Nesterov momentum
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = CosineSchedule(lr, total, min(int(cfg.get("warmup_steps", 30)), total))
    batches = forever(train_loader(train_set, cfg, 32, seed))
    model.train()
    for step in range(total):
        x, y = next(batches)
        apply_lr(opt, sched(step))
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, total // 5) == 0:
            log.info("supervised reference step %d/%d loss %.4f", step, total, loss.item())
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for x, y in DataLoader(val_set, 128, num_workers=workers):
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y)
    metrics = evaluate_logits(torch.cat(logits), torch.cat(labels))
    metrics.update(
        num_classes=num_classes,
        train_images=len(train_set),
        val_images=len(val_set),
        steps=total,
        final_loss=round(float(loss.item()), 4),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return metrics


def run_supervised_reference(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    """The supervised reference over ``cfg.seeds`` (a transfer runner; ``encoder_ref`` is None)."""
    return over_seeds(supervised_once, manifest, encoder_ref, default_config, cfg)
