"""The regions pipeline in memory on a tiny manifest (one shard, the rest, then nothing), and its nodes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError
from PIL import Image
from skimage.segmentation import felzenszwalb

from maelab.data.manifest import conform
from maelab.datasets import RegionStoreDataset
from maelab.pipelines.regions import create_pipeline
from maelab.pipelines.regions.nodes import check_manifest, select_rows
from maelab.regions.build import shard_rows
from maelab.regions.store import RegionStore

PARAMS = {
    "compute": ["fh"],
    "images": {"sources": ["toy"], "splits": ["train"]},
    "workers": 0,
    "shard_size": 2,
    "progress": False,
    "sources": {"fh": {"type": "fh", "scales": [30, 90]}},
}


def toy_manifest(root) -> pd.DataFrame:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        img = np.zeros((32, 40, 3), np.uint8)
        img[: 8 + 4 * i, : 10 + 3 * i] = rng.integers(0, 256, 3)
        img = np.clip(img + rng.integers(0, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        split = "val" if i == 4 else "train"  # not selected
        rows.append(
            {
                "image_id": f"toy:{split}:{i}",
                "source": "toy",
                "split": split,
                "root": str(root),
                "path": f"{i}.png",
                "width": 40,
                "height": 32,
                "content_hash": f"h{i}",
            }
        )
    return conform(pd.DataFrame(rows))


def test_regions_pipeline_in_memory_is_incremental(tmp_path, run_memory) -> None:
    manifest = toy_manifest(tmp_path / "toy")
    store_dir = tmp_path / "regions"

    def run(params):
        inputs = {
            "manifest": manifest,
            "region_store_previous": RegionStoreDataset(str(store_dir)),
            "region_store": RegionStoreDataset(str(store_dir)),
        }
        out = run_memory(create_pipeline(), inputs, {"regions": params})
        assert isinstance(out["region_store"], RegionStore) and out["region_store"].path == store_dir
        return out["regions_report"]

    # one shard of two (what the Prefect flow's sharded run passes): only its images, nothing pruned
    report = run({**PARAMS, "shard": {"index": 1, "count": 2}})
    mine = shard_rows(pd.DataFrame({"image_id": [f"toy:train:{i}" for i in range(4)]}), 1, 2)
    assert 0 < len(mine) < 4 and report["shard"] == {"index": 1, "count": 2}
    fh = report["sources"]["fh"]
    assert (fh["selected"], fh["computed"], fh["stored"]) == (len(mine), len(mine), len(mine))

    fh = run(PARAMS)["sources"]["fh"]  # the whole selection: the other shard's images are computed
    assert (fh["selected"], fh["computed"], fh["up_to_date"], fh["stored"]) == (
        4,
        4 - len(mine),
        len(mine),
        4,
    )
    store = RegionStore(store_dir)["fh"]
    assert sorted(store.ids()) == [f"toy:train:{i}" for i in range(4)]
    img = np.asarray(Image.open(tmp_path / "toy" / "2.png"))
    np.testing.assert_array_equal(store.get("toy:train:2")[1], felzenszwalb(img, scale=90, min_size=90) + 1)

    fh = run(PARAMS)["sources"]["fh"]  # nothing changed: nothing recomputed
    assert fh["computed"] == 0 and fh["up_to_date"] == 4


def test_select_rows_and_manifest_checks() -> None:
    manifest = pd.DataFrame({"source": ["a", "a", "b"], "split": ["train", "val", "train"]})
    assert len(select_rows(manifest, ["a"], None)) == 2 and len(select_rows(manifest, None, ["train"])) == 2
    with pytest.raises(ValueError, match=r"manifest \(catalog entry 'manifest'\): missing field"):
        check_manifest(manifest)


def test_an_unconfigured_source_names_the_field(tmp_path) -> None:
    from maelab.pipelines.regions.nodes import compute_regions

    manifest = toy_manifest(tmp_path / "toy")
    with pytest.raises(ValueError, match=r"regions\.compute: 'sam2' has no block"):
        compute_regions(manifest, RegionStore(tmp_path / "r"), {**PARAMS, "compute": ["sam2"]})


def test_saving_a_handle_on_another_folder_fails(tmp_path) -> None:
    with pytest.raises(DatasetError, match="cannot be saved"):
        RegionStoreDataset(str(tmp_path / "a")).save(RegionStore(tmp_path / "b"))
