"""iRPE contextual product on keys (Wu et al. 2021), as LoMaR uses it: the bias depends only on relative
position, matches a direct unfused computation of the formula, and with RPE off the encoder is plain."""

import math

import pytest
import torch
from timm.layers import Attention as TimmAttention

from maelab.masking import WindowMasker
from maelab.models import ViTEncoder
from maelab.models.attention import Attention
from maelab.models.irpe import ContextualProductRPE, piecewise_index, product_buckets


def _g(x: int, alpha: float = 1.9, beta: float = 3.8, gamma: float = 15.2) -> int:
    """Wu et al. §3.3's piecewise index function, written out on one integer."""
    if abs(x) <= alpha:
        return round(x)
    y = round(alpha + math.log(abs(x) / alpha) / math.log(gamma / alpha) * (beta - alpha))
    return int(math.copysign(min(beta, y), x))


def test_piecewise_index_on_a_7x7_window():
    rel = torch.arange(-6, 7)
    got = piecewise_index(rel, 1.9, 3.8, 15.2).tolist()
    assert got == [_g(int(x)) for x in rel]
    assert got == [-3, -3, -3, -2, -2, -1, 0, 1, 2, 2, 3, 3, 3]  # exact near, log-compressed, clipped at 3
    assert product_buckets((7, 7)).max() == 48  # 7 x 7 buckets


def test_bias_depends_only_on_relative_position():
    torch.manual_seed(0)
    rpe = ContextualProductRPE((7, 7), head_dim=8)
    q = torch.randn(1, 2, 1, 8).expand(1, 2, 50, 8)  # the same query content at every position
    with torch.no_grad():
        bias = rpe(q)  # [1, 2, 50, 50]
    assert bias.shape == (1, 2, 50, 50)
    assert bias[:, :, 0].abs().sum() == 0 and bias[:, :, :, 0].abs().sum() == 0  # CLS skipped
    pos = [(r, c) for r in range(7) for c in range(7)]
    by_offset: dict[tuple[int, int], torch.Tensor] = {}
    for i, (ri, ci) in enumerate(pos):
        for j, (rj, cj) in enumerate(pos):
            key = (ri - rj, ci - cj)
            v = bias[0, :, 1 + i, 1 + j]
            if key in by_offset:
                assert torch.equal(v, by_offset[key]), key
            else:
                by_offset[key] = v
    assert len(by_offset) == 13 * 13
    # and it does depend on the offset (a learned table, not a constant)
    assert len({round(float(v[0]), 6) for v in by_offset.values()}) > 1
    # the same table on a bigger grid: the same offsets give the same bias (translation invariance)
    big = ContextualProductRPE((14, 14), head_dim=8)
    big.load_state_dict(rpe.state_dict())
    with torch.no_grad():
        b2 = big(q[:, :, :1].expand(1, 2, 197, 8))
    assert torch.allclose(b2[0, :, 1 + 3 * 14 + 5, 1 + 1 * 14 + 2], by_offset[(2, 3)])


def test_bias_equals_a_direct_unfused_computation():
    torch.manual_seed(1)
    grid, d, heads = (4, 5), 6, 3
    rpe = ContextualProductRPE(grid, head_dim=d)
    q = torch.randn(2, heads, 1 + 20, d)
    got = rpe(q)
    pos = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    want = torch.zeros_like(got)
    for b in range(2):
        for h in range(heads):
            for i, (ri, ci) in enumerate(pos):
                for j, (rj, cj) in enumerate(pos):
                    bucket = (_g(ri - rj) + 3) * 7 + (_g(ci - cj) + 3)
                    r_ij = rpe.table[bucket]  # shared across heads
                    want[b, h, 1 + i, 1 + j] = q[b, h, 1 + i] @ r_ij / math.sqrt(d)
    assert torch.allclose(got, want, atol=1e-6)


def test_attention_with_irpe_on_sdpa_equals_the_unfused_formula():
    torch.manual_seed(2)
    attn = Attention(16, num_heads=2).eval()
    attn.add_rel_pos((3, 3), 1, "irpe")
    x = torch.randn(2, 10, 16)
    got = attn(x)  # fused SDPA with the bias as a float mask
    qkv = attn.qkv(x).reshape(2, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    buckets = product_buckets((3, 3))
    r = attn.rel_pos.table[buckets]  # [9, 9, d]: r_ij
    logits = q @ k.transpose(-2, -1)  # [B, h, N, N]
    rel = torch.einsum("bhid,ijd->bhij", q[:, :, 1:], r)  # q_i . r_ij, keys only, CLS skipped
    logits[:, :, 1:, 1:] += rel
    out = (logits / math.sqrt(8)).softmax(-1) @ v  # e_ij = q_i (k_j + r_ij)^T / sqrt(d)
    want = attn.proj(out.transpose(1, 2).reshape(2, 10, 16))
    assert torch.allclose(got, want, atol=1e-5)
    attn.fused_attn = False  # the explicit path agrees too
    assert torch.allclose(attn(x), want, atol=1e-5)


CFG = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # 8 x 8 grid


def test_irpe_in_every_block_shared_across_heads_and_learns():
    enc = ViTEncoder(**CFG, rel_pos="irpe", abs_pos=False)
    for blk in enc.blocks:
        assert isinstance(blk.attn.rel_pos, ContextualProductRPE)
        assert blk.attn.rel_pos.table.shape == (49, 16)  # one [buckets, head_dim] table for both heads
    assert not enc.pos_embed.any()  # no absolute positions
    enc(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(blk.attn.rel_pos.table.grad.abs().sum() > 0 for blk in enc.blocks)


def test_zero_tables_give_the_plain_encoder():
    torch.manual_seed(3)
    plain = ViTEncoder(**CFG).eval()
    rpe = ViTEncoder(**CFG, rel_pos="irpe").eval()
    missing, unexpected = rpe.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("rel_pos.table") for k in missing)
    for blk in rpe.blocks:
        torch.nn.init.zeros_(blk.attn.rel_pos.table)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rpe(x), plain(x), atol=1e-6)


def test_lomar_encoder_with_rpe_off_is_the_plain_encoder_on_the_windows():
    torch.manual_seed(4)
    enc = ViTEncoder(**CFG, mask_token=True, window_size=4).eval()  # rel_pos off, absolute positions
    assert enc.rel_pos is None and all(b.attn.rel_pos is None for b in enc.blocks)
    masker = WindowMasker(enc.grid, ratio=0.75, window=4, views=3)
    plan = masker.batch_plan(2, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    got = enc(x, plan)  # [2*3, 1+16, D]
    # by hand: the plain ViT (timm's attention) on each window's tokens, mask token in, positions added
    tok = enc.patch_embed(x)  # [2, 64, D]
    ids = plan.window_ids.reshape(2, 48)
    w = torch.gather(tok, 1, ids[..., None].expand(-1, -1, 32))
    w = torch.where(plan.mask[..., None], enc.mask_token, w)
    w = w + torch.gather(enc.pos_embed[:, 1:].expand(2, -1, -1), 1, ids[..., None].expand(-1, -1, 32))
    w = w.reshape(6, 16, 32)
    w = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(6, -1, -1), w], dim=1)
    for blk in enc.blocks:
        w = w + TimmAttention.forward(blk.attn, blk.norm1(w))
        w = w + blk.mlp(blk.norm2(w))
    assert torch.allclose(got, enc.norm(w), atol=1e-5)


def test_bad_rel_pos_kind_names_the_field():
    with pytest.raises(ValueError, match="encoder.rel_pos"):
        ViTEncoder(**CFG, rel_pos="rope")
