"""MAE's pixel decoder and loss (He et al. 2022, §3 "MAE decoder" and "Reconstruction target").

Kept tokens are projected to the decoder width, mask tokens fill the removed slots, ``ids_restore``
puts the sequence back in raster order, fixed sin-cos positions are added, a few ViT blocks run, and
a Linear predicts the ``p*p*C`` pixels of every patch. The loss is the MSE on masked patches only,
against per-patch normalised pixels when ``norm_pix_loss`` (§3, "normalized pixels" variant).

Width and heads. MAE's decoder is 8 blocks x 512-d x 16 heads. Long-sequence MAE (Hu et al. 2022, App. A)
keeps the decoder at half the encoder width with the encoder's heads, for its long-sequence recipe and its
MAE baseline alike: 384-d x 12 heads for ViT-B, 512-d x 16 heads for ViT-L; recipes set them (conf/coco).

Shorter decoder (long-seq MAE Tab. 2e row 3, App. A), ``downsample: 2``: after mask filling and positions,
a learned 2x2 convolution with stride 2 merges each 2x2 group of tokens, so the decoder runs on
``L / 4`` tokens (28x28 -> 14x14) and predicts ``2p x 2p x C`` pixels per token, regressed against the
image cut into ``2p`` patches (normalised per ``2p`` patch with ``norm_pix_loss``). The positions are
added before the convolution (our choice: the paper does not say; every mask token then carries its
place into the merge). The loss is still taken on the masked ``p`` patches only: the ``2p`` prediction is
cut back into its four ``p`` patches, so a 2x2 group that is partly visible is scored on its masked part.
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
        downsample: int = 1,
    ) -> None:
        super().__init__(spec)
        if downsample not in (1, 2):
            raise ValueError(
                f"pixel decoder: downsample must be 1 (MAE) or 2 (long-seq Tab. 2e), got {downsample!r}"
            )
        gh, gw = spec.grid
        if gh % downsample or gw % downsample:
            raise ValueError(
                f"pixel decoder: downsample {downsample} needs a patch grid divisible by it, got {spec.grid}"
            )
        self.norm_pix_loss, self.downsample = norm_pix_loss, int(downsample)
        self.out_patch = spec.patch_size * self.downsample  # p, or 2p after the 2x2 convolution
        self.out_grid = (gh // self.downsample, gw // self.downsample)
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
        self.decoder_pred = nn.Linear(embed_dim, self.out_patch**2 * spec.in_chans)
        # Tab. 2e row 3: learned 2x2 stride-2 convolution before the first decoder block (App. A)
        self.decoder_shorten = nn.Conv2d(embed_dim, embed_dim, 2, stride=2) if self.downsample == 2 else None
        for blk in self.decoder_blocks:
            blk.attn.fused_attn = fused_attn
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_norm)
        if self.decoder_shorten is not None:  # as MAE's patch projection: xavier on the weight viewed 2-D
            w = self.decoder_shorten.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.decoder_shorten.bias)

    def plan_needs(self) -> dict[str, str]:
        """Traits the masker's plan must have, each with the reason (checked by ``maelab.models.compat``)."""
        if self.downsample > 1:
            return {
                "full_grid": "the 2x2 convolution (downsample: 2) merges neighbours on the whole patch grid"
            }
        return {"full_grid": "the decoder puts the kept tokens back on the whole patch grid (MAE §3)"}

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def decode(self, latent: Tensor, plan: MaskPlan, extra: Tensor | None = None) -> Tensor:
        """[B, 1+L_keep, D_enc] -> [B, L, p*p*C] predictions for every patch (raster order), or with
        ``downsample: 2`` [B, L/4, 2p*2p*C] for every 2x2 group; ``extra`` [B, L, Dd], if given, is added to
        the patch tokens after mask filling."""
        return self.decoder_pred(self.decode_tokens(self.decode_input(latent, plan, extra)))[:, 1:]

    def decode_input(self, latent: Tensor, plan: MaskPlan, extra: Tensor | None = None) -> Tensor:
        """The decoder's input sequence [B, 1+L(/4), Dd]: embedded, mask-filled, raster order, positions."""
        x = self.decoder_embed(latent)  # [B, 1+L_keep, Dd]
        b, n_keep = x.shape[0], x.shape[1] - 1
        n = plan.ids_restore.shape[-1]
        masked = self.mask_token.expand(b, n - n_keep, -1).to(x.dtype)  # [B, L-L_keep, Dd]
        x_ = torch.cat([x[:, 1:], masked], dim=1)  # [kept, mask tokens] in shuffle order
        x_ = torch.gather(x_, 1, plan.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # raster order
        if extra is not None:
            x_ = x_ + extra.to(x_.dtype)
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # [B, 1+L, Dd]
        if self.decoder_shorten is not None:
            x = torch.cat([x[:, :1], self.shorten(x[:, 1:])], dim=1)  # [B, 1+L/4, Dd]
        return x

    def decode_tokens(self, x: Tensor) -> Tensor:
        """The decoder blocks and norm on the input sequence [B, 1+L', Dd] (MR-MAE's decoder mimic head
        reads these tokens too); ``decode`` drops the CLS slot after the predictor."""
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)

    def shorten(self, x: Tensor) -> Tensor:
        """[B, L, Dd] -> [B, L/4, Dd]: the learned 2x2 stride-2 convolution over the patch grid."""
        (gh, gw), b, d = self.spec.grid, x.shape[0], x.shape[-1]
        x = x.transpose(1, 2).reshape(b, d, gh, gw)  # [B, Dd, gh, gw]
        return self.decoder_shorten(x).flatten(2).transpose(1, 2)  # [B, gh/2 * gw/2, Dd]

    def to_patches(self, x: Tensor) -> Tensor:
        """Predictions or targets ``[B, L', p'*p'*C]`` on the output grid -> ``[B, L, p*p*C]`` on the patch
        grid (the identity without ``downsample``)."""
        if self.downsample == 1:
            return x
        img = unpatchify(x, self.out_patch, self.out_grid, self.spec.in_chans)  # [B, C, H, W]
        return patchify(img, self.spec.patch_size)

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
        """[B, C, H, W] -> [B, L, p*p*C] regression target (per-patch normalised if norm_pix_loss); with
        ``downsample: 2`` [B, L/4, 2p*2p*C], cut into 2p patches (App. A)."""
        target = patchify(image.float(), self.out_patch)
        return normalize_patches(target)[0] if self.norm_pix_loss else target

    def forward(
        self, latent: Tensor, plan: MaskPlan, batch: dict[str, Any], intermediates: dict[int, Tensor]
    ) -> tuple[Tensor, Tensor]:
        pred = self.decode(latent, plan, batch.get("shared", {}).get(PIXEL_DECODER_INPUT))
        with torch.autocast(pred.device.type, enabled=False):  # target and loss in fp32
            target = self.target(batch["image"])
            loss = masked_mse(self.to_patches(pred.float()), self.to_patches(target), plan.mask)
        return loss, pred

    @torch.no_grad()
    def reconstruct(self, image: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """[B, C, H, W] in the input normalisation: visible patches from ``image``, masked ones predicted
        (norm-pix predictions are mapped back with each target patch's mean and std, as the MAE demo)."""
        patches = patchify(image.float(), self.spec.patch_size)  # [B, L, p*p*C]
        pred = pred.float()
        if self.norm_pix_loss:
            _, mean, var = normalize_patches(patchify(image.float(), self.out_patch))  # stats of p' patches
            pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
        out = torch.where(mask.unsqueeze(-1), self.to_patches(pred), patches)
        return unpatchify(out, self.spec.patch_size, self.spec.grid, self.spec.in_chans)
