"""Load a pre-trained encoder for transfer: a file or an MLflow URI -> ``ViTEncoder`` at the transfer size.

Resolution changes follow ViTDet (Li et al. 2022, §4.1 / its released code): the absolute position
embedding is bicubic-interpolated to the new grid; long-seq MAE (Hu et al. 2022, §4.1) does the same to
the patch-embedding filters "treated as 2D convolution filters" when the patch size differs.
Layer-wise lr decay follows BEiT (Bao et al. 2021, §2.3 fine-tuning) as used by MAE (§A.2) and ViTDet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maelab.files import metadata_encoder_config, read_weights
from maelab.models.vit import ViTEncoder, build_encoder
from maelab.transfer.config import FineTuneLoopConfig

log = logging.getLogger(__name__)

ENCODER_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "rel_pos",  # LoMaR's iRPE travels into every transfer task (Chen et al. 2022, §1.4)
    "abs_pos",  # and so does its lack of absolute positions
)


# ---------------------------------------------------------------------------------------- files
def resolve_encoder_path(ref: str | Path | None) -> Path | None:
    """``None`` (random init), a local path, or ``models:/NAME@ALIAS`` / ``runs:/...`` (via the registry)."""
    if ref is None or str(ref).strip().lower() in ("", "null", "none", "random"):
        return None
    ref = str(ref)
    if ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        from maelab.orchestration.registry import resolve_encoder  # lazy: needs mlflow and a tracking store

        return Path(resolve_encoder(ref))
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"transfer.encoders: encoder file {path} does not exist")
    return path


def read_encoder_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None, dict[str, str]]:
    """State dict, ``encoder_config`` from the safetensors metadata (or None) and the raw metadata.

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``
    (a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unpacked, as MAE checkpoints have).
    """
    state, meta = read_weights(path)
    return state, metadata_encoder_config(meta, path), meta


MAX_DEPTH = 1024  # deeper "encoders" are metadata that lies


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every ``ViTEncoder`` state-dict key and its shape for ``config``, asked of the encoder itself built on
    the ``meta`` device: no tensor memory is allocated, and every option (relative-position tables, ...)
    is covered. Depths beyond ``MAX_DEPTH`` are refused before anything is built."""
    try:
        size = config.get("img_size", 224)
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        p, c = int(config.get("patch_size", 16)), int(config.get("in_chans", 3))
        d, depth = int(config.get("embed_dim", 768)), int(config.get("depth", 12))
        hidden = int(d * float(config.get("mlp_ratio", 4.0)))
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"encoder_config {config}: {err}") from None
    if min(h, w, p, c, d, depth, hidden) <= 0:
        raise ValueError(f"encoder_config {config}: sizes must be positive")
    if depth > MAX_DEPTH:
        raise ValueError(f"encoder_config {config}: depth {depth} is over {MAX_DEPTH}")
    with torch.device("meta"):
        encoder = build_encoder(config)
    return {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def check_encoder_weights(state: dict[str, Tensor], config: dict[str, Any], path: str | Path) -> None:
    """The file's tensors are exactly what ``config`` describes (keys, shapes, finite floats): checked
    before any model is built, so metadata that lies cannot make us allocate a model the file cannot fill.
    ``pos_embed`` may hold another square grid (it is interpolated on load)."""
    try:
        want = expected_shapes(config)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if "mask_token" in state and "mask_token" not in want:  # LoMaR's, for pre-training only (dropped on load)
        want["mask_token"] = (1, 1, want["cls_token"][-1])
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        raise ValueError(
            f"{path}: state dict does not match encoder_config {config}: missing {missing[:5]}"
            f"{f' (+{len(missing) - 5})' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    for key, shape in want.items():
        t = state[key]
        got = tuple(t.shape)
        if key == "pos_embed" and len(got) == 3 and got[0] == 1 and got[2] == shape[2]:
            side = round((got[1] - 1) ** 0.5)
            if side * side == got[1] - 1:
                shape = got
        if got != shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {list(got)}, encoder_config says {list(shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected a float")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")


# ------------------------------------------------------------------------------ interpolation
def interpolate_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None, num_prefix: int = 1
) -> Tensor:
    """[1, P+h*w, D] -> [1, P+H*W, D]: bicubic on the patch part, prefix (CLS) slots kept (ViTDet, MAE).

    Identity when the grid does not change. ``old_grid`` defaults to a square grid.
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n, dim = grid_tokens.shape[1], grid_tokens.shape[2]
    if old_grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"pos_embed has {n} patch slots, not a square grid: pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = grid_tokens.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()  # [1, D, h, w]
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)  # [1, D, H, W]
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def interpolate_patch_embed(weight: Tensor, new_patch: int, mode: str = "bicubic") -> Tensor:
    """[D, C, p, p] -> [D, C, q, q]. ``bicubic``: the filters as 2-D images (long-seq MAE §4.1);
    ``pinv``: FlexiViT's pseudo-inverse resize (timm ``resample_patch_embed``), which keeps token values."""
    if weight.shape[-1] == new_patch and weight.shape[-2] == new_patch:
        return weight
    if mode == "pinv":
        from timm.layers import resample_patch_embed

        return resample_patch_embed(weight, [new_patch, new_patch])
    if mode != "bicubic":
        raise ValueError(f"transfer.patch_embed_resize: unknown mode {mode!r} (bicubic | pinv)")
    out = F.interpolate(weight.float(), size=(new_patch, new_patch), mode="bicubic", align_corners=False)
    return out.to(weight.dtype)


def adapt_state_dict(
    state: dict[str, Tensor], encoder: ViTEncoder, patch_mode: str = "bicubic"
) -> dict[str, Tensor]:
    """Resize a checkpoint's ``pos_embed`` and ``patch_embed.proj.weight`` to ``encoder``'s grid and patch."""
    state = dict(state)
    if encoder.mask_token is None:  # LoMaR's in-encoder mask token is for pre-training only
        state.pop("mask_token", None)
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], encoder.grid, num_prefix=1)
    key = "patch_embed.proj.weight"
    if key in state and state[key].shape[-1] != encoder.patch_size:
        state[key] = interpolate_patch_embed(state[key], encoder.patch_size, patch_mode)
    return state


# ------------------------------------------------------------------------------------ loading
def encoder_config(
    path: Path | None, default: dict[str, Any], file_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The pre-training encoder config: the file's metadata if present, else ``default`` (parameters)."""
    cfg = dict(file_config) if file_config else dict(default)
    if not cfg:
        raise ValueError(
            f"{path or 'random_init'}: no encoder_config in the file and no default encoder config"
        )
    return {k: v for k, v in cfg.items() if k in ENCODER_FIELDS}


def load_encoder(
    ref: str | Path | None,
    default_config: dict[str, Any],
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    patch_mode: str = "bicubic",
) -> tuple[ViTEncoder, dict[str, Any]]:
    """A ``ViTEncoder`` at the transfer ``img_size`` / ``patch_size`` with the checkpoint's weights.

    ``ref=None`` gives a randomly initialised encoder with ``default_config`` (the ``random_init`` row).
    Returns the encoder and an info dict (path, config, recipe) for the metrics.
    """
    path = resolve_encoder_path(ref)
    state, file_cfg, meta = read_encoder_file(path) if path is not None else ({}, None, {})
    cfg = encoder_config(path, default_config, file_cfg)
    if state:
        check_encoder_weights(state, cfg, path)  # before build_encoder allocates anything
    overrides = {"drop_path_rate": float(drop_path_rate)}
    if img_size is not None:
        overrides["img_size"] = int(img_size)
    if patch_size is not None:
        overrides["patch_size"] = int(patch_size)
    encoder = build_encoder(cfg, **overrides)
    if state:
        state = adapt_state_dict(state, encoder, patch_mode)
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: state dict does not match the encoder: missing {missing}, unexpected {unexpected}"
            )
    info = {"path": str(path) if path else None, "config": {**cfg, **overrides}, "recipe": meta.get("recipe")}
    return encoder, info


# ---------------------------------------------------------------------------- layer-wise lr decay
def task_encoder(
    encoder_ref: str | Path | None, default_config: dict[str, Any], cfg: FineTuneLoopConfig, img_size: int
) -> tuple[ViTEncoder, dict[str, Any]]:
    """``load_encoder`` with a fine-tune task's ``patch_size`` and ``drop_path`` at ``img_size``."""
    return load_encoder(
        encoder_ref,
        default_config,
        img_size=img_size,
        patch_size=cfg.patch_size,
        drop_path_rate=cfg.drop_path,
    )


def layer_id(name: str, num_layers: int) -> int:
    """BEiT/MAE layer id: embeddings 0, ``blocks.i`` i+1, everything after the blocks ``num_layers + 1``."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups_lrd(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    no_weight_decay: set[str] = frozenset(),
    prefix: str = "",
) -> list[dict[str, Any]]:
    """Parameter groups with ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)`` (BEiT §2.3, MAE §A.2).

    Parameters are named relative to ``prefix`` (e.g. ``"encoder."`` for a model wrapping the encoder);
    names outside ``prefix`` are heads and get the top layer id (scale 1). No decay on 1-D params,
    biases and ``no_weight_decay`` names. Use :func:`apply_lr` to set each group's lr every step.
    """
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inner = name[len(prefix) :] if prefix and name.startswith(prefix) else None
        lid = layer_id(inner, num_layers) if inner is not None else num_layers + 1
        decay = not (p.ndim == 1 or name.endswith(".bias") or (inner or name) in no_weight_decay)
        group = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
                "layer_id": lid,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA; the foreach path is ~5x slower on CPU here)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), foreach=False)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_drop_path(encoder: ViTEncoder, rate: float) -> None:
    """Stochastic depth rising linearly to ``rate`` over the blocks (as timm/MAE fine-tune)."""
    from timm.layers import DropPath

    rates = torch.linspace(0, rate, len(encoder.blocks)).tolist()
    for blk, r in zip(encoder.blocks, rates, strict=True):
        blk.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        blk.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
