"""Detection + instance segmentation, ViTDet style (Li et al. 2022, "Exploring Plain ViT Backbones").

plain ViT (window attention in most blocks, global attention in 4 evenly spaced blocks, optional
decomposed relative position bias; §3 "Backbone adaptation") -> simple feature pyramid from the last map
only (§3 "Simple feature pyramid", Fig. 2c: deconvs / identity / max-pool to strides 4, 8, 16, 32)
-> torchvision Mask R-CNN heads. Training: large-scale jitter, AdamW with layer-wise lr decay, drop path,
linear warm-up then step decay (§4.1 / Appendix A.2). Evaluation: pycocotools (COCO) or the LVIS API.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torch.utils.data import DataLoader

from maelab.models.attention import rel_pos_bias, window_partition, window_unpartition
from maelab.models.vit import ViTEncoder
from maelab.transfer.backbone import adamw, apply_lr, param_groups_lrd, task_encoder
from maelab.transfer.classification import forever, optimizer_step, pick_device
from maelab.transfer.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionSet,
    category_maps,
    coco_json_path,
    collate_detection,
    select,
    train_loader,
)

log = logging.getLogger(__name__)
PYRAMID_STRIDES = (4, 8, 16, 32)


# ------------------------------------------------------------------------------ window attention
def global_block_indices(depth: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced global-attention blocks, the last one included (ViT-B: 2, 5, 8, 11)."""
    return sorted({(i + 1) * depth // count - 1 for i in range(count)})


# ------------------------------------------------------------------------------ feature pyramid
class SimpleFeaturePyramid(nn.Module):
    """ViTDet Fig. 2c: the last map (stride = patch size) resampled to ``strides`` by deconvs (up) /
    identity / max-pool (down), then 1x1 and 3x3 convs with LayerNorm to ``out_channels``; plus a
    stride-2 subsample of the coarsest level (``pool``, torchvision's LastLevelMaxPool)."""

    def __init__(
        self, dim: int, patch_size: int, out_channels: int, strides: tuple[int, ...] = PYRAMID_STRIDES
    ):
        super().__init__()
        self.strides = tuple(strides)
        self.stages = nn.ModuleList()
        for s in self.strides:
            layers: list[nn.Module] = []
            c = dim
            if s < patch_size:  # upsample by deconvs: x2 per step (x4 = deconv, LN, GELU, deconv)
                steps = int(np.log2(patch_size // s))
                if 2**steps * s != patch_size:
                    raise ValueError(f"detection: stride {s} not reachable from patch size {patch_size}")
                for k in range(steps):
                    layers.append(nn.ConvTranspose2d(c, c // 2, 2, stride=2))
                    c //= 2
                    if k < steps - 1:
                        layers += [LayerNorm2d(c), nn.GELU()]
            elif s > patch_size:  # downsample by max-pool, x2 per step
                steps = int(np.log2(s // patch_size))
                if 2**steps * patch_size != s:
                    raise ValueError(f"detection: stride {s} not reachable from patch size {patch_size}")
                layers += [nn.MaxPool2d(2, 2) for _ in range(steps)]
            layers += [
                nn.Conv2d(c, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """[B, D, h, w] -> {"0": stride 4, "1": 8, "2": 16, "3": 32, "pool": 64}, each [B, C, H/s, W/s]."""
        out = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))
        out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out


# ------------------------------------------------------------------------------------ backbone
class ViTDetBackbone(nn.Module):
    """Plain ViT adapted for detection (ViTDet §3): no CLS token, windowed blocks, simple pyramid.

    Input images are padded bottom/right to ``img_size`` x ``img_size`` (ViTDet pads to 1024), so the
    absolute position embedding always matches the grid.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        out_channels: int = 256,
        window_size: int = 14,
        global_blocks: list[int] | None = None,
        use_rel_pos: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        self.encoder, self.out_channels = encoder, out_channels
        self.img_size, self.patch_size, self.grid = encoder.img_size, encoder.patch_size, encoder.grid
        depth, dim = len(encoder.blocks), encoder.embed_dim
        self.global_blocks = set(global_block_indices(depth) if global_blocks is None else global_blocks)
        self.window_size, self.use_rel_pos, self.grad_checkpoint = (
            int(window_size),
            use_rel_pos,
            grad_checkpoint,
        )
        self.rel_pos_h, self.rel_pos_w = nn.ParameterList(), nn.ParameterList()
        if use_rel_pos:  # zero-initialised (ViTDet rel_pos_zero_init), one table per block and axis
            head_dim = dim // encoder.blocks[0].attn.num_heads
            for i in range(depth):
                span = self.grid if i in self.global_blocks else (self.window_size, self.window_size)
                self.rel_pos_h.append(nn.Parameter(torch.zeros(2 * span[0] - 1, head_dim)))
                self.rel_pos_w.append(nn.Parameter(torch.zeros(2 * span[1] - 1, head_dim)))
        self.pyramid = SimpleFeaturePyramid(dim, self.patch_size, out_channels)

    def run_block(self, i: int, x: Tensor) -> Tensor:
        """One ViT block on [B, H, W, D]; attention inside windows unless ``i`` is a global block."""
        blk = self.encoder.blocks[i]
        h, w = x.shape[1:3]
        y = blk.norm1(x)
        windowed = i not in self.global_blocks
        if windowed:
            y, padded = window_partition(y, self.window_size)  # [B*nW, ws, ws, D]
        hh, ww = y.shape[1:3]
        tokens = y.reshape(y.shape[0], hh * ww, -1)  # [B', N, D]
        bias = None
        if self.use_rel_pos:
            attn = blk.attn
            q = attn.qkv(tokens)[..., : attn.num_heads * attn.head_dim]
            q = attn.q_norm(q.view(tokens.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2))
            bias = rel_pos_bias(q, self.rel_pos_h[i], self.rel_pos_w[i], (hh, ww)).to(tokens.dtype)
        y = blk.attn(tokens, attn_mask=bias).view(-1, hh, ww, tokens.shape[-1])
        if windowed:
            y = window_unpartition(y, self.window_size, padded, (h, w))
        x = x + blk.drop_path1(blk.ls1(y))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """[B, 3, H, W] (H, W <= img_size) -> pyramid maps."""
        th, tw = self.img_size
        if images.shape[-2] > th or images.shape[-1] > tw:
            raise ValueError(
                f"detection: batch {tuple(images.shape[-2:])} larger than backbone img_size {self.img_size}"
            )
        images = F.pad(images, (0, tw - images.shape[-1], 0, th - images.shape[-2]))
        x = (
            self.encoder.patch_embed(images) + self.encoder.pos_embed[:, 1:]
        )  # [B, L, D], CLS dropped (ViTDet)
        x = x.view(x.shape[0], *self.grid, -1)  # [B, h, w, D]
        for i in range(len(self.encoder.blocks)):
            if self.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(self.run_block, i, x, use_reentrant=False)
            else:
                x = self.run_block(i, x)
        return self.pyramid(x.permute(0, 3, 1, 2))  # [B, D, h, w] -> pyramid


# ----------------------------------------------------------------------------------- Mask R-CNN
def _lsj_transform_cls():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class LSJTransform(GeneralizedRCNNTransform):
        """Training images come already jittered (LSJ) and are only normalised and batched; eval resizes."""

        def resize(self, image, target=None):
            if self.training:
                return image, target
            return super().resize(image, target)

    return LSJTransform


def build_mask_rcnn(backbone: ViTDetBackbone, num_classes: int, cfg: dict[str, Any]) -> nn.Module:
    """torchvision Mask R-CNN on the ViTDet backbone: 2-conv RPN, 4conv1fc box head and 4-conv mask head
    with LayerNorm (ViTDet's Mask R-CNN heads); ``num_classes`` excludes the background."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    c = backbone.out_channels
    size = int(backbone.img_size[0])
    head_dim, fc_dim = int(cfg.get("head_channels", c)), int(cfg.get("fc_dim", 1024))
    anchors = AnchorGenerator(
        tuple((int(s),) for s in cfg.get("anchor_sizes", (32, 64, 128, 256, 512))), ((0.5, 1.0, 2.0),) * 5
    )
    names = [str(i) for i in range(len(PYRAMID_STRIDES))]
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=size,
        max_size=size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2),
        rpn_pre_nms_top_n_train=int(cfg.get("rpn_pre_nms_top_n_train", 2000)),
        rpn_post_nms_top_n_train=int(cfg.get("rpn_post_nms_top_n_train", 1000)),
        rpn_pre_nms_top_n_test=int(cfg.get("rpn_pre_nms_top_n_test", 1000)),
        rpn_post_nms_top_n_test=int(cfg.get("rpn_post_nms_top_n_test", 1000)),
        rpn_batch_size_per_image=int(cfg.get("rpn_batch_size_per_image", 256)),
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
        box_head=FastRCNNConvFCHead((c, 7, 7), [head_dim] * 4, [fc_dim], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(fc_dim, num_classes + 1),
        box_batch_size_per_image=int(cfg.get("box_batch_size_per_image", 512)),
        box_detections_per_img=int(cfg.get("detections_per_img", 100)),
        box_score_thresh=float(cfg.get("score_thresh", 0.05)),
        mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
        mask_head=MaskRCNNHeads(c, [head_dim] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(head_dim, head_dim, num_classes + 1),
    )
    model.transform = _lsj_transform_cls()(
        size, size, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible=32
    )
    return model


def step_lr(step: int, base: float, total: int, warmup: int, milestones: tuple[float, ...]) -> float:
    """ViTDet schedule: linear warm-up from 0.001x, then x0.1 at each milestone fraction of ``total``."""
    if step < warmup:
        return base * (0.001 + (1 - 0.001) * step / warmup)
    return base * 0.1 ** sum(step >= m * total for m in milestones)


# ---------------------------------------------------------------------------------- evaluation
def to_coco_results(
    outputs: list[dict[str, Tensor]], image_ids: list[int], label_to_cat: dict[int, int]
) -> list[dict]:
    """Mask R-CNN outputs -> COCO result dicts (bbox xywh, RLE segmentation at the original image size)."""
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].tolist()
        masks = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8) if "masks" in out else None
        for k, (box, score, label) in enumerate(
            zip(boxes, out["scores"].tolist(), out["labels"].tolist(), strict=True)
        ):
            res = {
                "image_id": int(image_id),
                "category_id": int(label_to_cat[int(label)]),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "score": float(score),
            }
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[k]))
                rle["counts"] = rle["counts"].decode("ascii")
                res["segmentation"] = rle
            results.append(res)
    return results


def coco_evaluate(
    gt: dict, results: list[dict], image_ids: list[int] | None = None, iou_types=("bbox", "segm")
) -> dict[str, float]:
    """COCO AP / AP50 / AP75 (percent) per IoU type via pycocotools: ``box_ap``, ``mask_ap50``, ..."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {"bbox": "box", "segm": "mask"}
    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
    for iou_type in iou_types:
        prefix = names[iou_type]
        dts = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not dts:
            metrics.update({f"{prefix}_ap": 0.0, f"{prefix}_ap50": 0.0, f"{prefix}_ap75": 0.0})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(dts))
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [max(0.0, float(s)) * 100 for s in ev.stats[:3]]  # -1 (no gt) -> 0
        metrics.update({f"{prefix}_ap": stats[0], f"{prefix}_ap50": stats[1], f"{prefix}_ap75": stats[2]})
    return metrics


def lvis_evaluate(gt: dict | str | Path, results: list[dict], iou_types=("bbox", "segm")) -> dict[str, float]:
    """LVIS AP, AP50, AP75 and AP-rare/common/frequent (percent) with the ``lvis`` API (Gupta et al. 2019)."""
    names = {"bbox": "box", "segm": "mask"}
    # lvis 0.5.3 still calls np.float (removed in NumPy 1.24): alias it for the duration of the call
    shim = not hasattr(np, "float")
    if shim:
        setattr(np, "float", float)  # noqa: B010
    try:
        return _lvis_evaluate(gt, results, iou_types, names)
    finally:
        if shim:
            delattr(np, "float")


def _lvis_evaluate(
    gt: dict | str | Path, results: list[dict], iou_types, names: dict[str, str]
) -> dict[str, float]:
    from lvis import LVIS, LVISEval, LVISResults

    with tempfile.TemporaryDirectory() as tmp:
        path = gt
        if isinstance(gt, dict):
            path = Path(tmp) / "gt.json"
            path.write_text(json.dumps(gt))
        lvis_gt = LVIS(str(path))
        metrics: dict[str, float] = {}
        for iou_type in iou_types:
            prefix = names[iou_type]
            dts = [r for r in results if iou_type == "bbox" or "segmentation" in r]
            if not dts:
                metrics.update({f"{prefix}_{k}": 0.0 for k in ("ap", "ap50", "ap75", "apr", "apc", "apf")})
                continue
            ev = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(dts)), iou_type)
            ev.run()
            res = ev.get_results()
            for k, name in (
                ("AP", "ap"),
                ("AP50", "ap50"),
                ("AP75", "ap75"),
                ("APr", "apr"),
                ("APc", "apc"),
                ("APf", "apf"),
            ):
                metrics[f"{prefix}_{name}"] = max(0.0, float(res[k])) * 100
    return metrics


# --------------------------------------------------------------------------------------- task
def run_detection(
    manifest: pd.DataFrame, encoder_ref: str | None, default_config: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    """Fine-tune ViTDet Mask R-CNN on a COCO-format source and evaluate box / mask AP (percent)."""
    from maelab.data.cocojson import load_instances

    t0, seed = time.perf_counter(), int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    device = pick_device(cfg.get("device"))
    data = cfg.get("data", {})
    source = data.get("source", "scenes")
    train_split, eval_split = data.get("train_split", "train"), data.get("eval_split", "val")
    lvis = data.get("evaluator", "coco") == "lvis"
    json_root = data.get("json_root", "data/03_primary")
    train_json = load_instances(
        data.get("train_json") or coco_json_path(source, train_split, json_root), lvis=lvis
    )
    eval_path = data.get("eval_json") or coco_json_path(source, eval_split, json_root)
    eval_json = load_instances(eval_path, lvis=lvis)
    _, label_to_cat = category_maps(train_json)
    num_classes = len(train_json["categories"])

    size = int(cfg.get("img_size", 1024))
    if size % 32:
        raise ValueError(
            f"transfer.tasks.detection.img_size: {size} must be a multiple of 32 (Mask R-CNN batching)"
        )
    encoder, info = task_encoder(encoder_ref, default_config, cfg, size)
    backbone = ViTDetBackbone(
        encoder,
        int(cfg.get("out_channels", 256)),
        int(cfg.get("window_size", 14)),
        cfg.get("global_blocks"),
        bool(cfg.get("use_rel_pos", False)),
        bool(cfg.get("grad_checkpoint", False)),
    )
    model = build_mask_rcnn(backbone, num_classes, cfg).to(device)

    train_rows = select(manifest, [source], train_split, "ann_id", data.get("max_train_images"))
    eval_rows = select(manifest, [source], eval_split, "ann_id", data.get("max_eval_images"))
    train_set = DetectionSet(
        train_rows, train_json, size, True, tuple(cfg.get("lsj", (0.1, 2.0))), seed, "train json"
    )
    eval_set = DetectionSet(eval_rows, eval_json, size, False, source_name=str(eval_path))
    workers = int(cfg.get("num_workers", 0))
    loader = train_loader(train_set, cfg, 64, seed, collate_fn=collate_detection)
    batch = loader.batch_size
    steps_per_epoch = max(1, len(train_set) // batch)
    total = int(cfg["steps"]) if cfg.get("steps") else int(cfg.get("epochs", 100)) * steps_per_epoch
    warmup = min(total, int(cfg.get("warmup_steps", 250)))
    lr = float(cfg.get("lr", 1e-4))
    groups = param_groups_lrd(
        model,
        float(cfg.get("weight_decay", 0.1)),
        float(cfg.get("layer_decay", 0.7)),
        len(encoder.blocks),
        no_weight_decay={"cls_token", "pos_embed"},
        prefix="backbone.encoder.",
    )
    opt = adamw(groups, lr, (0.9, 0.999))
    milestones = tuple(cfg.get("lr_milestones", (0.9, 0.95)))

    model.train()
    batches, losses = forever(loader), {}
    for step in range(total):
        images, targets = next(batches)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        apply_lr(opt, step_lr(step, lr, total, warmup, milestones))
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer_step("detection", loss, model, opt, step, total, parts=losses)
    t_train = time.perf_counter() - t0

    model.eval()
    results, image_ids = [], []
    with torch.no_grad():
        for images, targets in DataLoader(
            eval_set, int(cfg.get("eval_batch_size", 4)), collate_fn=collate_detection, num_workers=workers
        ):
            outs = model([im.to(device) for im in images])
            ids = [int(t["image_id"]) for t in targets]
            results += to_coco_results([{k: v.cpu() for k, v in o.items()} for o in outs], ids, label_to_cat)
            image_ids += ids
    metrics = lvis_evaluate(eval_json, results) if lvis else coco_evaluate(eval_json, results, image_ids)
    metrics.update(
        evaluator="lvis" if lvis else "coco",
        num_classes=num_classes,
        train_images=len(train_set),
        eval_images=len(eval_set),
        steps=total,
        detections=len(results),
        final_loss=round(float(sum(v.item() for v in losses.values())), 4) if losses else None,
        train_seconds=round(t_train, 2),
        seconds=round(time.perf_counter() - t0, 2),
        encoder=info["path"],
    )
    return metrics
