"""``maelab bench regions``: region-store throughput, bytes per image, overhead over bare ``felzenszwalb``.

Same images, same process count, same chunks, side by side in one run:
  bare      = ``skimage.segmentation.felzenszwalb`` at the configured scales on already-decoded arrays;
  pipeline  = :func:`~maelab.regions.build.build_source` into a fresh store (decode + FH + compress + atomic
              shard write + index commit + gc), i.e. what ``kedro run --pipelines=regions`` does per source.
Each is timed ``repeats`` times, alternating which goes first; the overhead is the median of the paired
ratios, in wall time and in CPU time (parent + pool processes, which a busy machine disturbs less).
Images are skimage's bundled photos resized to 640x480 (COCO-sized), saved as JPEG q95, variants
flipped/rolled when more are asked for.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from maelab.data.manifest import conform
from maelab.regions.build import build_source
from maelab.regions.sources import FHSource, make_source, read_rgb
from maelab.regions.store import SourceStore

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "cat",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
)


def make_images(n: int, folder: Path, size: tuple[int, int] = (480, 640)) -> pd.DataFrame:
    """``n`` RGB JPEGs of ``size`` (H, W) in ``folder`` and their manifest."""
    import skimage.data
    from skimage.transform import resize

    folder.mkdir(parents=True, exist_ok=True)
    photos = [getattr(skimage.data, p)() for p in PHOTOS]
    rows = []
    for i in range(n):
        base = photos[i % len(photos)]
        img = resize(base[..., :3], size, preserve_range=True, anti_aliasing=True).astype(np.uint8)
        variant = i // len(photos)
        if variant:  # a different image, same statistics
            img = np.roll(img[:, ::-1] if variant % 2 else img, 37 * variant, axis=1)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(img)).save(path, quality=95)
        rows.append(
            {
                "image_id": f"bench:train:{i}",
                "source": "bench",
                "split": "train",
                "root": str(folder),
                "path": path.name,
                "width": size[1],
                "height": size[0],
                "content_hash": f"bench{i}",
            }
        )
    return conform(pd.DataFrame(rows))


def _bare_chunk(images: list[np.ndarray], source: FHSource) -> int:
    from skimage.segmentation import felzenszwalb

    for image in images:
        for s, m in zip(source.scales, source.min_sizes, strict=True):
            felzenszwalb(image, scale=s, sigma=source.sigma, min_size=m)
    return len(images)


def run_bench(
    images: int = 8,
    *,
    fh: dict[str, Any] | None = None,
    workers: int | None = None,
    repeats: int = 3,
    size: tuple[int, int] = (480, 640),
    codec: str = "lzma",
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Measure; returns the figures (fractions, medians). ``fh``: the ``regions.sources.fh`` parameters."""
    source = make_source("fh", fh or {"type": "fh", "scales": [500, 1000, 1500]})
    if not isinstance(source, FHSource):
        raise ValueError("bench regions: regions.sources.fh must be an FH source")
    workers = max(1, min(workers or mp.cpu_count(), images))
    shard_size = math.ceil(images / workers)  # one chunk per process, for both sides
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        manifest = make_images(images, Path(tmp) / "images", size)
        arrays = [read_rgb(Path(r.root) / r.path) for r in manifest.itertuples()]
        chunks = [arrays[i : i + shard_size] for i in range(0, images, shard_size)]
        bare, pipe, nbytes = [], [], 0  # (wall s, cpu s) per repeat

        def run_bare() -> None:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                assert sum(pool.map(_bare_chunk, chunks, [source] * len(chunks))) == images

        def run_pipeline(rep: int) -> None:
            nonlocal nbytes
            store = SourceStore(Path(tmp) / f"store{rep}" / "fh")
            report = build_source(
                store, source, manifest, workers=workers, shard_size=shard_size, codec=codec, progress=False
            )
            assert report["computed"] == images
            nbytes = store.nbytes()

        for rep in range(repeats):  # alternate which side goes first
            sides = [(bare, run_bare), (pipe, lambda rep=rep: run_pipeline(rep))]
            for out, fn in sides if rep % 2 == 0 else sides[::-1]:
                out.append(_timed(fn))
    wall = statistics.median(p[0] / b[0] for b, p in zip(bare, pipe, strict=True)) - 1
    cpu = statistics.median(p[1] / b[1] for b, p in zip(bare, pipe, strict=True)) - 1
    t_bare, t_pipe = statistics.median(b[0] for b in bare), statistics.median(p[0] for p in pipe)
    return {
        "images_per_s_per_core": round(images / t_pipe / workers, 4),
        "bytes_per_image": round(nbytes / images, 1),
        "overhead_vs_felzenszwalb": round(wall, 4),  # median over repeats of paired wall-time ratios
        "overhead_cpu": round(cpu, 4),  # same with CPU seconds (parent + workers): robust to a busy machine
        "images_per_cpu_s": round(images / statistics.median(p[1] for p in pipe), 4),
        "images": images,
        "workers": workers,
        "size": list(size),
        "scales": source.layers,
        "codec": codec,
        "repeats": repeats,
        "bare_s": round(t_bare, 3),
        "pipeline_s": round(t_pipe, 3),
    }


def _timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its reaped children) of ``fn()``."""

    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    w0, c0 = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - w0, cpu() - c0


def cli(args: argparse.Namespace) -> int:
    from maelab.config import load_config

    params = load_config("parameters", args.env).get("regions", {})
    catalog = load_config("catalog", args.env).get("region_store", {})
    fh = (params.get("sources") or {}).get("fh")
    result = run_bench(args.images, fh=fh, workers=params.get("workers"), codec=catalog.get("codec", "lzma"))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"regions bench: {result['images']} images {result['size'][1]}x{result['size'][0]}, FH scales "
            f"{result['scales']}, {result['workers']} processes, median of {result['repeats']}"
        )
        print(f"  bare felzenszwalb      {result['bare_s']:8.3f} s")
        print(
            f"  store + pipeline       {result['pipeline_s']:8.3f} s  "
            f"(overhead {100 * result['overhead_vs_felzenszwalb']:+.1f} %)"
        )
        print(f"  overhead in CPU time   {100 * result['overhead_cpu']:+8.1f} %")
        print(f"  images/s per core      {result['images_per_s_per_core']:8.3f}")
        print(f"  bytes per image        {result['bytes_per_image']:8.0f}")
    return 0
