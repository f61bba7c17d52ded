import copy

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maelab.models.vit import build_encoder
from maelab.transfer.detection import (
    SimpleFeaturePyramid,
    ViTDetBackbone,
    build_mask_rcnn,
    coco_evaluate,
    global_block_indices,
    lvis_evaluate,
    step_lr,
    to_coco_results,
    window_partition,
    window_unpartition,
)

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)


def test_global_blocks_vit_b():
    assert global_block_indices(12) == [2, 5, 8, 11]
    assert global_block_indices(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("patch,grid", [(16, 64), (8, 16)])
def test_simple_pyramid_strides(patch, grid):
    fpn = SimpleFeaturePyramid(dim=32, patch_size=patch, out_channels=16)
    out = fpn(torch.randn(2, 32, grid, grid))
    size = grid * patch
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for key, stride in zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64], strict=True):
        assert out[key].shape == (2, 16, size // stride, size // stride), key


def test_window_partition_roundtrip_with_padding():
    x = torch.randn(2, 10, 7, 4)
    win, padded = window_partition(x, 4)
    assert win.shape == (2 * 3 * 2, 4, 4, 4) and padded == (12, 8)
    assert torch.equal(window_unpartition(win, 4, padded, (10, 7)), x)


def test_window_covering_grid_equals_global_attention():
    """A window as large as the grid is global attention: the windowed path must give the same maps."""
    enc = build_encoder(TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    windowed = ViTDetBackbone(enc, out_channels=16, window_size=8, global_blocks=[]).eval()
    glob = ViTDetBackbone(enc, out_channels=16, window_size=8, global_blocks=[0, 1, 2, 3]).eval()
    glob.pyramid.load_state_dict(windowed.pyramid.state_dict())
    a, b = windowed(x), glob(x)
    torch.testing.assert_close(a["2"], b["2"], atol=1e-5, rtol=1e-5)
    small = ViTDetBackbone(enc, out_channels=16, window_size=4, global_blocks=[]).eval()
    small.pyramid.load_state_dict(windowed.pyramid.state_dict())
    assert not torch.allclose(small(x)["2"], a["2"], atol=1e-4)


def test_backbone_rel_pos_and_padding():
    enc = build_encoder(TINY)
    bb = ViTDetBackbone(enc, out_channels=16, window_size=3, use_rel_pos=True)
    out = bb(torch.randn(2, 3, 48, 64))  # padded to 64 x 64
    assert out["0"].shape == (2, 16, 16, 16)
    out["0"].sum().backward()
    assert bb.rel_pos_h[1].grad is not None
    with pytest.raises(ValueError, match="larger than backbone img_size"):
        bb(torch.randn(1, 3, 96, 64))


def test_mask_rcnn_train_step_and_eval():
    torch.manual_seed(0)
    bb = ViTDetBackbone(build_encoder(TINY), out_channels=16, window_size=4)
    cfg = dict(
        anchor_sizes=[8, 16, 32, 64, 128],
        fc_dim=32,
        head_channels=16,
        rpn_post_nms_top_n_train=50,
        rpn_post_nms_top_n_test=20,
        box_batch_size_per_image=16,
        rpn_batch_size_per_image=32,
    )
    model = build_mask_rcnn(bb, num_classes=3, cfg=cfg)
    masks = torch.zeros(1, 48, 64, dtype=torch.uint8)
    masks[0, 10:30, 5:25] = 1
    target = {"boxes": torch.tensor([[5.0, 10.0, 25.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks}
    losses = model([torch.rand(3, 48, 64)], [target])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(
        losses
    )
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 80)])[0]  # eval resizes, then maps boxes back to 100 x 80
    assert out["masks"].shape[-2:] == (100, 80)


def test_step_lr():
    assert step_lr(0, 1.0, 100, 10, (0.9, 0.95)) == pytest.approx(0.001)
    assert step_lr(50, 1.0, 100, 10, (0.9, 0.95)) == 1.0
    assert step_lr(92, 1.0, 100, 10, (0.9, 0.95)) == pytest.approx(0.1)
    assert step_lr(96, 1.0, 100, 10, (0.9, 0.95)) == pytest.approx(0.01)


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
