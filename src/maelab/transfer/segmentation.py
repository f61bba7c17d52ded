"""Semantic segmentation: UperNet on multi-level ViT features, as BEiT (Bao et al. 2021, §3.3 / App. C) and
MAE (He et al. 2022, §A.4).

Four encoder blocks (ViT-B: 3, 5, 7, 11) are read out, resampled to four scales (x4 by two deconvs, x2 by a
deconv, identity, /2 by max-pool) and fed to segmentation-models-pytorch's ``UPerNetDecoder`` (a maintained
UperNet head: PPM + FPN + fusion). As in mmsegmentation's BEiT/MAE UperNet config, an auxiliary FCN head
(one 3x3 conv, 256 channels) on the third level adds 0.4 x its cross-entropy during training.
Training: AdamW, layer-wise lr decay, linear warm-up then poly decay, cross-entropy with ignore index 255.
Metric: mIoU from a confusion matrix, optionally averaged over seeds (long-seq MAE §4.1: the mean of 3 runs).
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
from maelab.transfer.backbone import adamw, apply_lr, param_groups_lrd, task_encoder
from maelab.transfer.classification import forever, optimizer_step, pick_device
from maelab.transfer.data import IGNORE_INDEX, SegmentationSet, collate_eval, select, train_loader

log = logging.getLogger(__name__)


def default_out_indices(depth: int) -> list[int]:
    """BEiT/MAE read-out blocks: 3, 5, 7, 11 for depth 12, else four evenly spaced ones ending at the last."""
    if depth == 12:
        return [3, 5, 7, 11]
    return [max(0, (i + 1) * depth // 4 - 1) for i in range(4)]  # depth < 4 repeats blocks


class MultiLevelNeck(nn.Module):
    """BEiT's fpn1..fpn4: [B, D, h, w] x 4 -> strides x4, x2, x1, x0.5 of the patch grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, 2)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class ViTUperNet(nn.Module):
    """Encoder -> 4 block outputs -> :class:`MultiLevelNeck` -> smp ``UPerNetDecoder`` -> 1x1 classifier."""

    def __init__(
        self,
        encoder: ViTEncoder,
        num_classes: int,
        out_indices: list[int] | None = None,
        decoder_channels: int = 512,
        dropout: float = 0.1,
        aux_channels: int = 0,
    ):
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        super().__init__()
        self.encoder = encoder
        self.out_indices = list(out_indices) if out_indices else default_out_indices(len(encoder.blocks))
        if len(self.out_indices) != 4:
            raise ValueError(f"segmentation.out_indices: expected 4 blocks, got {self.out_indices}")
        dim = encoder.embed_dim
        self.neck = MultiLevelNeck(dim)
        # smp counts features from stride 1: [1, 1/2, 1/4, 1/8, 1/16, 1/32]; the first two are skipped
        self.decoder = UPerNetDecoder(
            encoder_channels=[0, 0, dim, dim, dim, dim], encoder_depth=5, decoder_channels=decoder_channels
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        # mmseg FCNHead(in_index=2, num_convs=1, concat_input=False): used in training only (0 = none)
        self.aux_head = (
            nn.Sequential(
                nn.Conv2d(dim, aux_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(aux_channels),
                nn.ReLU(inplace=True),
                nn.Dropout2d(dropout),
                nn.Conv2d(aux_channels, num_classes, 1),
            )
            if aux_channels
            else None
        )

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] -> the neck's 4 maps [B, D, 4h, 4w] ... [B, D, h/2, w/2]."""
        _, inter = self.encoder.forward_intermediates(x, indices=self.out_indices)  # 4 x [B, 1+L, D]
        h, w = self.encoder.grid
        maps = [t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in inter]  # 4 x [B, D, h, w]
        return self.neck(maps)

    def head(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        """The UperNet decoder and classifier: logits [B, K, *size]."""
        out = self.decoder([None, None, *feats])  # [B, C, 4h, 4w]
        logits = self.classifier(self.dropout(out))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """[B, 3, H, W] -> logits [B, K, H, W] and the auxiliary head's [B, K, H, W] (None without one)."""
        feats, size = self.pyramid(x), x.shape[-2:]
        logits = self.head(feats, size)
        if self.aux_head is None:
            return logits, None
        aux = self.aux_head(feats[2])  # [B, K, h, w]
        return logits, F.interpolate(aux, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> logits [B, K, H, W] (the main head only: evaluation skips the auxiliary head)."""
        return self.head(self.pyramid(x), x.shape[-2:])


# ------------------------------------------------------------------------------------------ metric
def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """[K, K] counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels dropped."""
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(
            f"segmentation: label {int(t.max())} outside [0, {num_classes}) (num_classes too small?)"
        )
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou_from_confusion(cm: Tensor) -> dict[str, Any]:
    """IoU_c = TP / (TP + FP + FN); mIoU = mean over classes present in gt or prediction (mmseg's nanmean)."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = float(tp.sum() / cm.sum().clamp_min(1))
    return {
        "miou": 100.0 * float(np.nanmean(iou.numpy())) if bool((union > 0).any()) else 0.0,
        "pixel_acc": 100.0 * acc,
        "iou": [None if np.isnan(v) else round(100.0 * v, 3) for v in iou.tolist()],
    }


def poly_lr(
    step: int, base: float, total: int, warmup: int, power: float = 1.0, min_lr: float = 0.0
) -> float:
    """mmseg's MAE/BEiT schedule: linear warm-up (from 1e-6 x), then polynomial decay to ``min_lr``."""
    if step < warmup:
        return base * (1e-6 + (1 - 1e-6) * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (base - min_lr) * (1 - progress) ** power + min_lr


# ------------------------------------------------------------------------------------------- task
def resolve_num_classes(data: dict[str, Any]) -> int:
    """``data.num_classes``, or the categories of ``instances_<source>_<train_split>.json`` (+1 for label 0 =
    background unless ``reduce_zero_label``)."""
    if data.get("num_classes"):
        return int(data["num_classes"])
    from maelab.data.cocojson import read_json
    from maelab.transfer.data import coco_json_path

    path = coco_json_path(
        data.get("sources", ["scenes"])[0],
        data.get("train_split", "train"),
        data.get("json_root", "data/03_primary"),
    )
    cats = read_json(path).get("categories")
    if not cats:
        raise ValueError(
            f"{path}: field categories is empty; set transfer.tasks.segmentation.data.num_classes"
        )
    return len(cats) + (0 if data.get("reduce_zero_label") else 1)


def _train_eval_once(
    manifest: pd.DataFrame,
    encoder_ref: str | None,
    default_config: dict[str, Any],
    cfg: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    device = pick_device(cfg.get("device"))
    data = cfg.get("data", {})
    sources = data.get("sources", ["scenes"])
    size = int(cfg.get("img_size", 512))
    reduce_zero = bool(data.get("reduce_zero_label", False))
    train_rows = select(
        manifest, sources, data.get("train_split", "train"), "mask_path", data.get("max_train_images")
    )
    eval_rows = select(
        manifest, sources, data.get("eval_split", "val"), "mask_path", data.get("max_eval_images")
    )
    num_classes = resolve_num_classes(data)
    train_set = SegmentationSet(
        train_rows, size, True, tuple(cfg.get("crop_scale", (0.5, 1.0))), reduce_zero, seed
    )
    eval_set = SegmentationSet(eval_rows, size, False, reduce_zero_label=reduce_zero)

    encoder, info = task_encoder(encoder_ref, default_config, cfg, size)
    aux_weight = float(cfg.get("aux_weight", 0.4))
    model = ViTUperNet(
        encoder,
        num_classes,
        cfg.get("out_indices"),
        int(cfg.get("decoder_channels", 512)),
        aux_channels=int(cfg.get("aux_channels", 256)) if aux_weight > 0 else 0,
    ).to(device)
    groups = param_groups_lrd(
        model,
        float(cfg.get("weight_decay", 0.05)),
        float(cfg.get("layer_decay", 0.65)),
        len(encoder.blocks),
        no_weight_decay={"cls_token", "pos_embed"},
        prefix="encoder.",
    )
    lr = float(cfg.get("lr", 1e-4))
    opt = adamw(groups, lr, (0.9, 0.999))
    workers = int(cfg.get("num_workers", 0))
    loader = train_loader(train_set, cfg, 16, seed)
    total = int(cfg.get("steps", 160_000))
    warmup = min(total, int(cfg.get("warmup_steps", 1500)))

    t0 = time.perf_counter()
    model.train()
    batches, loss = forever(loader), torch.tensor(float("nan"))
    for step in range(total):
        x, y = next(batches)
        apply_lr(opt, poly_lr(step, lr, total, warmup))
        y = y.to(device)
        logits, aux = model.forward_with_aux(x.to(device))
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        if aux is not None:  # mmseg: auxiliary FCN loss, weight 0.4
            loss = loss + aux_weight * F.cross_entropy(aux, y, ignore_index=IGNORE_INDEX)
        optimizer_step("segmentation", loss, model, opt, step, total)
    t_train = time.perf_counter() - t0

    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for x, masks in DataLoader(
            eval_set, int(cfg.get("eval_batch_size", 8)), collate_fn=collate_eval, num_workers=workers
        ):
            logits = model(x.to(device)).float().cpu()
            for lg, m in zip(logits, masks, strict=True):  # logits back to the mask's own size
                pred = F.interpolate(lg[None], size=m.shape, mode="bilinear", align_corners=False)[0].argmax(
                    0
                )
                cm += confusion_matrix(pred, m, num_classes)
    out = miou_from_confusion(cm)
    out.update(
        seed=seed,
        steps=total,
        final_loss=round(float(loss.item()), 4),
        train_seconds=round(t_train, 2),
        train_images=len(train_set),
        eval_images=len(eval_set),
        encoder=info["path"],
    )
    return out


def run_segmentation(
    manifest: pd.DataFrame, encoder_ref: str | None, default_config: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    """Fine-tune UperNet for each seed in ``cfg["seeds"]``; ``miou`` is the mean over seeds (percent)."""
    t0 = time.perf_counter()
    seeds = [int(s) for s in cfg.get("seeds", [0])]
    runs = [_train_eval_once(manifest, encoder_ref, default_config, cfg, s) for s in seeds]
    mious = [r["miou"] for r in runs]
    return {
        "miou": float(np.mean(mious)),
        "miou_std": float(np.std(mious)),
        "pixel_acc": float(np.mean([r["pixel_acc"] for r in runs])),
        "num_classes": resolve_num_classes(cfg.get("data", {})),
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 2),
    }
