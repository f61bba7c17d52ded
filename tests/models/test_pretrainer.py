import pytest
import torch

from maelab.masking import MaskContext, Masker, MaskPlan, build_masker
from maelab.models import HEADS, Head, PixelDecoderHead, Pretrainer, build_pretrainer, patchify, unpatchify
from maelab.models.heads.pixel import masked_mse, normalize_patches

RECIPE = {
    "name": "tiny",
    "encoder": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "masker": {"type": "random", "ratio": 0.75},
    "heads": {"pixel": dict(type="pixel_decoder", weight=1.0, embed_dim=16, depth=1, num_heads=2)},
}


def _batch(model: Pretrainer, b: int = 2, seed: int = 0) -> dict:
    masker = build_masker(RECIPE["masker"], model.encoder.grid)
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, 3, 32, 32, generator=g),
        "plan": MaskPlan.collate([masker(g) for _ in range(b)]),
    }


def test_forward_shapes_and_backward():
    model = build_pretrainer(RECIPE)
    batch = _batch(model)
    out = model(batch)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert set(out.losses) == {"pixel"} and out.outputs["pixel"].shape == (2, 16, 8 * 8 * 3)
    out.loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.encoder.pos_embed.grad is None  # fixed buffer


def test_loss_weights_sum():
    recipe = {
        **RECIPE,
        "heads": {
            "a": {**RECIPE["heads"]["pixel"], "weight": 0.5},
            "b": {**RECIPE["heads"]["pixel"], "weight": 2.0},
        },
    }
    model = build_pretrainer(recipe)
    out = model(_batch(model))
    torch.testing.assert_close(out.loss, 0.5 * out.losses["a"] + 2.0 * out.losses["b"])


def test_no_weight_decay_names_exist():
    model = build_pretrainer(RECIPE)
    names = model.no_weight_decay()
    assert names == {"encoder.cls_token", "heads.pixel.mask_token"}
    assert names <= dict(model.named_parameters()).keys()


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (2, 6, 12)
    # patch (row 1, col 2) -> index 5; its first entry is pixel (2, 4) channel 0, then channel 1 (p q c order)
    assert p[0, 5, 0] == x[0, 0, 2, 4] and p[0, 5, 1] == x[0, 1, 2, 4] and p[0, 5, 3] == x[0, 0, 2, 5]
    torch.testing.assert_close(unpatchify(p, 2, (2, 3)), x)


def test_norm_pix_loss_hand_computed():
    """One sample, 2 patches of 2 pixels x 1 channel... done in the 4-value patch space by hand.

    target patch 0 = [1, 2, 3, 4]: mean 2.5, unbiased var = (2.25+0.25+0.25+2.25)/3 = 5/3
      -> normalised = (t - 2.5) / sqrt(5/3 + 1e-6)
    pred patch 0 = 0 -> per-patch mse = mean(normalised^2) = (5 / (5/3 + 1e-6)) / 4 = 0.75 (to 1e-6)
    patch 1 is visible (not masked) and must not count.
    """
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 1.0]]])  # [1, 2, 4]
    norm, mean, var = normalize_patches(target)
    assert mean[0, 0, 0] == 2.5 and abs(float(var[0, 0, 0]) - 5 / 3) < 1e-6
    pred = torch.zeros(1, 2, 4)
    mask = torch.tensor([[True, False]])
    expected = (5.0 / (5.0 / 3.0 + 1e-6)) / 4.0
    assert abs(float(masked_mse(pred, norm, mask)) - expected) < 1e-6
    # without normalisation: mean((0 - [1,2,3,4])^2) = 30/4
    assert abs(float(masked_mse(pred, target, mask)) - 7.5) < 1e-6


def test_pixel_head_norm_pix_loss_on_image():
    """The head's loss on a 1-patch-masked image equals the hand formula applied to that patch."""
    head = PixelDecoderHead(build_pretrainer(RECIPE).encoder.spec, embed_dim=16, depth=1, num_heads=2)
    image = torch.randn(1, 3, 32, 32)
    pred = torch.zeros(1, 16, 192)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    t = patchify(image, 8)[0, 5]
    expected = ((t - t.mean()) ** 2).sum() / (t.var() + 1e-6) / 192
    got = masked_mse(pred, head.target(image), mask)
    torch.testing.assert_close(got, expected)


def test_loss_only_on_masked_patches():
    model = build_pretrainer(RECIPE)
    batch = _batch(model, b=1)
    head = model.heads["pixel"]
    target = head.target(batch["image"])
    pred = torch.randn(1, 16, 192)
    mask = batch["plan"].mask
    loss = masked_mse(pred, target, mask)
    visible, masked = (~mask[0]).nonzero()[0, 0], mask[0].nonzero()[0, 0]
    pred2 = pred.clone()
    pred2[0, visible] += 10.0
    assert torch.equal(masked_mse(pred2, target, mask), loss)
    pred3 = pred.clone()
    pred3[0, masked] += 10.0
    assert not torch.equal(masked_mse(pred3, target, mask), loss)


def test_reconstruct_pastes_visible_and_unnormalises():
    model = build_pretrainer(RECIPE)
    batch = _batch(model, b=2)
    out = model(batch)
    rec = model.reconstruct(batch, out)
    assert rec.shape == batch["image"].shape
    keep = ~batch["plan"].mask
    torch.testing.assert_close(patchify(rec, 8)[keep], patchify(batch["image"], 8)[keep])
    # a perfect norm-pix prediction reconstructs the original masked patches too
    out.outputs["pixel"] = model.heads["pixel"].target(batch["image"])
    torch.testing.assert_close(model.reconstruct(batch, out), batch["image"], atol=1e-4, rtol=1e-4)


def test_bad_recipe_errors():
    with pytest.raises(ValueError, match="heads.pixel.type"):
        build_pretrainer({**RECIPE, "heads": {"pixel": {"type": "nope"}}})
    with pytest.raises(ValueError, match="heads.pixel: bad field"):
        build_pretrainer({**RECIPE, "heads": {"pixel": {"type": "pixel_decoder", "depht": 2}}})
    with pytest.raises(ValueError, match="heads"):
        build_pretrainer({**RECIPE, "heads": {}})
    model = build_pretrainer(RECIPE)
    with pytest.raises(KeyError, match="plan"):
        model({"image": torch.randn(1, 3, 32, 32)})


def test_bf16_autocast_keeps_loss_fp32():
    model = build_pretrainer(RECIPE)
    batch = _batch(model)
    ref = model(batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out.loss.dtype == torch.float32 and out.outputs["pixel"].dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, ref, atol=0.05, rtol=0.05)


class _LayerHead(Head):
    """A test head reading encoder block 0 (as MR-MAE's multi-layer fusion would)."""

    layers = (0, -1)

    def __init__(self, spec, scale: float = 1.0) -> None:
        super().__init__(spec)
        self.proj = torch.nn.Linear(spec.embed_dim, 1)
        self.scale = scale
        self.seen: dict = {}

    def forward(self, latent, plan, batch, intermediates):
        self.seen = {k: v.shape for k, v in intermediates.items()}
        out = self.proj(intermediates[0][:, 1:] + intermediates[1][:, 1:])  # [B, L_keep, 1]
        return self.scale * (out.float() - batch["target"][..., None]).pow(2).mean(), out


class _InStepMasker(Masker):
    in_step = True

    def plan_batch(self, batch, context):
        assert isinstance(context.model, torch.nn.Module) and context.step == 5
        b = batch["image"].shape[0]
        return MaskPlan.from_noise(torch.arange(self.num_patches).float().repeat(b, 1), 0.5)


def test_heads_get_intermediates_and_extras(monkeypatch):
    monkeypatch.setitem(HEADS, "layer_probe", _LayerHead)
    recipe = {
        **RECIPE,
        "heads": {**RECIPE["heads"], "probe": {"type": "layer_probe", "weight": 0.5, "scale": 2.0}},
    }
    model = build_pretrainer(recipe)
    assert model.layers == [0, 1]
    batch = _batch(model)
    batch["target"] = torch.zeros(2, 4)
    out = model(batch)
    assert model.heads["probe"].seen == {0: (2, 5, 32), 1: (2, 5, 32)}
    torch.testing.assert_close(out.loss, out.losses["pixel"] + 0.5 * out.losses["probe"])


def test_in_step_masker_makes_the_plan():
    model = build_pretrainer(RECIPE)
    model.masker = _InStepMasker(model.encoder.grid)
    out = model({"image": torch.randn(2, 3, 32, 32), "context": MaskContext(step=5, total_steps=10)})
    assert out.plan.ids_keep.shape == (2, 8)
    assert torch.equal(out.plan.ids_keep[0], torch.arange(8))
    assert model.reconstruct({"image": torch.randn(2, 3, 32, 32)}, out).shape == (2, 3, 32, 32)
