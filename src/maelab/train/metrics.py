"""Throughput figures every training run logs: images/s, step time, data-loader wait per step, compile
time, achieved model TFLOP/s and model-FLOPs utilisation (MFU, on CUDA devices whose peak is known).

    MFU = 3 x forward FLOPs per image x images/s / device peak (dense bf16)

Forward FLOPs are counted once per run by ``torch.utils.flop_counter.FlopCounterMode`` on a fresh CPU
copy of the model fed one sample of the first batch; 3x covers forward and backward (the usual
convention: activation-checkpointing recomputation is not model FLOPs).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from maelab.masking.plan import MaskPlan

log = logging.getLogger(__name__)

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets; SXM parts unless named)
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "V100": 125.0,  # fp16
}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():  # first match: "H100 PCIe" before "H100"
        if key in name:
            return peak
    return None


def first_sample(value: Any, batch_size: int) -> Any:
    """The first sample of a batch field: tensors (and the tensor fields of a plan) with a leading batch
    dimension are cut to ``[:1]`` and moved to the CPU; anything else is kept."""
    if isinstance(value, torch.Tensor):
        return value[:1].cpu() if value.dim() and value.shape[0] == batch_size else value.cpu()
    if dataclasses.is_dataclass(value) and isinstance(value, MaskPlan):
        cut = {f.name: first_sample(getattr(value, f.name), batch_size) for f in dataclasses.fields(value)}
        return type(value)(**cut)
    return value


def forward_flops_per_image(
    build_model: Callable[[dict], nn.Module], recipe: dict, batch: dict
) -> float | None:
    """FLOPs of one training forward of one image: a fresh CPU copy of the model (explicit attention, so
    the counter sees the attention matmuls) runs the batch's first sample under ``FlopCounterMode``; the
    global RNG is left as it was. None when the model cannot be counted this way."""
    from torch.utils.flop_counter import FlopCounterMode

    size = int(batch["image"].shape[0])
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = build_model(recipe).train()
            for module in model.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
            one = {k: first_sample(v, size) for k, v in batch.items()}
            counter = FlopCounterMode(display=False)
            with counter:
                model(one)
        return float(counter.get_total_flops())
    except Exception as err:  # counting is a report, never a reason to stop training
        log.info("model FLOPs not counted (%s: %s); no MFU for this run", type(err).__name__, err)
        return None


class StepMeter:
    """Step times, data-loader wait and the derived figures of one run (``images_per_step`` images per
    optimiser step, all ranks together)."""

    def __init__(self, images_per_step: int, device: torch.device, world_size: int = 1) -> None:
        self.images_per_step, self.device, self.world_size = images_per_step, device, world_size
        self.step_times: list[float] = []
        self.waits: list[float] = []
        self._wait = 0.0
        self.flops_per_image: float | None = None
        self.peak_tflops = device_peak_tflops(device)

    def timed(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches``, with the time spent waiting for each one added to the current step's wait."""
        while True:
            t0 = time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:
                return
            self._wait += time.perf_counter() - t0
            yield item

    def step_done(self, seconds: float) -> dict[str, float]:
        """Record one optimiser step; returns its figures (``data_wait_ms``, and ``mfu`` / ``tflops``
        once FLOPs are known)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_times.append(seconds)
        self.waits.append(self._wait)
        self._wait = 0.0
        out = {"data_wait_ms": self.waits[-1] * 1e3}
        out.update(self.utilisation(self.images_per_step / seconds))
        return out

    def utilisation(self, images_per_s: float) -> dict[str, float]:
        if self.flops_per_image is None:
            return {}
        per_device = 3 * self.flops_per_image * images_per_s / self.world_size / 1e12
        out = {"tflops": per_device}
        if self.peak_tflops:
            out["mfu"] = per_device / self.peak_tflops
        return out

    def steady(self) -> list[float]:
        """Step times without the first two (compilation, allocator and kernel warm-up) when there are
        more than four."""
        return self.step_times[2:] if len(self.step_times) > 4 else self.step_times

    def summary(self, compiled: bool) -> dict[str, float | None]:
        """Images/s and step time (mean over the steady steps), data wait (mean per step), compile time
        (first step minus the steady median, with ``compile``), TFLOP/s and MFU."""
        timed = self.steady()
        if not timed:
            return {"images_per_s": 0.0}
        ips = self.images_per_step * len(timed) / sum(timed)
        median = statistics.median(timed)
        out: dict[str, float | None] = {
            "images_per_s": ips,
            "step_ms": 1e3 * sum(timed) / len(timed),
            "data_wait_ms": 1e3 * statistics.fmean(self.waits[-len(timed) :]),
            "first_step_s": self.step_times[0],
            "compile_s": max(0.0, self.step_times[0] - median) if compiled else None,
        }
        out.update(self.utilisation(ips))
        return out
