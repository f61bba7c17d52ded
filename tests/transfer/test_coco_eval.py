import copy

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maelab.transfer.coco_eval import coco_evaluate, lvis_evaluate, to_coco_results


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_fixture(lvis=False):
    """Two 40x50 images, three objects (two categories), masks as RLE, one as a polygon."""
    images, anns = [], []
    m1 = np.zeros((40, 50), np.uint8)
    m1[5:20, 5:25] = 1
    m2 = np.zeros((40, 50), np.uint8)
    m2[22:38, 30:48] = 1
    for iid in (1, 2):
        images.append({"id": iid, "width": 50, "height": 40, "file_name": f"{iid}.jpg"})
    for aid, (iid, cat, m) in enumerate([(1, 1, m1), (1, 2, m2), (2, 2, m1)], start=1):
        x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m))).tolist()
        anns.append(
            {
                "id": aid,
                "image_id": iid,
                "category_id": cat,
                "bbox": [x, y, w, h],
                "area": float(m.sum()),
                "iscrowd": 0,
                "segmentation": _rle(m),
            }
        )
    anns.append(
        {
            "id": 4,
            "image_id": 2,
            "category_id": 1,
            "bbox": [30.0, 5.0, 10.0, 10.0],
            "area": 100.0,
            "iscrowd": 0,
            "segmentation": [[30, 5, 40, 5, 40, 15, 30, 15]],
        }
    )
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    gt = {"images": images, "annotations": anns, "categories": cats}
    if lvis:
        for c, f in zip(cats, ("r", "f"), strict=True):
            c.update(frequency=f, synset=c["name"], image_count=1, instance_count=1)
        for im in images:
            im.update(not_exhaustive_category_ids=[], neg_category_ids=[], coco_url=f"x/{im['file_name']}")
    return gt


def gt_as_results(gt):
    out = []
    for a in gt["annotations"]:
        seg = a["segmentation"]
        if isinstance(seg, list):
            seg = mask_utils.merge(mask_utils.frPyObjects(seg, 40, 50))
            seg["counts"] = seg["counts"].decode("ascii")
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": a["bbox"],
                "score": 1.0,
                "segmentation": seg,
            }
        )
    return out


def test_coco_ap_is_100_when_predictions_equal_ground_truth():
    gt = coco_fixture()
    m = coco_evaluate(gt, gt_as_results(gt), image_ids=[1, 2])
    for k in ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75"):
        assert m[k] == pytest.approx(100.0), k
    # a wrong prediction must lower AP (the check can fail)
    bad = gt_as_results(gt)
    bad[0]["bbox"] = [0.0, 0.0, 3.0, 3.0]
    assert coco_evaluate(gt, bad, iou_types=("bbox",))["box_ap"] < 100.0
    assert coco_evaluate(gt, [])["mask_ap"] == 0.0


def test_lvis_ap_is_100_with_rare_category():
    gt = coco_fixture(lvis=True)
    m = lvis_evaluate(copy.deepcopy(gt), gt_as_results(gt))
    for k in ("box_ap", "box_apr", "box_apf", "mask_ap", "mask_apr"):
        assert m[k] == pytest.approx(100.0), k


def test_to_coco_results_roundtrip():
    masks = torch.zeros(1, 1, 40, 50)
    masks[0, 0, 5:20, 5:25] = 0.9
    out = {
        "boxes": torch.tensor([[5.0, 5.0, 25.0, 20.0]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([1]),
        "masks": masks,
    }
    res = to_coco_results([out], [7], {1: 42})
    assert res[0]["category_id"] == 42 and res[0]["bbox"] == [5.0, 5.0, 20.0, 15.0]
    assert mask_utils.area(res[0]["segmentation"]) == 15 * 20
