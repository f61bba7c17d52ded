"""How a model trains at scale: spread over processes (``train.strategy: ddp | fsdp``), activation
checkpointing per block (``train.activation_checkpointing: none | full | selective``) and
``torch.compile`` (``train.compile``); and its state dicts, free of wrapper prefixes.

Order, as torchtitan applies them: activation checkpointing, then compile, then the data-parallel wrapper.

- ``ddp``: ``DistributedDataParallel`` when there is more than one process (else the bare model).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block (the elements of any
  ``*blocks`` ``ModuleList``: the encoder's and the heads' decoders'), then on the root. On CUDA with
  ``precision: bf16`` the policy keeps bf16 parameters and compute and reduces gradients in fp32
  (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); elsewhere everything stays fp32.
- Activation checkpointing wraps each block's ``forward`` (an instance attribute, so state-dict keys do not
  change): ``full`` recomputes the whole block in backward, ``selective`` keeps the outputs of the matmuls
  and attention and recomputes the rest (layer norms, GELU, residual adds), with
  ``torch.utils.checkpoint.create_selective_checkpoint_contexts``.
- Compile works in place (``nn.Module.compile``, no ``_orig_mod.`` in the keys): with ``ddp`` the encoder
  and each head as a whole, with ``fsdp`` each block (FSDP2's hooks sit between blocks).

State dicts go through ``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` / ``set_state_dict``):
the keys are the bare model's (no ``module.`` or ``_orig_mod.``), optimiser state is keyed by parameter name,
so a checkpoint moves between DDP and FSDP and between world sizes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")
CHECKPOINTING = ("none", "full", "selective")


# ------------------------------------------------------------------------------------------ blocks
def blocks_of(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of ``model``: the elements of each ``ModuleList`` whose name ends in
    ``blocks`` (``encoder.blocks``, ``heads.pixel.decoder_blocks``, ...), in module order."""
    out: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1].endswith("blocks"):
            out.extend(module)
    return out


# ---------------------------------------------------------------------- activation checkpointing
def _saved_ops() -> set[Any]:
    """The ops whose outputs selective checkpointing keeps: matmuls and fused attention."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _selective_context() -> Any:
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _checkpointed(forward: Callable[..., Any], mode: str, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Checkpoint every block of ``model`` (``full`` or ``selective``; ``none``: leave it). Returns the
    number of blocks wrapped."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing: {mode!r} is not one of {', '.join(CHECKPOINTING)}")
    if mode == "none":
        return 0
    blocks = blocks_of(model)
    for blk in blocks:
        blk.forward = functools.partial(_checkpointed, type(blk).forward.__get__(blk), mode)
    return len(blocks)


# ------------------------------------------------------------------------------------------ compile
def compile_model(model: nn.Module, strategy: str = "ddp") -> list[str]:
    """Compile in place: the encoder and each head (``ddp``), or every block (``fsdp``); a model without
    an ``encoder`` is compiled whole. Returns what was compiled (for the log)."""
    if strategy == "fsdp":
        blocks = blocks_of(model)
        for blk in blocks:
            blk.compile()
        return [f"{len(blocks)} blocks"]
    parts: dict[str, nn.Module] = {}
    if hasattr(model, "encoder"):
        parts["encoder"] = model.encoder
        for name, head in getattr(model, "heads", {}).items():
            parts[f"heads.{name}"] = head
    else:
        parts["model"] = model
    for part in parts.values():
        part.compile()
    return list(parts)


# ------------------------------------------------------------------------------------------- FSDP2
def fsdp_policy(precision: str, device: torch.device) -> Any:
    """bf16 parameters and compute with fp32 gradient reduction on CUDA under bf16; fp32 otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """FSDP2: ``fully_shard`` every block, then the root (which holds the rest: embeddings, norms, heads'
    projections). Parameters become DTensors sharded over all processes."""
    from torch.distributed.fsdp import fully_shard

    policy = fsdp_policy(precision, device)
    blocks = blocks_of(model)
    for blk in blocks:
        fully_shard(blk, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def wrap_model(
    raw: nn.Module, tcfg: dict[str, Any], world_size: int, device: torch.device, precision: str
) -> tuple[nn.Module, DDP | None]:
    """Apply ``train.activation_checkpointing``, ``train.compile`` and ``train.strategy`` to ``raw`` (in
    place). Returns the model the step calls and its DDP wrapper (None unless DDP)."""
    strategy = str(tcfg.get("strategy") or "ddp")
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    apply_activation_checkpointing(raw, str(tcfg.get("activation_checkpointing") or "none"))
    if tcfg.get("compile"):
        log.info("compiling %s", ", ".join(compile_model(raw, strategy)))
    if strategy == "fsdp":
        from maelab.train.distributed import ensure_group

        ensure_group(device)  # FSDP2 needs a process group, even of one
        return shard_model(raw, precision, device), None
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        unused = bool(tcfg.get("find_unused_parameters", False))
        ddp = DDP(raw, device_ids=ids, find_unused_parameters=unused)
        return ddp, ddp
    return raw, None


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ------------------------------------------------------------------------------------ state dicts
def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model", "optimizer"}`` as ``torch.distributed.checkpoint`` saves and loads them: each rank's
    shards under FSDP, whole tensors otherwise; keys are parameter names (no wrapper prefixes)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole model and optimiser state on the CPU (gathered from the shards under FSDP: every rank
    must call it; rank 0 gets the values)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return {"model": msd, "optimizer": osd}


def full_model_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (gathered from the shards under FSDP: every rank must call it;
    rank 0 gets the values), the keys under ``prefix`` only, with the prefix removed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def load_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any], full: bool
) -> None:
    """Put ``state`` (:func:`full_state` on every rank if ``full``, else :func:`sharded_state` as loaded
    by DCP) into the model and optimiser (None: the model only), whatever their strategy."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    opts = StateDictOptions(full_state_dict=full)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=opts)
        return
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=opts,
    )


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Model keys without a leading ``module.`` (DDP) and without ``_orig_mod.`` (``torch.compile``
    wrappers) anywhere: what a checkpoint written by an older run may carry."""
    out = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        out[key.removeprefix("module.")] = value
    return out
