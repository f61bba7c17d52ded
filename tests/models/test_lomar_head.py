"""LoMaR's head and loss (Chen et al. 2022, §1.4): CLS per window dropped, one linear layer to p*p*3, norm-pix
MSE on the masked window tokens only; incompatible heads refused with a reason."""

import pytest
import torch

from maelab.masking import MaskPlan, WindowMasker
from maelab.models import build_pretrainer
from maelab.models.compat import IncompatibleRecipeError
from maelab.models.heads import LomarHead, normalize_patches, patchify

ENC = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mask_token=True, window_size=4)
RECIPE = {
    "name": "lomar_test",
    "encoder": {**ENC, "rel_pos": "irpe", "abs_pos": False},
    "masker": {"type": "window", "ratio": 0.75, "window": 4, "views": 3},
    "heads": {"pixel": {"type": "lomar", "norm_pix_loss": True}},
}


def _batch(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = MaskPlan.collate([model.masker(g) for _ in range(b)])
    return {"image": torch.randn(b, 3, 32, 32, generator=g), "plan": plan}


def test_lomar_pretrainer_trains_one_step():
    torch.manual_seed(0)
    model = build_pretrainer(RECIPE)
    head = model.heads["pixel"]
    assert isinstance(head, LomarHead) and head.pred.out_features == 4 * 4 * 3  # p*p*3
    batch = _batch(model)
    out = model(batch)
    assert out.outputs["pixel"].shape == (2, 3 * 16, 48)  # [B, n*K*K, p*p*3]
    assert torch.isfinite(out.loss)
    out.loss.backward()
    enc = model.encoder
    assert enc.mask_token.grad.abs().sum() > 0 and enc.blocks[0].attn.rel_pos.table.grad.abs().sum() > 0


def test_loss_is_norm_pix_mse_on_masked_window_tokens_only():
    torch.manual_seed(1)
    model = build_pretrainer(RECIPE).eval()
    head, batch = model.heads["pixel"], _batch(model)
    plan = batch["plan"]
    latent = model.encoder(batch["image"], plan)  # [B*n, 1+K*K, D]
    loss, pred = head(latent, plan, batch, {})
    # by hand: each window token's pixels, per-patch normalised, squared error averaged on masked tokens
    patches = patchify(batch["image"], 4)  # [B, 64, 48]
    want = []
    for b in range(2):
        tgt = normalize_patches(patches[b, plan.window_ids[b].flatten()])[0]  # [n*K*K, 48]
        err = (pred[b] - tgt).pow(2).mean(-1)
        want.append(err[plan.mask[b]])
    assert torch.allclose(loss, torch.cat(want).mean(), atol=1e-6)
    # the CLS of each window does not reach the loss; visible tokens' predictions do not either
    cls_changed = latent.clone()
    cls_changed[:, 0] += 5.0
    assert torch.equal(head(cls_changed, plan, batch, {})[0], loss)
    vis = (~plan.mask).reshape(6, 16)
    changed = latent.clone()
    changed[:, 1:][vis] += 5.0
    assert torch.allclose(head(changed, plan, batch, {})[0], loss)
    changed[:, 1:][~vis] += 5.0
    assert not torch.allclose(head(changed, plan, batch, {})[0], loss)


def test_window_pictures_shapes_and_visible_pixels():
    model = build_pretrainer(RECIPE).eval()
    batch = _batch(model)
    out = model(batch)
    windows, recon, mask = model.heads["pixel"].window_pictures(
        batch["image"], out.outputs["pixel"], out.plan
    )
    assert windows.shape == recon.shape == (6, 3, 16, 16) and mask.shape == (6, 16)
    # the first window of image 0 holds that image's pixels
    top_left = int(batch["plan"].window_ids[0, 0, 0])
    r, c = divmod(top_left, 8)
    assert torch.equal(windows[0], batch["image"][0, :, 4 * r : 4 * r + 16, 4 * c : 4 * c + 16])


@pytest.mark.parametrize(
    "heads,trait",
    [
        ({"pixel": {"type": "pixel_decoder", "embed_dim": 16, "depth": 1, "num_heads": 2}}, "full_grid"),
        ({"region": {"type": "region", "num_regions": 2, "enc_dim": 16, "dim": 16}}, "full_grid"),
    ],
)
def test_window_masker_refuses_full_grid_heads(heads, trait):
    with pytest.raises(IncompatibleRecipeError, match=trait) as err:
        build_pretrainer({**RECIPE, "heads": heads})
    assert "WindowMasker" in str(err.value)


def test_lomar_head_refuses_a_masker_without_windows():
    with pytest.raises(IncompatibleRecipeError, match="windows"):
        build_pretrainer({**RECIPE, "masker": {"type": "random", "ratio": 0.75}})


def test_official_pairing_runs_in_the_step():
    model = build_pretrainer({**RECIPE, "masker": {**RECIPE["masker"], "official_pairing": True}})
    assert model.masker.in_step
    out = model({"image": torch.randn(4, 3, 32, 32)})
    assert isinstance(model.masker, WindowMasker) and out.plan.window_ids.shape == (4, 3, 16)
    assert torch.isfinite(out.loss)


def test_training_pictures_show_the_windows():
    from maelab.analysis.viz import training_pictures

    model = build_pretrainer(RECIPE).eval()
    batch = _batch(model)
    with torch.no_grad():
        pics = training_pictures(model, batch, model(batch))
    assert set(pics) == {"reconstruction"} and pics["reconstruction"].startswith(b"\x89PNG")


def test_mae_style_encoder_decoder_inside_windows():
    """Fig. 4: the encoder sees each window's visible tokens only; MAE's decoder restores the window."""
    torch.manual_seed(5)
    recipe = {
        **RECIPE,
        "encoder": {**ENC, "mask_token": False},
        "heads": {
            "pixel": {"type": "lomar", "window": 4, "decoder": {"embed_dim": 16, "depth": 1, "num_heads": 2}}
        },
    }
    model = build_pretrainer(recipe)
    batch = _batch(model)
    latent = model.encoder(batch["image"], batch["plan"])
    assert latent.shape == (6, 1 + 4, 32)  # 16 - int(16 * 0.75) = 4 visible tokens per window
    out = model(batch)
    assert out.outputs["pixel"].shape == (2, 48, 48) and torch.isfinite(out.loss)
    # the masked patches' pixels do not reach the encoder
    noisy = batch["image"].clone()
    plan = batch["plan"]
    visible = set(plan.window_ids[0][~plan.window_mask()[0]].tolist())  # in any window of image 0
    for idx in set(range(64)) - visible:
        r, c = divmod(idx, 8)
        noisy[0, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 10.0
    assert torch.allclose(model.encoder(noisy, plan), latent, atol=1e-5)
    out.loss.backward()
    assert model.heads["pixel"].decoder.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="window"):
        build_pretrainer({**recipe, "heads": {"pixel": {"type": "lomar", "decoder": {"depth": 1}}}})
