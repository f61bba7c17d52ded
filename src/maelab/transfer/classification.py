"""Classification transfer: end-to-end fine-tuning and linear probing, as MAE (He et al. 2022, §A.2, §A.3).

Fine-tune: global average pooling of the patch tokens + ``fc_norm`` + linear head, AdamW with layer-wise
lr decay, drop path, mixup/cutmix and label smoothing (MAE Tab. 9). Linear probe: the frozen encoder's CLS
(or mean-pooled) feature -> ``BatchNorm1d(affine=False, eps=1e-6)`` -> ``Linear``, LARS, no weight decay
(MAE Tab. 10): the head and its training are here (:func:`train_linear_probe`); the task, which extracts
frozen features once and shares them with the kNN probe, is :func:`maelab.transfer.probes.run_linear_probe`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from maelab.models.vit import ViTEncoder
from maelab.train.schedule import CosineSchedule
from maelab.transfer.backbone import apply_lr, task_encoder
from maelab.transfer.config import FineTuneConfig, LinearProbeConfig, TaskConfig
from maelab.transfer.data import ClassificationSet, select, train_loader
from maelab.transfer.loop import evaluate, fine_tune, start

log = logging.getLogger(__name__)


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, per k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = pred == target[:, None]
    return [int(hit[:, : min(k, kmax)].any(1).sum()) for k in ks]


# ---------------------------------------------------------------------------------------- models
class FineTuneClassifier(nn.Module):
    """Encoder + (global pool + fc_norm | CLS after the encoder norm) + head (MAE ``models_vit``)."""

    def __init__(self, encoder: ViTEncoder, num_classes: int, global_pool: bool = True):
        super().__init__()
        self.encoder, self.global_pool = encoder, global_pool
        dim = encoder.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if global_pool else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE main_finetune: head init std 2e-5
        nn.init.zeros_(self.head.bias)

    def features(self, x: Tensor) -> Tensor:
        x = self.encoder.embed(x)  # [B, 1+L, D]
        for blk in self.encoder.blocks:
            x = blk(x)
        if self.global_pool:  # MAE: average the patch tokens, fc_norm replaces the encoder norm
            return self.fc_norm(x[:, 1:].mean(1))  # [B, D]
        return self.encoder.norm(x)[:, 0]  # [B, D]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # [B, C]


class LinearProbe(nn.Module):
    """MAE linear probe head: BatchNorm without affine (a feature whitening) then a linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # MAE main_linprobe
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Tensor) -> Tensor:
        return self.fc(self.bn(feats))


def train_linear_probe(
    train_x: Tensor, train_y: Tensor, num_classes: int, cfg: LinearProbeConfig, seed: int = 0
) -> LinearProbe:
    """Train :class:`LinearProbe` on cached features: LARS (or SGD), warm-up + cosine, no weight decay."""
    torch.manual_seed(seed)
    head = LinearProbe(train_x.shape[1], num_classes)
    batch = min(cfg.batch_size, len(train_x))
    lr = float(cfg.lr) if cfg.lr is not None else cfg.blr * batch / 256
    wd = cfg.weight_decay
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    if cfg.optimizer == "lars":  # MAE Tab. 10 and its LARS: trust ratio |w|/|g| (coeff 1), 1-D params exempt
        from timm.optim import Lars

        opt = Lars(
            [{"params": weights, "always_adapt": True}, {"params": others, "weight_decay": 0.0}],
            lr=lr,
            momentum=0.9,
            weight_decay=wd,
            trust_coeff=1.0,
        )
    else:
        opt = torch.optim.SGD(
            [{"params": weights}, {"params": others, "weight_decay": 0.0}],
            lr=lr,
            momentum=0.9,
            weight_decay=wd,
        )
    steps_per_epoch = max(1, len(train_x) // batch)
    total = cfg.epochs * steps_per_epoch
    sched = CosineSchedule(lr, total, cfg.warmup_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    step = 0
    while step < total:
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            apply_lr(opt, sched(step))
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, dataset: Any, batch_size: int, num_workers: int, device: torch.device
) -> dict[str, Any]:
    """Top-1 / top-5 (:func:`evaluate_logits`) of ``model`` on every ``(image, label)`` of ``dataset``."""
    logits, labels = [], []

    def predict(batch_xy: tuple[Tensor, Tensor]) -> None:
        logits.append(model(batch_xy[0].to(device)).float().cpu())
        labels.append(batch_xy[1])

    evaluate(model, DataLoader(dataset, batch_size, num_workers=num_workers), predict)
    return evaluate_logits(torch.cat(logits), torch.cat(labels))


@torch.no_grad()
def evaluate_logits(logits: Tensor, labels: Tensor) -> dict[str, float]:
    top1, top5 = topk_correct(logits, labels)
    n = max(1, len(labels))
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


# --------------------------------------------------------------------------------------- tasks
def class_count(rows: pd.DataFrame) -> int:
    return int(rows["label"].astype("int64").max()) + 1


def classification_sets(
    manifest: pd.DataFrame, cfg: TaskConfig, size: int, train_aug: bool
) -> tuple[ClassificationSet, ClassificationSet, int]:
    """The task's train and eval :class:`ClassificationSet` (rows of ``cfg.data``) and the class count.
    ``train_aug``: the train set draws random resized crops (``cfg.crop_scale``) and flips, plus the
    task's RandAugment and random erasing when it has them (fine-tune); else both sets are the eval view."""
    data = cfg.data
    train_rows = select(manifest, data.sources, data.train_split, "label", data.max_train_images)
    val_rows = select(manifest, data.sources, data.eval_split, "label", data.max_eval_images)
    aug = {}
    if train_aug:
        aug = {
            "scale": cfg.crop_scale,
            "rand_augment": getattr(cfg, "rand_augment", None),
            "erase_prob": getattr(cfg, "erase_prob", 0.0),
        }
    train_set = ClassificationSet(train_rows, size, train=train_aug, seed=cfg.seed, **aug)
    val_set = ClassificationSet(val_rows, size, train=False)
    return train_set, val_set, max(class_count(train_rows), class_count(val_rows))


def task_size(cfg: TaskConfig, default_config: dict[str, Any]) -> int:
    """The task's input size: ``img_size``, else the encoder's pre-training size (224 when unknown)."""
    return int(cfg.img_size or default_config.get("img_size", 224))


def run_finetune(
    manifest: pd.DataFrame, encoder_ref: str | None, default_config: dict[str, Any], cfg: FineTuneConfig
) -> dict[str, Any]:
    """End-to-end fine-tuning (MAE §A.2) -> ``{"top1", "top5", ...}`` in percent."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    t0 = time.perf_counter()
    device = start(cfg)
    # timm's Mixup draws from NumPy's global RNG: seed it for the run, restore it after
    numpy_state = np.random.get_state()  # noqa: NPY002
    np.random.seed(cfg.seed)  # noqa: NPY002
    size = task_size(cfg, default_config)
    encoder, info = task_encoder(encoder_ref, default_config, cfg, size)
    train_set, val_set, num_classes = classification_sets(manifest, cfg, size, train_aug=True)
    model = FineTuneClassifier(encoder, num_classes, global_pool=cfg.global_pool).to(device)

    batch = min(cfg.batch_size, len(train_set))
    batch -= batch % 2  # mixup pairs samples within the batch
    mixup = (
        Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        if cfg.mixup > 0 or cfg.cutmix > 0
        else None
    )
    criterion = (
        SoftTargetCrossEntropy()
        if mixup
        else (LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss())
    )

    def loss_fn(batch_xy: tuple[Tensor, Tensor]) -> tuple[Tensor, None]:
        x, y = (t.to(device) for t in batch_xy)
        if mixup is not None:
            x, y = mixup(x, y)
        return criterion(model(x), y), None

    loader = train_loader(train_set, cfg.batch_size, cfg.num_workers, cfg.seed)
    try:
        fit = fine_tune(
            model, loader, loss_fn, cfg, num_layers=len(encoder.blocks), prefix="encoder.", batch=batch
        )
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002

    metrics = evaluate_classifier(model, val_set, cfg.eval_batch_size, cfg.num_workers, device)
    metrics.update(
        num_classes=num_classes,
        train_images=len(train_set),
        val_images=len(val_set),
        steps=fit.steps,
        final_loss=fit.final_loss,
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics
