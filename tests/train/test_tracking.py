import time
import warnings

import pytest
from fake_parts import build_pretrainer, tiny_recipe

from maelab.analysis.viz import training_pictures
from maelab.config import mlflow_settings, resolve_uri
from maelab.train.engine import train


def run(recipe, manifest, out, mlflow):
    return train(
        recipe,
        manifest,
        out_dir=out,
        mlflow=mlflow,
        build_model=build_pretrainer,
        progress=False,
        pictures=training_pictures,  # train draws none itself; analysis draws them
    )


def test_run_has_params_metrics_and_artifacts(manifest, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    settings = {
        "tracking_uri": uri,
        "artifact_location": (tmp_path / "mlruns" / "artifacts").as_uri(),
        "experiment": "test",
    }
    r = run(tiny_recipe(steps=4, image_every=2, log_every=2), manifest, tmp_path / "out", settings)
    assert r.mlflow_run_id
    client = MlflowClient(uri)
    got = client.get_run(r.mlflow_run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.steps"] == "4" and got.data.params["encoder.embed_dim"] == "32"
    assert {"loss", "loss/pixel", "lr", "images_per_s", "peak_mem_mb"} <= set(got.data.metrics)
    assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "loss")] == [2, 4]
    arts = {a.path for a in client.list_artifacts(r.mlflow_run_id)}
    assert {"encoder", "images"} <= arts
    # log_image(key=..., step=...): the UI's image slider; files images/<key>+step+<N>+timestamp+...png
    pngs = [a.path for a in client.list_artifacts(r.mlflow_run_id, "images") if a.path.endswith(".png")]
    steps = sorted((p.split("/")[1].split("+")[0], int(p.split("+")[2])) for p in pngs)
    assert steps == [("reconstruction", 2), ("reconstruction", 4)]
    assert (tmp_path / "mlruns" / "artifacts").is_dir()


def test_broken_backend_warns_once_and_training_goes_on(manifest, tmp_path):
    bad = {"tracking_uri": f"sqlite:///{tmp_path}", "experiment": "x"}  # a folder is not a database
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run(tiny_recipe(steps=3, image_every=1), manifest, tmp_path / "out", bad)
    ours = [w for w in caught if "MLflow" in str(w.message)]
    assert len(ours) == 1 and "tracking is off" in str(ours[0].message)
    assert r.steps == 3 and r.mlflow_run_id is None and r.encoder_path


def test_uri_resolution(tmp_path, monkeypatch):
    assert resolve_uri("sqlite:///mlruns/mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert resolve_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert resolve_uri("http://host:5000", tmp_path) == "http://host:5000"
    monkeypatch.setenv("MAELAB_PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = mlflow_settings(cfg={"tracking_uri": "sqlite:///mlruns/mlflow.db", "artifact_location": "mlruns"})
    assert s["tracking_uri"] == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert s["artifact_location"] == (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert mlflow_settings(cfg={})["tracking_uri"] == "sqlite:////elsewhere.db"


@pytest.mark.parametrize("n", [3])
def test_reconstruction_grid_shape(n):
    import torch

    from maelab.analysis.viz import png_bytes, reconstruction_grid

    img = torch.randn(n, 3, 32, 32)
    mask = torch.zeros(n, 16, dtype=torch.bool)
    mask[:, :12] = True
    grid = reconstruction_grid(img, torch.zeros_like(img), mask, scale=1)
    assert grid.shape == (96, 32 * n, 3) and grid.dtype.name == "uint8"
    # visible patches of row 2 equal the original row 3; masked ones are the reconstruction
    assert (grid[32:64, :, :][-8:] == grid[64:96][-8:]).all()
    assert png_bytes(grid)[:4] == b"\x89PNG"


def test_fluent_run_has_git_tags_unique_names_and_system_metrics(tmp_path, monkeypatch):
    import mlflow

    from maelab.train.tracking import Tracker

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    settings = {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "experiment": "x", "tags": {"maelab.env": "e"}}
    names = []
    for _ in range(2):
        t = Tracker(settings)
        run_id = t.start("tiny", {"a": 1}, tags={"maelab.pipeline": "pretrain_tiny"})
        assert mlflow.active_run().info.run_id == run_id  # a fluent run
        time.sleep(1.5)
        t.end()
        assert mlflow.active_run() is None
        run = t.client.get_run(run_id)
        names.append(run.info.run_name)
        tags = run.data.tags
        assert tags["maelab.env"] == "e" and tags["maelab.pipeline"] == "pretrain_tiny"
        assert len(tags["mlflow.source.git.commit"]) == 40 and "mlflow.user" in tags
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics
    assert len(set(names)) == 2 and all(n.startswith("tiny-") for n in names)
