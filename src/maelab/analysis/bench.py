"""``maelab bench train``: median images/s and peak memory of training steps on synthetic input.

Several precisions are measured side by side in one run (same recipe, batch and device), each on a
fresh model after warm-up steps. On a GPU it also reports model-FLOPs utilisation:

    MFU = 3 x forward MACs x 2 FLOPs/MAC x images/s / device peak (dense bf16)

with the forward MACs of ``maelab.analysis.flops.count_gmacs`` (3x: forward + backward).

An in-step masker (self-guided MAE) gets a ``MaskContext`` whose step advances with every step timed
(warm-up included), as in training, so ``--set masker.refresh_every=N`` takes effect; with it the steps
differ, so the mean images/s (``images_per_s_mean``) is reported beside the median.
``--set KEY.PATH=VALUE`` edits the recipe (not ``--against``'s), e.g. ``masker.switch_at_step=0`` to time
self-guided MAE after its switch.

    maelab bench train --recipe mae --env imagenet --batch-size 8 --precision bf16,fp32 --steps 5 --json
    maelab bench train --recipe sgmae --against mae --env imagenet --batch-size 2 --steps 8 \
        --set masker.switch_at_step=0 --set masker.refresh_every=4
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import torch

from maelab.masking.context import MaskContext
from maelab.masking.plan import MaskPlan
from maelab.train.metrics import PEAK_BF16_TFLOPS, device_peak_tflops

__all__ = ["PEAK_BF16_TFLOPS", "bench_train", "device_peak_tflops", "parse_variant", "train_cli"]

VARIANT_HELP = (
    "PRECISION[+compile][+ac=full|selective][+fsdp], several comma-separated: fp32,bf16,bf16+compile"
)


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``bf16+compile+ac=selective+fsdp`` -> (``bf16``, the ``train`` keys it sets)."""
    precision, *flags = [p.strip() for p in spec.split("+")]
    train: dict[str, Any] = {}
    for flag in flags:
        if flag == "compile":
            train["compile"] = True
        elif flag in ("fsdp", "ddp"):
            train["strategy"] = flag
        elif flag.startswith("ac="):
            train["activation_checkpointing"] = flag[3:]
        else:
            raise ValueError(f"--precision {spec!r}: unknown part {flag!r} ({VARIANT_HELP})")
    return precision, train


class RssPeak:
    """Peak resident memory of this process while the block runs (sampled from /proc every 5 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __enter__(self) -> RssPeak:
        import os

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def synthetic_batch(
    model: Any, recipe: dict[str, Any], batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Random images, the recipe's masker's plans (seeded) and whatever extra inputs the heads need."""
    g = torch.Generator().manual_seed(0)
    enc = recipe["encoder"]
    size = enc["img_size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    batch: dict[str, Any] = {"image": torch.randn(batch_size, 3, *hw, generator=g)}
    masker = getattr(model, "masker", None)
    if masker is not None and not masker.in_step:
        batch["plan"] = MaskPlan.collate([masker(g) for _ in range(batch_size)])
    for head in getattr(model, "heads", {}).values():
        if hasattr(head, "example_batch"):
            batch.update(head.example_batch(batch_size))
    return {k: (v.to(device) if isinstance(v, torch.Tensor | MaskPlan) else v) for k, v in batch.items()}


def bench_precision(
    recipe: dict[str, Any], variant: str, batch_size: int, steps: int, device: torch.device, warmup: int = 2
) -> dict[str, Any]:
    """One variant (``parse_variant``): a fresh model with the variant's activation checkpointing, compile
    and strategy (``maelab.train.strategy.wrap_model``, as the engine builds it), ``warmup`` steps (the
    first one's time, compilation included, is reported as ``first_step_s``), then the median of ``steps``."""
    from maelab.models import build_pretrainer
    from maelab.train.optim import build_optimizer, optimizer_step
    from maelab.train.precision import autocast, grad_scaler, resolve_precision
    from maelab.train.strategy import wrap_model

    precision, flags = parse_variant(variant)
    precision = resolve_precision(precision, device)
    tcfg = {**recipe.get("train", {}), "compile": False, **flags}
    torch.manual_seed(0)
    model = build_pretrainer(recipe).to(device).train()
    batch = synthetic_batch(model, recipe, batch_size, device)
    step_model, _ = wrap_model(model, tcfg, 1, device, precision)
    opt = build_optimizer(model, 1e-4, tcfg)
    scaler = grad_scaler(precision, device)
    in_step = getattr(getattr(model, "masker", None), "in_step", False)
    counter = iter(range(max(1, warmup) + steps))

    def step() -> tuple[float, float]:  # forward, backward and the engine's own optimiser step
        if in_step:  # the step an in-step masker sees advances, as in training
            batch["context"] = MaskContext(next(counter), 0, warmup + steps)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(precision, device):
            loss = step_model(batch).loss.float()
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(opt, model.parameters(), scaler, tcfg.get("clip_grad"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, time.process_time() - c0

    first = [step() for _ in range(max(1, warmup))]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with RssPeak() as rss:
        times, cpu_times = zip(*[step() for _ in range(steps)], strict=True)
    med, mean = statistics.median(times), statistics.fmean(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
    return {
        "precision": variant if flags else precision,
        "images_per_s": batch_size / med,
        "images_per_s_mean": batch_size / mean,
        "step_ms": med * 1e3,
        # this process's CPU seconds per step (all its threads): on a shared CPU, unlike wall time, it does
        # not grow when other processes take the cores (with 1 thread it equals wall time on an idle machine)
        "cpu_step_ms": statistics.median(cpu_times) * 1e3,
        "cpu_step_ms_mean": statistics.fmean(cpu_times) * 1e3,
        "first_step_s": first[0][0],
        "peak_mem_mb": peak / 2**20,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_rss",
    }


def bench_train(
    recipe: dict[str, Any],
    precisions: list[str],
    batch_size: int | None = None,
    steps: int = 20,
    device: str | None = None,
    warmup: int = 2,
) -> dict[str, Any]:
    from maelab.train.distributed import pick_device

    dev = pick_device(device)
    batch_size = int(batch_size or recipe["train"]["batch_size"])
    results = [bench_precision(recipe, p, batch_size, steps, dev, warmup) for p in precisions]
    out: dict[str, Any] = {
        "recipe": recipe.get("name"),
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": batch_size,
        "steps": steps,
        "results": results,
    }
    peak = device_peak_tflops(dev)
    if dev.type == "cuda":
        from maelab.analysis.flops import count_gmacs

        gmacs = count_gmacs(recipe)
        out["gmacs_per_image"] = gmacs
        out["peak_bf16_tflops"] = peak
        for r in results:
            achieved = 3 * gmacs * 1e9 * 2 * r["images_per_s"]
            r["tflops"] = achieved / 1e12
            r["mfu"] = achieved / (peak * 1e12) if peak else None
    return out


def bench_against(
    recipe: dict[str, Any],
    other: dict[str, Any],
    precisions: list[str],
    batch_size: int | None = None,
    steps: int = 20,
    device: str | None = None,
    warmup: int = 2,
) -> dict[str, Any]:
    """``recipe`` and ``other`` side by side in one run (same batch, device, precisions and attention kernel),
    ``other`` at ``recipe``'s image size; ``speedup`` = recipe images/s / other images/s per precision (e.g.
    LoMaR against MAE at 384 px, Chen et al. 2022 Table 1). On CPU the second run's peak RSS includes what the
    first left in the process; on CUDA each peak is its own."""
    other = {**other, "encoder": {**other["encoder"], "img_size": recipe["encoder"]["img_size"]}}
    batch_size = int(batch_size or recipe["train"]["batch_size"])
    first = bench_train(recipe, precisions, batch_size, steps, device, warmup)
    second = bench_train(other, precisions, batch_size, steps, device, warmup)
    pairs = list(zip(first["results"], second["results"], strict=True))
    speedup = {a["precision"]: a["images_per_s"] / b["images_per_s"] for a, b in pairs}
    speedup_mean = {a["precision"]: a["images_per_s_mean"] / b["images_per_s_mean"] for a, b in pairs}
    speedup_cpu = {a["precision"]: b["cpu_step_ms"] / a["cpu_step_ms"] for a, b in pairs}
    speedup_cpu_mean = {a["precision"]: b["cpu_step_ms_mean"] / a["cpu_step_ms_mean"] for a, b in pairs}
    return {
        "runs": [first, second],
        "speedup": speedup,
        "speedup_mean": speedup_mean,
        "speedup_cpu_time": speedup_cpu,
        "speedup_cpu_time_mean": speedup_cpu_mean,
        "img_size": recipe["encoder"]["img_size"],
    }


def _print_run(out: dict[str, Any]) -> None:
    print(f"{out['recipe']} on {out['device']}, batch {out['batch_size']}, median of {out['steps']} steps")
    cols = ("images/s", "(mean)", "step ms", "CPU ms", "1st step s", "peak MB")
    print(f"{'variant':>24} " + " ".join(f"{c:>10}" for c in cols) + f" {'MFU':>6}")
    for r in out["results"]:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        ips, mean, ms, mb = r["images_per_s"], r["images_per_s_mean"], r["step_ms"], r["peak_mem_mb"]
        cpu, first = r["cpu_step_ms"], r.get("first_step_s", 0.0)
        values = ((ips, 2), (mean, 2), (ms, 1), (cpu, 1), (first, 1), (mb, 0))
        cells = " ".join(f"{v:10.{d}f}" for v, d in values)
        print(f"{r['precision']:>24} {cells} {mfu:>6}")


def isolated(args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    """Each variant in a fresh process (``--isolate``): on CPU a process's peak RSS otherwise carries what
    the variants before it left; the results are merged as one run's."""
    import subprocess
    import sys

    runs = []
    for variant in variants:
        cmd = [sys.executable, "-m", "maelab.command", "bench", "train", "--recipe", args.recipe, "--json"]
        cmd += ["--precision", variant, "--steps", str(args.steps)]
        for edit in getattr(args, "sets", None) or []:
            cmd += ["--set", edit]
        for flag, value in (
            ("--env", args.env),
            ("--batch-size", args.batch_size),
            ("--device", args.device),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"bench train {variant}: exit {done.returncode}\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {**runs[0], "results": [r for run in runs for r in run["results"]], "isolated": True}


def train_cli(args: argparse.Namespace) -> int:
    from maelab.config import load_recipe
    from maelab.teachers.build import with_untrained_teachers

    recipe = load_recipe(args.recipe, args.env)
    if getattr(args, "sets", None):
        from maelab.schema import check_recipe
        from maelab.train.__main__ import apply_sets

        recipe = apply_sets(recipe, args.sets)
        check_recipe(recipe)  # a misspelt --set key stops here, naming it
    recipe = with_untrained_teachers(recipe)  # speed does not depend on weights
    precisions = [p.strip() for p in (args.precision or recipe["train"].get("precision", "auto")).split(",")]
    against = getattr(args, "against", None)
    if against:
        other = with_untrained_teachers(load_recipe(against, args.env))
        out = bench_against(recipe, other, precisions, args.batch_size, args.steps, args.device)
        if args.json:
            print(json.dumps(out))
            return 0
        for run in out["runs"]:
            _print_run(run)
        for precision, ratio in out["speedup"].items():
            mean = out["speedup_mean"][precision]
            print(
                f"{args.recipe} / {against} at {out['img_size']} px, {precision}: {ratio:.2f}x images/s "
                f"(median step; {mean:.2f}x by the mean step; "
                f"{out['speedup_cpu_time'][precision]:.2f}x by CPU time, "
                f"{out['speedup_cpu_time_mean'][precision]:.2f}x by the mean CPU time)"
            )
        return 0
    if getattr(args, "isolate", False) and len(precisions) > 1:
        out = isolated(args, precisions)
    else:
        out = bench_train(recipe, precisions, args.batch_size, args.steps, args.device)
    if args.json:
        print(json.dumps(out))
        return 0
    _print_run(out)
    return 0
