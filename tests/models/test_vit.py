import math

import pytest
import torch

from maelab.masking import MaskPlan, RandomMasker
from maelab.models import ViTEncoder, sincos_2d


def tiny(**kw) -> ViTEncoder:
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    return ViTEncoder(**{**cfg, **kw}).eval()


def _plan(grid, batch=2, ratio=0.75, seed=0) -> MaskPlan:
    g = torch.Generator().manual_seed(seed)
    masker = RandomMasker(grid, ratio)
    return MaskPlan.collate([masker(g) for _ in range(batch)])


def test_encoder_keeps_only_visible_tokens():
    enc = tiny()
    x = torch.randn(2, 3, 32, 32)
    plan = _plan(enc.grid)  # 16 patches, 4 kept
    assert enc.forward_features(x, plan).shape == (2, 1 + 4, 32)
    assert enc.forward_features(x).shape == (2, 1 + 16, 32)


def test_kept_tokens_match_full_sequence_order_free():
    """With a plan that keeps everything, encoding equals the plain forward up to the token permutation."""
    enc = tiny()
    x = torch.randn(1, 3, 32, 32)
    plan = MaskPlan.from_noise(torch.rand(1, 16), 0.0)
    full, kept = enc.forward_features(x), enc.forward_features(x, plan)
    torch.testing.assert_close(kept[:, 1:], full[:, 1:][:, plan.ids_keep[0]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)


def test_rectangular_grid_and_intermediates():
    enc = tiny(img_size=(32, 48))
    assert enc.grid == (4, 6) and enc.pos_embed.shape == (1, 1 + 24, 32)
    x, plan = torch.randn(2, 3, 32, 48), _plan((4, 6), ratio=0.5)
    final, feats = enc.forward_intermediates(x, plan, indices=[0, -1])
    assert final.shape == (2, 13, 32) and len(feats) == 2
    assert all(f.shape == (2, 13, 32) for f in feats)
    torch.testing.assert_close(enc.norm(feats[1]), final)  # last block + final norm = output
    assert len(enc.forward_intermediates(x, plan, indices=2)[1]) == 2
    with pytest.raises(IndexError):
        enc.forward_intermediates(x, plan, indices=[5])


def test_sincos_mae_convention():
    """First half of dims encodes the column (w) index, second half the row; CLS slot zero."""
    dim, grid = 8, (2, 3)
    emb = sincos_2d(dim, grid)
    assert emb.shape == (7, 8) and torch.equal(emb[0], torch.zeros(8))
    # patch at row 1, col 2 -> raster index 1*3+2 = 5 (+1 for CLS)
    omega = [1.0, 1.0 / 100]  # 1/10000^(i/2) for i in 0,1 (dim/4 = 2 frequencies)
    col = [math.sin(2 * w) for w in omega] + [math.cos(2 * w) for w in omega]
    row = [math.sin(1 * w) for w in omega] + [math.cos(1 * w) for w in omega]
    torch.testing.assert_close(emb[6], torch.tensor(col + row))


def test_mae_init_and_fused_switch():
    enc = tiny()
    assert torch.equal(enc.blocks[0].norm1.weight, torch.ones(32))
    assert torch.equal(enc.blocks[0].attn.qkv.bias, torch.zeros(96))
    assert 0.0 < enc.cls_token.std() < 0.05
    x = torch.randn(1, 3, 32, 32)
    fused = enc.forward_features(x)
    enc.set_fused_attn(False)
    torch.testing.assert_close(enc.forward_features(x), fused, atol=1e-5, rtol=1e-5)
    assert "pos_embed" not in dict(enc.named_parameters())  # fixed: a buffer, still in the state dict
    assert "pos_embed" in enc.state_dict()


def test_bad_img_size():
    with pytest.raises(ValueError, match="encoder.img_size"):
        tiny(img_size=30)
