"""Nodes of the ``regions`` pipeline (R-MAE §4.1: regions are precomputed once, before pre-training)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from maelab.data.manifest import select_rows
from maelab.regions.build import build_source, shard_rows
from maelab.regions.sources import make_source
from maelab.regions.store import RegionStore

REQUIRED = ("image_id", "source", "split", "root", "path", "content_hash", "width", "height")


def check_manifest(manifest: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in manifest]
    if missing:
        raise ValueError(f"manifest (catalog entry 'manifest'): missing field(s) {missing}")
    dup = manifest["image_id"][manifest["image_id"].duplicated()]
    if len(dup):
        raise ValueError(
            f"manifest (catalog entry 'manifest'): field 'image_id' repeats, e.g. {dup.iloc[0]!r}"
        )


def compute_regions(
    manifest: pd.DataFrame, region_store: RegionStore, params: dict[str, Any]
) -> tuple[RegionStore, dict[str, Any]]:
    """Bring every source in ``params["compute"]`` up to date for its selected images; return the store
    (written shard by shard through this handle) and the run report.

    Quarantined images are absent from the manifest, so they are never computed; with ``prune`` their stale
    maps (and those of deleted images) leave the index. ``params["shard"] = {index, count}`` (set by the
    Prefect flow that runs ``count`` of these at once) computes only that shard's images and never prunes.
    """
    check_manifest(manifest)
    shard = params.get("shard") or {}
    count = shard.get("count", 1)
    sharded = count != 1
    images = params.get("images") or {}
    configured = params.get("sources") or {}
    report: dict[str, Any] = {}
    for name in params.get("compute") or []:
        if name not in configured:
            raise ValueError(
                f"regions.compute: {name!r} has no block under regions.sources ({sorted(configured)})"
            )
        cfg = configured[name] or {}
        rows = select_rows(
            manifest,
            cfg.get("sources", images.get("sources")),
            cfg.get("splits", images.get("splits")),
            allow_empty=True,
        )
        if sharded:
            rows = shard_rows(rows, shard.get("index"), count)
        report[name] = build_source(
            region_store[name],
            make_source(name, cfg),
            rows,
            workers=params.get("workers"),
            shard_size=int(params.get("shard_size", 64)),
            codec=region_store.codec,
            keep_ids=manifest["image_id"].tolist() if params.get("prune", True) else None,
            progress=bool(params.get("progress", True)),
            exclusive=not sharded,
        )
    return region_store, {"store": str(region_store.path), "shard": shard or None, "sources": report}
