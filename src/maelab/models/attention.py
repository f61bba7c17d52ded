"""Attention pieces shared by the encoder, the heads and the ViTDet backbone.

- :class:`Attention`: timm's attention (fused SDPA by default) that can add a decomposed relative
  position bias over its token grid and, for the blocks asked, compute the explicit softmax and keep
  its probabilities (self-guided MAE's token relations, Shi et al. 2024, §3.1 and §4).
- :func:`record_attention`: ask chosen blocks for their attention probabilities during a forward.
- :func:`window_partition` / :func:`window_unpartition`: windows as the batch (ViTDet §3, LoMaR §3).
- :class:`RelPosBias` / :func:`rel_pos_bias`: decomposed relative position (MViTv2, used by ViTDet §3);
  LoMaR (§3 "Implementation") adds a relative position encoding so its windows are translation-invariant.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import Tensor, nn

from maelab.models.irpe import ContextualProductRPE


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """[B, H, W, D] -> [B * nW, window, window, D], zero-padding H, W to multiples of ``window`` (ViTDet)."""
    b, h, w, d = x.shape
    ph, pw = (window - h % window) % window, (window - w % window) % window
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window, window, wp // window, window, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, d), (hp, wp)


def window_unpartition(x: Tensor, window: int, padded: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: [B * nW, window, window, D] -> [B, H, W, D]."""
    hp, wp = padded
    b = x.shape[0] // (hp * wp // window // window)
    x = x.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, : hw[0], : hw[1]].contiguous()


def rel_pos_bias(q: Tensor, rel_h: Tensor, rel_w: Tensor, hw: tuple[int, int]) -> Tensor:
    """Decomposed relative position bias (MViTv2, used by ViTDet §3): q [B, h, N, d] -> [B, h, N, N]."""
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

    b, heads, n, d = q.shape
    bias = get_decomposed_rel_pos_bias(q.reshape(b * heads, n, d), rel_h, rel_w, hw, hw)
    return bias.view(b, heads, n, n)


class RelPosBias(nn.Module):
    """Learned decomposed relative positions over a ``grid = (gh, gw)`` of tokens, zero-initialised
    (ViTDet's rel_pos_zero_init); the first ``num_prefix_tokens`` tokens (CLS) get no bias."""

    def __init__(self, grid: tuple[int, int], head_dim: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.grid, self.num_prefix_tokens = (int(grid[0]), int(grid[1])), int(num_prefix_tokens)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.grid[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.grid[1] - 1, head_dim))

    def forward(self, q: Tensor) -> Tensor:
        """q [B, h, P+gh*gw, d] -> bias [B, h, P+gh*gw, P+gh*gw] (zero on the prefix rows and columns)."""
        p = self.num_prefix_tokens
        bias = rel_pos_bias(q[:, :, p:], self.rel_pos_h, self.rel_pos_w, self.grid)
        return F.pad(bias, (p, 0, p, 0))


class Attention(TimmAttention):
    """timm's ``Attention`` plus two options; with neither it runs timm's own forward (fused SDPA).

    ``add_rel_pos(grid, kind)``: add a :class:`RelPosBias` (or LoMaR's iRPE) over this token grid (after the
    prefix tokens), added to the logits as SDPA's float mask.
    ``record = True`` (see :func:`record_attention`): compute ``softmax(q k^T / sqrt(d) + bias)`` explicitly
    and keep it, detached, in ``probs`` ``[B, heads, N, N]``.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.rel_pos: nn.Module | None = None  # q [B, h, N, d] -> additive bias [B, h, N, N]
        self.record = False
        self.probs: Tensor | None = None

    def add_rel_pos(
        self, grid: tuple[int, int], num_prefix_tokens: int = 1, kind: str = "decomposed"
    ) -> None:
        """``kind``: ``decomposed`` (MViTv2 / ViTDet) or ``irpe`` (iRPE contextual product on keys, shared
        across heads, LoMaR; :class:`maelab.models.irpe.ContextualProductRPE`)."""
        if kind == "irpe":
            self.rel_pos = ContextualProductRPE(grid, self.head_dim, num_prefix_tokens)
        elif kind == "decomposed":
            self.rel_pos = RelPosBias(grid, self.head_dim, num_prefix_tokens)
        else:
            raise ValueError(f"encoder.rel_pos {kind!r} is unknown; choose decomposed or irpe")

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if not self.record and self.rel_pos is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, N, d] each
        q, k = self.q_norm(q), self.k_norm(k)
        bias = attn_mask
        if self.rel_pos is not None:
            rel = self.rel_pos(q).to(q.dtype)  # [B, h, N, N]
            bias = rel if bias is None else bias + rel
        if self.record or not self.fused_attn:  # explicit: recorded, or seen by FLOP counters
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, h, N, N]
            attn = (attn if bias is None else attn + bias).softmax(dim=-1)
            if self.record:
                self.probs = attn.detach()
            x = self.attn_drop(attn) @ v
        else:
            drop = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, is_causal=is_causal)
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@contextmanager
def record_attention(blocks: Sequence[nn.Module], indices: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Attention probabilities of ``blocks[i].attn`` for ``i`` in ``indices`` during the forward run inside
    the ``with``; the dict is filled on exit: ``{i: [B, heads, N, N]}``, rows summing to 1. The other
    blocks keep their fused path. Blocks must use :class:`Attention`."""
    chosen = {i % len(blocks): blocks[i].attn for i in indices}
    for i, attn in chosen.items():
        if not isinstance(attn, Attention):
            raise TypeError(
                f"block {i}: {type(attn).__name__} cannot report attention (use models.Attention)"
            )
        attn.record, attn.probs = True, None
    maps: dict[int, Tensor] = {}
    try:
        yield maps
    finally:
        for i, attn in chosen.items():
            if attn.probs is not None:
                maps[i] = attn.probs
            attn.record, attn.probs = False, None
