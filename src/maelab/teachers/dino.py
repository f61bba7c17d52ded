"""DINO's ViT as a teacher, through timm (Caron et al. 2021; MR-MAE §3.2 and Fig. 4).

Features: the last block's patch tokens after the final norm, ``[B, L, 768]`` for ViT-B/16 (timm model
``vit_base_patch16_224.dino``). The CLS attention of a block is recomputed from its ``qkv`` on the block's
normed input (the block itself stays on fused attention).

Weights: a local file loaded through timm's own path, ``create_model(name, pretrained=True,
pretrained_cfg_overlay={"file": path})`` (timm's checkpoint filter adapts the original DINO release), or
untrained (``pretrained=False``); never a hub download.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from maelab.teachers.base import Teacher, TeacherOutput, cls_attention_qkv


class DinoTeacher(Teacher):
    """timm ``model`` (default ``vit_base_patch16_224.dino``) with ``weights`` (a local file, or None:
    untrained); ``model_kwargs`` go to ``timm.create_model`` (e.g. a smaller ViT in tests)."""

    def __init__(
        self,
        model: str = "vit_base_patch16_224.dino",
        weights: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        kwargs: dict[str, Any] = {"num_classes": 0, **dict(model_kwargs or {})}
        if weights is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
        self.vit = timm.create_model(model, **kwargs)
        cfg = self.vit.pretrained_cfg or {}
        self.mean = tuple(cfg.get("mean", self.mean))
        self.std = tuple(cfg.get("std", self.std))
        self.img_size = tuple(int(s) for s in self.vit.patch_embed.img_size)
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.embed_dim, self.depth = int(self.vit.embed_dim), len(self.vit.blocks)
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        self.freeze()

    def set_fused_attn(self, enable: bool) -> None:
        for blk in self.vit.blocks:
            blk.attn.fused_attn = bool(enable)

    def encode(self, x: Tensor, attention_layer: int | None) -> TeacherOutput:
        v, p = self.vit, self.num_prefix_tokens
        take = None if attention_layer is None else self.layer_index(attention_layer)
        h = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))  # [B, P+L, D]
        cls_attn = None
        for i, blk in enumerate(v.blocks):
            if i == take:
                cls_attn = cls_attention_qkv(blk.attn, blk.norm1(h), p)  # [B, L]
            h = blk(h)
        tokens = v.norm(h)[:, p:]  # [B, L, D]
        return TeacherOutput(tokens.float(), self.grid, cls_attn)
