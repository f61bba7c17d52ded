"""Weights in the layout of the official MAE code (facebookresearch/mae, ``MaskedAutoencoderViT``).

Official keys: ``cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*`` (encoder) and
``mask_token, decoder_embed.*, decoder_pos_embed, decoder_blocks.N.*, decoder_norm.*, decoder_pred.*``
(pixel decoder). Here the encoder lives under ``encoder.`` and the pixel decoder under ``heads.<name>.``
with the same inner names (timm's Block naming matches the official one), so the mapping is a prefix.
Released encoder-only checkpoints (``mae_pretrain_vit_base.pth``) hold the encoder under ``"model"``;
visualisation checkpoints hold the full model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from maelab.files import atomic_write, read_weights
from maelab.models.pretrainer import Pretrainer
from maelab.models.vit import ViTEncoder

DECODER_PREFIXES = (
    "mask_token",
    "decoder_embed.",
    "decoder_pos_embed",
    "decoder_blocks.",
    "decoder_norm.",
    "decoder_pred.",
)


def is_decoder_key(key: str) -> bool:
    return key.startswith(DECODER_PREFIXES)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a ``.safetensors`` file or a torch checkpoint (``weights_only=True``);
    a ``"model"`` entry is unwrapped."""
    return read_weights(path)[0]


def _check_keys(expected: set[str], got: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise KeyError(
            f"{where}: state dict does not match the official MAE layout; "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )


def _load_into(module: torch.nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    own = module.state_dict()
    _check_keys(set(own), set(state), where)
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"{where}: shape mismatch for " + "; ".join(bad))
    module.load_state_dict(state, strict=True)


def load_official_mae(
    model: Pretrainer | ViTEncoder, state: Mapping[str, Tensor] | str | Path, head: str = "pixel"
) -> str:
    """Load official-layout weights strictly. Returns ``"full"`` or ``"encoder"`` (what was loaded).

    A full checkpoint needs a Pretrainer with a pixel decoder named ``head``; an encoder-only one
    loads the encoder and leaves the heads as they are. Any other missing/unexpected key is an error.
    """
    where = str(state) if isinstance(state, (str, Path)) else "official MAE state dict"
    state = read_state_dict(state) if isinstance(state, (str, Path)) else dict(state)
    enc_state = {k: v for k, v in state.items() if not is_decoder_key(k)}
    dec_state = {k: v for k, v in state.items() if is_decoder_key(k)}
    encoder = model if isinstance(model, ViTEncoder) else model.encoder
    if dec_state:
        if not isinstance(model, Pretrainer) or head not in model.heads:
            raise KeyError(
                f"{where}: holds decoder keys but the model has no pixel head {head!r} to take them"
            )
        _load_into(model.heads[head], dec_state, f"{where} (decoder -> heads.{head})")
    _load_into(encoder, enc_state, f"{where} (encoder)")
    return "full" if dec_state else "encoder"


def to_official_mae(
    model: Pretrainer | ViTEncoder, head: str = "pixel", encoder_only: bool = False
) -> dict[str, Tensor]:
    """The reverse: a state dict with official MAE key names (encoder, plus the pixel decoder)."""
    encoder = model if isinstance(model, ViTEncoder) else model.encoder
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    if not encoder_only and isinstance(model, Pretrainer):
        if head not in model.heads:
            raise KeyError(f"model has no head {head!r}; heads are {sorted(model.heads)}")
        state.update({k: v.detach().clone() for k, v in model.heads[head].state_dict().items()})
    return state


def save_official_mae(
    model: Pretrainer | ViTEncoder, path: str | Path, head: str = "pixel", encoder_only: bool = False
) -> Path:
    """Write ``{"model": official state dict}`` atomically (tmp file + ``os.replace``); ``.safetensors``
    paths get a flat safetensors file instead."""
    path = Path(path)
    state = {k: v.contiguous() for k, v in to_official_mae(model, head, encoder_only).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return atomic_write(path, lambda tmp: torch.save({"model": state}, tmp))
