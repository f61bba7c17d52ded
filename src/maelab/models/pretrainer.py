"""One encoder, many objectives: a variant is a masker plus heads with loss weights (DESIGN.md).

MAE is the recipe ``masker: random`` + ``heads: {pixel: pixel_decoder}``; nothing here knows about it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from maelab.masking import MaskContext, Masker, build_masker
from maelab.masking.plan import MaskPlan
from maelab.models.compat import IncompatibleRecipeError, check_compatible
from maelab.models.heads import HEADS, Head, PixelDecoderHead, build_head
from maelab.models.heads.mimic import store_fed_head
from maelab.models.vit import ViTEncoder, build_encoder


@dataclass
class PretrainOutput:
    loss: Tensor  # [] fp32: sum_h weight_h * loss_h
    losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted per-head losses
    outputs: dict[str, Tensor] = field(default_factory=dict)  # e.g. "pixel": [B, L, p*p*3]
    plan: MaskPlan | None = None  # the plan used (made in the step for in-step maskers)


class Pretrainer(nn.Module):
    """Encoder + named heads.

    ``forward(batch)``: batch = dict(image=[B, C, H, W], plan=MaskPlan [B, L], ...extras). Without a plan,
    the recipe's in-step masker makes one from ``batch["context"]`` (a ``MaskContext``) and this model.

    Multi-layer fusion (MR-MAE §3.3), ``fusion_layers``: the visible tokens of the chosen encoder blocks are
    summed element-wise and the sum, after the encoder's final norm, replaces the last layer's output as the
    ``latent`` every head reads (the mimic head and the pixel decoder alike): ``norm(sum_i x_i)``, ``x_i`` the
    output of block ``i`` (the last block's before its norm, as for any other block). Our choice where the
    paper is silent: one shared norm after the sum, so the decoder sees tokens on the scale it sees in MAE.

    Heads run in ascending ``priority`` (a head attribute, default 0; ties keep recipe order) and see a
    fresh per-step dict ``batch["shared"]`` through which a head may hand tensors to the heads after it
    (e.g. R-MAE's region-to-pixel feeding, ``priority = -1``).
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        heads: dict[str, Head],
        weights: dict[str, float] | None = None,
        masker: Masker | None = None,
        fusion_layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("Pretrainer: a recipe needs at least one head under 'heads'")
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in heads}
        self.masker = masker
        self.fusion_layers: list[int] = encoder.block_indices(list(fusion_layers)) if fusion_layers else []
        wanted = [i for h in heads.values() for i in h.layers] + self.fusion_layers
        self.layers: list[int] = sorted({encoder.block_indices([i])[0] for i in wanted})

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        for hname, head in self.heads.items():
            names |= {f"heads.{hname}.{n}" for n in head.no_weight_decay()}
        return names

    def make_plan(self, batch: dict[str, Any]) -> MaskPlan:
        plan = batch.get("plan")
        if plan is not None:
            return plan
        if self.masker is not None and self.masker.in_step:
            return self.masker.plan_batch(batch, replace(batch.get("context") or MaskContext(), model=self))
        raise KeyError("batch has no 'plan' and the recipe's masker does not run in the step")

    def forward(self, batch: dict[str, Any]) -> PretrainOutput:
        image, plan = batch["image"], self.make_plan(batch)
        if self.layers:
            latent, feats = self.encoder.forward_intermediates(image, plan, self.layers)
            intermediates = dict(zip(self.layers, feats, strict=True))
            if self.fusion_layers:
                latent = self.fuse(intermediates)
        else:
            latent, intermediates = self.encoder.forward_features(image, plan), {}
        losses, outputs = {}, {}
        batch = {**batch, "shared": {}}
        for name, head in sorted(self.heads.items(), key=lambda kv: getattr(kv[1], "priority", 0)):
            losses[name], outputs[name] = head(latent, plan, batch, intermediates)
        losses = {n: losses[n] for n in self.heads}  # recipe order
        total = sum(self.weights[n] * losses[n].float() for n in losses)
        return PretrainOutput(total, losses, outputs, plan)

    def fuse(self, intermediates: dict[int, Tensor]) -> Tensor:
        """MR-MAE §3.3 multi-layer fusion: ``norm(sum of blocks fusion_layers' outputs)`` [B, 1+L_keep, D]."""
        return self.encoder.norm(torch.stack([intermediates[i] for i in self.fusion_layers]).sum(0))

    def pixel_head(self) -> tuple[str, PixelDecoderHead]:
        for name, head in self.heads.items():
            if isinstance(head, PixelDecoderHead):
                return name, head
        raise ValueError("this recipe has no pixel_decoder head to reconstruct images with")

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, Any], out: PretrainOutput) -> Tensor:
        """[B, C, H, W] in the input normalisation: visible patches pasted, masked ones predicted."""
        name, head = self.pixel_head()
        plan = out.plan if out.plan is not None else batch["plan"]
        return head.reconstruct(batch["image"], out.outputs[name], plan.mask)


def with_feature_source(heads: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The heads block with ``features: store`` on the head whose teacher ``data.teacher.mode: store``
    replaces by the teacher-feature store (MR-MAE; the head then reads the batch instead of the teacher)."""
    teacher = data.get("teacher") or {}
    if teacher.get("mode", "online") == "online":
        return heads
    head = store_fed_head(dict(heads), teacher.get("head"))
    return {**heads, head: {**heads[head], "features": "store"}}


def build_pretrainer(recipe: dict[str, Any], **encoder_overrides: Any) -> Pretrainer:
    """A Pretrainer from a recipe dict (``encoder``, ``masker``, ``heads``; see parameters_pretrain.yml).

    ``encoder_overrides`` (e.g. ``fused_attn=False``) go to every ViT built, encoder and heads.
    """
    name = recipe.get("name", "<recipe>")
    if "encoder" not in recipe:
        raise ValueError(f"recipe {name}: missing field 'encoder'")
    encoder = build_encoder(recipe["encoder"], **encoder_overrides)
    heads_cfg = recipe.get("heads") or {}
    if not heads_cfg:
        raise ValueError(f"recipe {name}: field 'heads' is empty; a variant needs at least one head")
    heads_cfg = with_feature_source(heads_cfg, recipe.get("data") or {})
    heads, weights = {}, {}
    for hname, cfg in heads_cfg.items():
        cfg = dict(cfg)
        head_cls = HEADS.get(cfg.get("type"))
        if (
            "fused_attn" in encoder_overrides
            and head_cls
            and "fused_attn" in inspect.signature(head_cls).parameters
        ):
            cfg.setdefault("fused_attn", encoder_overrides["fused_attn"])
        heads[hname] = build_head(hname, cfg, encoder.spec)
        weights[hname] = float(cfg.get("weight", 1.0))
    masker = build_masker(recipe["masker"], encoder.grid) if recipe.get("masker") else None
    check_compatible(masker, heads, name)  # a bad combination fails at start, saying why
    if hasattr(masker, "saliency_head") and any(
        getattr(h, "features", "") == "store" for h in heads.values()
    ):
        raise IncompatibleRecipeError(
            f"recipe {name}: masker focused ranks patches by the teacher's attention in the step, and stored "
            "teacher features (data.teacher.mode: store) keep none: use data.teacher.mode online"
        )
    return Pretrainer(encoder, heads, weights, masker, recipe.get("fusion_layers"))
