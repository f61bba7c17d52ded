"""MLflow tracking for one pre-training run (rank 0 only).

Tracking URI: ``conf/<env>/mlflow.yml`` (``tracking_uri``; ``conf/local`` overrides ``conf/base``),
overridden by ``$MLFLOW_TRACKING_URI``; relative paths (``sqlite:///mlruns/mlflow.db``) are taken
from the project root. A failing backend (bad URI, locked db, a server that never answers) warns once and
training goes on: HTTP calls have a short timeout and bounded retries (:func:`bounded_http`), and a run
that lost tracking is closed as ``FAILED`` when the server can still be reached.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maelab.config import load_config, project_root

log = logging.getLogger(__name__)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def resolve_uri(uri: str, root: Path) -> str:
    """Make relative sqlite/file locations absolute against ``root``."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return uri if path.startswith("/") else f"sqlite:///{(root / path).resolve()}"
    if "://" not in uri:
        return str((root / uri).resolve())
    return uri


def mlflow_settings(env: str | None = None, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tracking settings: ``cfg`` (or ``conf/<env>/mlflow.yml``), then ``$MLFLOW_TRACKING_URI``."""
    root = project_root()
    if cfg is None:
        try:
            cfg = load_config("mlflow", env)
        except Exception as exc:  # a missing conf folder must not stop training
            warnings.warn(f"MLflow config for env {env!r} unreadable ({exc}); using defaults", stacklevel=2)
            cfg = {}
    cfg = dict(cfg)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.get("tracking_uri") or "sqlite:///mlruns/mlflow.db"
    artifacts = cfg.get("artifact_location") or "mlruns/artifacts"
    art_path = Path(artifacts) if "://" not in artifacts else None
    if art_path is not None and not art_path.is_absolute():
        art_path = root / art_path
    return {
        "tracking_uri": resolve_uri(uri, root),
        "artifact_location": art_path.resolve().as_uri() if art_path is not None else artifacts,
        "experiment": cfg.get("experiment", "maelab"),
        "enabled": bool(cfg.get("enabled", True)),
    }


# MLflow's defaults (120 s read timeout, 7 retries, backoff factor 2) stall a run ~20 min on a dead server.
# Ours: about 11 s per call at worst (2 attempts x 5 s + 1 s backoff). The environment still wins.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}


def bounded_http() -> None:
    """Short timeouts and bounded retries for every MLflow REST call of this process (env vars MLflow reads
    at each request, ``mlflow/environment_variables.py``); values already in the environment are kept."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def check_sqlite(path: Path) -> None:
    """Fail fast on an unusable sqlite file (MLflow itself retries for ~100 s before giving up)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=10)
    try:
        con.execute("PRAGMA schema_version").fetchone()
    finally:
        con.close()


class Tracker:
    """A thin MlflowClient wrapper: every call is guarded; after the first failure it goes quiet."""

    def __init__(self, settings: Mapping[str, Any] | None, enabled: bool = True) -> None:
        self.settings = dict(settings or {})
        self.enabled = enabled and self.settings.get("enabled", True)
        self.client = None
        self.run_id: str | None = None
        self.lost = False  # a call failed after the run was created: it ends FAILED, not RUNNING

    def _fail(self, what: str, exc: BaseException) -> None:
        warnings.warn(
            f"MLflow {what} failed ({type(exc).__name__}: {exc}); tracking is off for the rest of this run "
            f"(tracking_uri={self.settings.get('tracking_uri')!r})",
            RuntimeWarning,
            stacklevel=3,
        )
        self.enabled = False
        self.lost = self.run_id is not None

    def start(self, name: str, params: Mapping[str, Any], run_id: str | None = None) -> str | None:
        """Start (or, with ``run_id``, re-open) the run; log the flattened recipe as params."""
        if not self.enabled:
            return None
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            bounded_http()
            uri = self.settings["tracking_uri"]
            if uri.startswith("sqlite:///"):
                check_sqlite(Path(uri[len("sqlite:///") :]))
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(self.settings["experiment"])
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(
                    self.settings["experiment"], artifact_location=self.settings.get("artifact_location")
                )
            )
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            else:
                self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
                flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
                for i in range(0, len(flat), 100):
                    self.client.log_batch(self.run_id, params=flat[i : i + 100])
        except Exception as exc:
            self._fail("start", exc)
            return None
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not (self.enabled and self.run_id):
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:
            self._fail("log_metrics", exc)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not (self.enabled and self.run_id):
            return
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:
            self._fail("log_artifact", exc)

    def log_png(self, png: bytes, name: str, artifact_path: str = "reconstructions") -> None:
        if not (self.enabled and self.run_id):
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(png)
            self.log_artifact(path, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (``FAILED`` if tracking was lost mid-run: one last, bounded try)."""
        if self.run_id is None or self.client is None or not (self.enabled or self.lost):
            return
        try:
            self.client.set_terminated(self.run_id, status="FAILED" if self.lost else status)
        except Exception as exc:
            if self.enabled:
                self._fail("end", exc)
            else:
                log.info("MLflow run %s could not be closed (%s)", self.run_id, exc)
        self.lost = False
