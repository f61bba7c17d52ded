"""Mask R-CNN on the ViTDet backbone (Li et al. 2022, §4.1 / App. A.2): torchvision's Mask R-CNN with
ViTDet's heads (2-conv RPN, 4conv1fc box head, 4-conv mask head, LayerNorm); large-scale jitter happens in
the dataset, so the model's transform only normalises training images."""

from __future__ import annotations

from timm.layers import LayerNorm2d
from torch import nn

from maelab.transfer.config import DetectionConfig
from maelab.transfer.data import IMAGENET_MEAN, IMAGENET_STD
from maelab.transfer.vitdet import PYRAMID_STRIDES, ViTDetBackbone


def _lsj_transform_cls():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class LSJTransform(GeneralizedRCNNTransform):
        """Training images come already jittered (LSJ) and are only normalised and batched; eval resizes."""

        def resize(self, image, target=None):
            if self.training:
                return image, target
            return super().resize(image, target)

    return LSJTransform


def build_mask_rcnn(backbone: ViTDetBackbone, num_classes: int, cfg: DetectionConfig) -> nn.Module:
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
    head_dim, fc_dim = cfg.head_channels or c, cfg.fc_dim
    anchors = AnchorGenerator(tuple((int(s),) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
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
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
        box_head=FastRCNNConvFCHead((c, 7, 7), [head_dim] * 4, [fc_dim], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(fc_dim, num_classes + 1),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.detections_per_img,
        box_score_thresh=cfg.score_thresh,
        mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
        mask_head=MaskRCNNHeads(c, [head_dim] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(head_dim, head_dim, num_classes + 1),
    )
    model.transform = _lsj_transform_cls()(
        size, size, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible=32
    )
    return model
