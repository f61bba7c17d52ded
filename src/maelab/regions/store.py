"""The region store: label maps of every image, compressed in shards, indexed by ``image_id``.

Layout under the catalog path (one folder per region source, e.g. ``fh``, ``panoptic``, ``sam``)::

    <path>/<source>/meta.json          format version, source kind, parameters and their fingerprint
    <path>/<source>/index.parquet      one row per image (INDEX_COLUMNS), sorted by image_id
    <path>/<source>/shards/<hash>.bin  concatenated compressed records, named by a hash of their content

A record is one image's ``[S, H, W]`` maps (uint16, or int32 past 65535 labels), C order, compressed with
``codec`` (lzma preset 1 by default: label maps are long runs, ~100x smaller than raw uint16). Float arrays
keep their dtype (the teacher-feature store, ``maelab.teachers.store``, keeps ``[C, h, w]`` float16 features
in this same layout, uncompressed: codec ``raw``).
Writes are atomic: a shard is written to a temp file and ``os.replace``d; the index is rewritten the same
way only after its shards are on disk, so a killed run leaves at worst an unreferenced shard (removed by the
next run's :meth:`SourceStore.gc`). Reads use ``os.pread`` on shards opened lazily per process and kept in
a small LRU (:data:`MAX_OPEN_SHARDS` descriptors per store and process, whatever the shard count), so a store
handle can be shared with DataLoader workers (forked or pickled) under a low ``ulimit -n``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maelab.files import TMP_PREFIX, atomic_write, atomic_write_bytes
from maelab.pools import held_lock
from maelab.regions.sources import RegionSource, storage_dtype

FORMAT_VERSION = 1

INDEX_COLUMNS: dict[str, str] = {
    "image_id": "string",
    "content_hash": "string",  # of the image file (manifest), or "" when unknown
    "fingerprint": "string",  # of the source parameters that produced the maps
    "shard": "string",  # file name under shards/
    "offset": "int64",
    "length": "int64",
    "crc32": "int64",  # of the compressed record
    "codec": "string",
    "dtype": "string",  # uint16 | int32
    "layers": "int32",  # S
    "height": "int32",
    "width": "int32",
    "scales": "string",  # comma-separated layer names, e.g. "500,1000,1500"
    "num_segments": "string",  # comma-separated max label per layer
}

CODECS = ("lzma", "zlib", "raw")  # raw: stored as is (float features hardly compress)
MAX_OPEN_SHARDS = 32  # shard descriptors one store keeps open per process (LRU); ImageNet has ~5,000 shards


def encode(maps: np.ndarray, codec: str = "lzma") -> tuple[bytes, np.dtype]:
    """``[S, H, W]`` labels (or float features, kept in their dtype) -> (compressed bytes, stored dtype)."""
    dtype = maps.dtype if np.issubdtype(maps.dtype, np.floating) else storage_dtype(maps)
    raw = np.ascontiguousarray(maps, dtype=dtype).tobytes()
    if codec == "lzma":
        return lzma.compress(raw, preset=1), dtype
    if codec == "zlib":
        return zlib.compress(raw, 6), dtype
    if codec == "raw":
        return raw, dtype
    raise ValueError(f"regions codec: unknown {codec!r}, expected one of {CODECS}")


def decode(blob: bytes, codec: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    raw = lzma.decompress(blob) if codec == "lzma" else zlib.decompress(blob) if codec == "zlib" else blob
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


def write_shard(shard_dir: Path, ids: list[str], blobs: list[bytes]) -> tuple[str, list[int]]:
    """Concatenate ``blobs`` into one shard file, atomically. Returns (file name, offsets)."""
    data = b"".join(blobs)
    digest = hashlib.sha1("\n".join(ids).encode() + b"\0" + data).hexdigest()[:24]
    name = f"{digest}.bin"
    shard_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(shard_dir / name, data, fsync=True)
    offsets = np.cumsum([0] + [len(b) for b in blobs[:-1]]).tolist() if blobs else []
    return name, offsets


def make_records(
    shard: str,
    offsets: list[int],
    items: list[tuple[str, str, np.ndarray, bytes, np.dtype]],
    fingerprint: str,
    codec: str,
    scales: list[str],
) -> list[dict[str, Any]]:
    """Index rows for the records of one shard; ``items`` = (image_id, content_hash, maps, blob, dtype)."""
    records = []
    for offset, (image_id, content_hash, maps, blob, dtype) in zip(offsets, items, strict=True):
        s, h, w = maps.shape
        names = scales if len(scales) == s else [str(i) for i in range(s)]
        records.append(
            {
                "image_id": image_id,
                "content_hash": content_hash or "",
                "fingerprint": fingerprint,
                "shard": shard,
                "offset": offset,
                "length": len(blob),
                "crc32": zlib.crc32(blob),
                "codec": codec,
                "dtype": dtype.name,
                "layers": s,
                "height": h,
                "width": w,
                "scales": ",".join(names),
                "num_segments": ""  # float features have no segments
                if np.issubdtype(dtype, np.floating)
                else ",".join(str(int(m.max())) if m.size else "0" for m in maps),
            }
        )
    return records


def _conform_index(df: pd.DataFrame) -> pd.DataFrame:
    for col, dtype in INDEX_COLUMNS.items():
        if col not in df:
            df[col] = pd.Series([None] * len(df), dtype=dtype, index=df.index)
        df[col] = df[col].astype(dtype)
    return df[list(INDEX_COLUMNS)].sort_values("image_id", kind="stable").reset_index(drop=True)


class SourceStore:
    """One region source's shards + index. ``get(image_id)`` -> ``[S, H, W]`` maps."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index_path = self.path / "index.parquet"
        self.meta_path = self.path / "meta.json"
        self.shard_dir = self.path / "shards"
        self._index: pd.DataFrame | None = None
        self._rows: dict[str, int] | None = None
        self._cols: dict[str, np.ndarray] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()  # shard -> fd, least recently used first
        self._pid = os.getpid()

    # -- index -------------------------------------------------------------------------------------------
    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            if self.index_path.is_file():
                try:
                    self._index = _conform_index(pd.read_parquet(self.index_path))
                except Exception as e:
                    raise ValueError(f"{self.index_path}: unreadable region index ({e})") from e
            else:
                self._index = _conform_index(pd.DataFrame())
        return self._index

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else {}

    def refresh(self) -> SourceStore:
        self._index, self._rows = None, None
        self._close()
        return self

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._lookup()

    def ids(self) -> list[str]:
        return self.index["image_id"].tolist()

    def _lookup(self) -> dict[str, int]:
        if self._rows is None:
            index = self.index
            self._rows = {k: i for i, k in enumerate(index["image_id"].tolist())}
            self._cols = {
                c: index[c].to_numpy()
                for c in ("shard", "offset", "length", "crc32", "codec", "dtype", "layers", "height", "width")
            }
        return self._rows

    def commit(self, records: Iterable[Mapping[str, Any]] = (), drop: Iterable[str] = ()) -> None:
        """Add/replace index rows for ``records``, remove ``drop`` ids; swap the index file atomically."""
        new = pd.DataFrame(list(records))
        gone = set(drop) | (set(new["image_id"]) if len(new) else set())
        old = self.index[~self.index["image_id"].isin(gone)]
        parts = [df for df in (old, _conform_index(new) if len(new) else None) if df is not None and len(df)]
        index = _conform_index(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.index_path, lambda tmp: index.to_parquet(tmp, index=False), fsync=True)
        self._index, self._rows = index, None

    def write_meta(self, source: RegionSource) -> None:
        meta = {
            "format": FORMAT_VERSION,
            "source": source.name,
            "kind": source.kind,
            "params": source.params,
            "fingerprint": source.fingerprint,
            "layers": source.layers,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            self.meta_path, (json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n").encode()
        )

    def append(
        self,
        items: Iterable[tuple[str, str, np.ndarray]],
        fingerprint: str = "",
        codec: str = "lzma",
        scales: list[str] | None = None,
    ) -> int:
        """Write ``(image_id, hash, maps [S, H, W])`` items as one indexed shard; returns the count."""
        encoded = [(i, c, m, *encode(np.asarray(m), codec)) for i, c, m in items]
        if not encoded:
            return 0
        shard, offsets = write_shard(self.shard_dir, [e[0] for e in encoded], [e[3] for e in encoded])
        self.commit(make_records(shard, offsets, encoded, fingerprint, codec, scales or []))
        return len(encoded)

    # -- maintenance -------------------------------------------------------------------------------------
    def gc(self) -> int:
        """Delete shards no index row references and temp files of killed runs; returns the count."""
        keep = set(self.index["shard"].tolist())
        removed = 0
        for d in (self.shard_dir, self.path):
            if not d.is_dir():
                continue
            for f in d.iterdir():
                if f.name.startswith(TMP_PREFIX) or (d == self.shard_dir and f.name not in keep):
                    f.unlink(missing_ok=True)
                    removed += 1
        return removed

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file() and f.name != ".lock")

    @contextlib.contextmanager
    def lock(self, wait: bool = False) -> Iterator[None]:
        """Exclusive writer lock (``flock`` on ``.lock``): two builds of one store never interleave.
        ``wait=False`` fails at once when another run holds it; ``wait=True`` blocks (shard commits)."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with held_lock(self.path / ".lock", wait=wait):
                yield
        except BlockingIOError:
            raise RuntimeError(f"{self.path}: another regions run holds the store lock") from None

    # -- reads -------------------------------------------------------------------------------------------
    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: open our own descriptors
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        while len(self._fds) >= MAX_OPEN_SHARDS:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        path = self.shard_dir / shard
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: shard listed in {self.index_path} (field 'shard') is missing"
            ) from None
        self._fds[shard] = fd
        return fd

    def get(self, image_id: str) -> np.ndarray:
        """The stored ``[S, H, W]`` label maps of ``image_id`` (read-only array; uint16 or int32)."""
        pos = self._lookup().get(image_id)
        if pos is None:
            raise KeyError(f"{self.index_path}: no regions for image_id {image_id!r}")
        r = {c: v[pos] for c, v in self._cols.items()}
        blob = os.pread(self._fd(r["shard"]), int(r["length"]), int(r["offset"]))
        if len(blob) != int(r["length"]) or zlib.crc32(blob) != int(r["crc32"]):
            raise OSError(f"{self.shard_dir / r['shard']}: record of {image_id!r} is corrupt (field 'crc32')")
        return decode(blob, r["codec"], r["dtype"], (int(r["layers"]), int(r["height"]), int(r["width"])))

    def _close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}  # descriptors and the cached index are per process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close()

    def __repr__(self) -> str:
        return f"SourceStore({str(self.path)!r})"


class RegionStore:
    """All region sources under one folder: ``store["fh"]`` -> :class:`SourceStore`; ``codec``: new shards."""

    def __init__(self, path: str | Path, codec: str = "lzma") -> None:
        if codec not in CODECS:
            raise ValueError(f"region store codec: unknown {codec!r}, expected one of {CODECS}")
        self.path = Path(path)
        self.codec = codec
        self._sources: dict[str, SourceStore] = {}

    def __getitem__(self, name: str) -> SourceStore:
        if name not in self._sources:
            self._sources[name] = SourceStore(self.path / name)
        return self._sources[name]

    def names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(d.name for d in self.path.iterdir() if (d / "index.parquet").is_file())

    def __repr__(self) -> str:
        return f"RegionStore({str(self.path)!r}, sources={self.names()})"
