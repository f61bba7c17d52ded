"""Ingest nodes: materialise generated sources, list every source, decode each image once, write the manifest.

Side effects are limited to generation (``prepare_sources``) and the decode cache (``decode_images``);
everything else goes through the catalog.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import pandas as pd

from maelab.data.decode import Limits, Probe, decode_all
from maelab.data.manifest import conform
from maelab.data.photos import DEFAULT_PHOTOS, copy_skimage_photos
from maelab.data.scenes import ScenesConfig, generate
from maelab.data.sources import Listing, read_source, resolve_root, same_files, source_name

log = logging.getLogger(__name__)

QUARANTINE_COLUMNS = ["file", "source", "split", "image_id", "reason"]


def _sources(ingest: dict) -> list[dict]:
    sources = ingest.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError(
            "parameters_ingest.yml: ingest.sources: expected a non-empty list of {type, root, ...}"
        )
    return sources


def prepare_sources(ingest: dict[str, Any]) -> dict[str, Any]:
    """Generate ``scenes`` and copy the ``photos`` demo images, each skipped when already up to date."""
    workers = int(ingest.get("workers", 2))
    report = []
    for cfg in _sources(ingest):
        if cfg.get("type") == "scenes":
            stats = generate(resolve_root(cfg["root"]), ScenesConfig.from_params(cfg), workers=workers)
            report.append({"source": source_name(cfg), **stats})
        elif cfg.get("type") == "photos" and cfg.get("skimage", DEFAULT_PHOTOS):
            files = copy_skimage_photos(resolve_root(cfg["root"]), list(cfg.get("skimage", DEFAULT_PHOTOS)))
            report.append({"source": source_name(cfg), "images": len(files)})
    return {"prepared": report}


def list_images(ingest: dict[str, Any], prepared: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Read every source's layout. Returns candidate rows and COCO-format annotations by output stem.

    ``prepared`` only orders this node after generation.
    """
    merged = Listing()
    for cfg in _sources(ingest):
        listing = read_source(cfg)
        log.info("ingest: %s lists %d images", source_name(cfg), len(listing.rows))
        merged.rows += listing.rows
        clash = set(merged.annotations) & set(listing.annotations)
        if clash:
            raise ValueError(f"ingest.sources: two sources write {sorted(clash)}; give one a distinct `name`")
        merged.annotations.update(listing.annotations)
    if not merged.rows:
        raise ValueError("ingest: the configured sources list no images (check ingest.sources roots)")
    candidates = pd.DataFrame(merged.rows)
    dup = candidates["image_id"].duplicated(keep=False)
    if dup.any():
        raise ValueError(
            f"ingest: duplicate image_id {candidates.loc[dup, 'image_id'].iloc[0]!r}: "
            "two sources share a `name`, or a JSON lists one file twice"
        )
    return candidates, merged.annotations


def decode_images(candidates: pd.DataFrame, ingest: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Decode each candidate once (cached by path, size, mtime_ns). Returns per-row probes and timing."""
    t0 = time.perf_counter()
    reject = candidates["reject"] if "reject" in candidates else pd.Series(None, index=candidates.index)
    keep = reject.isna().to_numpy()
    jobs = [
        (f, None if pd.isna(m) else m)
        for f, m in zip(candidates["file"][keep], candidates["mask_file"][keep], strict=True)
    ]
    probed, counts = decode_all(
        jobs,
        cache_path=resolve_root(ingest.get("cache", "data/02_intermediate/decode_cache.parquet")),
        min_side=int(ingest.get("min_side", 16)),
        workers=int(ingest.get("workers", 2)),
        limits=Limits.from_params(ingest),
    )
    it = iter(probed)  # rejected rows (e.g. a name that is not UTF-8) are quarantined unread
    probes = [next(it) if k else Probe(0, 0, "", False, str(r)) for k, r in zip(keep, reject, strict=True)]
    seconds = time.perf_counter() - t0
    decoded = pd.DataFrame(
        [asdict(p) for p in probes], columns=["width", "height", "content_hash", "ok", "reason"]
    )
    stats = {
        **counts,
        "decode_seconds": round(seconds, 3),
        "decoded_images_per_s": round(counts["decoded"] / seconds, 1) if counts["decoded"] else None,
    }
    log.info("ingest: decoded %d, from cache %d, in %.1f s", counts["decoded"], counts["cached"], seconds)
    return decoded, stats


def build_manifest(candidates: pd.DataFrame, decoded: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Good images -> manifest (``MANIFEST_COLUMNS``); bad ones -> quarantine rows with their reason."""
    df = pd.concat([candidates.reset_index(drop=True), decoded.reset_index(drop=True)], axis=1)
    if "json_width" in df:  # annotations describe the image as the JSON states it: sizes must agree
        stated = df["json_width"].notna()
        w, h = df["json_width"], df["json_height"]
        off = df["ok"] & stated & ((w != df["width"]) | (h != df["height"]))
        df.loc[off, "reason"] = [
            f"size {a}x{b} != {int(c)}x{int(d)} stated in the annotation JSON"
            for a, b, c, d in zip(df.loc[off, "width"], df.loc[off, "height"], w[off], h[off], strict=True)
        ]
        df.loc[off, "ok"] = False
    ok = df.index[df["ok"]]
    for i, j in same_files(df.loc[ok, "file"].tolist()).items():  # one file under two ids: keep the first
        df.loc[ok[i], ["ok", "reason"]] = [False, f"same file as {df.loc[ok[j], 'image_id']}"]
    good, bad = df[df["ok"]], df[~df["ok"]]
    quarantine = pd.DataFrame(
        {
            "file": [f"{r}/{p}" for r, p in zip(bad["root"], bad["path"], strict=True)],
            "source": bad["source"].values,
            "split": bad["split"].values,
            "image_id": bad["image_id"].values,
            "reason": bad["reason"].values,
        },
        columns=QUARANTINE_COLUMNS,
    )
    if len(quarantine):
        log.warning(
            "ingest: %d file(s) quarantined, e.g. %s: %s",
            len(quarantine),
            quarantine["file"].iloc[0],
            quarantine["reason"].iloc[0],
        )
    return conform(good), quarantine


def pack_shards(manifest: pd.DataFrame, ingest: dict[str, Any]) -> dict[str, Any]:
    """``ingest.shards: {dir, images_per_shard}``: the manifest's images packed into WebDataset-style tar
    shards with an index (``maelab.data.shards``), for ``data.shards`` in training; unset: nothing."""
    cfg = ingest.get("shards") or {}
    if not cfg:
        return {"shards": 0}
    from maelab.data.shards import write_shards

    folder = resolve_root(cfg.get("dir") or "data/02_intermediate/shards")
    index = write_shards(manifest, folder, int(cfg.get("images_per_shard", 1000)))
    log.info("packed %d images into %d shards in %s", len(index), index["shard"].nunique(), folder)
    return {"dir": str(folder), "images": len(index), "shards": int(index["shard"].nunique())}


def export_annotations(annotations: dict[str, dict], manifest: pd.DataFrame) -> dict[str, dict]:
    """COCO-format JSON per detection source/split, limited to the manifest's images.

    Image ids are the manifest's ``ann_id``; ``file_name`` is the manifest's ``path`` (relative to the source
    root, stored in ``info.maelab_root``). Panoptic PNG paths are relative to that root too.
    """
    out = {}
    for stem, entry in sorted(annotations.items()):
        rows = manifest[(manifest["source"] == entry["source"]) & (manifest["split"] == entry["split"])]
        path_of = dict(
            zip(rows["ann_id"].dropna().astype(int), rows.loc[rows["ann_id"].notna(), "path"], strict=True)
        )
        data = entry["data"]
        images = [{**im, "file_name": path_of[im["id"]]} for im in data["images"] if im["id"] in path_of]
        anns = [a for a in data.get("annotations", []) if a["image_id"] in path_of]
        info = {
            **(data.get("info") or {}),
            "maelab_source": entry["source"],
            "maelab_split": entry["split"],
            "maelab_root": entry["root"],
        }
        out[stem] = {**data, "info": info, "images": images, "annotations": anns}
        dropped = len(data["images"]) - len(images)
        if dropped:
            log.warning("ingest: %s: %d quarantined image(s) left out", stem, dropped)
    return out


def summarize(
    prepared: dict[str, Any], decode_stats: dict[str, Any], manifest: pd.DataFrame, quarantine: pd.DataFrame
) -> dict[str, Any]:
    """What this run did, for ``data/08_reporting/ingest_summary.json``."""
    per_source = manifest.groupby(["source", "split"]).size()
    return {
        **prepared,
        **decode_stats,
        "images": int(len(manifest)),
        "quarantined": int(len(quarantine)),
        "per_source": {f"{s}/{p}": int(n) for (s, p), n in per_source.items()},
    }
