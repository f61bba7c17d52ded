"""The ingest pipeline in memory on a small scenes config (twice: the second run decodes nothing), and its
nodes on small fixtures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pycocotools.coco import COCO

from maelab.data.manifest import MANIFEST_COLUMNS, image_path, mask_file
from maelab.pipelines.ingest import create_pipeline
from maelab.pipelines.ingest.nodes import export_annotations, summarize


def small(tmp_path: Path) -> dict:
    return {
        "workers": 0,
        "cache": str(tmp_path / "decode_cache.parquet"),
        "sources": [
            {
                "type": "scenes",
                "root": str(tmp_path / "scenes"),
                "seed": 7,
                "size": 64,
                "splits": {"train": 12, "val": 6},
            }
        ],
    }


def test_ingest_pipeline_in_memory_then_rerun_from_the_cache(tmp_path: Path, run_memory) -> None:
    params = {"ingest": small(tmp_path)}
    out = run_memory(create_pipeline(), {}, params)
    manifest = out["manifest"]
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest.groupby(["source", "split"]).size().to_dict() == {
        ("scenes", "train"): 12,
        ("scenes", "val"): 6,
    }
    assert (manifest.width == 64).all() and manifest.label.notna().all() and manifest.ann_id.notna().all()
    assert all(image_path(r).exists() and mask_file(r).exists() for _, r in manifest.iterrows())
    assert len(out["ingest_quarantine"]) == 0

    coco = out["coco_annotations"]
    assert set(coco) >= {"instances_scenes_train", "instances_scenes_val"}
    api = COCO()
    api.dataset = coco["instances_scenes_val"]
    api.createIndex()
    val = manifest[manifest.split == "val"].set_index("ann_id")
    assert sorted(api.getImgIds()) == sorted(val.index)
    assert all(im["file_name"] == val.loc[im["id"], "path"] for im in api.loadImgs(api.getImgIds()))
    assert out["ingest_summary"]["decoded"] == 18 and out["ingest_summary"]["cached"] == 0

    again = run_memory(create_pipeline(), {}, params)  # unchanged inputs: nothing generated or decoded
    assert again["ingest_summary"]["decoded"] == 0 and again["ingest_summary"]["cached"] == 18
    assert again["ingest_summary"]["prepared"][0]["generated"] is False
    pd.testing.assert_frame_equal(again["manifest"], manifest)


def test_export_annotations_keeps_only_manifest_images_and_names_files_by_path() -> None:
    data = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "annotations": [{"id": 10, "image_id": 1}, {"id": 11, "image_id": 2}],
        "categories": [{"id": 1, "name": "x"}],
    }
    annotations = {"instances_toy_val": {"source": "toy", "split": "val", "root": "r", "data": data}}
    manifest = pd.DataFrame({"source": ["toy"], "split": ["val"], "ann_id": [1.0], "path": ["images/a.png"]})
    out = export_annotations(annotations, manifest)["instances_toy_val"]
    assert [im["file_name"] for im in out["images"]] == ["images/a.png"]  # image 2 was quarantined
    assert [a["id"] for a in out["annotations"]] == [10]
    assert out["info"]["maelab_root"] == "r" and out["info"]["maelab_split"] == "val"


def test_summarize_counts_per_source_and_split() -> None:
    manifest = pd.DataFrame({"source": ["s", "s", "t"], "split": ["train", "val", "train"]})
    quarantine = pd.DataFrame({"file": ["bad.png"]})
    summary = summarize({"prepared": []}, {"decoded": 3}, manifest, quarantine)
    assert summary["images"] == 3 and summary["quarantined"] == 1
    assert summary["per_source"] == {"s/train": 1, "s/val": 1, "t/train": 1}


@pytest.mark.parametrize("sources", [[], None])
def test_ingest_without_sources_names_the_field(sources) -> None:
    from maelab.pipelines.ingest.nodes import prepare_sources

    with pytest.raises(ValueError, match=r"ingest\.sources"):
        prepare_sources({"sources": sources})
