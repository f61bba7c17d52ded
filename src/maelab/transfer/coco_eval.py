"""COCO and LVIS evaluation of Mask R-CNN outputs: pycocotools (box / mask AP, AP50, AP75) and the LVIS API
(Gupta et al. 2019; adds AP on rare / common / frequent categories)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
from torch import Tensor


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
