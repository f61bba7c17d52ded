"""Decode every image once: EXIF orientation, any mode to RGB, size, content hash, or a reason to reject it.

:func:`load_rgb` is the one way any part of maelab turns a file into RGB pixels, so what ingest
accepted is exactly what training reads. :func:`probe` runs it once per file during ingest (in a
process pool, :func:`probe_many`) and :class:`DecodeCache` remembers the outcome keyed by
``(path, size, mtime_ns)``, so an unchanged file is never decoded twice.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from maelab.files import atomic_write

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_name(name: str | Path) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is dropped (like torchvision's loader); 16/32-bit is rescaled."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        # I;16*, I (32-bit int), F: rescale the full 16-bit range (or [0, 1] floats) to 8 bits
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif a.size and np.nanmax(a) > 255:
            a = a * (255.0 / 65535.0)
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # a palette with transparency converts cleanly only through RGBA
    return im.convert("RGB")


def _open(data: bytes) -> Image.Image:
    """Decode fully (``load``), with the EXIF orientation applied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on odd EXIF / palette transparency; we convert anyway
        im = Image.open(io.BytesIO(data))
        im.load()
        return ImageOps.exif_transpose(im)


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as an EXIF-upright 8-bit RGB ``PIL.Image`` (raises on a bad file)."""
    return to_rgb(_open(Path(path).read_bytes()))


@dataclass(frozen=True)
class Probe:
    """What decoding one file found. ``reason`` is empty when ``ok``."""

    width: int
    height: int
    content_hash: str
    ok: bool
    reason: str


def probe(path: str, mask_path: str | None = None, min_side: int = 16) -> Probe:
    """Decode ``path`` once; never raises. A mask (if any) must exist and match the upright image size."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set globally by some other code: truncated files would pass
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; ingest needs it False")

    def bad(reason: str, w: int = 0, h: int = 0, digest: str = "") -> Probe:
        return Probe(w, h, digest, False, reason)

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return bad("missing file")
    except OSError as e:
        return bad(f"unreadable: {e.strerror or e}")
    if not data:
        return bad("empty file (0 bytes)")
    digest = hashlib.sha1(data).hexdigest()
    try:
        rgb = to_rgb(_open(data))
    except UnidentifiedImageError:
        return bad("not an image (unknown format)", digest=digest)
    except Image.DecompressionBombError as e:
        return bad(f"too large: {e}", digest=digest)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e).split("\n")[0]
        kind = "truncated" if "truncated" in text.lower() or isinstance(e, EOFError) else "corrupt"
        return bad(f"{kind}: {text}", digest=digest)
    except Exception as e:  # e.g. struct.error from a broken EXIF block: still a bad file, never a crash
        return bad(f"undecodable: {type(e).__name__}: {e}", digest=digest)
    w, h = rgb.size
    if mask_path is not None:
        try:
            with Image.open(mask_path) as m:  # header only: size check, no decode
                mw, mh = m.size
        except FileNotFoundError:
            return bad(f"missing mask {Path(mask_path).name}", w, h, digest)
        except (OSError, SyntaxError, ValueError) as e:
            return bad(f"bad mask {Path(mask_path).name}: {e}", w, h, digest)
        if (mw, mh) != (w, h):
            return bad(f"mask size {mw}x{mh} != image size {w}x{h}", w, h, digest)
    return with_min_side(Probe(w, h, digest, True, ""), min_side)


def _probe_star(job: tuple[str, str | None, int]) -> Probe:
    return probe(*job)


def probe_many(
    jobs: list[tuple[str, str | None]], min_side: int = 16, workers: int = 2, desc: str = "decode"
) -> list[Probe]:
    """:func:`probe` every ``(path, mask_path)`` in a process pool (``workers <= 1``: in-process)."""
    args = [(p, m, min_side) for p, m in jobs]
    bar = dict(total=len(args), desc=desc, unit="img", mininterval=0.5, disable=not args)
    if workers <= 1 or len(args) < 64:
        return [probe(*a) for a in tqdm(args, **bar)]
    chunk = max(1, min(64, len(args) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_probe_star, args, chunksize=chunk), **bar))


# --------------------------------------------------------------------------------------------- cache
CACHE_COLUMNS = {
    "key": "string",  # "path|size|mtime_ns|mask stat"
    "width": "int32",
    "height": "int32",
    "content_hash": "string",
    "ok": "bool",
    "reason": "string",
}


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}|{st.st_mtime_ns}"


def cache_key(path: str, mask_path: str | None) -> str:
    """``(path, size, mtime_ns)`` of the image (and of its mask): a changed file gets a new key."""
    key = f"{path}|{_stat_key(path)}"
    return key if mask_path is None else f"{key}|{mask_path}|{_stat_key(mask_path)}"


class DecodeCache:
    """``cache_key -> Probe``, kept as a parquet file (written atomically). Missing files are never cached."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, Probe] = {}
        if self.path is not None and self.path.exists():
            try:
                df = pd.read_parquet(self.path)
                cols = (df[c].tolist() for c in CACHE_COLUMNS)
                for key, w, h, digest, ok, reason in zip(*cols, strict=True):
                    self.entries[key] = Probe(int(w), int(h), str(digest), bool(ok), str(reason))
            except Exception as e:  # a damaged cache only costs a re-decode
                log.warning("ignoring unreadable decode cache %s: %s", self.path, e)
                self.entries = {}
        self._loaded = len(self.entries)

    def save(self, keys: Iterable[str]) -> None:
        """Keep only ``keys`` (the current inputs) and write the cache atomically (only when it changed)."""
        if self.path is None:
            return
        keep = [(k, self.entries[k]) for k in dict.fromkeys(keys) if k in self.entries]
        if self.path.exists() and len(keep) == len(self.entries) == self._loaded:
            return  # nothing added, nothing dropped
        df = pd.DataFrame([{"key": k, **asdict(p)} for k, p in keep], columns=list(CACHE_COLUMNS))
        df = df.astype(CACHE_COLUMNS)
        atomic_write(self.path, lambda tmp: df.to_parquet(tmp, index=False))


def with_min_side(p: Probe, min_side: int) -> Probe:
    """Reject a decoded image smaller than one patch (kept out of the cache, so ``min_side`` can change)."""
    if p.ok and min(p.width, p.height) < min_side:
        return Probe(
            p.width, p.height, p.content_hash, False, f"too small: {p.width}x{p.height} < {min_side} px"
        )
    return p


def decode_all(
    jobs: list[tuple[str, str | None]],
    cache_path: str | Path | None,
    min_side: int = 16,
    workers: int = 2,
) -> tuple[list[Probe], dict[str, int]]:
    """Probe every ``(path, mask_path)``, decoding only those not in the cache. Returns probes and counts."""
    cache = DecodeCache(cache_path)
    keys = [cache_key(p, m) for p, m in jobs]
    results: dict[int, Probe] = {i: cache.entries[k] for i, k in enumerate(keys) if k in cache.entries}
    todo = [i for i in range(len(jobs)) if i not in results]
    fresh = probe_many([jobs[i] for i in todo], min_side=0, workers=workers)
    for i, p in zip(
        todo, fresh, strict=True
    ):  # a file that appears later gets a new key: absence is cacheable
        results[i] = cache.entries[keys[i]] = p
    cache.save(keys)
    probes = [with_min_side(results[i], min_side) for i in range(len(jobs))]
    return probes, {"decoded": len(todo), "cached": len(jobs) - len(todo)}
