"""Shared fixtures. Tests write only under pytest's tmp_path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mlflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root in tmp_path whose MLflow store is a fresh sqlite db (no server)."""
    root = tmp_path / "proj"
    (root / "mlruns").mkdir(parents=True)
    (root / "conf" / "base").mkdir(parents=True)
    (root / "conf" / "local").mkdir()
    shutil.copy(REPO / "conf" / "base" / "mlflow.yml", root / "conf" / "base" / "mlflow.yml")
    monkeypatch.setenv("MAELAB_PROJECT_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlruns/mlflow.db")
    return root


@pytest.fixture
def kedro_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throw-away copy of the project (pyproject + conf, empty data/ and mlruns/), cwd set to it.

    Put test overrides in ``<project>/conf/local/parameters_*.yml``; run with :func:`run_kedro`.
    """
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(REPO / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    for layer in (
        "01_raw",
        "02_intermediate",
        "03_primary",
        "04_feature",
        "05_model_input",
        "06_models",
        "07_model_output",
        "08_reporting",
    ):
        (project / "data" / layer).mkdir(parents=True)
    (project / "mlruns").mkdir()
    (project / "src").mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("MAELAB_PROJECT_ROOT", str(project))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlruns/mlflow.db")
    return project


def run_kedro(project: Path, pipeline: str, params: dict | None = None, env: str | None = None) -> dict:
    """``kedro run --pipelines=NAME --params ...`` in ``project``, in-process; returns the free outputs."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params=params or {}) as session:
        return session.run(pipeline_names=[pipeline])


@pytest.fixture
def kedro_run():
    return run_kedro
