import pytest
import torch

from maelab.models.vit import build_encoder
from maelab.transfer.segmentation import (
    ViTUperNet,
    confusion_matrix,
    default_out_indices,
    miou_from_confusion,
)


def test_confusion_matrix_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    out = miou_from_confusion(cm)
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 3 / (3 + 4 - 3) = 3/4, IoU2 = 1 / (2 + 1 - 1) = 1/2
    assert out["miou"] == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 5 / 7)


def test_miou_skips_absent_classes_and_checks_labels():
    cm = torch.tensor([[4, 0, 0], [0, 0, 0], [0, 0, 2]])
    out = miou_from_confusion(cm)
    assert out["miou"] == pytest.approx(100.0) and out["iou"][1] is None
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.zeros(2, 2), torch.full((2, 2), 3), 3)


def test_out_indices():
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(6) == [0, 2, 3, 5]
    assert default_out_indices(2) == [0, 0, 0, 1]


def test_upernet_shapes_and_gradient():
    enc = build_encoder(dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0))
    model = ViTUperNet(enc, num_classes=5, decoder_channels=16)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5, 64, 64)
    logits.mean().backward()
    assert enc.blocks[0].attn.qkv.weight.grad is not None


def test_auxiliary_head_is_trained_but_not_used_for_prediction():
    enc = build_encoder(dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0))
    model = ViTUperNet(enc, num_classes=5, decoder_channels=16, aux_channels=8).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, aux = model.forward_with_aux(x)
    assert aux is not None and aux.shape == logits.shape == (2, 5, 64, 64)
    assert torch.equal(model(x), logits)
    aux.mean().backward()
    assert model.aux_head[0].weight.grad is not None and model.classifier.weight.grad is None
    assert ViTUperNet(enc, num_classes=5, decoder_channels=16).forward_with_aux(x)[1] is None
