"""Models: the ViT encoder, pre-training heads and the Pretrainer that joins them."""

from maelab.models.heads import HEADS, Head, PixelDecoderHead, build_head, patchify, unpatchify
from maelab.models.pretrainer import Pretrainer, PretrainOutput, build_pretrainer
from maelab.models.vit import EncoderSpec, ViTEncoder, build_encoder, sincos_2d

__all__ = [
    "HEADS",
    "EncoderSpec",
    "Head",
    "PixelDecoderHead",
    "PretrainOutput",
    "Pretrainer",
    "ViTEncoder",
    "build_encoder",
    "build_head",
    "build_pretrainer",
    "patchify",
    "sincos_2d",
    "unpatchify",
]
