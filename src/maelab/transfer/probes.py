"""Frozen-feature probes that respond at small scale, each over several seeds (mean and standard deviation).

- **kNN probe** (DINO, Caron et al. 2021, §4.1 / ``eval_knn``): L2-normalised frozen features, cosine
  similarity to every training feature, the ``k`` nearest vote with weight ``exp(sim / T)`` (k = 20,
  T = 0.07 as DINO). No training at all, so it shows what the features hold without any optimiser.
- **Linear segmentation probe** (DINOv2, Oquab et al. 2023, §7.4 "linear"): a linear layer on the frozen
  final patch tokens (after BatchNorm, as DINOv2's ``BNHead``) predicts class logits at the patch grid,
  bilinearly upsampled to the label resolution; mIoU at the original mask resolution.
- **Foreground probe** (``fg_probe``): the same head and training on masks made class-agnostic (every
  instance pixel 1, background 0; :func:`foreground_masks`), so it credits separating objects from background
  even where the object's class is not recognised.
- **Linear classification probe over seeds**: MAE's probe head and training
  (:func:`maelab.transfer.classification.train_linear_probe`), once per seed, on features shared with kNN.

A seed sets the probe's initialisation and shuffling, and the random-init encoder's weights (so the
``random_init`` row's spread includes the spread of random encoders). :func:`over_seeds` runs any
single-seed task per seed and reports every float metric ``m`` as the mean, with ``m_std`` (population
standard deviation, ``ddof=0``) and ``m_seeds`` (the per-seed values). Each probe's parameters and defaults
are a typed config in :mod:`maelab.transfer.config` (``LinearProbeConfig``, ``KnnProbeConfig``,
``SegProbeConfig``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
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
from maelab.transfer.classification import classification_sets, evaluate_logits, task_size, train_linear_probe
from maelab.transfer.config import (
    FgProbeConfig,
    FrozenProbeConfig,
    KnnProbeConfig,
    LinearProbeConfig,
    SegProbeConfig,
    TaskConfig,
)
from maelab.transfer.data import IGNORE_INDEX, SegmentationSet, collate_eval, select
from maelab.transfer.loop import check_finite, start
from maelab.transfer.segmentation import confusion_matrix, miou_from_confusion, resolve_num_classes

log = logging.getLogger(__name__)

Runner = Callable[..., dict[str, Any]]  # (manifest, encoder_ref, default_config, cfg, *args) -> metrics


def over_seeds(
    run: Runner, manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: Any, *args
) -> dict:
    """Run ``run`` once per seed in ``cfg.seeds``, each with ``cfg.seed`` set to it; float metrics become
    ``m`` (mean), ``m_std`` and ``m_seeds`` (the last two only with more than one seed); others come from
    the first seed."""
    seeds = [int(s) for s in cfg.seeds]
    t0 = time.perf_counter()
    runs = [
        run(manifest, encoder_ref, default_config, dataclasses.replace(cfg, seed=s), *args) for s in seeds
    ]
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, float) and key != "seconds":  # metrics; counts (ints) come from the first seed
            values = np.array([float(r[key]) for r in runs])
            out[key] = round(float(values.mean()), 3)
            if len(runs) > 1:  # one seed has no spread to report: no `_std` rather than a false 0.0
                out[f"{key}_std"] = round(float(values.std()), 3)
                out[f"{key}_seeds"] = [round(float(v), 3) for v in values]
        elif key != "seconds":
            out[key] = first
    out.update(seeds=seeds, seconds=round(time.perf_counter() - t0, 2))
    return out


def _encoder(
    encoder_ref: Any, default_config: dict, cfg: TaskConfig
) -> tuple[ViTEncoder, dict, torch.device]:
    """The frozen encoder at the task's size, and the device; ``cfg.seed`` draws a random init's weights."""
    device = start(cfg)
    encoder, info = load_encoder(
        encoder_ref, default_config, img_size=task_size(cfg, default_config), patch_size=cfg.patch_size
    )
    return encoder, info, device


# Frozen features are the expensive part of every probe. A pre-trained encoder gives the same features for
# every seed and every probe on the same images, so they are extracted once per process (the Kedro runner
# runs one encoder's probe nodes in one process) and kept for the next probe; a random init is keyed by seed.
_FEATURES: dict[tuple, Any] = {}
_FEATURES_KEEP = 4  # entries (one entry: train + val features of one encoder / seed / view)


def _cached(key: tuple, compute: Callable[[], Any]) -> Any:
    if key not in _FEATURES:
        while len(_FEATURES) >= _FEATURES_KEEP:
            _FEATURES.pop(next(iter(_FEATURES)))
        _FEATURES[key] = compute()
    return _FEATURES[key]


def _feature_key(kind: str, encoder_ref: Any, cfg: TaskConfig, size: int, rows: int) -> tuple:
    ref = None if encoder_ref is None else str(encoder_ref)
    stamp = Path(ref).stat().st_mtime_ns if ref and Path(ref).is_file() else None
    data = cfg.data
    split = (data.train_split, data.eval_split, tuple(data.sources))
    seed = cfg.seed if ref is None else None
    return (kind, ref, stamp, seed, size, cfg.patch_size, split, rows, cfg.device)


@torch.no_grad()
def extract_tokens(encoder: ViTEncoder, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    """Frozen final tokens ``[N, 1+L, D]`` (after the encoder norm) and labels ``[N]``."""
    encoder.eval().to(device)
    tokens, labels = [], []
    for x, y in loader:
        tokens.append(encoder.forward_features(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(tokens), torch.cat(labels)


def pool_tokens(tokens: Tensor, pool: str) -> Tensor:
    """``cls``: the CLS token; ``mean``: the mean of the patch tokens. [N, 1+L, D] -> [N, D]."""
    if pool not in ("cls", "mean"):
        raise ValueError(f"probe pool: expected cls | mean, got {pool!r}")
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)


def classification_features(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: FrozenProbeConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, dict]:
    """Frozen final tokens ``[N, 1+L, D]`` of the train and val images (classification eval view), their
    labels, the class count and the encoder info; cached (see above)."""
    size = task_size(cfg, default_config)
    train_set, val_set, num_classes = classification_sets(manifest, cfg, size, train_aug=False)

    def compute() -> tuple:
        encoder, info, device = _encoder(encoder_ref, default_config, cfg)
        out = []
        for dataset in (train_set, val_set):
            loader = DataLoader(dataset, cfg.extract_batch_size, num_workers=cfg.num_workers)
            out += extract_tokens(encoder, loader, device)
        return (*out, num_classes, info)

    key = _feature_key("cls", encoder_ref, cfg, size, len(train_set) * 100_003 + len(val_set))
    return _cached(key, compute)


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
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: KnnProbeConfig
) -> dict[str, Any]:
    """One seed of the kNN probe -> ``{"top1", "top5", ...}`` in percent."""
    t0 = time.perf_counter()
    train_t, train_y, val_t, val_y, num_classes, info = classification_features(
        manifest, encoder_ref, default_config, cfg
    )
    train_x, val_x = pool_tokens(train_t, cfg.pool), pool_tokens(val_t, cfg.pool)
    if cfg.standardize:  # z-score with train statistics, as the linear probe's BN does
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
        train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    scores = knn_classify(train_x, train_y, val_x, num_classes, cfg.k, cfg.temperature)
    metrics = evaluate_logits(scores, val_y)
    metrics.update(
        k=cfg.k,
        train_images=len(train_y),
        val_images=len(val_y),
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics


def linear_probe_once(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: LinearProbeConfig
) -> dict[str, Any]:
    """One seed of MAE's linear probe (§A.3; the head and its training are
    :func:`maelab.transfer.classification.train_linear_probe`) on the cached frozen features."""
    t0 = time.perf_counter()
    train_t, train_y, val_t, val_y, num_classes, info = classification_features(
        manifest, encoder_ref, default_config, cfg
    )
    head = train_linear_probe(pool_tokens(train_t, cfg.pool), train_y, num_classes, cfg, cfg.seed)
    with torch.no_grad():
        metrics = evaluate_logits(head(pool_tokens(val_t, cfg.pool)), val_y)
    metrics.update(
        num_classes=num_classes,
        train_images=len(train_y),
        val_images=len(val_y),
        pool=cfg.pool,
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics


def run_knn_probe(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: KnnProbeConfig
) -> dict[str, Any]:
    """kNN probe over ``cfg.seeds`` -> top-1 / top-5 in percent, each with ``_std`` and ``_seeds``.

    The kNN vote has no randomness of its own: a seed changes only a random init's weights. A pre-trained
    encoder is therefore evaluated once (the first seed), and its row has no ``_std``."""
    if encoder_ref is not None:
        cfg = dataclasses.replace(cfg, seeds=tuple(cfg.seeds[:1]))
    return over_seeds(knn_probe_once, manifest, encoder_ref, default_config, cfg)


def run_linear_probe(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: LinearProbeConfig
) -> dict[str, Any]:
    """MAE's linear probe over ``cfg.seeds`` (features extracted once per encoder, see above)."""
    return over_seeds(linear_probe_once, manifest, encoder_ref, default_config, cfg)


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


def segmentation_features(
    manifest: pd.DataFrame, encoder_ref: Any, default_config: dict, cfg: SegProbeConfig
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], dict]:
    """Frozen patch-token maps of the train images with their masks at the input size ``[N, S, S]``, and
    of the eval images with their masks at their own size; the encoder info; cached (see above)."""
    data, size = cfg.data, task_size(cfg, default_config)
    rows = {
        "train": select(manifest, data.sources, data.train_split, "mask_path", data.max_train_images),
        "val": select(manifest, data.sources, data.eval_split, "mask_path", data.max_eval_images),
    }

    def compute() -> tuple:
        encoder, info, device = _encoder(encoder_ref, default_config, cfg)
        loader = {
            split: DataLoader(
                SegmentationSet(r, size, train=False, reduce_zero_label=data.reduce_zero_label),
                cfg.extract_batch_size,
                collate_fn=collate_eval,
                num_workers=cfg.num_workers,
            )
            for split, r in rows.items()
        }
        train_x, train_masks = patch_token_maps(encoder, loader["train"], device, size)
        val_x, val_masks = patch_token_maps(encoder, loader["val"], device, None)
        return train_x, torch.stack(train_masks), val_x, val_masks, info

    key = _feature_key("seg", encoder_ref, cfg, size, len(rows["train"]) * 100_003 + len(rows["val"]))
    return _cached(key, compute)


def train_seg_head(
    train_x: Tensor, train_y: Tensor, num_classes: int, cfg: SegProbeConfig
) -> tuple[LinearSegHead, int, float]:
    """Train :class:`LinearSegHead` on cached patch-token maps (logits upsampled to the masks): AdamW,
    warm-up then cosine. Returns the head (eval mode), the step count and the final loss."""
    torch.manual_seed(cfg.seed)
    head = LinearSegHead(train_x.shape[1], num_classes)
    batch = min(cfg.batch_size, len(train_x))
    steps_per_epoch = max(1, len(train_x) // batch)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = CosineSchedule(cfg.lr, total, cfg.warmup_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    head.train()
    step, loss = 0, torch.tensor(float("nan"))
    while step < total:
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            apply_lr(opt, sched(step))
            logits = F.interpolate(
                head(train_x[idx]), size=train_y.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, train_y[idx], ignore_index=IGNORE_INDEX)
            check_finite(cfg.TASK, loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval(), total, round(float(loss.item()), 4)


def foreground_masks(masks: Tensor) -> Tensor:
    """Class masks -> foreground (1) / background (0); ignored pixels stay ignored."""
    return torch.where(masks == IGNORE_INDEX, masks, (masks > 0).long())


def seg_probe_once(
    manifest: pd.DataFrame,
    encoder_ref: Any,
    default_config: dict,
    cfg: SegProbeConfig,
    train_annotations: dict | None = None,
) -> dict[str, Any]:
    """One seed of the linear segmentation probe (class-wise, or foreground / background for an
    :class:`FgProbeConfig`) -> ``{"miou", "pixel_acc", ...}`` in percent."""
    t0 = time.perf_counter()
    num_classes = resolve_num_classes(cfg, train_annotations)
    train_x, train_y, val_x, val_masks, info = segmentation_features(
        manifest, encoder_ref, default_config, cfg
    )
    if isinstance(cfg, FgProbeConfig):
        train_y, val_masks = foreground_masks(train_y), [foreground_masks(m) for m in val_masks]
    head, steps, final_loss = train_seg_head(train_x, train_y, num_classes, cfg)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for i, mask in enumerate(val_masks):  # logits back to the mask's own size
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
        steps=steps,
        final_loss=final_loss,
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics


def run_seg_probe(
    manifest: pd.DataFrame,
    encoder_ref: Any,
    default_config: dict,
    cfg: SegProbeConfig,
    train_annotations: dict | None = None,
) -> dict[str, Any]:
    """Linear segmentation probe over ``cfg.seeds``. train_annotations: the train split's COCO-format JSON
    (its categories give the class count unless ``data.num_classes`` is set)."""
    return over_seeds(seg_probe_once, manifest, encoder_ref, default_config, cfg, train_annotations)
