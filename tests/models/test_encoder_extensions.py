"""The encoder's extension points: in-encoder mask tokens, relative positions, windows, attention maps."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block
from torch import Tensor

from maelab.masking import MaskPlan, RandomMasker
from maelab.models import PixelDecoderHead, ViTEncoder
from maelab.models.attention import Attention, record_attention

CFG = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2)  # 8 x 8 grid


def _plan(grid, batch=2, ratio=0.75, seed=0) -> MaskPlan:
    g = torch.Generator().manual_seed(seed)
    return MaskPlan.collate([RandomMasker(grid, ratio)(g) for _ in range(batch)])


def _timm_forward(enc: ViTEncoder, x: Tensor, plan: MaskPlan | None) -> Tensor:
    """The encoder as it was before the extension points: timm's own attention forward throughout."""
    x = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    if plan is not None:
        x = torch.gather(x, 1, plan.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
    for blk in enc.blocks:
        x = x + blk.drop_path1(blk.ls1(TimmAttention.forward(blk.attn, blk.norm1(x))))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return enc.norm(x)


def test_default_encoder_is_the_old_one_bit_for_bit():
    torch.manual_seed(0)
    new = ViTEncoder(**CFG).eval()
    torch.manual_seed(0)
    old = ViTEncoder(**CFG, block_fn=Block, attn_layer=TimmAttention).eval()  # timm's own layers
    assert [type(b.attn) for b in new.blocks] == [Attention] * 3
    assert new.state_dict().keys() == old.state_dict().keys()
    for k, v in new.state_dict().items():
        assert torch.equal(v, old.state_dict()[k]), k  # same init, same names
    x, plan = torch.randn(2, 3, 32, 32), _plan(new.grid)
    for p in (None, plan):
        assert torch.equal(new(x, p), old(x, p))
        assert torch.equal(new(x, p), _timm_forward(new, x, p))


def test_mask_tokens_rel_pos_and_windows_shapes():
    enc = ViTEncoder(**CFG, mask_token=True, rel_pos=True, window_size=4).eval()
    x, plan = torch.randn(2, 3, 32, 32), _plan(enc.grid)
    out = enc(x, plan)
    assert out.shape == (2 * 4, 1 + 16, 32)  # 4 windows of 4 x 4 per image, each with its CLS
    assert enc.blocks[0].attn.rel_pos.rel_pos_h.shape == (2 * 4 - 1, 16)
    # masked patches are replaced by the mask token: their pixels do not reach the output
    noisy = x.clone()
    pix = plan.mask[0].view(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1)
    noisy[0, :, pix] += 10.0
    assert torch.equal(enc(noisy, plan)[:4], out[:4])
    # no windows: every token, mask tokens in place
    full = ViTEncoder(**CFG, mask_token=True, rel_pos=True).eval()
    assert full(x, plan).shape == (2, 1 + 64, 32)
    assert "mask_token" in full.no_weight_decay()
    with pytest.raises(ValueError, match="mask_token"):
        ViTEncoder(**CFG, window_size=4)(x, plan)  # windows need every token
    with pytest.raises(ValueError, match="window_size"):
        ViTEncoder(**CFG, window_size=9)  # larger than the 8 x 8 grid
    with pytest.raises(ValueError, match="window_size"):
        ViTEncoder(**CFG, mask_token=True, window_size=3)(x, plan)  # no window plan: must partition the grid


def test_rel_pos_bias_learns():
    enc = ViTEncoder(**CFG, mask_token=True, rel_pos=True, window_size=4)
    enc(torch.randn(1, 3, 32, 32), _plan(enc.grid, batch=1)).sum().backward()
    assert enc.blocks[1].attn.rel_pos.rel_pos_w.grad.abs().sum() > 0


@dataclass(frozen=True)
class WindowPlan(MaskPlan):
    window_ids: Tensor  # [B, n, k*k] grid index of each window token


def test_windows_from_the_plan():
    enc = ViTEncoder(**CFG, mask_token=True, window_size=2).eval()
    base = _plan(enc.grid)
    ids = torch.tensor([[0, 1, 8, 9], [18, 19, 26, 27], [54, 55, 62, 63]])  # three 2 x 2 windows
    plan = WindowPlan(*base.tensors(), window_ids=ids.expand(2, 3, 4))
    out = enc(torch.randn(2, 3, 32, 32), plan)
    assert out.shape == (2 * 3, 1 + 4, 32)


class _CountSDPA:
    def __init__(self, monkeypatch) -> None:
        self.calls, self.sdpa = 0, F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.sdpa(*args, **kw)


def test_attention_of_chosen_encoder_blocks(monkeypatch):
    enc = ViTEncoder(**CFG).eval()
    x, plan = torch.randn(2, 3, 32, 32), _plan(enc.grid)
    fused = enc(x, plan)
    count = _CountSDPA(monkeypatch)
    out, maps = enc.forward_attention(x, plan, indices=[0, -1])
    assert sorted(maps) == [0, 2]
    assert count.calls == 1  # block 1 alone stayed on fused SDPA
    for a in maps.values():
        assert a.shape == (2, 2, 17, 17)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 17))
    torch.testing.assert_close(out, fused, atol=1e-5, rtol=1e-5)
    assert not any(b.attn.record for b in enc.blocks) and all(b.attn.probs is None for b in enc.blocks)


def test_attention_of_chosen_pixel_decoder_blocks(monkeypatch):
    enc = ViTEncoder(**CFG).eval()
    head = PixelDecoderHead(enc.spec, embed_dim=16, depth=2, num_heads=2).eval()
    plan = _plan(enc.grid)
    latent = enc(torch.randn(2, 3, 32, 32), plan)
    count = _CountSDPA(monkeypatch)
    pred, maps = head.decode_attention(latent, plan, indices=[1])
    assert pred.shape == (2, 64, 4 * 4 * 3) and list(maps) == [1]
    assert count.calls == 1  # decoder block 0 stayed fused
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 2, 65))


def test_record_attention_needs_the_maelab_layer():
    enc = ViTEncoder(**CFG, attn_layer=TimmAttention)
    with pytest.raises(TypeError, match="cannot report attention"), record_attention(enc.blocks, [0]):
        pass
