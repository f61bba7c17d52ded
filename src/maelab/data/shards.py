"""Packed shards for large datasets: WebDataset-style tar files plus an index for random access.

``ingest.shards: {dir, images_per_shard}`` makes ingest pack the accepted images, as their original
encoded bytes (never re-encoded), into ``shard-000000.tar``, ``shard-000001.tar``, ... in manifest order.
Each sample is two members sharing a key, as WebDataset reads them: ``<key>.<ext>`` (the image) and
``<key>.json`` (``image_id``, ``source``, ``split``, ``width``, ``height``, ``content_hash``).
``index.parquet`` keeps each image's shard and the byte offset and size of its data inside the tar, so
the training data set (``data.shards``) reads any sample with one ``seek`` + ``read`` (a map-style data
set needs random access; the order stays the sampler's, so resume stays exact).

Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0644) and shards are written atomically, so the
same manifest always gives byte-identical shards: DVC versions the folder and re-ingest changes no hash.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd

from maelab.data.decode import read_bounded
from maelab.data.manifest import image_path
from maelab.files import atomic_write

INDEX = "index.parquet"
INDEX_COLUMNS = {"image_id": "string", "shard": "string", "offset": "int64", "size": "int64"}


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_shards(manifest: pd.DataFrame, out_dir: str | Path, images_per_shard: int = 1000) -> pd.DataFrame:
    """Pack every manifest row's image into tar shards under ``out_dir``; returns (and writes) the index.
    Shards no longer needed (a smaller manifest) are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, names = [], set()
    for start in range(0, len(manifest), images_per_shard):
        part = manifest.iloc[start : start + images_per_shard]
        name = f"shard-{start // images_per_shard:06d}.tar"
        names.add(name)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:

            def add(name: str, data: bytes) -> int:
                """Add a member; returns where its data starts in the tar."""
                info, body = _member(name, data)
                start_of_data = tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors))
                tar.addfile(info, body)
                return start_of_data

            for i, (_, row) in enumerate(part.iterrows()):
                path = image_path(row)
                key = f"{start + i:09d}"
                data = read_bounded(path, 1 << 40)
                meta = {k: _plain(row[k]) for k in ("image_id", "source", "split", "width", "height")}
                meta["content_hash"] = _plain(row.get("content_hash"))
                offset = add(f"{key}{Path(path).suffix.lower() or '.img'}", data)
                rows.append(
                    {"image_id": str(row["image_id"]), "shard": name, "offset": offset, "size": len(data)}
                )
                add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        atomic_write(out / name, lambda tmp, blob=buf.getvalue(): tmp.write_bytes(blob))
    for stale in out.glob("shard-*.tar"):
        if stale.name not in names:
            stale.unlink()
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).astype(INDEX_COLUMNS)
    atomic_write(out / INDEX, lambda tmp: index.to_parquet(tmp, index=False))
    return index


def _plain(value: object) -> object:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


class ShardReader:
    """The bytes of any image in a shard folder, by ``image_id``: one seek and one read."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = pd.read_parquet(self.folder / INDEX)
        cols = (index[c].tolist() for c in ("image_id", "shard", "offset", "size"))
        self.where = {str(i): (str(s), int(o), int(n)) for i, s, o, n in zip(*cols, strict=True)}
        self._files: dict[str, object] = {}  # opened lazily, per process (DataLoader workers fork)

    def __len__(self) -> int:
        return len(self.where)

    def read(self, image_id: str) -> bytes:
        try:
            shard, offset, size = self.where[image_id]
        except KeyError:
            raise KeyError(f"{self.folder}: no image {image_id!r} in the shard index") from None
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.folder / shard, "rb")  # noqa: SIM115 (kept open for reuse)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.folder / shard}: truncated at {image_id!r} ({len(data)} of {size} bytes)")
        return data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}
