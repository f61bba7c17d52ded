"""A tiny R-MAE trained for a few steps on generated scenes and registered (encoder + full state) in a
throw-away MLflow store, once per session; and ``maelab serve`` started on it on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from maelab.config import deep_merge, load_config, resolve_recipe

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "scenes_fixture", REPO / "tests" / "transfer" / "scenes_fixture.py"
)
scenes_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_fixture)

PARAMS = load_config("parameters")  # the repository's conf, read before any project root is switched
TINY = {
    "encoder": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "data": {"num_workers": 0, "sources": ["scenes"], "regions": {"k": 2}},
    "heads": {
        "pixel": {"embed_dim": 16, "depth": 1, "num_heads": 2},
        "region": {"num_regions": 2, "dim": 16, "enc_dim": 16, "num_heads": 2, "enc_heads": 2},
    },
    "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "ckpt_every": 0,
              "image_every": 0, "precision": "fp32", "device": "cpu"},
}  # fmt: skip
MODEL = "maelab-rmae-vit-w32p8-64-d2"


@dataclass
class Project:
    root: Path
    env: dict[str, str]  # MAELAB_PROJECT_ROOT and MLFLOW_TRACKING_URI of its store
    model: str  # NAME@ALIAS of the registered R-MAE


@pytest.fixture(scope="session")
def rmae_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    from maelab.pipelines.pretrain.nodes import pretrain
    from maelab.pipelines.regions.nodes import compute_regions
    from maelab.regions.store import RegionStore

    root = tmp_path_factory.mktemp("serve") / "proj"
    (root / "mlruns").mkdir(parents=True)
    (root / "conf" / "base").mkdir(parents=True)
    (root / "conf" / "local").mkdir()
    shutil.copy(REPO / "conf" / "base" / "mlflow.yml", root / "conf" / "base" / "mlflow.yml")
    env = {"MAELAB_PROJECT_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns/mlflow.db"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.chdir(root)  # manifest roots are relative to the project
        manifest = scenes_fixture.make_scenes(root, n_train=16, n_val=4, size=64)
        store = RegionStore(root / "data" / "04_feature" / "regions")
        regions = {"compute": ["fh"], "images": {"sources": ["scenes"], "splits": ["train"]}, "workers": 0,
                   "progress": False, "sources": {"fh": {"type": "fh", "scales": [50, 150]}}}  # fmt: skip
        compute_regions(manifest, store, regions)
        defaults = deep_merge(PARAMS["recipe_defaults"], TINY)
        defaults["train"]["out_dir"] = str(root / "data" / "06_models")
        recipe = resolve_recipe({"recipes": PARAMS["recipes"], "recipe_defaults": defaults}, "rmae")
        report, *_ = pretrain(manifest, recipe, None, store)
        assert report["registered_version"] == 1
    yield Project(root, env, f"{MODEL}@champion")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(rmae_project: Project) -> Iterator[str]:
    """``maelab serve`` in a child process on a free port; yields its URL and stops it."""
    port = free_port()
    env = {**os.environ, **rmae_project.env, "PYTHONUNBUFFERED": "1"}
    manifest = rmae_project.root / "data" / "02_intermediate" / "manifest.parquet"
    cmd = [sys.executable, "-m", "maelab", "serve", "--port", str(port), "--manifest", str(manifest),
           "--max-upload-mb", "0.5"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=rmae_project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.poll() is not None else "(still running)"
                    raise RuntimeError(f"maelab serve did not come up: {out}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
