"""Classification transfer: end-to-end fine-tuning and linear probing, as MAE (He et al. 2022, §A.2, §A.3).

Fine-tune: global average pooling of the patch tokens + ``fc_norm`` + linear head, AdamW with layer-wise
lr decay, drop path, mixup/cutmix and label smoothing (MAE Tab. 9). Linear probe: the frozen encoder's CLS
(or mean-pooled) feature -> ``BatchNorm1d(affine=False, eps=1e-6)`` -> ``Linear``, LARS, no weight decay
(MAE Tab. 10). The probe extracts features once and trains the head on the cached features (no augmentation;
on CPU this is what makes it cheap).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from maelab.models.vit import ViTEncoder
from maelab.train.distributed import pick_device
from maelab.train.schedule import CosineSchedule
from maelab.transfer.backbone import adamw, apply_lr, load_encoder, param_groups_lrd, task_encoder
from maelab.transfer.data import ClassificationSet, select, train_loader

log = logging.getLogger(__name__)


def optimizer_step(
    task: str,
    loss: Tensor,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    total: int,
    clip_grad: float | None = None,
    parts: dict[str, Tensor] | None = None,
) -> None:
    """One optimiser step of a transfer task: stop on a non-finite loss (naming the step and the loss
    ``parts``), backward, optional gradient clipping, step; log the loss five times per run."""
    if not torch.isfinite(loss):
        detail = f" ({', '.join(f'{k}={v.item():.4g}' for k, v in parts.items())})" if parts else ""
        raise FloatingPointError(f"{task}: loss is {loss.item()} at step {step}{detail}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), float(clip_grad))
    opt.step()
    if step % max(1, total // 5) == 0:
        log.info("%s step %d/%d loss %.4f", task, step, total, loss.item())


def forever(loader: DataLoader) -> Iterator[Any]:
    epoch = 0
    while True:
        if hasattr(loader.dataset, "epoch"):
            loader.dataset.epoch = epoch
        yield from loader
        epoch += 1


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


@torch.no_grad()
def extract_features(
    encoder: ViTEncoder, loader: DataLoader, pool: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Frozen features [N, D] (``pool``: ``cls`` after the norm, or ``mean`` of patch tokens), labels [N]."""
    if pool not in ("cls", "mean"):
        raise ValueError(f"transfer.tasks.linear_probe.pool: expected cls | mean, got {pool!r}")
    encoder.eval().to(device)
    feats, labels = [], []
    for x, y in loader:
        tokens = encoder.forward_features(x.to(device))  # [B, 1+L, D]
        feats.append((tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def train_linear_probe(
    train_x: Tensor, train_y: Tensor, num_classes: int, cfg: dict[str, Any], seed: int = 0
) -> LinearProbe:
    """Train :class:`LinearProbe` on cached features: LARS (or SGD), warm-up + cosine, no weight decay."""
    torch.manual_seed(seed)
    head = LinearProbe(train_x.shape[1], num_classes)
    batch = min(int(cfg.get("batch_size", 256)), len(train_x))
    lr = float(cfg["lr"]) if cfg.get("lr") is not None else float(cfg.get("blr", 0.1)) * batch / 256
    wd = float(cfg.get("weight_decay", 0.0))
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    if (
        cfg.get("optimizer", "lars") == "lars"
    ):  # MAE Tab. 10 and its LARS: trust ratio |w|/|g| (coeff 1), 1-D params exempt
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
    total = int(cfg.get("epochs", 90)) * steps_per_epoch
    sched = CosineSchedule(lr, total, int(cfg.get("warmup_epochs", 10)) * steps_per_epoch)
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
def evaluate_logits(logits: Tensor, labels: Tensor) -> dict[str, float]:
    top1, top5 = topk_correct(logits, labels)
    n = max(1, len(labels))
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


# --------------------------------------------------------------------------------------- tasks
def class_count(rows: pd.DataFrame) -> int:
    return int(rows["label"].astype("int64").max()) + 1


def _loaders(manifest: pd.DataFrame, cfg: dict[str, Any], size: int, train_aug: bool, seed: int):
    data = cfg.get("data", {})
    sources = data.get("sources", ["scenes"])
    train_rows = select(
        manifest, sources, data.get("train_split", "train"), "label", data.get("max_train_images")
    )
    val_rows = select(manifest, sources, data.get("eval_split", "val"), "label", data.get("max_eval_images"))
    scale = tuple(cfg.get("crop_scale", (0.08, 1.0)))
    train_set = ClassificationSet(
        train_rows,
        size,
        train=train_aug,
        scale=scale,
        seed=seed,
        rand_augment=cfg.get("rand_augment"),
        erase_prob=float(cfg.get("erase_prob", 0.0)),
    )
    val_set = ClassificationSet(val_rows, size, train=False)
    workers = int(cfg.get("num_workers", 0))
    return train_set, val_set, max(class_count(train_rows), class_count(val_rows)), workers


def run_linear_probe(
    manifest: pd.DataFrame, encoder_ref: str | None, default_config: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    """Linear probe of a frozen encoder (MAE §A.3) -> ``{"top1", "top5", ...}`` in percent."""
    t0, seed = time.perf_counter(), int(cfg.get("seed", 0))
    device = pick_device(cfg.get("device"))
    size = int(cfg.get("img_size", default_config.get("img_size", 224)))
    torch.manual_seed(seed)  # the random_init encoder's weights
    encoder, info = load_encoder(encoder_ref, default_config, img_size=size, patch_size=cfg.get("patch_size"))
    train_set, val_set, num_classes, workers = _loaders(manifest, cfg, size, train_aug=False, seed=seed)
    bs = int(cfg.get("extract_batch_size", 64))
    train_x, train_y = extract_features(
        encoder, DataLoader(train_set, bs, num_workers=workers), cfg.get("pool", "cls"), device
    )
    val_x, val_y = extract_features(
        encoder, DataLoader(val_set, bs, num_workers=workers), cfg.get("pool", "cls"), device
    )
    t_feat = time.perf_counter() - t0
    head = train_linear_probe(train_x, train_y, num_classes, cfg, seed)
    metrics = evaluate_logits(head(val_x), val_y)
    metrics.update(
        num_classes=num_classes,
        train_images=len(train_set),
        val_images=len(val_set),
        pool=cfg.get("pool", "cls"),
        feature_seconds=round(t_feat, 2),
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics


def run_finetune(
    manifest: pd.DataFrame, encoder_ref: str | None, default_config: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    """End-to-end fine-tuning (MAE §A.2) -> ``{"top1", "top5", ...}`` in percent."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    t0, seed = time.perf_counter(), int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    # timm's Mixup draws from NumPy's global RNG: seed it for the run, restore it after
    numpy_state = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002
    device = pick_device(cfg.get("device"))
    size = int(cfg.get("img_size", default_config.get("img_size", 224)))
    encoder, info = task_encoder(encoder_ref, default_config, cfg, size)
    train_set, val_set, num_classes, workers = _loaders(manifest, cfg, size, train_aug=True, seed=seed)
    model = FineTuneClassifier(encoder, num_classes, global_pool=bool(cfg.get("global_pool", True))).to(
        device
    )

    batch = min(int(cfg.get("batch_size", 64)), len(train_set))
    batch -= batch % 2  # mixup pairs samples within the batch
    lr = float(cfg["lr"]) if cfg.get("lr") is not None else float(cfg.get("blr", 5e-4)) * batch / 256
    groups = param_groups_lrd(
        model,
        float(cfg.get("weight_decay", 0.05)),
        float(cfg.get("layer_decay", 0.75)),
        len(encoder.blocks),
        no_weight_decay={"cls_token", "pos_embed"},
        prefix="encoder.",
    )
    opt = adamw(groups, lr, tuple(cfg.get("betas", (0.9, 0.999))))
    steps_per_epoch = max(1, len(train_set) // batch)
    total = int(cfg["steps"]) if cfg.get("steps") else int(cfg.get("epochs", 100)) * steps_per_epoch
    warmup = (
        int(cfg["warmup_steps"])
        if cfg.get("warmup_steps") is not None
        else int(cfg.get("warmup_epochs", 5)) * steps_per_epoch
    )
    sched = CosineSchedule(lr, total, min(warmup, total), float(cfg.get("min_lr", 1e-6)))

    mix_on = float(cfg.get("mixup", 0.8)) > 0 or float(cfg.get("cutmix", 1.0)) > 0
    smoothing = float(cfg.get("smoothing", 0.1))
    mixup = (
        Mixup(
            mixup_alpha=float(cfg.get("mixup", 0.8)),
            cutmix_alpha=float(cfg.get("cutmix", 1.0)),
            label_smoothing=smoothing,
            num_classes=num_classes,
        )
        if mix_on
        else None
    )
    criterion = (
        SoftTargetCrossEntropy()
        if mixup
        else (LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss())
    )

    loader = train_loader(train_set, cfg, 64, seed)
    model.train()
    batches = forever(loader)
    for step in range(total):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        if mixup is not None:
            x, y = mixup(x, y)
        apply_lr(opt, sched(step))
        loss = criterion(model(x), y)
        optimizer_step("fine-tune", loss, model, opt, step, total, cfg.get("clip_grad"))
    np.random.set_state(numpy_state)  # noqa: NPY002

    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for x, y in DataLoader(val_set, int(cfg.get("eval_batch_size", 64)), num_workers=workers):
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
        encoder=info["path"],
    )
    return metrics
