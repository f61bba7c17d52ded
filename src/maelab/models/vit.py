"""The ViT encoder every variant shares, built from timm layers (fused SDPA attention by default).

Masked pre-training encodes only the kept tokens (MAE, He et al. 2022, §3 "MAE encoder"): patches are
embedded, get their fixed 2-D sin-cos position, then the plan's ``ids_keep`` selects the visible ones.

Extension points, in the manner of timm's ``VisionTransformer`` (all off by default, which is MAE's encoder):
- ``block_fn`` / ``attn_layer``: the block and the attention layer (default timm ``Block`` with
  :class:`maelab.models.attention.Attention`, i.e. timm's fused attention);
- ``mask_token``: keep every token and replace the masked ones by a learned mask token (LoMaR §3, "we feed
  all the patches, including visible and masked ones ... to the encoder");
- ``window_size``: windows of ``k x k`` patches as the batch (LoMaR §3): the plan's ``window_ids``
  ``[B, n, k*k]`` (grid indices of each window's patches, raster order) when it has them, else the
  fixed non-overlapping partition of the grid; every window gets its own CLS token;
- ``rel_pos``: a relative position bias in every block over the token grid (a window's grid when windowed):
  ``true`` / ``decomposed`` (MViTv2, as ViTDet), or ``irpe``, the iRPE contextual product on keys shared
  across heads that LoMaR uses (Chen et al. 2022, §1.4 "Implementation"; ``maelab.models.irpe``);
- ``abs_pos``: add the fixed sin-cos positions (default); LoMaR with iRPE has none, in pre-training or
  transfer (``abs_pos: false``; its ``pos_embed`` buffer is then zeros, so state dicts keep one layout);
- a LoMaR ``WindowPlan`` (``maelab.masking.window``): its windows are gathered from the grid first, then its
  window-token mask puts the mask token in, so a patch in two overlapping windows is masked per window;
- attention probabilities of chosen blocks: :meth:`ViTEncoder.forward_attention` (the other blocks stay
  fused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from maelab.masking.plan import MaskPlan
from maelab.masking.window import WindowPlan
from maelab.models.attention import Attention, record_attention, window_partition


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[M] positions -> [M, dim]: ``[sin(pos * w), cos(pos * w)]``, ``w_i = 1 / 10000^(i / (dim/2))``
    (Vaswani et al. 2017, §3.5), in float64 like MAE's numpy code."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [dim/2]
    out = pos.to(torch.float64)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> Tensor:
    """Fixed 2-D position embedding ``[(1 +) gh*gw, dim]`` in raster order, float32.

    MAE convention (``get_2d_sincos_pos_embed``): the first half of the dims encodes the column (w)
    index, the second half the row (h) index; the CLS slot is zeros. Works for rectangular grids.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # [gh, gw] each
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x: [B, L, D], ids: [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@dataclass(frozen=True)
class EncoderSpec:
    """What a head needs to know about the encoder it sits on."""

    embed_dim: int
    grid: tuple[int, int]
    patch_size: int
    in_chans: int = 3
    num_prefix_tokens: int = 1

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


class ViTEncoder(nn.Module):
    """ViT with a CLS token and fixed 2-D sin-cos positions; ``forward_features`` sees only kept tokens
    (every token with ``mask_token``; one sequence per window with ``window_size``)."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] | partial = partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate: float = 0.0,
        fused_attn: bool = True,
        *,
        block_fn: Callable[..., nn.Module] = Block,
        attn_layer: Callable[..., nn.Module] = Attention,
        mask_token: bool = False,
        window_size: int | None = None,
        rel_pos: bool | str = False,
        abs_pos: bool = True,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), int(patch_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(
                f"encoder.img_size {img_size} must be divisible by encoder.patch_size {patch_size}"
            )
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.embed_dim, self.depth, self.num_prefix_tokens = embed_dim, depth, 1
        self.in_chans = in_chans
        self.window_size = int(window_size) if window_size else None
        if self.window_size and self.window_size > min(self.grid):
            raise ValueError(f"encoder.window_size {window_size} is larger than the patch grid {self.grid}")

        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        # fixed, never trained: a buffer, saved in the state dict under the official name
        self.abs_pos = bool(abs_pos)
        pos = sincos_2d(embed_dim, self.grid)[None]  # [1, 1+L, D]
        self.register_buffer("pos_embed", pos if self.abs_pos else torch.zeros_like(pos), persistent=True)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under a meta device
        self.blocks = nn.ModuleList(
            block_fn(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                drop_path=dpr[i],
                attn_layer=attn_layer,
            )
            for i in range(depth)
        )
        self.rel_pos = "decomposed" if rel_pos is True else (rel_pos or None)
        if self.rel_pos:
            self.add_rel_pos(self.rel_pos)
        self.norm = norm_layer(embed_dim)
        self.set_fused_attn(fused_attn)
        self.init_weights()

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.embed_dim, self.grid, self.patch_size, self.in_chans, self.num_prefix_tokens)

    def add_rel_pos(self, kind: str = "decomposed") -> None:
        """A relative position bias in every block, over the grid of one sequence (a window's if windowed)."""
        token_grid = (self.window_size,) * 2 if self.window_size else self.grid
        for i, blk in enumerate(self.blocks):
            if not isinstance(blk.attn, Attention):
                raise TypeError(f"encoder.rel_pos: block {i} attention is {type(blk.attn).__name__}")
            blk.attn.add_rel_pos(token_grid, self.num_prefix_tokens, kind)

    def set_fused_attn(self, enable: bool) -> None:
        """Fused SDPA (fast) or explicit ``softmax(q k^T) v`` (FLOP counters see the matmuls)."""
        for blk in self.blocks:
            blk.attn.fused_attn = enable

    def init_weights(self) -> None:
        """MAE init: xavier_uniform on the patch projection viewed 2-D and on Linear layers,
        normal(0.02) on the CLS token, LayerNorm ones/zeros."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_norm)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token"} if self.mask_token is not None else {"cls_token"}

    # -- forward ---------------------------------------------------------------------------------
    def embed(self, x: Tensor, plan: MaskPlan | None = None) -> Tensor:
        """[B, C, H, W] -> [B, 1+L_keep, D]: embed, add positions, keep ``plan.ids_keep``, prepend CLS.

        With ``mask_token``: [B, 1+L, D], masked patches replaced by the mask token before the positions
        are added; with ``window_size``: [B*n, 1+k*k, D], one sequence per window."""
        x = self.patch_embed(x)  # [B, L, D]
        if isinstance(plan, WindowPlan):
            return self.with_cls(self.embed_windows(x, plan))
        if plan is not None and self.mask_token is not None:
            x = torch.where(plan.mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if self.abs_pos:
            x = x + self.pos_embed[:, 1:]  # [B, L, D]
        if plan is not None and self.mask_token is None:
            x = gather_tokens(x, plan.ids_keep)  # [B, L_keep, D]
        if self.window_size:
            x = self.windows(x, plan)  # [B*n, k*k, D]
        return self.with_cls(x)

    def with_cls(self, x: Tensor) -> Tensor:
        """[B', N, D] -> [B', 1+N, D]: the CLS token (plus its zero position) in front of every sequence."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [B', 1, D]
        return torch.cat([cls, x], dim=1)

    def embed_windows(self, x: Tensor, plan: WindowPlan) -> Tensor:
        """LoMaR (§1.4 "Implementation"): patch tokens [B, L, D] -> [B*n, k*k, D], all k*k tokens of each
        window in raster order, the masked ones replaced by the mask token, positions (if ``abs_pos``) from
        each token's grid index. Without ``mask_token`` (the MAE-style encoder-decoder inside windows of
        Fig. 4): only each window's visible tokens, [B*n, k*k - masked, D]."""
        b, n, kk = plan.window_ids.shape
        if self.window_size is None or self.window_size**2 != kk:
            raise ValueError(
                f"a LoMaR window plan ({n} windows of {kk} tokens) needs encoder.window_size "
                f"{int(kk**0.5)}, got {self.window_size}"
            )
        ids = plan.window_ids.reshape(b, n * kk)  # [B, n*k*k] grid indices
        x = gather_tokens(x, ids)  # [B, n*k*k, D]
        if self.mask_token is not None:
            x = torch.where(plan.mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if self.abs_pos:
            x = x + gather_tokens(self.pos_embed[:, 1:].expand(b, -1, -1), ids)
        x = x.reshape(b * n, kk, x.shape[-1])
        if self.mask_token is None:  # MAE-style inside the windows (Fig. 4): the visible tokens only
            x = gather_tokens(x, plan.per_window().ids_keep)  # [B*n, k*k - masked, D]
        return x

    def windows(self, x: Tensor, plan: MaskPlan | None) -> Tensor:
        """[B, L, D] -> [B*n, k*k, D]: the plan's ``window_ids`` [B, n, k*k] if it has them, else the grid's
        non-overlapping k x k windows (raster order inside each)."""
        if x.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError("encoder.window_size needs every token: set encoder.mask_token with a plan")
        if self.grid[0] % self.window_size or self.grid[1] % self.window_size:
            raise ValueError(
                f"encoder.window_size {self.window_size} must divide the patch grid {self.grid} to partition "
                "it (a LoMaR window plan places its windows anywhere)"
            )
        window_ids = getattr(plan, "window_ids", None)
        if window_ids is not None:
            b, n, kk = window_ids.shape
            return gather_tokens(x, window_ids.reshape(b, n * kk)).reshape(b * n, kk, x.shape[-1])
        k = self.window_size
        win, _ = window_partition(x.view(x.shape[0], *self.grid, x.shape[-1]), k)  # [B*n, k, k, D]
        return win.reshape(win.shape[0], k * k, x.shape[-1])

    def forward_features(self, x: Tensor, plan: MaskPlan | None = None) -> Tensor:
        """[B, C, H, W] -> [B, 1+L_keep, D] (L_keep = L without a plan), after the final norm."""
        x = self.embed(x, plan)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_intermediates(
        self, x: Tensor, plan: MaskPlan | None = None, indices: int | Sequence[int] = 1, norm: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Final output ``[B, 1+L_keep, D]`` and the outputs of blocks ``indices`` (an int n = the last n
        blocks; negative indices count from the end), each ``[B, 1+L_keep, D]``, optionally normed."""
        take = self.block_indices(indices)
        x, feats = self.embed(x, plan), {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                feats[i] = self.norm(x) if norm else x
        return self.norm(x), [feats[i] for i in take]

    def forward_attention(
        self, x: Tensor, plan: MaskPlan | None = None, indices: Sequence[int] = (-1,)
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Final output and the attention probabilities ``{i: [B, heads, N, N]}`` of blocks ``indices``
        (negative count from the end); only those blocks leave fused SDPA."""
        with record_attention(self.blocks, self.block_indices(indices)) as maps:
            out = self.forward_features(x, plan)
        return out, maps

    def block_indices(self, indices: int | Sequence[int]) -> list[int]:
        if isinstance(indices, int):
            return list(range(self.depth - indices, self.depth))
        out = [i % self.depth if -self.depth <= i < self.depth else None for i in indices]
        if None in out:
            raise IndexError(f"block indices {list(indices)} out of range for depth {self.depth}")
        return out  # type: ignore[return-value]

    def forward(self, x: Tensor, plan: MaskPlan | None = None) -> Tensor:
        return self.forward_features(x, plan)


def init_linear_norm(m: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier_uniform Linear with zero bias; LayerNorm weight 1, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_encoder(cfg: dict, **overrides) -> ViTEncoder:
    """A ``ViTEncoder`` from ``recipe["encoder"]``; unknown keys give a clear error."""
    cfg = {**cfg, **overrides}
    try:
        return ViTEncoder(**cfg)
    except TypeError as err:
        raise ValueError(f"encoder: bad field in {cfg}: {err}") from err
