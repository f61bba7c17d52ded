"""Decode every image once: EXIF orientation, any mode to RGB, size, content hash, or a reason to reject it.

:func:`load_rgb` is the one way any part of maelab turns a file into RGB pixels, so what ingest
accepted is exactly what training reads. :func:`probe` runs it once per file during ingest (in a
process pool, :func:`probe_many`) and :class:`DecodeCache` remembers the outcome keyed by
``(path, size, mtime_ns, ctime_ns, inode)``, so an unchanged file is never decoded twice (``ctime`` cannot
be restored by ``tar -x`` or ``cp -p``, so a rewritten file with its old size and mtime is decoded again).

Hostile files are quarantined with a reason, never read without bound: only regular files are opened
(a FIFO or a link to ``/dev/zero`` is refused), reads stop at :attr:`Limits.max_file_bytes`, and a file whose
decode would need more than :attr:`Limits.max_decode_bytes` (pixels x bytes per pixel, from the header,
before decoding) is refused. File names that are not valid UTF-8 are refused by name.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from maelab.files import atomic_write
from maelab.pools import worker_pool
from maelab.progress import track

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


def _open(data: bytes, limits: Limits | None = None) -> Image.Image:
    """Decode fully (``load``), with the EXIF orientation applied; the header is checked against
    ``limits`` before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on odd EXIF / palette transparency; we convert anyway
        im = Image.open(io.BytesIO(data))
        check_budget(im, limits or LIMITS)
        im.load()
        return ImageOps.exif_transpose(im)


@dataclass(frozen=True)
class Limits:
    """Bounds on one file: bytes read, and bytes a decode may need (pixels x bytes per pixel)."""

    max_file_bytes: int = 256 << 20
    max_decode_bytes: int = 1 << 30

    @classmethod
    def from_params(cls, ingest: dict) -> Limits:
        """From ``ingest.max_file_mb`` / ``ingest.max_decode_mb`` (MiB)."""
        d = cls()
        return cls(
            int(ingest.get("max_file_mb") or d.max_file_bytes >> 20) << 20,
            int(ingest.get("max_decode_mb") or d.max_decode_bytes >> 20) << 20,
        )


LIMITS = Limits()  # ingest's defaults
UNLIMITED = Limits(1 << 62, 1 << 62)  # readers of files ingest already accepted (under its own limits)

# decoded bytes per pixel by Pillow mode; 16/32-bit and float modes also pass through float64 in to_rgb
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Peak bytes to decode an image of ``mode`` and size to 8-bit RGB (the decoded frame, any float64
    rescale, the RGB copy)."""
    per = _MODE_BYTES.get(mode, 4)
    if mode.startswith("I") or mode == "F":
        per += 8
    return width * height * (per + 3)


def read_bounded(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``OSError`` with a reason otherwise.

    Opened non-blocking, so a FIFO cannot hang the call; ``fstat`` on the opened descriptor refuses
    anything but a regular file (a symlink to ``/dev/zero`` is a character device)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "FIFO" if stat.S_ISFIFO(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode) else "special"
            )
            raise OSError(f"not a regular file ({kind})")
        if st.st_size > limit:
            raise OSError(f"file too large: {st.st_size} bytes > {limit} (ingest.max_file_mb)")
        chunks, left = [], limit + 1
        while left > 0:  # the file may grow while read: never take more than limit + 1 bytes
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise OSError(f"file too large: more than {limit} bytes (ingest.max_file_mb)")
        return data
    finally:
        os.close(fd)


def check_budget(im: Image.Image, limits: Limits = LIMITS) -> None:
    """Refuse (``ValueError``) a decode that would need more than ``limits.max_decode_bytes``."""
    need = decode_bytes(im.mode, *im.size)
    if need > limits.max_decode_bytes:
        w, h = im.size
        raise ValueError(
            f"over the decode budget: {w}x{h} {im.mode} needs {need >> 20} MiB > "
            f"{limits.max_decode_bytes >> 20} MiB (ingest.max_decode_mb)"
        )


def load_rgb(path: str | Path, limits: Limits = UNLIMITED) -> Image.Image:
    """The image at ``path`` as an EXIF-upright 8-bit RGB ``PIL.Image`` (raises on a bad file)."""
    return decode_rgb(read_bounded(path, limits.max_file_bytes), limits)


def decode_rgb(data: bytes, limits: Limits = UNLIMITED) -> Image.Image:
    """Encoded image bytes (a file's, or a shard member's) as an EXIF-upright 8-bit RGB ``PIL.Image``."""
    return to_rgb(_open(data, limits))


EXIF_ORIENTATION = 0x0112
JPEG_REDUCTIONS = (8, 4, 2, 1)  # libjpeg's DCT scaling (Pillow ``draft``): 1/8, 1/4, 1/2, 1


def decode_crop(
    data: bytes,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    flip: bool = False,
    limits: Limits = UNLIMITED,
) -> Image.Image:
    """Decode only what a crop needs, then crop, resize and flip in one Pillow pass: 8-bit RGB ``size``.

    box: ``(top, left, height, width)`` in upright source pixels; size: ``(H, W)`` out. A JPEG is decoded
    at the smallest DCT scale (1/2, 1/4, 1/8, Pillow ``draft``) that still gives the crop at least ``size``
    pixels, so a 480-px crop resized to 224 decodes at half resolution; every format is then resized from
    the box alone (bicubic, antialiased: Pillow's ``resize(box=...)``), never converting the whole frame to
    floats. A file with an EXIF rotation is decoded whole and made upright first (the box is upright).
    Not bit-identical to decoding fully and resizing with torch (``View.apply``): a different resampler."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = Image.open(io.BytesIO(data))
        check_budget(im, limits)
        full_w, full_h = im.size
        top, left, height, width = box
        upright = im.getexif().get(EXIF_ORIENTATION, 1) in (0, 1)
        if upright and im.format == "JPEG":
            scale = min(width / size[1], height / size[0])  # source pixels per output pixel
            reduce = next(f for f in JPEG_REDUCTIONS if f <= max(scale, 1))
            if reduce > 1:
                im.draft("RGB", (-(-full_w // reduce), -(-full_h // reduce)))
        im.load()
        if not upright:
            im = ImageOps.exif_transpose(im)
        rgb = to_rgb(im)
    rx, ry = full_w / rgb.size[0], full_h / rgb.size[1]  # 1 unless draft reduced the decode
    if not upright:
        rx = ry = 1.0
    w, h = rgb.size
    crop = (left / rx, top / ry, min(w, (left + width) / rx), min(h, (top + height) / ry))
    out = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC, box=crop)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def decode_jpegs_on(device: str, datas: list[bytes]) -> list:
    """JPEG bytes -> uint8 RGB tensors ``[3, H, W]`` on ``device`` with ``torchvision.io.decode_jpeg``
    (nvJPEG on CUDA, batched); the GPU decode path (``maelab bench data``)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


@dataclass(frozen=True)
class Probe:
    """What decoding one file found. ``reason`` is empty when ``ok``."""

    width: int
    height: int
    content_hash: str
    ok: bool
    reason: str


BUDGET_PREFIX = "over the decode budget"  # reasons that depend on the limits: never cached
TOO_LARGE_PREFIX = "unreadable: file too large"


def probe(path: str, mask_path: str | None = None, min_side: int = 16, limits: Limits = LIMITS) -> Probe:
    """Decode ``path`` once; never raises. A mask (if any) must exist and match the upright image size."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set globally by some other code: truncated files would pass
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; ingest needs it False")

    def bad(reason: str, w: int = 0, h: int = 0, digest: str = "") -> Probe:
        return Probe(w, h, digest, False, reason)

    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return bad("file name is not valid UTF-8")
    try:
        data = read_bounded(path, limits.max_file_bytes)
    except FileNotFoundError:
        return bad("missing file")
    except OSError as e:
        return bad(f"unreadable: {e.strerror or e}")
    if not data:
        return bad("empty file (0 bytes)")
    digest = hashlib.sha1(data).hexdigest()
    try:
        rgb = to_rgb(_open(data, limits))
    except UnidentifiedImageError:
        return bad("not an image (unknown format)", digest=digest)
    except Image.DecompressionBombError as e:
        return bad(f"too large: {e}", digest=digest)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if str(e).startswith(BUDGET_PREFIX):
            return bad(str(e), digest=digest)
        text = str(e).split("\n")[0]
        kind = "truncated" if "truncated" in text.lower() or isinstance(e, EOFError) else "corrupt"
        return bad(f"{kind}: {text}", digest=digest)
    except Exception as e:  # e.g. struct.error from a broken EXIF block: still a bad file, never a crash
        return bad(f"undecodable: {type(e).__name__}: {e}", digest=digest)
    w, h = rgb.size
    reason = mask_problem(mask_path, (w, h), limits) if mask_path is not None else ""
    if reason:
        return bad(reason, w, h, digest)
    return with_min_side(Probe(w, h, digest, True, ""), min_side)


def mask_problem(mask_path: str, size: tuple[int, int], limits: Limits) -> str:
    """Why the mask at ``mask_path`` cannot go with an upright image of ``size`` (w, h); "" if it can."""
    try:
        with Image.open(io.BytesIO(read_bounded(mask_path, limits.max_file_bytes))) as m:  # header only
            mw, mh = m.size
    except FileNotFoundError:
        return f"missing mask {Path(mask_path).name}"
    except (OSError, SyntaxError, ValueError) as e:
        return f"bad mask {Path(mask_path).name}: {e}"
    if (mw, mh) != size:
        return f"mask size {mw}x{mh} != image size {size[0]}x{size[1]}"
    return ""


def _probe_star(job: tuple[str, str | None, int, Limits]) -> Probe:
    return probe(*job)


def probe_many(
    jobs: list[tuple[str, str | None]],
    min_side: int = 16,
    workers: int = 2,
    desc: str = "decode",
    limits: Limits = LIMITS,
) -> list[Probe]:
    """:func:`probe` every ``(path, mask_path)`` in a process pool (``workers <= 1``: in-process)."""
    args = [(p, m, min_side, limits) for p, m in jobs]
    bar = dict(total=len(args), desc=desc, unit="img", mininterval=0.5, enabled=bool(args))
    if workers <= 1 or len(args) < 64:
        return [probe(*a) for a in track(args, **bar)]
    chunk = max(1, min(64, len(args) // (workers * 8)))
    with worker_pool(workers) as pool:
        return list(track(pool.map(_probe_star, args, chunksize=chunk), **bar))


# --------------------------------------------------------------------------------------------- cache
CACHE_COLUMNS = {
    "key": "string",  # "path|size|mtime_ns|ctime_ns|inode|mask stat"
    "width": "int32",
    "height": "int32",
    "content_hash": "string",
    "ok": "bool",
    "reason": "string",
}


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return "missing"
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def cache_key(path: str, mask_path: str | None) -> str:
    """``(path, size, mtime_ns, ctime_ns, inode)`` of the image (and of its mask): a changed file gets a
    new key, even one rewritten with its old size and a restored mtime (the kernel sets ctime)."""
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
    limits: Limits = LIMITS,
) -> tuple[list[Probe], dict[str, int]]:
    """Probe every ``(path, mask_path)``, decoding only those not in the cache. Returns probes and counts."""
    cache = DecodeCache(cache_path)
    keys = [cache_key(p, m) for p, m in jobs]
    results: dict[int, Probe] = {i: cache.entries[k] for i, k in enumerate(keys) if k in cache.entries}
    todo = [i for i in range(len(jobs)) if i not in results]
    fresh = probe_many([jobs[i] for i in todo], min_side=0, workers=workers, limits=limits)
    for i, p in zip(
        todo, fresh, strict=True
    ):  # a file that appears later gets a new key: absence is cacheable
        results[i] = p
        if not p.reason.startswith((BUDGET_PREFIX, TOO_LARGE_PREFIX)):  # those change with the limits
            cache.entries[keys[i]] = p
    cache.save(keys)
    probes = [with_min_side(results[i], min_side) for i in range(len(jobs))]
    return probes, {"decoded": len(todo), "cached": len(jobs) - len(todo)}
