"""``maelab bench data``: images/s per worker core of each pre-training decode path, and the worker cores
one GPU needs to be kept fed at a given training rate.

Each path turns encoded JPEG bytes into one normalised training view (MAE's RandomResizedCrop(0.2, 1) +
flip, ImageNet mean/std), in one process on one thread, as one DataLoader worker does:

- ``full``: decode the whole image, then crop and resize in torch (``data.decode: full``, the default);
- ``crop``: decode only what the crop needs (JPEG DCT scaling via Pillow ``draft``) and crop + resize in
  one Pillow pass (``data.decode: crop``);
- ``shards+crop``: ``crop``, reading the bytes from ingest's packed tar shards (one seek + read) instead of
  one file per image;
- ``gpu`` (CUDA only): ``torchvision.io.decode_jpeg`` on the GPU for a whole batch, crop + resize there;
  its rate is GPU time, not worker cores.

cores per GPU = training images/s / (images/s per core). The rates are ``--rate`` (default: 1,977 img/s,
DailyMAE's MAE-B per A100, and 8,000 img/s, MAE-B on an H100 at 50% MFU), e.g. the bf16 images/s that
``maelab bench train`` or ``scripts/gpu_check.sh`` measured.

    maelab bench data --images 64 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from maelab.data.decode import decode_crop, decode_jpegs_on, decode_rgb, read_bounded
from maelab.data.view import IMAGENET_MEAN, IMAGENET_STD, View

DEFAULT_RATES = (1977.0, 8000.0)


def synthetic_jpegs(
    folder: Path, n: int, size: tuple[int, int] = (480, 640), quality: int = 90
) -> list[Path]:
    """``n`` photo-like JPEGs (smooth colour fields, edges and grain) of ``size`` (H, W): what a decoder
    spends its time on depends on the entropy, so flat or pure-noise images would mislead."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    out = []
    for i in range(n):
        base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        img += 40 * np.sin(xx[..., None] / rng.uniform(5, 40) + yy[..., None] / rng.uniform(5, 40))
        img += rng.normal(0, 8, img.shape)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=quality)
        out.append(path)
    return out


class Views:
    """The same random views for every path: MAE's RandomResizedCrop(scale) + flip, seeded per image."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0)) -> None:
        self.size, self.scale = (size, size), scale
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def view(self, i: int, src_hw: tuple[int, int]) -> View:
        g = torch.Generator().manual_seed(i)
        return View.random_resized_crop(src_hw, self.size, self.scale, generator=g)

    def normalise(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std


def full_path(data: bytes, i: int, views: Views) -> torch.Tensor:
    arr = np.asarray(decode_rgb(data))
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    view = views.view(i, tuple(img.shape[-2:]))
    return views.normalise(view.apply(img, mode="bicubic").clamp_(0.0, 1.0))


def crop_path(data: bytes, i: int, views: Views, src_hw: tuple[int, int]) -> torch.Tensor:
    view = views.view(i, src_hw)
    out = decode_crop(data, (view.top, view.left, view.height, view.width), view.size, view.flip)
    img = torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float().div_(255.0)
    return views.normalise(img)


def per_core(run: Callable[[int], Any], n: int, rounds: int) -> float:
    """Median images/s of ``rounds`` passes over ``n`` images, one thread, after one untimed pass (page
    cache, lazy imports, allocator)."""
    for i in range(n):
        run(i)
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            run(i)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def gpu_rate(datas: list[bytes], views: Views, rounds: int, batch: int = 64) -> float:
    """Images/s of nvJPEG decode + crop + resize on the GPU, in batches."""
    device = torch.device("cuda")

    def one_pass() -> None:
        for start in range(0, len(datas), batch):
            chunk = datas[start : start + batch]
            for j, img in enumerate(decode_jpegs_on("cuda", chunk)):
                view = views.view(start + j, tuple(img.shape[-2:]))
                view.apply(img.float().div_(255.0), mode="bicubic")
        torch.cuda.synchronize(device)

    one_pass()  # warm-up: nvJPEG handles, kernels
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        one_pass()
        rates.append(len(datas) / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_data(
    paths: list[Path],
    crop: int = 224,
    rounds: int = 3,
    rates: tuple[float, ...] = DEFAULT_RATES,
    gpu: bool | None = None,
) -> dict[str, Any]:
    from maelab.data.shards import ShardReader, write_shards

    torch.set_num_threads(1)
    views = Views(crop)
    sizes = [Image.open(p).size for p in paths]  # header only
    src_hw = [(h, w) for w, h in sizes]
    n = len(paths)
    results: dict[str, float] = {}
    results["full"] = per_core(lambda i: full_path(read_bounded(paths[i], 1 << 40), i, views), n, rounds)
    results["crop"] = per_core(
        lambda i: crop_path(read_bounded(paths[i], 1 << 40), i, views, src_hw[i]), n, rounds
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            {
                "image_id": f"bench:{i}",
                "root": str(p.parent),
                "path": p.name,
                "source": "bench",
                "split": "train",
            }
            | {"width": w, "height": h}
            for i, (p, (w, h)) in enumerate(zip(paths, sizes, strict=True))
        ]
        write_shards(pd.DataFrame(rows), tmp, images_per_shard=max(1, n // 2))
        reader = ShardReader(tmp)
        results["shards+crop"] = per_core(
            lambda i: crop_path(reader.read(f"bench:{i}"), i, views, src_hw[i]), n, rounds
        )
    out: dict[str, Any] = {
        "images": n,
        "source_hw": list(src_hw[0]),
        "crop": crop,
        "rounds": rounds,
        "images_per_s_per_core": results,
        "crop_over_full": results["crop"] / results["full"],
        "cores_per_gpu": {f"{rate:g}": {path: rate / ips for path, ips in results.items()} for rate in rates},
    }
    if gpu if gpu is not None else torch.cuda.is_available():
        datas = [read_bounded(p, 1 << 40) for p in paths]
        out["gpu_decode_images_per_s"] = gpu_rate(datas, views, rounds)
    return out


def print_report(out: dict[str, Any]) -> None:
    h, w = out["source_hw"]
    print(
        f"{out['images']} JPEGs {w}x{h} -> {out['crop']} px views, 1 thread, median of {out['rounds']} passes"
    )
    rates = list(out["cores_per_gpu"])
    print(f"{'path':>12} {'img/s/core':>11} " + " ".join(f"{'cores@' + r:>11}" for r in rates))
    for path, ips in out["images_per_s_per_core"].items():
        cores = " ".join(f"{out['cores_per_gpu'][r][path]:11.1f}" for r in rates)
        print(f"{path:>12} {ips:11.1f} {cores}")
    print(f"crop-only / full decode: {out['crop_over_full']:.2f}x images/s per core")
    if "gpu_decode_images_per_s" in out:
        print(f"GPU decode (nvJPEG) + crop + resize: {out['gpu_decode_images_per_s']:.0f} images/s")


def cli(args: argparse.Namespace) -> int:
    rates = tuple(args.rate) if args.rate else DEFAULT_RATES
    if args.jpeg_dir:
        paths = sorted(p for p in Path(args.jpeg_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        paths = paths[: args.images]
        if not paths:
            raise SystemExit(f"--jpeg-dir {args.jpeg_dir}: no .jpg files")
        out = bench_data(paths, args.crop, args.rounds, rates)
    else:
        w, h = (int(v) for v in args.size.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            out = bench_data(synthetic_jpegs(Path(tmp), args.images, (h, w)), args.crop, args.rounds, rates)
    if args.json:
        print(json.dumps(out))
    else:
        print_report(out)
    return 0
