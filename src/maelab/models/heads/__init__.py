"""Pre-training heads, registered by ``type`` as recipes name them."""

from __future__ import annotations

import inspect
from typing import Any

from maelab.models.heads.base import Head
from maelab.models.heads.lomar import LomarHead
from maelab.models.heads.mimic import DecoderMimicHead, MimicHead
from maelab.models.heads.pixel import PixelDecoderHead, masked_mse, normalize_patches, patchify, unpatchify
from maelab.models.heads.region import RegionHead
from maelab.models.vit import EncoderSpec

HEADS: dict[str, type[Head]] = {
    "pixel_decoder": PixelDecoderHead,
    "region": RegionHead,
    "mimic": MimicHead,
    "decoder_mimic": DecoderMimicHead,
    "lomar": LomarHead,
}

RESERVED_KEYS = ("type", "weight")


def build_head(name: str, cfg: dict[str, Any], spec: EncoderSpec) -> Head:
    """Head ``name`` from ``recipe["heads"][name]``: ``type`` picks the class, keys other than
    ``type``/``weight`` go to its constructor after the encoder spec."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"heads.{name}: needs a 'type' (one of {sorted(HEADS)}), got {cfg!r}")
    if cfg["type"] not in HEADS:
        raise ValueError(f"heads.{name}.type {cfg['type']!r} is unknown; choose one of {sorted(HEADS)}")
    kwargs = {k: v for k, v in cfg.items() if k not in RESERVED_KEYS}
    if "name" in inspect.signature(HEADS[cfg["type"]]).parameters:
        kwargs.setdefault("name", name)  # errors name the recipe's head
    try:
        return HEADS[cfg["type"]](spec, **kwargs)
    except TypeError as err:
        raise ValueError(f"heads.{name}: bad field in {kwargs}: {err}") from err


__all__ = [
    "HEADS",
    "DecoderMimicHead",
    "EncoderSpec",
    "Head",
    "LomarHead",
    "MimicHead",
    "PixelDecoderHead",
    "RegionHead",
    "build_head",
    "masked_mse",
    "normalize_patches",
    "patchify",
    "unpatchify",
]
