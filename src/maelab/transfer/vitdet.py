"""ViTDet backbone (Li et al. 2022, "Exploring Plain ViT Backbones for Object Detection").

A plain ViT with window attention in most blocks, global attention in 4 evenly spaced blocks and an optional
decomposed relative position bias (§3 "Backbone adaptation"), then a simple feature pyramid from the last
map only (§3 "Simple feature pyramid", Fig. 2c: deconvs / identity / max-pool to strides 4, 8, 16, 32).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from maelab.models.attention import rel_pos_bias, window_partition, window_unpartition
from maelab.models.irpe import ContextualProductRPE
from maelab.models.vit import ViTEncoder

PYRAMID_STRIDES = (4, 8, 16, 32)


# ------------------------------------------------------------------------------ window attention
# window_partition / window_unpartition / rel_pos_bias live in maelab.models.attention (LoMaR uses them too)
def global_block_indices(depth: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced global-attention blocks, the last one included (ViT-B: 2, 5, 8, 11)."""
    return sorted({(i + 1) * depth // count - 1 for i in range(count)})


# ------------------------------------------------------------------------------ feature pyramid
class SimpleFeaturePyramid(nn.Module):
    """ViTDet Fig. 2c: the last map (stride = patch size) resampled to ``strides`` by deconvs (up) /
    identity / max-pool (down), then 1x1 and 3x3 convs with LayerNorm to ``out_channels``; plus a
    stride-2 subsample of the coarsest level (``pool``, torchvision's LastLevelMaxPool)."""

    def __init__(
        self, dim: int, patch_size: int, out_channels: int, strides: tuple[int, ...] = PYRAMID_STRIDES
    ):
        super().__init__()
        self.strides = tuple(strides)
        self.stages = nn.ModuleList()
        for s in self.strides:
            layers: list[nn.Module] = []
            c = dim
            if s < patch_size:  # upsample by deconvs: x2 per step (x4 = deconv, LN, GELU, deconv)
                steps = int(np.log2(patch_size // s))
                if 2**steps * s != patch_size:
                    raise ValueError(f"detection: stride {s} not reachable from patch size {patch_size}")
                for k in range(steps):
                    layers.append(nn.ConvTranspose2d(c, c // 2, 2, stride=2))
                    c //= 2
                    if k < steps - 1:
                        layers += [LayerNorm2d(c), nn.GELU()]
            elif s > patch_size:  # downsample by max-pool, x2 per step
                steps = int(np.log2(s // patch_size))
                if 2**steps * patch_size != s:
                    raise ValueError(f"detection: stride {s} not reachable from patch size {patch_size}")
                layers += [nn.MaxPool2d(2, 2) for _ in range(steps)]
            layers += [
                nn.Conv2d(c, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """[B, D, h, w] -> {"0": stride 4, "1": 8, "2": 16, "3": 32, "pool": 64}, each [B, C, H/s, W/s]."""
        out = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))
        out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out


# ------------------------------------------------------------------------------------ backbone
class ViTDetBackbone(nn.Module):
    """Plain ViT adapted for detection (ViTDet §3): no CLS token, windowed blocks, simple pyramid.

    Input images are padded bottom/right to ``img_size`` x ``img_size`` (ViTDet pads to 1024), so the
    absolute position embedding always matches the grid.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        out_channels: int = 256,
        window_size: int = 14,
        global_blocks: list[int] | None = None,
        use_rel_pos: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        self.encoder, self.out_channels = encoder, out_channels
        self.img_size, self.patch_size, self.grid = encoder.img_size, encoder.patch_size, encoder.grid
        depth, dim = len(encoder.blocks), encoder.embed_dim
        self.global_blocks = set(global_block_indices(depth) if global_blocks is None else global_blocks)
        self.window_size, self.use_rel_pos, self.grad_checkpoint = (
            int(window_size),
            use_rel_pos,
            grad_checkpoint,
        )
        self.rel_pos_h, self.rel_pos_w = nn.ParameterList(), nn.ParameterList()
        if use_rel_pos:  # zero-initialised (ViTDet rel_pos_zero_init), one table per block and axis
            head_dim = dim // encoder.blocks[0].attn.num_heads
            for i in range(depth):
                span = self.grid if i in self.global_blocks else (self.window_size, self.window_size)
                self.rel_pos_h.append(nn.Parameter(torch.zeros(2 * span[0] - 1, head_dim)))
                self.rel_pos_w.append(nn.Parameter(torch.zeros(2 * span[1] - 1, head_dim)))
        self.pyramid = SimpleFeaturePyramid(dim, self.patch_size, out_channels)

    def run_block(self, i: int, x: Tensor) -> Tensor:
        """One ViT block on [B, H, W, D]; attention inside windows unless ``i`` is a global block."""
        blk = self.encoder.blocks[i]
        h, w = x.shape[1:3]
        y = blk.norm1(x)
        windowed = i not in self.global_blocks
        if windowed:
            y, padded = window_partition(y, self.window_size)  # [B*nW, ws, ws, D]
        hh, ww = y.shape[1:3]
        tokens = y.reshape(y.shape[0], hh * ww, -1)  # [B', N, D]
        bias = None
        if isinstance(
            getattr(blk.attn, "rel_pos", None), ContextualProductRPE
        ):  # LoMaR's iRPE: this block's grid, no CLS
            blk.attn.rel_pos.configure((hh, ww), 0)
        if self.use_rel_pos:
            attn = blk.attn
            q = attn.qkv(tokens)[..., : attn.num_heads * attn.head_dim]
            q = attn.q_norm(q.view(tokens.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2))
            bias = rel_pos_bias(q, self.rel_pos_h[i], self.rel_pos_w[i], (hh, ww)).to(tokens.dtype)
        y = blk.attn(tokens, attn_mask=bias).view(-1, hh, ww, tokens.shape[-1])
        if windowed:
            y = window_unpartition(y, self.window_size, padded, (h, w))
        x = x + blk.drop_path1(blk.ls1(y))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """[B, 3, H, W] (H, W <= img_size) -> pyramid maps."""
        th, tw = self.img_size
        if images.shape[-2] > th or images.shape[-1] > tw:
            raise ValueError(
                f"detection: batch {tuple(images.shape[-2:])} larger than backbone img_size {self.img_size}"
            )
        images = F.pad(images, (0, tw - images.shape[-1], 0, th - images.shape[-2]))
        x = (
            self.encoder.patch_embed(images) + self.encoder.pos_embed[:, 1:]
        )  # [B, L, D], CLS dropped (ViTDet)
        x = x.view(x.shape[0], *self.grid, -1)  # [B, h, w, D]
        for i in range(len(self.encoder.blocks)):
            if self.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(self.run_block, i, x, use_reentrant=False)
            else:
                x = self.run_block(i, x)
        return self.pyramid(x.permute(0, 3, 1, 2))  # [B, D, h, w] -> pyramid
