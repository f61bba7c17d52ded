"""Frozen-feature probes that respond at small scale, each over several seeds (mean and standard deviation).

- **kNN probe** (DINO, Caron et al. 2021, §4.1 / ``eval_knn``): L2-normalised frozen features, cosine
  similarity to every training feature, the ``k`` nearest vote with weight ``exp(sim / T)`` (k = 20,
  T = 0.07 as DINO). No training at all, so it shows what the features hold without any optimiser.
- **Linear segmentation probe** (DINOv2, Oquab et al. 2023, §7.4 "linear"): a linear layer on the frozen
  final patch tokens (after BatchNorm, as DINOv2's ``BNHead``) predicts class logits at the patch grid,
  bilinearly upsampled to the label resolution; mIoU at the original mask resolution.
- **Linear classification probe over seeds**: :func:`maelab.transfer.classification.run_linear_probe` run
  once per seed.

A seed sets the probe's initialisation and shuffling, and the random-init encoder's weights (so the
``random_init`` row's spread includes the spread of random encoders). :func:`over_seeds` runs any
single-seed task per seed and reports every numeric metric ``m`` as the mean, with ``m_std`` (population
standard deviation, ``ddof=0``) and ``m_seeds`` (the per-seed values).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from maelab.models.vit import ViTEncoder
from maelab.train.schedule import CosineSchedule
from maelab.transfer.backbone import apply_lr, load_encoder
from maelab.transfer.classification import (
    _loaders,
    evaluate_logits,
    extract_features,
    pick_device,
    run_linear_probe,
)
from maelab.transfer.data import IGNORE_INDEX, SegmentationSet, select
from maelab.transfer.segmentation import confusion_matrix, miou_from_confusion, resolve_num_classes

log = logging.getLogger(__name__)

Runner = Callable[[pd.DataFrame, Any, dict[str, Any], dict[str, Any]], dict[str, Any]]


def over_seeds(
    run: Runner, manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: dict
) -> dict:
    """Run ``run`` once per seed in ``cfg.seeds`` (default ``[cfg.seed]`` or ``[0]``), each with
    ``cfg.seed`` set; numeric metrics become ``m`` (mean), ``m_std`` and ``m_seeds``; others come from the
    first seed."""
    seeds = [int(s) for s in (cfg.get("seeds") or [cfg.get("seed", 0)])]
    t0 = time.perf_counter()
    runs = [run(manifest, encoder_ref, default_config, {**cfg, "seed": s}) for s in seeds]
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, (int, float)) and not isinstance(first, bool) and key != "seconds":
            values = np.array([float(r[key]) for r in runs])
            out[key] = round(float(values.mean()), 3)
            out[f"{key}_std"] = round(float(values.std()), 3)
            out[f"{key}_seeds"] = [round(float(v), 3) for v in values]
        elif key != "seconds":
            out[key] = first
    out.update(seeds=seeds, seconds=round(time.perf_counter() - t0, 2))
    return out


def _encoder(encoder_ref: Any, default_config: dict, cfg: dict, seed: int) -> tuple[ViTEncoder, dict, int]:
    size = int(cfg.get("img_size", default_config.get("img_size", 224)))
    torch.manual_seed(seed)  # the random_init encoder's weights
    encoder, info = load_encoder(encoder_ref, default_config, img_size=size, patch_size=cfg.get("patch_size"))
    return encoder, info, size


# ------------------------------------------------------------------------------------------ kNN
@torch.no_grad()
def knn_classify(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, k: int = 20, temperature: float = 0.07
) -> Tensor:
    """DINO's weighted kNN: class scores [N_test, C] from the ``k`` most cosine-similar training features,
    each voting ``exp(sim / temperature)`` for its label."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    scores = []
    for chunk in test_x.split(512):
        sim, idx = (chunk @ train_x.T).topk(k, dim=1)  # [n, k]
        votes = torch.zeros(len(chunk), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_probe_once(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: dict
) -> dict[str, Any]:
    """One seed of the kNN probe -> ``{"top1", "top5", ...}`` in percent."""
    t0, seed = time.perf_counter(), int(cfg.get("seed", 0))
    encoder, info, size = _encoder(encoder_ref, default_config, cfg, seed)
    device = pick_device(cfg.get("device"))
    train_set, val_set, num_classes, workers = _loaders(manifest, cfg, size, train_aug=False, seed=seed)
    bs, pool = int(cfg.get("extract_batch_size", 128)), cfg.get("pool", "mean")
    train_x, train_y = extract_features(encoder, DataLoader(train_set, bs, num_workers=workers), pool, device)
    val_x, val_y = extract_features(encoder, DataLoader(val_set, bs, num_workers=workers), pool, device)
    scores = knn_classify(
        train_x, train_y, val_x, num_classes, int(cfg.get("k", 20)), float(cfg.get("temperature", 0.07))
    )
    metrics = evaluate_logits(scores, val_y)
    metrics.update(
        k=int(cfg.get("k", 20)),
        train_images=len(train_set),
        val_images=len(val_set),
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics


def run_knn_probe(manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: dict) -> dict:
    """kNN probe over ``cfg.seeds`` (a transfer runner: same signature as ``run_linear_probe``)."""
    return over_seeds(knn_probe_once, manifest, encoder_ref, default_config, cfg)


def run_linear_probe_seeds(manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: dict) -> dict:
    """MAE's linear probe (``run_linear_probe``) over ``cfg.seeds``."""
    return over_seeds(run_linear_probe, manifest, encoder_ref, default_config, cfg)


# ----------------------------------------------------------------------- linear segmentation probe
class LinearSegHead(nn.Module):
    """DINOv2's linear head: BatchNorm over the patch-token channels, then a 1x1 conv (a per-token linear)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.conv(self.bn(tokens))  # [B, D, h, w] -> [B, K, h, w]


@torch.no_grad()
def patch_token_maps(
    encoder: ViTEncoder, loader: DataLoader, device: torch.device, label_size: int | None
) -> tuple[Tensor, list[Tensor]]:
    """Frozen final patch tokens as maps [N, D, h, w], and the masks (resized nearest to ``label_size``
    when given, else kept at their own resolution)."""
    encoder.eval().to(device)
    maps, masks = [], []
    for x, ys in loader:
        tokens = encoder.forward_features(x.to(device))[:, 1:]  # [B, L, D]
        h, w = x.shape[-2] // encoder.patch_size, x.shape[-1] // encoder.patch_size
        maps.append(tokens.transpose(1, 2).reshape(len(x), -1, h, w).float().cpu())
        for y in ys:
            if label_size is not None:
                y = F.interpolate(y[None, None].float(), size=(label_size, label_size), mode="nearest")[0, 0]
            masks.append(y.long())
    return torch.cat(maps), masks


def seg_probe_once(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: dict
) -> dict[str, Any]:
    """One seed of the linear segmentation probe -> ``{"miou", "pixel_acc", ...}`` in percent."""
    from maelab.transfer.data import collate_eval

    t0, seed = time.perf_counter(), int(cfg.get("seed", 0))
    encoder, info, size = _encoder(encoder_ref, default_config, cfg, seed)
    device = pick_device(cfg.get("device"))
    data = cfg.get("data", {})
    sources = data.get("sources", ["scenes"])
    num_classes = resolve_num_classes(data)
    rows = {
        split: select(manifest, sources, data.get(key, split), "mask_path", data.get(limit))
        for split, key, limit in (
            ("train", "train_split", "max_train_images"),
            ("val", "eval_split", "max_eval_images"),
        )
    }
    bs = int(cfg.get("extract_batch_size", 128))
    loader = {
        s: DataLoader(SegmentationSet(r, size, train=False), bs, collate_fn=collate_eval)
        for s, r in rows.items()
    }
    train_x, train_masks = patch_token_maps(encoder, loader["train"], device, size)
    train_y = torch.stack(train_masks)  # [N, size, size]
    val_x, val_masks = patch_token_maps(encoder, loader["val"], device, None)

    torch.manual_seed(seed)
    head = LinearSegHead(train_x.shape[1], num_classes)
    batch = min(int(cfg.get("batch_size", 64)), len(train_x))
    steps_per_epoch = max(1, len(train_x) // batch)
    total = int(cfg.get("epochs", 10)) * steps_per_epoch
    lr = float(cfg.get("lr", 1e-2))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=float(cfg.get("weight_decay", 1e-4)))
    sched = CosineSchedule(lr, total, int(cfg.get("warmup_epochs", 1)) * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    step = 0
    while step < total:
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            apply_lr(opt, sched(step))
            logits = F.interpolate(
                head(train_x[idx]), size=(size, size), mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, train_y[idx], ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for i, mask in enumerate(val_masks):
            logits = F.interpolate(
                head(val_x[i : i + 1]), size=mask.shape, mode="bilinear", align_corners=False
            )
            cm += confusion_matrix(logits[0].argmax(0), mask, num_classes)
    metrics = miou_from_confusion(cm)
    metrics.pop("iou")
    metrics.update(
        num_classes=num_classes,
        train_images=len(train_x),
        val_images=len(val_x),
        steps=total,
        final_loss=round(float(loss.item()), 4),
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics


def run_seg_probe(manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: dict) -> dict:
    """Linear segmentation probe over ``cfg.seeds``."""
    return over_seeds(seg_probe_once, manifest, encoder_ref, default_config, cfg)


def run_finetune_seeds(manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: dict) -> dict:
    """MAE's end-to-end fine-tuning (``run_finetune``) over ``cfg.seeds``."""
    from maelab.transfer.classification import run_finetune

    return over_seeds(run_finetune, manifest, encoder_ref, default_config, cfg)
