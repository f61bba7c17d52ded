"""A maelab encoder as a teacher (e.g. the MAE encoder ``pretrain_mae`` registered, on the embedded default,
so MR-MAE runs offline; or any ``models:/NAME@ALIAS`` from the MLflow registry, resolved to its local
safetensors by :mod:`maelab.orchestration.teachers`).

Features: the encoder's output on the full, unmasked image after its final norm, patch tokens only,
``[B, L, D]``. The CLS attention comes from ``record_attention`` on the chosen block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from maelab.files import metadata_encoder_config, read_weights
from maelab.models.attention import record_attention
from maelab.models.vit import build_encoder
from maelab.teachers.base import Teacher, TeacherOutput


class EncoderTeacher(Teacher):
    """A ``ViTEncoder`` from ``weights`` (a safetensors file whose metadata holds ``encoder_config``, as
    pre-training exports) or, with ``weights=None``, untrained from ``config``."""

    def __init__(self, weights: str | Path | None = None, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        state: dict[str, Tensor] = {}
        if weights is not None:
            state, meta = read_weights(weights)
            config = metadata_encoder_config(meta, weights) or config
        if not config:
            raise ValueError(
                f"maelab teacher: {weights or 'no weights'}: the file has no encoder_config metadata and the "
                "teacher config gives no 'config'"
            )
        self.config = dict(config)
        self.encoder = build_encoder(self.config)
        if state:
            missing, unexpected = self.encoder.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{weights}: not a maelab encoder: missing {missing}, unexpected {unexpected}"
                )
        self.img_size, self.patch_size = self.encoder.img_size, self.encoder.patch_size
        self.embed_dim, self.depth = self.encoder.embed_dim, self.encoder.depth
        self.freeze()

    def set_fused_attn(self, enable: bool) -> None:
        self.encoder.set_fused_attn(enable)

    def encode(self, x: Tensor, attention_layer: int | None) -> TeacherOutput:
        if attention_layer is None:
            return TeacherOutput(self.encoder.forward_features(x)[:, 1:].float(), self.grid)
        take = self.layer_index(attention_layer)
        with record_attention(self.encoder.blocks, [take]) as maps:
            out = self.encoder.forward_features(x)  # [B, 1+L, D]
        cls_attn = maps[take][:, :, 0, 1:].float().mean(dim=1)  # [B, L]
        return TeacherOutput(out[:, 1:].float(), self.grid, cls_attn)
