"""Mixed precision: ``auto | bf16 | fp16 | fp32``.

auto = bf16 on CUDA and on CPUs with native bf16 (AMX or AVX512-BF16), else fp32.
fp16 needs CUDA and a ``GradScaler``; bf16 needs no scaler.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AMX", "AVX512_BF16")


def resolve_precision(precision: str, device: torch.device) -> str:
    precision = str(precision or "auto").lower()
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return "bf16" if native else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"recipe train.precision: {precision!r} is not one of auto, bf16, fp16, fp32")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"recipe train.precision: fp16 needs CUDA (device is {device.type}); use bf16 or fp32"
        )
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
