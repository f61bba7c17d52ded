"""Detection + instance segmentation, ViTDet style (Li et al. 2022, "Exploring Plain ViT Backbones").

The backbone is in :mod:`maelab.transfer.vitdet`, the Mask R-CNN heads in :mod:`maelab.transfer.mask_rcnn`,
COCO / LVIS evaluation in :mod:`maelab.transfer.coco_eval`. Training (:func:`maelab.transfer.loop.fine_tune`):
large-scale jitter, AdamW with layer-wise lr decay, drop path, warm-up then step decay (§4.1 / App. A.2).
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from torch import Tensor
from torch.utils.data import DataLoader

from maelab.transfer.backbone import task_encoder
from maelab.transfer.coco_eval import coco_evaluate, lvis_evaluate, to_coco_results
from maelab.transfer.config import DetectionConfig
from maelab.transfer.data import DetectionSet, category_maps, collate_detection, select, train_loader
from maelab.transfer.loop import evaluate, fine_tune, start
from maelab.transfer.mask_rcnn import build_mask_rcnn
from maelab.transfer.vitdet import ViTDetBackbone


def run_detection(
    manifest: pd.DataFrame,
    encoder_ref: str | None,
    default_config: dict[str, Any],
    cfg: DetectionConfig,
    train_json: dict,
    eval_json: dict,
) -> dict[str, Any]:
    """Fine-tune ViTDet Mask R-CNN on a COCO-format source and evaluate box / mask AP (percent).

    train_json / eval_json: the source's COCO-format (or LVIS) annotations of the two splits, validated.
    """
    t0 = time.perf_counter()
    device = start(cfg)
    data = cfg.data
    lvis = data.evaluator == "lvis"
    _, label_to_cat = category_maps(train_json)
    num_classes = len(train_json["categories"])

    size = int(cfg.img_size)
    encoder, info = task_encoder(encoder_ref, default_config, cfg, size)
    backbone = ViTDetBackbone(
        encoder,
        cfg.out_channels,
        cfg.window_size,
        list(cfg.global_blocks) if cfg.global_blocks is not None else None,
        cfg.use_rel_pos,
        cfg.grad_checkpoint,
    )
    model = build_mask_rcnn(backbone, num_classes, cfg).to(device)

    train_rows = select(manifest, [data.source], data.train_split, "ann_id", data.max_train_images)
    eval_rows = select(manifest, [data.source], data.eval_split, "ann_id", data.max_eval_images)
    eval_name = f"instances_{data.source}_{data.eval_split}"
    train_set = DetectionSet(train_rows, train_json, size, True, cfg.lsj, cfg.seed, "train json")
    eval_set = DetectionSet(eval_rows, eval_json, size, False, source_name=eval_name)
    loader = train_loader(train_set, cfg.batch_size, cfg.num_workers, cfg.seed, collate_fn=collate_detection)

    def loss_fn(batch: tuple[list[Tensor], list[dict[str, Tensor]]]) -> tuple[Tensor, dict[str, Tensor]]:
        images, targets = batch
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), losses

    fit = fine_tune(model, loader, loss_fn, cfg, num_layers=len(encoder.blocks), prefix="backbone.encoder.")

    results, image_ids = [], []

    def predict(batch: tuple[list[Tensor], list[dict[str, Tensor]]]) -> None:
        images, targets = batch
        outs = model([im.to(device) for im in images])
        ids = [int(t["image_id"]) for t in targets]
        results.extend(to_coco_results([{k: v.cpu() for k, v in o.items()} for o in outs], ids, label_to_cat))
        image_ids.extend(ids)

    eval_loader = DataLoader(
        eval_set, cfg.eval_batch_size, collate_fn=collate_detection, num_workers=cfg.num_workers
    )
    evaluate(model, eval_loader, predict)
    metrics = lvis_evaluate(eval_json, results) if lvis else coco_evaluate(eval_json, results, image_ids)
    metrics.update(
        evaluator=data.evaluator,
        num_classes=num_classes,
        train_images=len(train_set),
        eval_images=len(eval_set),
        steps=fit.steps,
        detections=len(results),
        final_loss=fit.final_loss,
        train_seconds=round(fit.seconds, 2),
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics
