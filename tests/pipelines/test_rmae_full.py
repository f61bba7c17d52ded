"""``kedro run --pipelines=rmae_full`` end to end on a micro config: raw scenes -> report.json,
with the pre-trained encoders registered in MLflow (first version = champion)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

_spec = importlib.util.spec_from_file_location(
    "scenes_fixture", Path(__file__).parents[1] / "transfer" / "scenes_fixture.py"
)
scenes_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_fixture)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}

MICRO = {
    "ingest": {
        "workers": 0,
        "sources": [
            {
                "type": "scenes",
                "root": "data/01_raw/scenes",
                "seed": 3,
                "size": 64,
                "splits": {"train": 12, "val": 6},
            }
        ],
    },
    "regions": {"workers": 0, "shard_size": 8, "progress": False, "sources": {"fh": {"scales": [20, 60]}}},
    "recipe_defaults": {
        "encoder": TINY,
        "data": {"num_workers": 0},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "ckpt_every": 0, "image_every": 0},
    },
    "recipes": {
        "rmae": {
            "data": {"regions": {"k": 2}},
            "heads": {
                "pixel": {"embed_dim": 16, "depth": 1, "num_heads": 2},
                "region": {"num_regions": 2, "dim": 16, "enc_dim": 16, "num_heads": 2, "enc_heads": 2},
            },
        },
        "mae": {"heads": {"pixel": {"embed_dim": 16, "depth": 1, "num_heads": 2}}},
    },
    "transfer": {
        "data": {"max_eval_images": 4},
        "tasks": scenes_fixture.MICRO_TASKS,
    },
}


@pytest.mark.slow
def test_rmae_full_goes_from_raw_images_to_the_report(kedro_project: Path, kedro_run) -> None:
    for stage in ("ingest", "regions", "pretrain", "transfer"):
        keys = {
            "ingest": ["ingest"],
            "regions": ["regions"],
            "pretrain": ["recipe_defaults", "recipes"],
            "transfer": ["transfer"],
        }[stage]
        (kedro_project / "conf/local" / f"parameters_{stage}.yml").write_text(
            yaml.safe_dump({k: MICRO[k] for k in keys})
        )
    kedro_run(kedro_project, "rmae_full")

    data = kedro_project / "data"
    report = json.loads((data / "08_reporting/report.json").read_text())
    rows = {r["recipe"]: r for r in report["rows"]}
    assert set(rows) == {"rmae", "mae", "random_init", "supervised_reference"}
    assert 0 <= rows["supervised_reference"]["finetune_top1"] <= 100
    for recipe in ("rmae", "mae", "random_init"):
        for key in ("linear_top1", "finetune_top1", "box_ap", "mask_ap", "miou"):
            assert rows[recipe][key] is not None and 0 <= rows[recipe][key] <= 100, (recipe, key)
    assert rows["rmae"]["gmacs"] > rows["mae"]["gmacs"] > 0  # the region branch costs something
    rmae = json.loads((data / "08_reporting/pretrain_rmae.json").read_text())
    assert set(rmae["heads"]) == {"pixel", "region"} and rmae["steps"] == 3
    assert (data / "04_feature/regions/fh/index.parquet").is_file()

    interactive = json.loads((data / "08_reporting/interactive_rmae.json").read_text())
    assert [r["kind"] for r in interactive["results"]] == ["reveal", "reveal", "clicks"]
    for r in interactive["results"]:
        assert r["instances"] > 0 and 0 <= r["miou"] <= 1 and 0 <= r["baseline_miou"] <= 1, r
    with Image.open(data / "08_reporting/interactive_rmae.png") as picture:
        assert picture.width == 4 * picture.height / min(6, interactive["images"])  # 4 panels per example

    from maelab.orchestration.registry import list_models

    rmae_models = [m for m in list_models() if m["name"].startswith("maelab-rmae-")]
    assert len(rmae_models) == 1 and "champion" in rmae_models[0]["aliases"], rmae_models
