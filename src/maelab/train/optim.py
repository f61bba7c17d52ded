"""AdamW with MAE's parameter groups (He et al. 2022, §A.1: AdamW, betas (0.9, 0.95), wd 0.05).

No weight decay on parameters with ``ndim <= 1`` (norm weights, biases) and on the names the
model lists in ``no_weight_decay()`` (position embeddings, cls/mask tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.split(".")[-1] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, train_cfg: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CUDA and on CPU (torch >= 2.4 has both), foreach otherwise."""
    groups = param_groups(model, float(train_cfg.get("weight_decay", 0.05)))
    betas = tuple(train_cfg.get("betas", (0.9, 0.95)))
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
) -> None:
    """One optimiser step after backward: unscale (fp16), clip the global grad norm, step, update the
    scaler, zero the grads. The engine and ``maelab bench train`` both run this."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(params, float(clip_grad))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
