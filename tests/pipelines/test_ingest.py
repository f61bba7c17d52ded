"""``kedro run --pipeline=ingest`` end to end on a small scenes config, twice."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pycocotools.coco import COCO

from maelab.data.manifest import MANIFEST_COLUMNS, image_path, mask_file

SMALL = """
ingest:
  workers: 2
  sources:
    - type: scenes
      root: data/01_raw/scenes
      seed: 7
      size: 64
      splits: {train: 40, val: 10}
    - type: photos
      root: data/01_raw/photos
      split: unlabeled
      skimage: [astronaut, camera]
"""


@pytest.mark.slow
def test_ingest_pipeline_runs_and_reruns_without_decoding(kedro_project: Path, kedro_run) -> None:
    (kedro_project / "src").mkdir(exist_ok=True)  # bootstrap_project wants source_dir; maelab is installed
    (kedro_project / "conf" / "local" / "parameters_ingest.yml").write_text(SMALL)
    kedro_run(kedro_project, "ingest")

    data = kedro_project / "data"
    manifest = pd.read_parquet(data / "02_intermediate" / "manifest.parquet")
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest.groupby(["source", "split"]).size().to_dict() == {
        ("photos", "unlabeled"): 2,
        ("scenes", "train"): 40,
        ("scenes", "val"): 10,
    }
    scenes = manifest[manifest.source == "scenes"]
    assert (scenes.width == 64).all() and (scenes.height == 64).all()
    assert scenes.label.notna().all() and scenes.mask_path.notna().all() and scenes.ann_id.notna().all()
    assert all(image_path(r).exists() and mask_file(r).exists() for _, r in scenes.iterrows())
    photos = manifest[manifest.source == "photos"].set_index("path")
    assert (photos.loc["astronaut.png", "width"], photos.loc["camera.png", "height"]) == (512, 512)

    quarantine = pd.read_csv(data / "08_reporting" / "ingest_quarantine.csv")
    assert {"file", "source", "reason"} <= set(quarantine.columns) and len(quarantine) == 0

    instances = data / "03_primary" / "instances_scenes_val.json"
    api = COCO(str(instances))
    val = scenes[scenes.split == "val"].set_index("ann_id")
    assert sorted(api.getImgIds()) == sorted(val.index)
    for im in api.loadImgs(api.getImgIds()):
        assert im["file_name"] == val.loc[im["id"], "path"]
        assert (kedro_project / api.dataset["info"]["maelab_root"] / im["file_name"]).exists()
    assert len(api.getAnnIds()) >= 10 and len(api.getCatIds()) >= 8

    summary = json.loads((data / "08_reporting" / "ingest_summary.json").read_text())
    assert summary["decoded"] == 52 and summary["cached"] == 0 and summary["quarantined"] == 0

    # the second run on unchanged inputs generates nothing and decodes nothing
    kedro_run(kedro_project, "ingest")
    summary = json.loads((data / "08_reporting" / "ingest_summary.json").read_text())
    assert summary["decoded"] == 0 and summary["cached"] == 52
    assert summary["prepared"][0]["generated"] is False
    pd.testing.assert_frame_equal(pd.read_parquet(data / "02_intermediate" / "manifest.parquet"), manifest)
