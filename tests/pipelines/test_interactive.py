"""The interactive pipeline in memory: an R-MAE checkpoint and the ingest's annotations -> report + figure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from maelab.config import deep_merge, load_config, resolve_recipe
from maelab.models import build_pretrainer
from maelab.pipelines.coco import instances
from maelab.pipelines.ingest.nodes import export_annotations
from maelab.pipelines.interactive import create_pipeline

_spec = importlib.util.spec_from_file_location(
    "scenes_fixture", Path(__file__).parents[1] / "transfer" / "scenes_fixture.py"
)
scenes_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_fixture)

MICRO = {
    "recipe_defaults": {
        "encoder": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    },
    "recipes": {
        "rmae": {
            "data": {"regions": {"k": 2}},
            "heads": {
                "pixel": {"embed_dim": 16, "depth": 1, "num_heads": 2},
                "region": {"num_regions": 2, "dim": 16, "enc_dim": 16, "num_heads": 2, "enc_heads": 2},
            },
        }
    },
}


def test_interactive_in_memory(tmp_path, monkeypatch, run_memory) -> None:
    manifest = scenes_fixture.make_scenes(tmp_path, n_train=1, n_val=4, size=32)
    monkeypatch.chdir(tmp_path)  # info.maelab_root is relative to the project
    raw = json.loads((tmp_path / "data/03_primary/instances_scenes_val.json").read_text())
    entry = {"source": "scenes", "split": "val", "root": "data/01_raw/scenes", "data": raw}
    annotations = export_annotations({"instances_scenes_val": entry}, manifest)  # as ingest writes them
    recipe = resolve_recipe(deep_merge(load_config("parameters"), MICRO), "rmae")
    torch.manual_seed(0)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": build_pretrainer(recipe).state_dict()}, checkpoint)
    params = {
        "interactive": {
            "recipe": "rmae",
            "annotations": "instances_scenes_val",
            "limit": 4,
            "prompts": [
                {"kind": "reveal", "amount": 0.25},
                {"kind": "clicks", "amount": 2, "image_visible": "all"},
            ],
            "figure": {"examples": 2},
        }
    }
    inputs = {
        "pretrain_rmae_recipe": recipe,
        "pretrain_rmae_checkpoint": f"{checkpoint}\n",
        "coco_annotations": annotations,
    }
    out = run_memory(create_pipeline("rmae"), inputs, params)
    report = out["interactive_report"]
    assert report["recipe"] == "rmae" and report["checkpoint"] == str(checkpoint)
    assert [r["kind"] for r in report["results"]] == ["reveal", "clicks"]
    for r in report["results"]:
        assert r["instances"] > 0 and 0 <= r["miou"] <= 1 and 0 <= r["baseline_miou"] <= 1
    assert isinstance(out["interactive_figure"], Image.Image)


def test_instances_names_the_missing_partition_and_loads_lazily() -> None:
    coco = {"images": [], "annotations": [], "categories": []}
    assert instances({"instances_a_val": lambda: coco}, "instances_a_val") == coco
    with pytest.raises(KeyError, match=r"no partition 'instances_b_val' \(have \['instances_a_val'\]\)"):
        instances({"instances_a_val": coco}, "instances_b_val")
