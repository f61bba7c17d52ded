"""RAE / R-MAE heads (R-MAE §3, App. A): shapes, permutation (in)equivariance, shared masking, feeding."""

from __future__ import annotations

import pytest
import torch

from maelab.masking.plan import MaskPlan
from maelab.models import build_pretrainer
from maelab.models.heads.region import RegionHead, region_loss, region_plan
from maelab.models.vit import EncoderSpec

ENC = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
PIX = {"type": "pixel_decoder", "embed_dim": 32, "depth": 1, "num_heads": 2}
K, B, L = 4, 2, 16


def region_cfg(**kw):
    return {
        "type": "region",
        "num_regions": K,
        "enc_dim": 32,
        "dim": 32,
        "num_heads": 4,
        "enc_heads": 4,
        **kw,
    }


def model(variant="length", pixel=True, **kw):
    torch.manual_seed(0)
    heads = {"region": region_cfg(variant=variant, **kw)}
    if pixel:
        heads = {"pixel": PIX, **heads}
    return build_pretrainer(
        {"encoder": ENC, "masker": {"type": "random", "ratio": 0.75}, "heads": heads}
    ).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = MaskPlan.from_noise(torch.rand(B, L, generator=g), 0.75)
    return {
        "image": torch.randn(B, 3, 32, 32, generator=g),
        "plan": plan,
        "regions": torch.rand(B, K, 32, 32, generator=g) > 0.5,
    }


@pytest.mark.parametrize("variant", ["length", "batch", "channel"])
def test_shapes_loss_and_gradients(variant):
    m, b = model(variant).train(), batch()
    out = m(b)
    assert out.outputs["region"].shape == (B, K, L, 64)
    assert out.outputs["pixel"].shape == (B, L, 192)
    assert torch.isfinite(out.losses["region"]) and out.losses["region"] > 0
    out.loss.backward()
    enc_grad = m.encoder.blocks[0].attn.qkv.weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0  # the region loss reaches the pixel encoder
    m.zero_grad()
    m(b).losses["region"].backward()
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["length", "batch"])
def test_permuting_regions_permutes_outputs(variant):
    m, b = model(variant), batch()
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = m(b)
        out_p = m({**b, "regions": b["regions"][:, perm]})
    torch.testing.assert_close(out_p.outputs["region"], out.outputs["region"][:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_p.losses["region"], out.losses["region"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_p.outputs["pixel"], out.outputs["pixel"])  # nothing else changes


def test_channel_variant_is_not_permutation_equivariant():
    m, b = model("channel"), batch()
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = m(b).outputs["region"][:, perm]
        p = m({**b, "regions": b["regions"][:, perm]}).outputs["region"]
    assert (a - p).abs().max() > 1e-3


def test_regions_share_the_image_plan_and_only_visible_patches_are_read():
    m, b = model("length"), batch()
    head: RegionHead = m.heads["region"]
    assert region_plan(b["plan"], None) is b["plan"]  # beta_R = beta_I: the very same plan
    # changing the region maps inside masked patches changes nothing the model computes
    masked_px = (
        b["plan"].mask.view(B, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    )  # [B, 1, H, W]
    scrambled = torch.where(masked_px, ~b["regions"], b["regions"])
    with torch.no_grad():
        lat = m.encoder(b["image"], b["plan"])
        logits, tokens = head.predict(lat, b["plan"], b["regions"])
        logits2, tokens2 = head.predict(lat, b["plan"], scrambled)
        torch.testing.assert_close(logits, logits2)
        # ... but changing a visible patch does
        vis = (~b["plan"].mask[0]).nonzero()[0].item()
        r, c = divmod(vis, 4)
        poked = b["regions"].clone()
        poked[0, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] ^= True
        assert (head.predict(lat, b["plan"], poked)[0] - logits).abs().max() > 1e-5
    assert tokens.shape == (B, K, b["plan"].num_keep, 32)


def test_beta_r_plan_is_nested_in_the_image_plan():
    plan = MaskPlan.from_noise(torch.rand(3, 64), 0.6)
    harder = region_plan(plan, 0.75)
    assert harder.num_keep == 16 and plan.num_keep == 25
    assert bool((harder.mask | ~plan.mask).all())  # region-visible is a subset of image-visible
    easier = region_plan(plan, 0.5)
    assert bool((~plan.mask & easier.mask).sum() == 0)  # image-visible is a subset of region-visible


def test_loss_counts_masked_patches_only():
    target = (torch.rand(1, 2, 4, 9) > 0.5).float()
    mask = torch.tensor([[True, False, True, False]])
    logits = (target * 2 - 1) * 30  # confident and right everywhere...
    logits[:, :, 1] = -logits[:, :, 1]  # ...except on a visible patch
    assert region_loss(logits, target, mask) < 1e-6
    logits[:, :, 0] = -logits[:, :, 0]  # wrong on a masked patch
    assert region_loss(logits, target, mask) > 1.0


def test_pixels_feed_regions_but_not_back_by_default():
    m, b = model("length", feed="pixel"), batch()
    other = {**b, "regions": ~b["regions"]}
    with torch.no_grad():
        torch.testing.assert_close(m(b).outputs["pixel"], m(other).outputs["pixel"])
        # a different image changes the region prediction (RAE <- MAE)
        moved = {**b, "image": torch.randn_like(b["image"])}
        assert (m(moved).outputs["region"] - m(b).outputs["region"]).abs().max() > 1e-5


@pytest.mark.parametrize("feed", ["region", "both"])
def test_regions_feed_the_pixel_decoder(feed):
    m, b = model("length", feed=feed, pixel_dim=32), batch()
    assert list(m.heads) == ["pixel", "region"]  # recipe order; the region head still runs first
    with torch.no_grad():
        a, c = m(b), m({**b, "regions": ~b["regions"]})
        assert (a.outputs["pixel"] - c.outputs["pixel"]).abs().max() > 1e-5  # eq. 14
        moved = m({**b, "image": torch.randn_like(b["image"])}).outputs["region"]
    changed = (moved - a.outputs["region"]).abs().max() > 1e-5
    assert changed == (feed == "both")  # feed "region": pixels do not reach the region decoder
    assert "shared" not in b  # the caller's batch is left alone


def boxes(seed=0):
    """[B, K, 32, 32] axis-aligned boxes: structured regions that can be completed from a few patches."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, 16, (B, K, 2), generator=g)
    hi = lo + torch.randint(8, 17, (B, K, 2), generator=g)
    ys, xs = torch.arange(32).view(1, 1, 32, 1), torch.arange(32).view(1, 1, 1, 32)
    return (
        (ys >= lo[..., :1, None])
        & (ys < hi[..., :1, None])
        & (xs >= lo[..., 1:, None])
        & (xs < hi[..., 1:, None])
    )


def test_rae_alone_learns_a_fixed_batch():
    m, b = model("length", pixel=False).train(), {**batch(), "regions": boxes()}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = m(b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_config_names_the_field():
    spec = EncoderSpec(32, (4, 4), 8)
    with pytest.raises(ValueError, match="variant"):
        RegionHead(spec, variant="sideways")
    with pytest.raises(ValueError, match="pixel_dim"):
        RegionHead(spec, feed="both")
    with pytest.raises(ValueError, match="mask_ratio"):
        RegionHead(spec, mask_ratio=1.5)
    with pytest.raises(KeyError, match="data.regions"):
        model("length")({k: v for k, v in batch().items() if k != "regions"})
    with pytest.raises(ValueError, match="channel"):
        m = model("channel")
        m({**batch(), "regions": batch()["regions"][:, :2]})
