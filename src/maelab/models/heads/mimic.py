"""MR-MAE's feature mimic head (Gao et al., "Mimic before Reconstruct", §3.2, Eq. 2).

    L_M = 1/l_v * || L(E_v) - F_v ||_2^2

``E_v`` are the encoder's visible tokens (``latent[:, 1:]``, or the multi-layer fusion of §3.3 when the
recipe sets ``fusion_layers``, see ``maelab.models.pretrainer``), ``L`` one linear projection to the teacher's
width, ``F_v`` the frozen teacher's features of the full, unmasked image (the same augmented view the
student sees) gathered at the plan's visible positions ``plan.ids_keep``. With the pixel head at weight 0.5
and this head at 0.5 the recipe's loss is the paper's ``0.5 L_R + 0.5 L_M`` (§4.1).

Choices the paper leaves open (configurable; defaults documented here and in the README):

- ``target_norm`` (default ``layernorm``): the teacher features are normalised per token before the loss,
  ``layernorm`` = LayerNorm without affine parameters (zero mean, unit variance over the channels, as
  feature distillation's whitening, Wei et al. 2022c), ``l2`` = unit L2 norm per token, ``none`` = raw.
  CLIP's tokens carry a few channels of very large magnitude; normalising puts ``L_M`` on the same scale as
  MAE's per-patch normalised pixel loss, so the paper's equal 0.5/0.5 weights stay balanced.
- ``reduction`` (default ``mean``): the squared error is averaged over the channels, then over the visible
  tokens of the batch, as maelab's pixel loss (MAE's code) averages over the ``p*p*3`` values of a patch.
  ``sum`` sums over the channels (Eq. 2 as written, ``||.||_2^2`` per token, then ``1/l_v``); it scales
  ``L_M`` by the teacher width ``C`` (768 for ViT-B), so keep the two losses' reductions alike.

The teacher. ``teacher`` is the recipe's teacher config (``maelab.teachers.build_teacher``: ``type`` clip |
dino | maelab, ``weights`` a local file; registry URIs are resolved to files before the model is built).
It is frozen, runs under ``no_grad`` in the step (online teacher features), and is deliberately not a
registered sub-module: it stays out of the state dict, the checkpoints and the optimiser, and follows the
input's device on first use. The focused masker (``maelab.masking.focused``) asks this head for the
teacher's CLS attention in the same step; the teacher then runs once and this head reuses its features.

Stored features. ``features: store`` (set by ``build_pretrainer`` for the head a recipe's
``data.teacher.mode: store`` names) reads the teacher's features from the batch, ``batch["teacher/<head>"]``
``[B, L, C]`` on the student's grid (the teacher-feature store resampled with the view, see
``maelab.teachers.store``), so no teacher forward runs in the step; the teacher is still built for its width.

``target: decoder`` is Table 3's "conflict" row (Fig. 1b): the high-level target is applied after the
decoder instead, to the masked tokens; see :class:`DecoderMimicHead`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maelab.masking.plan import MaskPlan
from maelab.models.heads.base import Head
from maelab.models.heads.pixel import PIXEL_DECODER_INPUT, PixelDecoderHead, masked_mse
from maelab.models.vit import EncoderSpec, gather_tokens, init_linear_norm

TARGET_NORMS = ("none", "layernorm", "l2")
REDUCTIONS = ("mean", "sum")
FEATURE_MODES = ("online", "store")


def stored_features_key(head: str) -> str:
    """The batch entry holding head ``head``'s stored teacher features ``[B, L, C]``."""
    return f"teacher/{head}"


def store_fed_head(heads: dict[str, Any], head: str | None = None) -> str:
    """The recipe head (``heads`` block) whose teacher the store replaces: ``head``, or the only one with a
    ``teacher``."""
    named = sorted(n for n, h in heads.items() if isinstance(h, dict) and isinstance(h.get("teacher"), dict))
    if head is not None:
        if head not in named:
            raise ValueError(f"data.teacher.head {head!r}: not a head with a teacher (have {named})")
        return head
    if len(named) != 1:
        raise ValueError(
            f"data.teacher: the recipe has {len(named)} heads with a teacher ({named}); name the one the "
            "store feeds with data.teacher.head"
        )
    return named[0]


def normalize_targets(target: Tensor, kind: str) -> Tensor:
    """[.., C] teacher features normalised per token: ``none`` | ``layernorm`` (no affine) | ``l2``."""
    if kind == "none":
        return target
    if kind == "layernorm":
        return F.layer_norm(target, target.shape[-1:], eps=1e-6)
    if kind == "l2":
        return F.normalize(target, dim=-1)
    raise ValueError(f"mimic head: target_norm {kind!r} is unknown; choose one of {TARGET_NORMS}")


def mimic_loss(pred: Tensor, target: Tensor, reduction: str = "mean", mask: Tensor | None = None) -> Tensor:
    """Eq. 2 in fp32: per-token squared error (mean or sum over channels), averaged over tokens
    (over the tokens where ``mask`` is True when given)."""
    err = (pred.float() - target.float()).pow(2)
    per_token = err.mean(-1) if reduction == "mean" else err.sum(-1)  # [B, N]
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


class TeacherMixin:
    """The frozen teacher a head mimics: built from config, kept out of the module tree, run once a step."""

    def init_target(self, name: str, target_norm: str, reduction: str) -> None:
        """The teacher-target options every mimic head shares, checked once (the paper leaves both open)."""
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"heads.{name}.target_norm {target_norm!r}: choose one of {TARGET_NORMS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"heads.{name}.reduction {reduction!r}: choose one of {REDUCTIONS}")
        self.target_norm, self.reduction = target_norm, reduction

    def init_features(self, name: str, features: str) -> None:
        """Where the teacher's features come from: ``online`` (run here) or ``store`` (the batch)."""
        if features not in FEATURE_MODES:
            raise ValueError(f"heads.{name}.features {features!r}: choose one of {FEATURE_MODES}")
        self.features, self.store_key = features, stored_features_key(name)

    def dense_targets(self, batch: dict[str, Any]) -> Tensor:
        """[B, L, C] this step's teacher features of the full view on the student's grid: the batch's stored
        features (``features: store``) or the teacher run now."""
        if self.features == "online":
            return self.teacher_features(batch["image"])
        if self.store_key not in batch:
            raise ValueError(
                f"{self.store_key}: not in the batch, but this head reads stored teacher features "
                "(data.teacher.mode: store); the teacher sample extra adds it"
            )
        return batch[self.store_key].float()

    def example_batch(self, batch_size: int) -> dict[str, Tensor]:
        if self.features == "online":
            return {}
        n = self.spec.grid[0] * self.spec.grid[1]
        return {self.store_key: torch.zeros(batch_size, n, int(self.teacher.embed_dim))}

    def init_teacher(self, teacher: dict[str, Any] | nn.Module, where: str, fused_attn: bool = True) -> None:
        if isinstance(teacher, nn.Module):
            built = teacher
        else:
            from maelab.teachers.build import build_teacher  # lazy: teachers import models

            built = build_teacher(dict(teacher), where=where)
        if hasattr(built, "set_fused_attn"):
            built.set_fused_attn(fused_attn)
        object.__setattr__(self, "_teacher", built)  # not a sub-module: no state dict, no optimiser
        object.__setattr__(self, "_cached", None)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    def teacher_dense(
        self, image: Tensor, attention_layer: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The teacher's features ``[B, L, C]`` (and CLS attention ``[B, L]`` when ``attention_layer`` is
        given) on the student's grid, for the full image; the features are kept for this step's forward."""
        feats, attn = self.run_teacher(image, attention_layer)
        object.__setattr__(self, "_cached", (image, feats))
        return feats, attn

    def run_teacher(self, image: Tensor, attention_layer: int | None = None) -> tuple[Tensor, Tensor | None]:
        t = self._teacher
        if next(t.parameters()).device != image.device:
            t.to(image.device)
        return t.dense(image, self.spec.grid, attention_layer)

    def teacher_features(self, image: Tensor) -> Tensor:
        """[B, L, C]: this step's teacher features (computed now unless the masker already ran the teacher
        on this very image tensor); the kept features are released either way."""
        cached = self._cached
        object.__setattr__(self, "_cached", None)
        if cached is not None and cached[0] is image:
            return cached[1]
        return self.run_teacher(image)[0]

    def teacher_saliency(self, image: Tensor, layer: int) -> Tensor:
        """[B, L] the teacher's CLS attention of block ``layer`` on the student's grid (§3.3)."""
        if self.features == "store":
            raise ValueError(
                "focused mimicking ranks patches by the teacher's attention in the step; stored teacher "
                "features (data.teacher.mode: store) keep no attention: use mode online"
            )
        return self.teacher_dense(image, layer)[1]


class MimicHead(TeacherMixin, Head):
    """Eq. 2: ``Linear(E_v) -> [B, L_keep, C_teacher]``, MSE to the teacher features at ``plan.ids_keep``."""

    def __init__(
        self,
        spec: EncoderSpec,
        teacher: dict[str, Any] | nn.Module,
        target_norm: str = "layernorm",
        reduction: str = "mean",
        name: str = "mimic",
        fused_attn: bool = True,
        features: str = "online",
    ) -> None:
        super().__init__(spec)
        self.init_target(name, target_norm, reduction)
        self.init_features(name, features)
        self.init_teacher(teacher, f"heads.{name}.teacher", fused_attn)
        self.proj = nn.Linear(spec.embed_dim, int(self.teacher.embed_dim))  # L in Eq. 2
        self.apply(init_linear_norm)

    def targets(self, batch: dict[str, Any], plan: MaskPlan) -> Tensor:
        """F_v: [B, L_keep, C] normalised teacher features at the visible positions."""
        dense = self.dense_targets(batch)  # [B, L, C], full unmasked image
        return normalize_targets(gather_tokens(dense, plan.ids_keep), self.target_norm)

    def forward(
        self, latent: Tensor, plan: MaskPlan, batch: dict[str, Any], intermediates: dict[int, Tensor]
    ) -> tuple[Tensor, Tensor]:
        pred = self.proj(latent[:, 1:])  # [B, L_keep, C]: the visible tokens, CLS dropped
        with torch.autocast(pred.device.type, enabled=False):
            loss = mimic_loss(pred, self.targets(batch, plan), self.reduction)
        return loss, pred


class DecoderMimicHead(TeacherMixin, PixelDecoderHead):
    """Table 3 row 5 / Fig. 1b ("conflict"): both targets after one decoder. The decoder predicts the
    pixels (``L_R``, Eq. 1) and, through a second linear layer, the teacher's features of the masked tokens;
    the head's loss is ``pixel_weight * L_R + feature_weight * L_feat`` (0.5 / 0.5 as §4.1's weights)."""

    def __init__(
        self,
        spec: EncoderSpec,
        teacher: dict[str, Any] | nn.Module,
        target_norm: str = "layernorm",
        reduction: str = "mean",
        pixel_weight: float = 0.5,
        feature_weight: float = 0.5,
        name: str = "decoder_mimic",
        fused_attn: bool = True,
        features: str = "online",
        **decoder: Any,
    ) -> None:
        super().__init__(spec, fused_attn=fused_attn, **decoder)
        self.init_target(name, target_norm, reduction)
        self.init_features(name, features)
        self.pixel_weight, self.feature_weight = float(pixel_weight), float(feature_weight)
        self.init_teacher(teacher, f"heads.{name}.teacher", fused_attn)
        width = self.decoder_pred.in_features
        self.decoder_feat_pred = nn.Linear(width, int(self.teacher.embed_dim))
        init_linear_norm(self.decoder_feat_pred)

    def forward(
        self, latent: Tensor, plan: MaskPlan, batch: dict[str, Any], intermediates: dict[int, Tensor]
    ) -> tuple[Tensor, Tensor]:
        if self.downsample != 1:
            raise ValueError("decoder_mimic: the 2x2 shortened decoder is not supported")
        x = self.decode_input(latent, plan, batch.get("shared", {}).get(PIXEL_DECODER_INPUT))
        tokens = self.decode_tokens(x)[:, 1:]  # [B, L, Dd]: one decoder pass feeds both predictors
        pred = self.decoder_pred(tokens)  # [B, L, p*p*C]
        feat = self.decoder_feat_pred(tokens)  # [B, L, C_teacher]
        with torch.autocast(pred.device.type, enabled=False):
            l_r = masked_mse(pred.float(), self.target(batch["image"]), plan.mask)
            target = normalize_targets(self.dense_targets(batch), self.target_norm)
            l_f = mimic_loss(feat, target, self.reduction, mask=plan.mask)
            loss = self.pixel_weight * l_r + self.feature_weight * l_f
        return loss, pred
