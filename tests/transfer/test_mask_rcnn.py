import torch

from maelab.models.vit import build_encoder
from maelab.transfer.config import DetectionConfig
from maelab.transfer.mask_rcnn import build_mask_rcnn
from maelab.transfer.vitdet import ViTDetBackbone

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)


def test_mask_rcnn_train_step_and_eval():
    torch.manual_seed(0)
    bb = ViTDetBackbone(build_encoder(TINY), out_channels=16, window_size=4)
    cfg = DetectionConfig(
        anchor_sizes=(8, 16, 32, 64, 128),
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
