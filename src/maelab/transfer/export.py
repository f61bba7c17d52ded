"""``maelab export``: an encoder as timm or detectron2 (ViTDet) weights.

Key mapping (our ``ViTEncoder`` is built from timm's ``PatchEmbed`` and ``Block``, so its names are timm's):

==============================  ==============================  ===========================================
maelab ``ViTEncoder``            timm ``VisionTransformer``        detectron2 ViTDet (``backbone.net.`` + ...)
==============================  ==============================  ===========================================
cls_token         [1, 1, D]      cls_token                        (dropped: ViTDet uses no CLS token)
pos_embed         [1, 1+L, D]    pos_embed                        pos_embed (CLS slot kept; ViTDet's
                                                                  ``pretrain_use_cls_token=True`` drops it
                                                                  and interpolates the grid on load)
patch_embed.proj.{weight,bias}   same                             patch_embed.proj.{weight,bias}
blocks.i.norm1 / norm2           same                             blocks.i.norm1 / norm2
blocks.i.attn.qkv / attn.proj    same                             blocks.i.attn.qkv / attn.proj
blocks.i.mlp.fc1 / mlp.fc2       same                             blocks.i.mlp.fc1 / mlp.fc2
norm.{weight,bias}               norm.{weight,bias}               (dropped: ViTDet has no final norm)
==============================  ==============================  ===========================================

timm: ``timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file=PATH, num_classes=0), **kwargs)`` with the ``timm_kwargs`` stored in the
file's metadata (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio) loads it with strict keys.
detectron2: a ``.pth`` ``{"model": state_dict}`` for ``train.init_checkpoint`` of a ViTDet config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maelab.files import atomic_write, save_safetensors
from maelab.transfer.backbone import (
    ENCODER_FIELDS,
    check_encoder_weights,
    read_encoder_file,
    resolve_encoder_path,
)

DETECTRON2_PREFIX = "backbone.net."


def timm_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` overrides that rebuild our encoder as a timm ViT (no head, CLS kept)."""
    keys = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
    return {k: config[k] for k in keys if k in config}


def to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys are timm's; check nothing foreign is present and make tensors contiguous."""
    allowed = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
    bad = [k for k in state if not k.startswith(allowed)]
    if bad:
        raise ValueError(f"export: keys with no timm counterpart: {bad[:5]}")
    return {k: v.contiguous() for k, v in state.items()}


def to_detectron2(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ViTDet's ``backbone.net.*`` names; the CLS token and the final norm have no counterpart."""
    return {
        DETECTRON2_PREFIX + k: v.contiguous()
        for k, v in to_timm(state).items()
        if k != "cls_token" and not k.startswith("norm.")
    }


def refuse_relative_positions(state: dict[str, Tensor], config: dict[str, Any], path: Path, fmt: str) -> None:
    """An encoder with relative position tables (LoMaR's iRPE, ``rel_pos`` in its config) has no timm or
    detectron2 layout: timm's ``VisionTransformer`` has no iRPE and ViTDet only its own decomposed bias, so
    the tables would be dropped and the model silently changed. Refused, saying why."""
    tables = [k for k in state if ".rel_pos." in k]
    if tables or config.get("rel_pos"):
        raise ValueError(
            f"export: {path} has relative position encoding (encoder.rel_pos = {config.get('rel_pos')!r}, "
            f"{len(tables)} tables, e.g. LoMaR's iRPE); {fmt} has no layout for it and would drop it. "
            "Use the maelab file directly (maelab transfer loads its tables), or pre-train with "
            "encoder.rel_pos: false and abs_pos: true (lomar_ape) to export."
        )


def export_encoder(
    encoder: str | Path, fmt: str, out: str | Path, default_config: dict[str, Any] | None = None
) -> Path:
    """Write ``encoder`` (path or MLflow URI) as ``fmt`` (``timm`` -> safetensors, ``detectron2`` -> .pth or
    .safetensors by the suffix of ``out``). Returns ``out``."""
    path = resolve_encoder_path(encoder)
    if path is None:
        raise ValueError("export: --encoder must name a file or an MLflow URI")
    state, config, meta = read_encoder_file(path)
    if config is None:
        if not default_config:
            raise ValueError(f"{path}: no encoder_config in the file's metadata and no default config given")
        config = default_config
    config = {k: v for k, v in config.items() if k in ENCODER_FIELDS}
    refuse_relative_positions(state, config, path, fmt)
    check_encoder_weights(state, config, path)
    out = Path(out)
    info = {
        "format": fmt,
        "source": str(path),
        "encoder_config": json.dumps(config),
        "recipe": meta.get("recipe", ""),
    }
    if fmt == "timm":
        info["timm_kwargs"] = json.dumps(timm_kwargs(config))
        save_safetensors(out, to_timm(state), info)
    elif fmt == "detectron2":
        weights = to_detectron2(state)
        if out.suffix == ".safetensors":
            save_safetensors(out, weights, info)
        else:  # detectron2 reads .pth with torch.load; tensors and strings only (weights_only-safe)
            atomic_write(out, lambda p: torch.save({"model": weights, "__author__": "maelab", **info}, p))
    else:
        raise ValueError(f"export: --format must be timm or detectron2, got {fmt!r}")
    return out


def cli(args: argparse.Namespace) -> int:
    """``maelab export --encoder PATH_OR_URI --format timm|detectron2 --out PATH [--env ENV]``."""
    default = None
    try:
        from maelab.config import load_config

        default = (
            load_config("parameters", getattr(args, "env", None)).get("recipe_defaults", {}).get("encoder")
        )
    except Exception:  # no project config: the file's metadata must carry the config
        default = None
    out = export_encoder(args.encoder, args.format, args.out, default)
    print(f"wrote {out} ({args.format})")
    return 0
