"""Fill a :class:`~maelab.regions.store.SourceStore` from manifest rows: parallel, incremental, safe to kill.

- Incremental: a row is computed only when its ``image_id`` is missing from the index, or its ``content_hash``
  or the source's parameter ``fingerprint`` changed.
- Parallel: pending rows (sorted by image_id) are cut into shards of ``shard_size``; each shard is one task
  in a process pool; the worker computes, compresses and writes its shard atomically and returns index rows.
- Safe to kill: the parent adds a shard's rows to the index (atomic swap) only after the shard is on disk.
  Fixed-size chunks of the sorted pending list and content-named shards make a killed-then-resumed run end
  with the same shard files and index as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import pandas as pd

from maelab.data.manifest import image_path
from maelab.pools import worker_pool
from maelab.progress import progress as progress_bar
from maelab.regions.sources import RegionSource, read_rgb
from maelab.regions.store import SourceStore, encode, make_records, write_shard

_WORKER_SOURCE: RegionSource | None = None  # set once per pool process (panoptic JSON etc. load once)


def pending(rows: pd.DataFrame, index: pd.DataFrame, fingerprint: str) -> pd.DataFrame:
    """Rows that are new, whose image changed, or that were computed with other source parameters."""
    stored = index.set_index("image_id")
    fp = rows["image_id"].map(stored["fingerprint"]).astype("string")
    hash_stored = rows["image_id"].map(stored["content_hash"]).astype("string").fillna("")
    stale = (
        fp.isna() | (fp != fingerprint) | (hash_stored != rows["content_hash"].astype("string").fillna(""))
    )
    return (
        rows[stale.fillna(True).to_numpy(dtype=bool)]
        .sort_values("image_id", kind="stable")
        .reset_index(drop=True)
    )


def compute_one(source: RegionSource, row: dict[str, Any]) -> Any:
    """``[S, H, W]`` maps of one row; errors name the image file."""
    path = image_path(row)
    try:
        image = read_rgb(path, row) if source.needs_image else None
        return source.compute(image, row)
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"regions.{source.name}: {path} (image_id {row['image_id']}): {e}") from e


def compute_shard(
    source: RegionSource, rows: list[dict[str, Any]], shard_dir: Any, codec: str
) -> list[dict[str, Any]]:
    """Compute, compress and atomically write one shard; return its index rows (not yet committed).
    A source with ``compute_batch(rows) -> [maps, ...]`` computes the shard's rows in one call (a teacher
    runs them as one batch); otherwise row by row."""
    batch = getattr(source, "compute_batch", None)
    computed = batch(rows) if batch is not None else [compute_one(source, row) for row in rows]
    items = []
    for row, maps in zip(rows, computed, strict=True):
        blob, dtype = encode(maps, codec)
        items.append((row["image_id"], row.get("content_hash") or "", maps, blob, dtype))
    shard, offsets = write_shard(shard_dir, [i[0] for i in items], [i[3] for i in items])
    return make_records(shard, offsets, items, source.fingerprint, codec, source.layers)


def _init_worker(source: RegionSource) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _run_shard(rows: list[dict[str, Any]], shard_dir: Any, codec: str) -> list[dict[str, Any]]:
    assert _WORKER_SOURCE is not None
    return compute_shard(_WORKER_SOURCE, rows, shard_dir, codec)


def _records(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain dicts (picklable, ``None`` for nulls) for the workers."""
    return [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in rows.to_dict("records")]


def build_source(
    store: SourceStore,
    source: RegionSource,
    rows: pd.DataFrame,
    *,
    workers: int | None = None,
    shard_size: int = 64,
    codec: str = "lzma",
    keep_ids: Iterable[str] | None = None,
    progress: bool = True,
    mp_context: str | None = None,
    exclusive: bool = True,
) -> dict[str, Any]:
    """Bring ``store`` up to date for ``rows`` (manifest rows). Returns a small report.

    workers: processes (None = all cores, 0 = in this process); keep_ids: ids still in the manifest —
    index rows of other ids (quarantined or deleted images) are dropped. Unreferenced shards are removed.
    exclusive=False is one of several concurrent runs on disjoint rows (``regions.shard``): it holds the store
    lock only while it commits, and neither drops ids nor removes files, which the other runs may still own.
    """
    t0 = time.perf_counter()
    if shard_size < 1:
        raise ValueError(f"regions.shard_size must be >= 1, got {shard_size}")
    if not exclusive:
        keep_ids = None
    with store.lock() if exclusive else contextlib.nullcontext():  # index and meta swaps are atomic
        store.refresh()
        store.write_meta(source)
        commit = store.commit if exclusive else functools.partial(_commit_shared, store)
        dropped: list[str] = []
        if keep_ids is not None:
            keep = set(keep_ids)
            dropped = [i for i in store.ids() if i not in keep]
            if dropped:
                store.commit(drop=dropped)
        todo = pending(rows, store.index, source.fingerprint)
        chunks = [_records(todo.iloc[i : i + shard_size]) for i in range(0, len(todo), shard_size)]
        desc = f"{getattr(source, 'store_kind', 'regions')}[{source.name}]"
        bar = progress_bar(len(todo), desc, "img", enabled=bool(progress and len(todo)))
        try:
            if workers == 0:
                for chunk in chunks:
                    commit(compute_shard(source, chunk, store.shard_dir, codec))
                    bar.update(len(chunk))
            elif chunks:
                _run_pool(store, source, chunks, codec, workers, mp_context, bar, commit)
        finally:
            bar.close()
        removed = store.gc() if exclusive else 0
    seconds = time.perf_counter() - t0
    return {
        "source": source.name,
        "fingerprint": source.fingerprint,
        "selected": int(len(rows)),
        "computed": int(len(todo)),
        "up_to_date": int(len(rows) - len(todo)),
        "dropped": len(dropped),
        "shards_written": len(chunks),
        "files_removed": removed,
        "stored": len(store),
        "bytes": store.nbytes(),
        "seconds": round(seconds, 3),
    }


def _commit_shared(store: SourceStore, records: list[dict[str, Any]]) -> None:
    """Commit under the blocking lock, onto the index as the other shard runs left it."""
    with store.lock(wait=True):
        store.refresh()
        store.commit(records)


def shard_of(image_id: str, count: int) -> int:
    """Stable shard of an id (BLAKE2b: CRC-32's low bits hardly differ between ``img:1``, ``img:2``, ...)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") % count


def shard_rows(rows: pd.DataFrame, index: int, count: int) -> pd.DataFrame:
    """The rows of shard ``index`` of ``count``: a stable hash of ``image_id``, whatever the row order."""
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(
            f"regions.shard: need integers 0 <= index < count, got index={index!r} count={count!r}"
        )
    keep = rows["image_id"].astype(str).map(lambda i: shard_of(i, count) == index).to_numpy(dtype=bool)
    return rows[keep]


def _run_pool(
    store: SourceStore,
    source: RegionSource,
    chunks: list[list[dict[str, Any]]],
    codec: str,
    workers: int | None,
    mp_context: str | None,
    bar: Any,
    commit: Callable[[list[dict[str, Any]]], None],
) -> None:
    n = min(workers or mp.cpu_count(), len(chunks))
    pool = worker_pool(n, initializer=_init_worker, initargs=(source,), mp_context=mp_context)
    try:
        futures: dict[Future, int] = {
            pool.submit(_run_shard, c, store.shard_dir, codec): len(c) for c in chunks
        }
        waiting = set(futures)
        while waiting:
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for fut in done:
                commit(fut.result())  # raises the worker's error; shards already indexed stay
                bar.update(futures[fut])
    except BaseException:
        # running shards still land atomically (unindexed; the next run rewrites or removes them)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
