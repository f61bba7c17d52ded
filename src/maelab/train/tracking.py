"""MLflow tracking for one pre-training run (rank 0 only).

The settings (tracking URI, artifact location, experiment) come from the caller, usually
``maelab.config.mlflow_settings(env)``. A failing backend (bad URI, locked db, a server that never answers)
warns once and training goes on: HTTP calls have a short timeout and bounded retries
(:func:`maelab.mlflow_http.bounded_http`), and a run that lost tracking is closed as ``FAILED`` when the
server can still be reached.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maelab.mlflow_http import bounded_http

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
