"""The image manifest: one parquet row per decodable image, whatever the source.

Columns (all sources write all of them; missing values are null):

==============  =========  =====================================================================
column          dtype      meaning
==============  =========  =====================================================================
image_id        string     unique across the manifest, ``"{source}:{split}:{native id}"``
source          string     scenes, coco, lvis, imagefolder, ade20k, flowers102, photos
split           string     ``train`` | ``val`` | ``test`` | ``unlabeled``
root            string     the source's root folder as configured (absolute, or relative to the project)
path            string     image file, relative to ``root``
width, height   int32      after EXIF orientation
content_hash    string     sha1 of the file bytes
label           Int32      image-level class index (classification sources, scenes), else null
label_name      string     class name for ``label``
mask_path       string     semantic-mask PNG relative to ``root`` (segmentation sources), else null
ann_id          Int64      native image id in the COCO/LVIS JSON (detection sources), else null
==============  =========  =====================================================================

Use :func:`image_path` to resolve a row to a file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

MANIFEST_COLUMNS: dict[str, str] = {
    "image_id": "string",
    "source": "string",
    "split": "string",
    "root": "string",
    "path": "string",
    "width": "int32",
    "height": "int32",
    "content_hash": "string",
    "label": "Int32",
    "label_name": "string",
    "mask_path": "string",
    "ann_id": "Int64",
}


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()})


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing columns as null and cast every column to its manifest dtype."""
    df = df.copy()
    for col, dtype in MANIFEST_COLUMNS.items():
        if col not in df:
            df[col] = pd.Series([None] * len(df), dtype=dtype, index=df.index)
        df[col] = df[col].astype(dtype)
    return df[list(MANIFEST_COLUMNS)].reset_index(drop=True)


def image_path(row: pd.Series | dict) -> Path:
    return Path(row["root"]) / row["path"]


def mask_file(row: pd.Series | dict) -> Path | None:
    return None if pd.isna(row["mask_path"]) else Path(row["root"]) / row["mask_path"]


def select_rows(
    manifest: pd.DataFrame,
    sources: list[str] | None = None,
    splits: list[str] | None = None,
    *,
    where: str = "manifest",
    fields: tuple[str, str] = ("sources", "splits"),
    allow_empty: bool = False,
) -> pd.DataFrame:
    """Rows whose ``source`` is in ``sources`` and ``split`` in ``splits`` (None: any), index reset.

    No row left is an error naming the config ``fields`` and the (source, split) pairs present, unless
    ``allow_empty``."""
    keep = pd.Series(True, index=manifest.index)
    if sources is not None:
        keep &= manifest["source"].isin(list(sources))
    if splits is not None:
        keep &= manifest["split"].isin(list(splits))
    rows = manifest[keep.to_numpy(dtype=bool)]
    if rows.empty and not allow_empty:
        have = sorted(set(zip(manifest["source"].astype(str), manifest["split"].astype(str), strict=True)))
        asked = f"{fields[0]}={sources} {fields[1]}={splits}"
        raise ValueError(f"{where}: no rows for {asked}; (source, split) present: {have}")
    return rows.reset_index(drop=True)
