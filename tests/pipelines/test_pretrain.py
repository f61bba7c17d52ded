"""End to end: ``kedro run --pipeline=pretrain_mae`` on a micro config in a throw-away project."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maelab.data.manifest import conform

MICRO = {
    "encoder": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "data": {"num_workers": 0},
    "train": {
        "steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "log_every": 2,
        "ckpt_every": 2,
        "image_every": 2,
        "precision": "fp32",
    },
}


def write_manifest(project, n=8):
    root = project / "data" / "01_raw" / "micro"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(
            {
                "image_id": f"scenes:train:{i}",
                "source": "scenes",
                "split": "train",
                "root": str(root),
                "path": f"{i}.png",
                "width": 40,
                "height": 40,
                "content_hash": str(i),
            }
        )
    conform(pd.DataFrame(rows)).to_parquet(project / "data" / "02_intermediate" / "manifest.parquet")


@pytest.mark.slow
def test_pretrain_mae_kedro_run_writes_the_report(kedro_project, kedro_run, monkeypatch):
    from maelab.pipelines.pretrain.pipeline import pretrain_pipeline

    (kedro_project / "src").mkdir(exist_ok=True)  # bootstrap_project wants source_dir; maelab is installed
    write_manifest(kedro_project)
    # register pretrain_mae the way the lead's registry will (find_pipelines only knows folders)
    import maelab.pipeline_registry as registry

    monkeypatch.setattr(registry, "register_pipelines", lambda: {"pretrain_mae": pretrain_pipeline("mae")})
    kedro_run(kedro_project, "pretrain_mae", {"recipe_defaults": MICRO})
    report = json.loads((kedro_project / "data" / "08_reporting" / "pretrain_mae.json").read_text())
    assert report["recipe"] == "mae" and report["steps"] == 4
    assert {
        "first_loss",
        "last_loss",
        "images_per_s",
        "wall_s",
        "heads",
        "mlflow_run_id",
        "encoder_path",
    } <= set(report)
    assert set(report["heads"]) == {"pixel"} and np.isfinite(report["last_loss"])
    enc = kedro_project / "data" / "06_models" / "pretrain" / "mae" / "encoder.safetensors"
    assert report["encoder_path"] == str(enc) and enc.is_file()
    assert (
        kedro_project / "data" / "06_models" / "pretrain" / "mae" / "encoder_path.txt"
    ).read_text() == str(enc)
    assert report["mlflow_run_id"]  # tracked in the project's sqlite store (conftest sets the URI)
    assert (kedro_project / "mlruns" / "mlflow.db").is_file()
