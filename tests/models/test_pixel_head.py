"""The pixel decoder's long-seq options (Hu et al. 2022, App. A): the 2x2 stride-2 decoder convolution."""

from __future__ import annotations

import pytest
import torch

from maelab.masking import MaskPlan
from maelab.models import PixelDecoderHead, build_pretrainer, patchify
from maelab.models.heads.pixel import masked_mse, normalize_patches
from maelab.models.vit import EncoderSpec

ENC = dict(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2)  # 8x8 grid
PIX = dict(type="pixel_decoder", embed_dim=16, depth=1, num_heads=2)


def recipe(downsample: int, masker: dict | None = None) -> dict:
    return {
        "name": f"ds{downsample}",
        "encoder": ENC,
        "masker": masker or {"type": "block", "ratio": 0.75, "block": 2},
        "heads": {"pixel": {**PIX, "downsample": downsample}},
    }


def batch(model, b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, 3, 64, 64, generator=g),
        "plan": MaskPlan.collate([model.masker(g) for _ in range(b)]),
    }


class Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return x


def test_conv_gives_the_decoder_a_quarter_of_the_tokens_and_2p_targets():
    """Tab. 2e row 3: 784 -> 196 decoder tokens, 2p x 2p x 3 targets (here 64 -> 16 tokens, 16x16x3)."""
    torch.manual_seed(0)
    model = build_pretrainer(recipe(2))
    head = model.heads["pixel"]
    assert isinstance(head.decoder_shorten, torch.nn.Conv2d)
    assert head.decoder_shorten.kernel_size == (2, 2) and head.decoder_shorten.stride == (2, 2)
    rec = Recorder()
    head.decoder_blocks.insert(0, rec)  # sees what the first decoder block sees
    b = batch(model)
    out = model(b)
    assert rec.seen == [(2, 1 + 16, 16)]  # CLS + L/4 tokens
    assert out.outputs["pixel"].shape == (2, 16, 16 * 16 * 3)  # one 2p x 2p x 3 prediction per token
    target = head.target(b["image"])
    assert target.shape == (2, 16, 16 * 16 * 3)
    # targets are the image cut into 2p patches, normalised per 2p patch (norm_pix_loss)
    torch.testing.assert_close(target, normalize_patches(patchify(b["image"], 16))[0])
    out.loss.backward()
    assert head.decoder_shorten.weight.grad is not None and head.decoder_shorten.weight.grad.abs().sum() > 0


def test_loss_is_taken_on_the_masked_patches_only():
    torch.manual_seed(0)
    model = build_pretrainer(recipe(2))
    head = model.heads["pixel"]
    b = batch(model)
    out = model(b)
    pred, target, mask = out.outputs["pixel"], head.target(b["image"]), b["plan"].mask
    fine_pred, fine_target = head.to_patches(pred), head.to_patches(target)
    assert fine_pred.shape == (2, 64, 8 * 8 * 3)
    torch.testing.assert_close(out.losses["pixel"], masked_mse(fine_pred, fine_target, mask))
    # 16 kept = 4 whole 2x2 blocks: every 2p patch is all masked or all visible, and the loss is the MSE
    # over the masked 2p patches
    coarse_mask = mask.view(2, 4, 2, 4, 2).all(-1).all(2).flatten(1)  # [B, 16]
    assert torch.equal(coarse_mask, mask.view(2, 4, 2, 4, 2).any(-1).any(2).flatten(1))
    torch.testing.assert_close(out.losses["pixel"], masked_mse(pred, target, coarse_mask))
    # a visible patch's error does not count
    changed = pred.detach().clone()
    visible_fine = (~mask).nonzero()[0]
    changed_img = head.to_patches(changed)
    changed_img[visible_fine[0], visible_fine[1]] += 100.0
    loss = out.losses["pixel"].item()
    assert masked_mse(changed_img, fine_target, mask).item() == pytest.approx(loss, rel=1e-5)


def test_reconstruct_pastes_visible_patches():
    torch.manual_seed(0)
    model = build_pretrainer(recipe(2, {"type": "random", "ratio": 0.75})).eval()
    b = batch(model)
    with torch.no_grad():
        out = model(b)
    rec = model.reconstruct(b, out)
    assert rec.shape == b["image"].shape
    vis = ~b["plan"].mask
    torch.testing.assert_close(patchify(rec, 8)[vis], patchify(b["image"], 8)[vis])


def test_default_decoder_is_unchanged_mae():
    head = PixelDecoderHead(EncoderSpec(32, (8, 8), 8), embed_dim=16, depth=1, num_heads=2)
    assert head.decoder_shorten is None and head.decoder_pred.out_features == 8 * 8 * 3
    assert "decoder_shorten" not in dict(head.named_modules())


def test_bad_downsample_fails_clearly():
    with pytest.raises(ValueError, match="downsample"):
        PixelDecoderHead(EncoderSpec(32, (8, 8), 8), downsample=3)
    with pytest.raises(ValueError, match="divisible"):
        PixelDecoderHead(EncoderSpec(32, (7, 7), 8), downsample=2)
