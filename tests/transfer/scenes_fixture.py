"""A tiny scenes dataset laid out like ingest's output (manifest + COCO JSON), for the transfer tests.

Used by tests/transfer and tests/pipelines/test_transfer.py (loaded by path: tests have no packages).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from maelab.data.manifest import conform
from maelab.data.scenes import CATEGORIES, ScenesConfig, generate


def make_scenes(
    project: Path, n_train: int = 16, n_val: int = 8, size: int = 64, seed: int = 0
) -> pd.DataFrame:
    """Generate scenes under ``project/data/01_raw/scenes``; write the manifest and
    ``data/03_primary/instances_scenes_<split>.json``. Paths in the manifest are relative to ``project``."""
    root_rel = "data/01_raw/scenes"
    root = project / root_rel
    cfg = ScenesConfig.from_params(
        {"seed": seed, "size": size, "splits": {"train": n_train, "val": n_val}, "min_visible": 12}
    )
    generate(root, cfg, workers=1)
    rows = []
    primary = project / "data" / "03_primary"
    primary.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        shutil.copy(
            root / "annotations" / f"instances_{split}.json", primary / f"instances_scenes_{split}.json"
        )
        for im in coco["images"]:
            cat = int(im["scene_class"])
            rows.append(
                {
                    "image_id": f"scenes:{split}:{im['id']}",
                    "source": "scenes",
                    "split": split,
                    "root": root_rel,
                    "path": f"images/{split}/{im['file_name']}",
                    "width": im["width"],
                    "height": im["height"],
                    "content_hash": "",
                    "label": cat - 1,
                    "label_name": CATEGORIES[cat - 1],
                    "mask_path": im["semantic_mask"],
                    "ann_id": im["id"],
                }
            )
    manifest = conform(pd.DataFrame(rows))
    (project / "data" / "02_intermediate").mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(project / "data" / "02_intermediate" / "manifest.parquet", index=False)
    return manifest
