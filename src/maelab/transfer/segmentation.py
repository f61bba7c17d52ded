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
from maelab.transfer.backbone import task_encoder
from maelab.transfer.config import SegmentationConfig
from maelab.transfer.data import IGNORE_INDEX, SegmentationSet, collate_eval, select, train_loader
from maelab.transfer.loop import evaluate, fine_tune, start

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


# ------------------------------------------------------------------------------------------- task
def resolve_num_classes(cfg: SegmentationConfig, train_annotations: dict | None) -> int:
    """``data.num_classes``, or the categories of the train split's COCO-format annotations (+1 for label
    0 = background unless ``reduce_zero_label``)."""
    data = cfg.data
    if data.num_classes:
        return int(data.num_classes)
    cats = (train_annotations or {}).get("categories")
    if not cats:
        raise ValueError(
            f"coco_annotations instances_{data.sources[0]}_{data.train_split}: field categories is missing "
            "or empty; set transfer.tasks.segmentation.data.num_classes"
        )
    return len(cats) + (0 if data.reduce_zero_label else 1)


def _train_eval_once(
    manifest: pd.DataFrame,
    encoder_ref: str | None,
    default_config: dict[str, Any],
    cfg: SegmentationConfig,
    num_classes: int,
    seed: int,
) -> dict[str, Any]:
    device = start(cfg, seed)
    data = cfg.data
    size = int(cfg.img_size)
    train_rows = select(manifest, data.sources, data.train_split, "mask_path", data.max_train_images)
    eval_rows = select(manifest, data.sources, data.eval_split, "mask_path", data.max_eval_images)
    train_set = SegmentationSet(train_rows, size, True, cfg.crop_scale, data.reduce_zero_label, seed)
    eval_set = SegmentationSet(eval_rows, size, False, reduce_zero_label=data.reduce_zero_label)

    encoder, info = task_encoder(encoder_ref, default_config, cfg, size)
    model = ViTUperNet(
        encoder,
        num_classes,
        list(cfg.out_indices) if cfg.out_indices else None,
        cfg.decoder_channels,
        aux_channels=cfg.aux_channels if cfg.aux_weight > 0 else 0,
    ).to(device)

    def loss_fn(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, None]:
        x, y = batch
        y = y.to(device)
        logits, aux = model.forward_with_aux(x.to(device))
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        if aux is not None:  # mmseg: auxiliary FCN loss, weight 0.4
            loss = loss + cfg.aux_weight * F.cross_entropy(aux, y, ignore_index=IGNORE_INDEX)
        return loss, None

    loader = train_loader(train_set, cfg.batch_size, cfg.num_workers, seed)
    fit = fine_tune(model, loader, loss_fn, cfg, num_layers=len(encoder.blocks), prefix="encoder.")

    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def predict(batch: tuple[Tensor, list[Tensor]]) -> None:
        nonlocal cm
        x, masks = batch
        logits = model(x.to(device)).float().cpu()
        for lg, m in zip(logits, masks, strict=True):  # logits back to the mask's own size
            pred = F.interpolate(lg[None], size=m.shape, mode="bilinear", align_corners=False)[0].argmax(0)
            cm += confusion_matrix(pred, m, num_classes)

    loader = DataLoader(eval_set, cfg.eval_batch_size, collate_fn=collate_eval, num_workers=cfg.num_workers)
    evaluate(model, loader, predict)
    out = miou_from_confusion(cm)
    out.update(
        seed=seed,
        steps=fit.steps,
        final_loss=fit.final_loss,
        train_seconds=round(fit.seconds, 2),
        train_images=len(train_set),
        eval_images=len(eval_set),
        encoder=info["path"],
    )
    return out


def run_segmentation(
    manifest: pd.DataFrame,
    encoder_ref: str | None,
    default_config: dict[str, Any],
    cfg: SegmentationConfig,
    train_annotations: dict | None = None,
) -> dict[str, Any]:
    """Fine-tune UperNet for each seed in ``cfg.seeds``; ``miou`` is the mean over seeds (percent).

    train_annotations: the train split's COCO-format JSON (its categories give the class count unless
    ``data.num_classes`` is set).
    """
    t0 = time.perf_counter()
    num_classes = resolve_num_classes(cfg, train_annotations)
    runs = [_train_eval_once(manifest, encoder_ref, default_config, cfg, num_classes, s) for s in cfg.seeds]
    mious = [r["miou"] for r in runs]
    spread = {"miou_std": float(np.std(mious))} if len(runs) > 1 else {}  # one seed: no spread to report
    return {
        "miou": float(np.mean(mious)),
        **spread,
        "pixel_acc": float(np.mean([r["pixel_acc"] for r in runs])),
        "num_classes": num_classes,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 2),
    }
