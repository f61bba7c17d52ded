"""CLIP's image tower as a teacher, through open_clip (Radford et al. 2021; MR-MAE §4.1: "ViT-B/16
pre-trained by CLIP ... as the high-level teacher" by default).

Features: the last block's patch tokens after ``ln_post``, ``[B, L, width]`` (768-d for ViT-B/16). MR-MAE
§3.2 writes the teacher features ``F_v`` with the encoder's own width ``C`` (``E_v, F_v in R^{l_v x C}``), so
the default is the tokens before CLIP's image-text projection; ``projection: true`` maps them through
``proj`` into the 512-d joint space instead (as MVP and MILAN use).

Weights come from a local checkpoint file (``open_clip.create_model(name, pretrained=<file>)``), never
a pretrained tag: maelab downloads nothing at run time (see ``maelab.teachers.build``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from maelab.teachers.base import Teacher, TeacherOutput


class ClipTeacher(Teacher):
    """open_clip ``model`` (default ``ViT-B-16``) with ``weights`` (a local file, or None: untrained);
    ``model_kwargs`` go to ``create_model`` (e.g. a smaller ``vision_cfg`` in tests)."""

    def __init__(
        self,
        model: str = "ViT-B-16",
        weights: str | None = None,
        projection: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import open_clip  # heavy: imported when a CLIP teacher is built

        clip = open_clip.create_model(
            model, pretrained=weights, pretrained_text=False, **dict(model_kwargs or {})
        )
        self.visual = clip.visual  # the text tower is dropped
        del clip
        self.mean, self.std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        self.img_size = tuple(int(s) for s in self.visual.image_size)
        self.patch_size = int(self.visual.patch_size[0])
        self.depth = len(self.visual.transformer.resblocks)
        self.projection = bool(projection)
        width = self.visual.transformer.width
        self.embed_dim = int(self.visual.proj.shape[1]) if self.projection else int(width)
        if not self.visual.transformer.batch_first:
            raise ValueError(f"CLIP teacher {model}: expects a batch-first transformer")
        self.fused_attn = True
        self.freeze()

    def set_fused_attn(self, enable: bool) -> None:
        self.fused_attn = bool(enable)

    def encode(self, x: Tensor, attention_layer: int | None) -> TeacherOutput:
        v = self.visual
        take = None if attention_layer is None else self.layer_index(attention_layer)
        h = v._embeds(x)  # [B, 1+L, width], ln_pre applied
        cls_attn = None
        for i, blk in enumerate(v.transformer.resblocks):
            if i == take:
                y = blk.ln_1(h)
                _, w = blk.attn(y, y, y, need_weights=True, average_attn_weights=True)  # [B, N, N]
                cls_attn = w[:, 0, 1:].float()  # [B, L]
            h = blk(h) if self.fused_attn else _explicit_block(blk, h)
        tokens = v.ln_post(h[:, 1:])  # [B, L, width]
        if self.projection:
            tokens = tokens @ v.proj  # [B, L, 512]
        return TeacherOutput(tokens.float(), self.grid, cls_attn)


def _explicit_block(blk, x: Tensor) -> Tensor:
    """open_clip's ``ResidualAttentionBlock`` with ``softmax(q k^T / sqrt(d)) v`` written out from the
    ``nn.MultiheadAttention`` weights (its fused kernels hide the matmuls from FLOP counters)."""
    attn, (b, n, d) = blk.attn, x.shape
    h = attn.num_heads
    q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))  # [B, h, N, d/h]
    probs = ((q * (d // h) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, N, N]
    y = (probs @ v).transpose(1, 2).reshape(b, n, d)
    x = x + blk.ls_1(attn.out_proj(y))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
