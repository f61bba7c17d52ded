"""RAE: masked region autoencoding (Nguyen et al., "R-MAE: Regions Meet Masked Autoencoders", §3.1, App. A).

Each of the ``k`` binary region maps of an image is patchified with the image's patch size, masked with
the image's ``MaskPlan`` (R-MAE §3.2 (ii): one shared mask), and completed by a small region
autoencoder whose decoder reads the pixel encoder through a *neck* (one ViT block, eq. 9).

Three variants (App. A; Table 1b/c):

- ``length`` (default, eq. 7-11): every region's visible patches go through the region encoder and are
  average-pooled into one query; the ``k`` queries are decoded as a set (self-attn, cross-attn to the neck,
  MLP, DETR-style), and the last block replaces cross-attention by the spatial expansion
  ``W^T v_context + v_query[:, None]`` (eq. 11), giving ``[B, k, N, p_D]``; a 3-layer MLP predicts the
  ``p*p`` logits of every patch. Permutation-equivariant; the decoder's cost hardly depends on ``k``.
- ``batch`` (eq. 4-6): every region runs its own encoder-decoder pass over ``N`` tokens (regions stacked
  in the batch axis). Permutation-equivariant, cost linear in ``k``.
- ``channel`` (eq. 1-3): the ``k`` maps are stacked as the channels of one ``k``-channel image. Cheap,
  but NOT permutation-equivariant.

Cross-feeding (App. A "Cross-feeding", Table 1e), ``feed``:

- ``"pixel"`` (RAE <- MAE, default): the neck reads the pixel encoder output (mask tokens filled in);
- ``"region"`` (RAE -> MAE): the pixel decoder input gets ``+ AvgPool_k(MaskFill(h(v_renc_i)))`` (eq. 12-14),
  handed over in ``batch["shared"]`` (see ``Pretrainer``); the region decoder's context is then built from
  the region tokens themselves (pixels do not feed regions);
- ``"both"`` (RAE <-> MAE): both of the above.

Mask ratios. With ``mask_ratio: null`` the region branch uses the image plan as is (beta_R = beta_I, the
paper's default). A different beta_R is derived from the SAME plan: the plan's shuffle order
``argsort(ids_restore)`` is cut after ``int(L * (1 - beta_R))`` patches, so the region and image visible
sets are nested (beta_R > beta_I: region-visible is a subset of image-visible), never independent
(``maelab.masking.nested_plan``; the region sampler checks eligibility against this same region plan).
That cut is a random subset only if the plan's order is random, so a beta_R needs a masker with the
``random_order`` trait (``plan_needs``; the block masker keeps raster order and fails at start).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from maelab.masking import nested_plan
from maelab.masking.plan import MaskPlan
from maelab.models.heads.base import Head
from maelab.models.heads.pixel import PIXEL_DECODER_INPUT, patchify
from maelab.models.vit import EncoderSpec, gather_tokens, init_linear_norm, sincos_2d

VARIANTS = ("length", "batch", "channel")
FEEDS = ("pixel", "region", "both")
Norm = partial(nn.LayerNorm, eps=1e-6)


# -- small pieces ----------------------------------------------------------------------------------
# the region branch's plan (beta_R) from the image plan (beta_I): one helper, shared with the region sampler
region_plan = nested_plan


def mask_fill(x: Tensor, ids_restore: Tensor, mask_token: Tensor) -> Tensor:
    """MaskFill (eq. 2, 5, 9, 12): kept tokens ``[B, L_keep, D]`` + mask tokens -> ``[B, L, D]`` (raster)."""
    b, n_keep, d = x.shape
    n = ids_restore.shape[-1]
    x = torch.cat([x, mask_token.to(x.dtype).expand(b, n - n_keep, d)], dim=1)
    return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))


def mlp(in_dim: int, hidden: int, out_dim: int, depth: int) -> nn.Sequential:
    """``depth`` Linear layers with GELU between them (the region predictor ``g``, App. A)."""
    if depth < 1:
        raise ValueError(f"region head: predictor_depth must be >= 1, got {depth}")
    dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``[B, M, D]`` over a context ``[B, N, D]``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"region head: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        b, m, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, m, h, d // h).transpose(1, 2)  # [B, h, M, d/h]
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)  # [B, h, N, d/h] each
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # explicit, so FLOP counters see the matmuls
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, m, d))


class QueryDecoderBlock(nn.Module):
    """DETR decoder block (three sub-layers, pre-norm): self-attn over queries, cross-attn, MLP (App. A)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1, self.attn = Norm(dim), Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2, self.cross_attn = Norm(dim), CrossAttention(dim, num_heads, qkv_bias)
        self.norm3, self.mlp = Norm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: Tensor, ctx: Tensor) -> Tensor:
        q = q + self.attn(self.norm1(q))  # [B, k, D]
        q = q + self.cross_attn(self.norm2(q), ctx)
        return q + self.mlp(self.norm3(q))


class ExpansionBlock(nn.Module):
    """The last region decoder block: self-attn over queries, then eq. 11 in place of cross-attention:
    ``v_rdec = W^T v_context + v_query[:, None]`` — each query added to every (projected) context token,
    i.e. attention where each context token attends only to itself (Fig. 2, right)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1, self.attn = Norm(dim), Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.expand = nn.Linear(dim, dim, bias=False)  # W in eq. 11

    def forward(self, q: Tensor, ctx: Tensor) -> Tensor:
        """q: [B, k, D], ctx: [B, N, D] -> [B, k, N, D]."""
        q = q + self.attn(self.norm1(q))
        return self.expand(ctx)[:, None] + q[:, :, None]


# -- the head --------------------------------------------------------------------------------------
class RegionHead(Head):
    """RAE head: ``latent [B, 1+L_keep, D_enc]`` + ``batch["regions"] [B, k, H, W]`` -> region logits
    ``[B, k, L, p*p]``; loss = BCE with logits on the masked patches of the region plan (§3.1 "Loss")."""

    def __init__(
        self,
        spec: EncoderSpec,
        variant: str = "length",
        num_regions: int = 8,
        enc_dim: int = 128,  # p_E
        enc_depth: int = 1,
        enc_heads: int = 8,
        dim: int = 128,  # p_D: neck and region decoder width (Table 8: 256)
        neck_depth: int = 1,
        depth: int = 1,  # region decoder blocks (the last one expands, for the length variant)
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        predictor_depth: int = 3,
        mask_ratio: float | None = None,  # beta_R; None = the image plan's (beta_I)
        feed: str = "pixel",
        pixel_dim: int | None = None,  # d_D of the pixel decoder, for feed "region"/"both"
        qkv_bias: bool = True,
        fused_attn: bool = True,
        key: str = "regions",
    ) -> None:
        super().__init__(spec)
        if variant not in VARIANTS:
            raise ValueError(f"region head: variant {variant!r} is unknown; choose one of {VARIANTS}")
        if feed not in FEEDS:
            raise ValueError(f"region head: feed {feed!r} is unknown; choose one of {FEEDS}")
        if feed != "pixel" and not pixel_dim:
            raise ValueError(
                f"region head: feed {feed!r} feeds the pixel decoder and needs pixel_dim (its embed_dim)"
            )
        if mask_ratio is not None and not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"region head: mask_ratio must be in [0, 1) or null, got {mask_ratio!r}")
        if min(num_regions, enc_depth, neck_depth, depth) < 1:
            raise ValueError("region head: num_regions, enc_depth, neck_depth and depth must be >= 1")
        self.variant, self.num_regions, self.feed, self.key = variant, num_regions, feed, key
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)
        self.from_pixels, self.to_pixels = feed in ("pixel", "both"), feed in ("region", "both")
        self.priority = -1 if self.to_pixels else 0  # run before the pixel head it feeds (see Pretrainer)
        p2, n_in = spec.patch_size**2, num_regions if variant == "channel" else 1

        # region encoder (eq. 1, 4, 7): Linear patch embedding + fixed sin-cos positions + ViT blocks
        self.region_embed = nn.Linear(n_in * p2, enc_dim)
        self.register_buffer("region_pos", sincos_2d(enc_dim, spec.grid, cls_token=False)[None])  # [1, L, pE]
        self.region_blocks = nn.ModuleList(
            Block(enc_dim, enc_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=Norm) for _ in range(enc_depth)
        )
        self.region_norm = Norm(enc_dim)

        # neck (eq. 9): MaskFill + sin-cos positions + ViT blocks over the pixel encoder output (or, for
        # feed "region", over the region tokens averaged over k)
        self.neck_embed = nn.Linear(spec.embed_dim if self.from_pixels else enc_dim, dim)
        self.neck_mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("neck_pos", sincos_2d(dim, spec.grid)[None])  # [1, 1+L, pD]
        self.neck_blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=Norm) for _ in range(neck_depth)
        )
        self.neck_norm = Norm(dim)

        self.proj = nn.Linear(enc_dim, dim)  # f: p_E -> p_D (eq. 2, 5, 10)
        if variant == "length":  # region queries decoded as a set (eq. 10-11)
            self.decoder_blocks = nn.ModuleList(
                QueryDecoderBlock(dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth - 1)
            )
            self.expansion = ExpansionBlock(dim, num_heads, qkv_bias)
            out = p2
        else:  # region tokens decoded over N positions (eq. 3, 6)
            self.dec_mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.register_buffer("dec_pos", sincos_2d(dim, spec.grid, cls_token=False)[None])  # [1, L, pD]
            self.decoder_blocks = nn.ModuleList(
                Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=Norm) for _ in range(depth)
            )
            out = p2 * (num_regions if variant == "channel" else 1)
        self.decoder_norm = Norm(dim)
        self.predictor = mlp(dim, dim, out, predictor_depth)  # g: p_D -> p*p (3 layers, App. A)

        if self.to_pixels:  # h: p_E -> d_D and its mask token (eq. 12)
            self.to_pixel = nn.Linear(enc_dim, int(pixel_dim))  # type: ignore[arg-type]
            self.pixel_mask_token = nn.Parameter(torch.zeros(1, 1, int(pixel_dim)))  # type: ignore[arg-type]
        self.set_fused_attn(fused_attn)
        for name, prm in self.named_parameters():
            if name.endswith("mask_token"):
                nn.init.normal_(prm, std=0.02)
        self.apply(init_linear_norm)

    def set_fused_attn(self, enable: bool) -> None:
        for m in self.modules():
            if isinstance(m, Attention | CrossAttention):
                m.fused_attn = enable

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("mask_token")}

    def plan_needs(self) -> dict[str, str]:
        """Traits the masker's plan must have, each with the reason (checked by ``maelab.models.compat``)."""
        needs = {
            "full_grid": "region maps are masked with the image's one plan over the whole patch grid "
            "(R-MAE §3.2 (ii)); the region encoder, neck and sampler index [L] plans"
        }
        if self.mask_ratio is not None:
            needs["random_order"] = (
                f"mask_ratio (beta_R = {self.mask_ratio}) cuts the region plan from the image plan's shuffle "
                "order (R-MAE Fig. 4a, nested masks), which is a random subset only for a random order; "
                "set heads.<region>.mask_ratio: null to share the image plan"
            )
        return needs

    def example_batch(self, batch_size: int) -> dict[str, Tensor]:
        h, w = (g * self.spec.patch_size for g in self.spec.grid)
        return {self.key: torch.zeros(batch_size, self.num_regions, h, w, dtype=torch.bool)}

    # -- pieces of the forward -----------------------------------------------------------------------
    def target(self, regions: Tensor) -> Tensor:
        """``[B, k, H, W]`` (bool or float) -> ``[B, k, L, p*p]`` float in {0, 1}."""
        b, k, h, w = regions.shape
        if k != self.num_regions and self.variant == "channel":
            raise ValueError(f"region head (channel): built for {self.num_regions} regions, batch has {k}")
        return patchify(regions.reshape(b * k, 1, h, w).float(), self.spec.patch_size).view(
            b, k, -1, self.spec.patch_size**2
        )

    def encode(self, target: Tensor, rplan: MaskPlan) -> Tensor:
        """Region encoder on the visible patches (eq. 1, 4, 7 before pooling): ``[B, k', L_keep_R, p_E]``
        with ``k' = k`` (length, batch) or 1 (channel)."""
        b, k, n, p2 = target.shape
        x = target - 0.5  # binary maps centred on 0
        if self.variant == "channel":
            x = x.permute(0, 2, 1, 3).reshape(b, 1, n, k * p2)  # k regions as channels
        k_ = x.shape[1]
        ids_keep = rplan.ids_keep.repeat_interleave(k_, 0)  # [B*k', L_keep]
        x = gather_tokens(x.flatten(0, 1), ids_keep)  # visible patches only: [B*k', L_keep, k''*p*p]
        x = self.region_embed(x) + self.region_pos[0, ids_keep]  # [B*k', L_keep, pE]
        for blk in self.region_blocks:
            x = blk(x)
        return self.region_norm(x).view(b, k_, -1, x.shape[-1])

    def context(self, latent: Tensor, plan: MaskPlan, tokens: Tensor, rplan: MaskPlan) -> Tensor:
        """Neck (eq. 9): ``v_context`` ``[B, (1+)L, p_D]`` — from the pixel encoder's ``latent`` (CLS kept, as
        the MAE decoder does), or for feed "region" from the region tokens averaged over regions."""
        if self.from_pixels:
            x = self.neck_embed(latent)  # [B, 1+L_keep, pD]
            x = torch.cat([x[:, :1], mask_fill(x[:, 1:], plan.ids_restore, self.neck_mask_token)], 1)
            x = x + self.neck_pos  # [B, 1+L, pD]
        else:
            x = self.neck_embed(tokens.mean(1))  # [B, L_keep_R, pD]
            x = mask_fill(x, rplan.ids_restore, self.neck_mask_token) + self.neck_pos[:, 1:]  # [B, L, pD]
        for blk in self.neck_blocks:
            x = blk(x)
        return self.neck_norm(x)

    def decode(self, tokens: Tensor, ctx: Tensor, rplan: MaskPlan) -> Tensor:
        """Region decoder + predictor -> logits ``[B, k, L, p*p]``."""
        n = rplan.num_patches
        if self.variant == "length":
            q = self.proj(
                tokens.mean(2)
            )  # AvgPool over visible patches (eq. 7), concat (eq. 8), f: [B, k, pD]
            for blk in self.decoder_blocks:
                q = blk(q, ctx)  # eq. 10
            x = self.expansion(q, ctx[:, -n:])  # eq. 11: [B, k, L, pD]
            return self.predictor(self.decoder_norm(x))  # g: [B, k, L, p*p]
        b, k_ = tokens.shape[:2]
        ids_restore = rplan.ids_restore.repeat_interleave(k_, 0)  # [B*k', L]
        x = (
            mask_fill(self.proj(tokens.flatten(0, 1)), ids_restore, self.dec_mask_token) + self.dec_pos
        )  # eq. 2, 5
        if self.from_pixels:  # eq. 3, 6: + v'_penc, shared by the k regions
            x = (x.view(b, k_, n, -1) + ctx[:, None, -n:]).flatten(0, 1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.predictor(self.decoder_norm(x)).view(b, k_, n, -1)  # [B, k', L, p*p*(k or 1)]
        if self.variant == "channel":
            x = x.view(b, n, self.num_regions, -1).permute(0, 2, 1, 3)  # [B, k, L, p*p]
        return x

    def pixel_input(self, tokens: Tensor, rplan: MaskPlan) -> Tensor:
        """Eq. 12-14: ``AvgPool_k(MaskFill(h(v_renc_i)))`` ``[B, L, d_D]`` for the pixel decoder input.
        ``h`` is affine and mask slots hold one shared token, so averaging over k first is the same."""
        return mask_fill(self.to_pixel(tokens.mean(1)), rplan.ids_restore, self.pixel_mask_token)

    def predict(
        self, latent: Tensor, plan: MaskPlan, regions: Tensor, rplan: MaskPlan | None = None
    ) -> tuple[Tensor, Tensor]:
        """Logits ``[B, k, L, p*p]`` and region tokens; ``plan`` is what the pixel encoder saw, ``rplan`` what
        the region encoder sees (default: derived from ``plan``; interactive segmentation passes its own)."""
        rplan = region_plan(plan, self.mask_ratio) if rplan is None else rplan
        tokens = self.encode(self.target(regions), rplan)
        ctx = self.context(latent, plan, tokens, rplan)
        return self.decode(tokens, ctx, rplan), tokens

    def forward(
        self, latent: Tensor, plan: MaskPlan, batch: dict[str, Any], intermediates: dict[int, Tensor]
    ) -> tuple[Tensor, Tensor]:
        if self.key not in batch:
            raise KeyError(
                f"region head: the batch has no {self.key!r}; "
                "set data.regions in the recipe (R-MAE needs region maps)"
            )
        rplan = region_plan(plan, self.mask_ratio)
        regions = batch[self.key]
        target = self.target(regions)
        tokens = self.encode(target, rplan)
        if self.to_pixels:
            batch.setdefault("shared", {})[PIXEL_DECODER_INPUT] = self.pixel_input(tokens, rplan)
        logits = self.decode(tokens, self.context(latent, plan, tokens, rplan), rplan)
        with torch.autocast(logits.device.type, enabled=False):
            loss = region_loss(logits, target, rplan.mask)
        return loss, logits


def region_loss(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """BCE with logits, mean over the patch's pixels and the k regions, then over masked patches (fp32).

    logits, target: [B, k, L, p*p]; mask: [B, L] bool (True = masked)."""
    per = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    per_patch = per.mean(dim=(-1, 1))  # [B, L]
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def region_probs(logits: Tensor, spec: EncoderSpec) -> Tensor:
    """Logits ``[B, k, L, p*p]`` -> probabilities ``[B, k, H, W]``."""
    b, k, n, p2 = logits.shape
    p = spec.patch_size
    x = logits.sigmoid().reshape(b * k, n, p2).float()
    (gh, gw) = spec.grid
    x = x.reshape(b * k, gh, gw, p, p).permute(0, 1, 3, 2, 4).reshape(b, k, gh * p, gw * p)
    return x
