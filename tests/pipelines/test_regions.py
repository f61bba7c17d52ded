"""End to end: ``kedro run --pipeline=regions`` on a tiny manifest, then an incremental re-run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.segmentation import felzenszwalb

from maelab.data.manifest import conform
from maelab.regions.build import shard_rows
from maelab.regions.store import SourceStore


@pytest.mark.slow
def test_regions_pipeline_end_to_end(kedro_project, kedro_run):
    (kedro_project / "src").mkdir(
        exist_ok=True
    )  # bootstrap_project wants the source dir (maelab is installed)
    images = kedro_project / "data" / "01_raw" / "toy"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        img = np.zeros((32, 40, 3), np.uint8)
        img[: 8 + 4 * i, : 10 + 3 * i] = rng.integers(0, 256, 3)
        img = np.clip(img + rng.integers(0, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(images / f"{i}.png")
        split = "val" if i == 4 else "train"  # not selected
        rows.append(
            {
                "image_id": f"toy:{split}:{i}",
                "source": "toy",
                "split": split,
                "root": str(images),
                "path": f"{i}.png",
                "width": 40,
                "height": 32,
                "content_hash": f"h{i}",
            }
        )
    conform(pd.DataFrame(rows)).to_parquet(kedro_project / "data" / "02_intermediate" / "manifest.parquet")
    local = kedro_project / "conf" / "local"
    (local / "catalog_manifest.yml").write_text(
        "manifest:\n  type: pandas.ParquetDataset\n  filepath: data/02_intermediate/manifest.parquet\n"
    )
    (local / "parameters_regions.yml").write_text(
        "regions:\n  images: {sources: [toy], splits: [train]}\n  workers: 2\n  shard_size: 2\n"
        "  progress: false\n"
        "  sources:\n    fh: {scales: [30, 90]}\n"
    )

    # one shard of two (what the Prefect flow's sharded run passes): only its images, nothing pruned
    kedro_run(kedro_project, "regions", {"regions": {"shard": {"index": 1, "count": 2}}})
    report = json.loads((kedro_project / "data" / "08_reporting" / "regions_report.json").read_text())
    mine = shard_rows(pd.DataFrame({"image_id": [f"toy:train:{i}" for i in range(4)]}), 1, 2)
    assert 0 < len(mine) < 4 and report["shard"] == {"index": 1, "count": 2}
    fh = report["sources"]["fh"]
    assert (fh["selected"], fh["computed"], fh["stored"]) == (len(mine), len(mine), len(mine))

    kedro_run(kedro_project, "regions")  # the whole selection: the other shard's images are computed
    report = json.loads((kedro_project / "data" / "08_reporting" / "regions_report.json").read_text())
    fh = report["sources"]["fh"]
    assert (fh["selected"], fh["computed"], fh["up_to_date"], fh["stored"]) == (
        4,
        4 - len(mine),
        len(mine),
        4,
    )

    store = SourceStore(kedro_project / "data" / "04_feature" / "regions" / "fh")
    assert sorted(store.ids()) == [f"toy:train:{i}" for i in range(4)]
    img = np.asarray(Image.open(images / "2.png"))
    np.testing.assert_array_equal(store.get("toy:train:2")[1], felzenszwalb(img, scale=90, min_size=90) + 1)

    kedro_run(kedro_project, "regions")  # nothing changed: nothing recomputed
    report = json.loads((kedro_project / "data" / "08_reporting" / "regions_report.json").read_text())
    assert report["sources"]["fh"]["computed"] == 0 and report["sources"]["fh"]["up_to_date"] == 4
