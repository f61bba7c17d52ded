"""A tiny scenes dataset laid out like ingest's output (manifest + COCO JSON), for the transfer tests.

Used by tests/transfer, tests/pipelines/test_transfer.py and test_rmae_full.py (loaded by path: no packages).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from maelab.data.manifest import conform
from maelab.data.scenes import CATEGORIES, ScenesConfig, generate

SMALL_TASK = {"img_size": 32, "steps": 2, "warmup_steps": 1, "batch_size": 4}
# transfer.tasks for the micro end-to-end runs: every task, a few steps on 32 px images, tiny heads
MICRO_TASKS = {
    "linear_probe": {"img_size": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 8, "seeds": [0]},
    "knn_probe": {"img_size": 32, "k": 3, "seeds": [0]},
    "seg_probe": {"img_size": 32, "epochs": 1, "batch_size": 4, "seeds": [0]},
    "fg_probe": {"img_size": 32, "epochs": 1, "batch_size": 4, "seeds": [0]},
    "supervised_reference": {**SMALL_TASK, "widths": [8, 8], "seeds": [0]},
    "finetune": SMALL_TASK,
    "detection": {
        **SMALL_TASK,
        "batch_size": 2,
        "out_channels": 16,
        "head_channels": 16,
        "fc_dim": 32,
        "window_size": 2,
        "eval_batch_size": 4,
        "anchor_sizes": [8, 16, 32, 64, 128],
    },
    "segmentation": {**SMALL_TASK, "decoder_channels": 16, "aux_channels": 8},
}


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
