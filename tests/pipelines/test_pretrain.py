"""The pre-training pipelines in memory on a micro config (MAE alone; R-MAE after the regions pipeline,
reading the region store dataset), a recipe added only in the parameters, and the nodes."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from maelab.config import deep_merge, load_config
from maelab.data.manifest import conform
from maelab.datasets import RegionStoreDataset
from maelab.pipelines import regions
from maelab.pipelines.pretrain import create_pipeline
from maelab.pipelines.pretrain.nodes import resolve, with_region_store
from maelab.regions.store import RegionStore

MICRO = {
    "encoder": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "data": {"num_workers": 0, "sources": ["micro"]},
    "train": {
        "steps": 3,
        "batch_size": 4,
        "warmup_steps": 1,
        "log_every": 1,
        "ckpt_every": 0,
        "image_every": 0,
    },
}
SMALL_HEADS = {
    "pixel": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "region": {"num_regions": 2, "dim": 16, "enc_dim": 16, "num_heads": 2, "enc_heads": 2},
}


def micro_manifest(root: Path, n: int = 8) -> pd.DataFrame:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = np.zeros((40, 40, 3), np.uint8)
        img[: 10 + 3 * i, : 12 + 2 * i] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append(
            {
                "image_id": f"micro:train:{i}",
                "source": "micro",
                "split": "train",
                "root": str(root),
                "path": f"{i}.png",
                "width": 40,
                "height": 40,
                "content_hash": str(i),
            }
        )
    return conform(pd.DataFrame(rows))


@pytest.fixture
def micro_params(tmp_path, monkeypatch):
    # MLflow off here (the rmae_full end-to-end test tracks and registers): no tracking store to start
    monkeypatch.setattr("maelab.config.mlflow_settings", lambda env=None: {"enabled": False})
    base = load_config("parameters")
    defaults = deep_merge(base["recipe_defaults"], MICRO)
    defaults["train"]["out_dir"] = str(tmp_path / "models")
    recipes = {
        "mae": deep_merge(base["recipes"]["mae"], {"heads": {"pixel": SMALL_HEADS["pixel"]}}),
        "rmae": deep_merge(base["recipes"]["rmae"], {"data": {"regions": {"k": 2}}, "heads": SMALL_HEADS}),
    }
    return {"recipe_defaults": defaults, "recipes": recipes}


def test_pretrain_mae_in_memory(tmp_path, micro_params, run_memory) -> None:
    manifest = micro_manifest(tmp_path / "micro")
    old = os.umask(0o077)  # a private umask: saved weights must still be readable by teammates
    try:
        out = run_memory(create_pipeline("mae"), {"manifest": manifest, "run_env": None}, micro_params)
    finally:
        os.umask(old)
    for weights in (out["pretrain_mae_encoder"], out["pretrain_mae_checkpoint"]):
        assert stat.S_IMODE(Path(weights).stat().st_mode) == 0o644, weights
    report = out["pretrain_mae_report"]
    assert report["recipe"] == "mae" and report["steps"] == 3 and set(report["heads"]) == {"pixel"}
    assert np.isfinite(report["last_loss"]) and report["mlflow_run_id"] is None
    assert out["pretrain_mae_encoder"] == str(tmp_path / "models/mae/encoder.safetensors")
    assert Path(out["pretrain_mae_encoder"]).is_file() and Path(out["pretrain_mae_checkpoint"]).is_file()
    assert out["pretrain_mae_checkpoint"] == str(tmp_path / "models/mae/model.safetensors")  # weights only
    losses = out["pretrain_mae_losses"]
    assert list(losses["step"]) == [1, 2, 3] and {"loss", "lr", "loss/pixel"} <= set(losses.columns)
    assert losses["loss"].iloc[-1] > 0
    assert out["pretrain_mae_recipe"]["name"] == "mae" and out["pretrain_mae_recipe"]["encoder"]["depth"] == 2


def test_rmae_reads_the_region_store_the_regions_pipeline_writes(tmp_path, micro_params, run_memory) -> None:
    manifest = micro_manifest(tmp_path / "micro")
    store = str(tmp_path / "regions")
    pipe = regions.create_pipeline() + create_pipeline("rmae", uses_regions=True)
    assert "region_store" in pipe.all_outputs() and "region_store" in pipe.all_inputs()
    params = {
        **micro_params,
        "regions": {
            "compute": ["fh"],
            "images": {"sources": ["micro"], "splits": ["train"]},
            "workers": 0,
            "progress": False,
            "sources": {"fh": {"type": "fh", "scales": [20, 60]}},
        },
    }
    inputs = {
        "manifest": manifest,
        "run_env": None,
        "region_store_previous": RegionStoreDataset(store),
        "region_store": RegionStoreDataset(store),
    }
    out = run_memory(pipe, inputs, params)
    assert out["regions_report"]["sources"]["fh"]["stored"] == 8
    report = out["pretrain_rmae_report"]
    assert set(report["heads"]) == {"pixel", "region"} and np.isfinite(report["heads"]["region"]["last_loss"])


def test_a_recipe_added_in_the_parameters_gets_a_pipeline_that_trains(
    tmp_path, micro_params, kedro_project, run_memory
) -> None:
    from maelab.pipeline_registry import register_pipelines

    path = kedro_project / "conf/base/parameters_pretrain.yml"
    conf = yaml.safe_load(path.read_text())
    conf["recipes"]["probe_recipe"] = copy.deepcopy(conf["recipes"]["mae"])
    path.write_text(yaml.safe_dump(conf))
    pipelines = register_pipelines()  # reads the project's conf (the kedro_project fixture's copy)
    assert "pretrain_probe_recipe" in pipelines
    params = {**micro_params, "recipes": {"probe_recipe": micro_params["recipes"]["mae"]}}
    manifest = micro_manifest(tmp_path / "micro")
    out = run_memory(pipelines["pretrain_probe_recipe"], {"manifest": manifest, "run_env": None}, params)
    assert out["pretrain_probe_recipe_report"]["steps"] == 3


def test_resolve_merges_the_defaults_and_names_the_recipe() -> None:
    recipe = resolve({"r": {"train": {"steps": 5}}}, {"train": {"steps": 1, "seed": 3}}, recipe_name="r")
    assert recipe == {"train": {"steps": 5, "seed": 3}, "name": "r"}
    with pytest.raises(KeyError, match="unknown recipe 'x'"):
        resolve({"r": {}}, {}, recipe_name="x")


def test_with_region_store_points_the_recipe_at_the_dataset(tmp_path) -> None:
    recipe = {"name": "rmae", "data": {"regions": {"source": "fh", "k": 2}}}
    out = with_region_store(recipe, RegionStore(tmp_path / "store"))
    assert out["data"]["regions"]["store"] == str(tmp_path / "store" / "fh")
    assert "store" not in recipe["data"]["regions"]  # the input is not modified
    assert with_region_store({"name": "mae", "data": {}}, None) == {"name": "mae", "data": {}}
    with pytest.raises(ValueError, match="no region_store input"):
        with_region_store(recipe, None)
