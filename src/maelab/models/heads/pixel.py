"""MAE's pixel decoder and loss (He et al. 2022, §3 "MAE decoder" and "Reconstruction target").

Kept tokens are projected to the decoder width, mask tokens fill the removed slots, ``ids_restore``
puts the sequence back in raster order, fixed sin-cos positions are added, a few ViT blocks run, and
a Linear predicts the ``p*p*C`` pixels of every patch. The loss is the MSE on masked patches only,
against per-patch normalised pixels when ``norm_pix_loss`` (§3, "normalized pixels" variant).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from maelab.masking.plan import MaskPlan
from maelab.models.attention import Attention, record_attention
from maelab.models.heads.base import Head
from maelab.models.vit import EncoderSpec, init_linear_norm, sincos_2d

NORM_PIX_EPS = 1e-6
# ``batch["shared"][PIXEL_DECODER_INPUT]``: [B, L, D_dec] added to the decoder input after mask filling, e.g.
# R-MAE's region-to-pixel feeding ``v'_penc + AvgPool(v'_renc)`` (R-MAE App. A, eq. 14)
PIXEL_DECODER_INPUT = "pixel_decoder_input"


def patchify(imgs: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches in raster order, each flattened (p, q, c) as in MAE."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"patchify: image {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # nchpwq -> nhwpqc (a pure permutation: autocast-safe)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, grid: tuple[int, int], in_chans: int = 3) -> Tensor:
    """[B, L, p*p*C] -> [B, C, gh*p, gw*p]; inverse of ``patchify``."""
    (gh, gw), b = grid, x.shape[0]
    x = x.reshape(b, gh, gw, p, p, in_chans)
    x = x.permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
    return x.reshape(b, in_chans, gh * p, gw * p)


def normalize_patches(target: Tensor, eps: float = NORM_PIX_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Per-patch mean and (unbiased) variance over the last dim: returns (normalised, mean, var)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5, mean, var


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over patches where ``mask`` of the per-patch MSE ``((pred - target)^2).mean(-1)``, in fp32."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L]
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


class PixelDecoderHead(Head):
    """MAE decoder: ``latent [B, 1+L_keep, D_enc] -> pred [B, L, p*p*C]``; loss on masked patches."""

    def __init__(
        self,
        spec: EncoderSpec,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] | partial = partial(nn.LayerNorm, eps=1e-6),
        fused_attn: bool = True,
    ) -> None:
        super().__init__(spec)
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(spec.embed_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(embed_dim, spec.grid)[None])  # [1, 1+L, Dd]
        self.decoder_blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                attn_layer=Attention,
            )
            for _ in range(depth)
        )
        self.decoder_norm = norm_layer(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, spec.patch_size**2 * spec.in_chans)
        for blk in self.decoder_blocks:
            blk.attn.fused_attn = fused_attn
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_norm)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def decode(self, latent: Tensor, plan: MaskPlan, extra: Tensor | None = None) -> Tensor:
        """[B, 1+L_keep, D_enc] -> [B, L, p*p*C] predictions for every patch (raster order);
        ``extra`` [B, L, Dd], if given, is added to the patch tokens after mask filling."""
        x = self.decoder_embed(latent)  # [B, 1+L_keep, Dd]
        b, n_keep = x.shape[0], x.shape[1] - 1
        n = plan.ids_restore.shape[-1]
        masked = self.mask_token.expand(b, n - n_keep, -1).to(x.dtype)  # [B, L-L_keep, Dd]
        x_ = torch.cat([x[:, 1:], masked], dim=1)  # [kept, mask tokens] in shuffle order
        x_ = torch.gather(x_, 1, plan.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # raster order
        if extra is not None:
            x_ = x_ + extra.to(x_.dtype)
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # [B, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop CLS -> [B, L, p*p*C]

    def decode_attention(
        self, latent: Tensor, plan: MaskPlan, indices: Sequence[int] = (-1,)
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """``decode`` plus the attention probabilities ``{i: [B, heads, 1+L, 1+L]}`` of decoder blocks
        ``indices`` (self-guided MAE §3.4 reads the decoder's attention to mask tokens); the other
        blocks stay fused."""
        with record_attention(self.decoder_blocks, indices) as maps:
            pred = self.decode(latent, plan)
        return pred, dict(sorted(maps.items()))

    def target(self, image: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, L, p*p*C] regression target (per-patch normalised if norm_pix_loss)."""
        target = patchify(image.float(), self.spec.patch_size)
        return normalize_patches(target)[0] if self.norm_pix_loss else target

    def forward(
        self, latent: Tensor, plan: MaskPlan, batch: dict[str, Any], intermediates: dict[int, Tensor]
    ) -> tuple[Tensor, Tensor]:
        pred = self.decode(latent, plan, batch.get("shared", {}).get(PIXEL_DECODER_INPUT))
        with torch.autocast(pred.device.type, enabled=False):  # target and loss in fp32
            loss = masked_mse(pred, self.target(batch["image"]), plan.mask)
        return loss, pred

    @torch.no_grad()
    def reconstruct(self, image: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """[B, C, H, W] in the input normalisation: visible patches from ``image``, masked ones predicted
        (norm-pix predictions are mapped back with each target patch's mean and std, as the MAE demo)."""
        patches = patchify(image.float(), self.spec.patch_size)  # [B, L, p*p*C]
        pred = pred.float()
        if self.norm_pix_loss:
            _, mean, var = normalize_patches(patches)
            pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
        out = torch.where(mask.unsqueeze(-1), pred, patches)
        return unpatchify(out, self.spec.patch_size, self.spec.grid, self.spec.in_chans)
