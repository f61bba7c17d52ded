"""MLflow tracking for one pre-training run (rank 0 only).

The settings (tracking URI, artifact location, experiment, extra ``tags``) come from the caller, usually
``maelab.config.mlflow_settings(env)``. The run is a fluent MLflow run (``mlflow.start_run``): it carries
MLflow's source/user tags plus git commit and branch, the caller's tags (Kedro env and pipeline), a unique
name, system metrics (CPU, memory, GPU when present) and the manifest as a dataset input. At the end the
encoder is logged as an MLflow pytorch model (a LoggedModel, ``torch.export`` "pt2" format: a traced
graph with its weights, no pickled code) beside the safetensors.

A failing backend (bad URI, locked db, a server that never answers) warns once and training goes on:
HTTP calls have a short timeout and bounded retries (:func:`maelab.mlflow_http.bounded_http`), and a run
that lost tracking is closed as ``FAILED`` when the server can still be reached.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import sqlite3
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maelab.mlflow_http import bounded_http
from maelab.paths import project_root

log = logging.getLogger(__name__)

MODEL_NAME = "encoder"  # the LoggedModel's name (artifact path) in the pre-training run
MODEL_ID_TAG = "maelab.encoder_model_id"  # run tag: the LoggedModel that the registry version points at
ENCODER_ARTIFACT = "encoder"  # run artifact folder of the encoder safetensors


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


def unique_run_name(name: str) -> str:
    """``<name>-<UTC date-time>-<4 hex>``: readable, sortable and never repeated."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def git_tags(root: str | Path | None = None) -> dict[str, str]:
    """MLflow's git tags (``mlflow.source.git.commit`` / ``.branch``) and ``maelab.git.dirty`` of the
    project checkout; outside a git work tree only ``$MAELAB_GIT_COMMIT`` (set by the Dockerfile)."""
    cwd = Path(root) if root else project_root()

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:  # no work tree (the container image): the commit it was built from, if recorded
        baked = os.environ.get("MAELAB_GIT_COMMIT", "")
        return {"mlflow.source.git.commit": baked} if baked else {}
    tags = {"mlflow.source.git.commit": commit}
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags["maelab.git.dirty"] = str(bool(status)).lower()
    return tags


TAGS_ENV = "MAELAB_MLFLOW_TAGS"  # JSON object of extra run tags (the Kedro node passes its own to torchrun)


def env_tags() -> dict[str, str]:
    """``$MAELAB_MLFLOW_TAGS`` (a JSON object) as run tags; malformed JSON is ignored with a warning."""
    raw = os.environ.get(TAGS_ENV)
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
        if not isinstance(tags, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        warnings.warn(f"${TAGS_ENV} ignored ({exc}): {raw[:200]!r}", RuntimeWarning, stacklevel=2)
        return {}
    return {str(k): str(v) for k, v in tags.items()}


class Tracker:
    """One fluent MLflow run; every call is guarded, and after the first failure it goes quiet."""

    def __init__(self, settings: Mapping[str, Any] | None, enabled: bool = True) -> None:
        self.settings = dict(settings or {})
        self.enabled = enabled and self.settings.get("enabled", True)
        self.client = None
        self.run_id: str | None = None
        self.lost = False  # a call failed after the run was created: it ends FAILED, not RUNNING
        self._fluent = False  # this tracker pushed the run on MLflow's active-run stack

    def _fail(self, what: str, exc: BaseException) -> None:
        warnings.warn(
            f"MLflow {what} failed ({type(exc).__name__}: {exc}); tracking is off for the rest of this run "
            f"(tracking_uri={self.settings.get('tracking_uri')!r})",
            RuntimeWarning,
            stacklevel=3,
        )
        self.enabled = False
        self.lost = self.run_id is not None

    @property
    def active(self) -> bool:
        return bool(self.enabled and self.run_id)

    def start(
        self,
        name: str,
        params: Mapping[str, Any],
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Start (or, with ``run_id``, re-open) the run; log the flattened recipe as params.

        A new run is named ``<name>-<date-time>-<hex>`` and tagged with git, the settings' ``tags`` and
        ``tags``; ``system_metrics: false`` in the settings turns MLflow's system metrics off."""
        if not self.enabled:
            return None
        try:
            import mlflow
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            bounded_http()
            uri = self.settings["tracking_uri"]
            if uri.startswith("sqlite:///"):
                check_sqlite(Path(uri[len("sqlite:///") :]))
            mlflow.set_tracking_uri(uri)
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(self.settings["experiment"])
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(
                    self.settings["experiment"], artifact_location=self.settings.get("artifact_location")
                )
            )
            all_tags = {
                "maelab.recipe": name,
                **git_tags(),
                **env_tags(),
                **dict(self.settings.get("tags") or {}),
                **dict(tags or {}),
            }
            run = mlflow.start_run(
                run_id=run_id,
                experiment_id=None if run_id else exp_id,
                run_name=None if run_id else unique_run_name(name),
                nested=mlflow.active_run() is not None,
                tags={k: str(v) for k, v in all_tags.items()},
                log_system_metrics=bool(self.settings.get("system_metrics", True)),
            )
            self._fluent, self.run_id = True, run.info.run_id
            if not run_id:
                flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
                for i in range(0, len(flat), 100):
                    self.client.log_batch(self.run_id, params=flat[i : i + 100])
        except Exception as exc:
            self._fail("start", exc)
            return None
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:
            self._fail("log_metrics", exc)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:
            self._fail("log_artifact", exc)

    def log_png(self, png: bytes, name: str, artifact_path: str = "reconstructions") -> None:
        """A PNG as a plain artifact file (``log_image`` is the stepped alternative)."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(png)
            self.log_artifact(path, artifact_path)

    def log_image(self, png: bytes, key: str, step: int) -> None:
        """A PNG through ``log_image(key=..., step=...)``: the run's Images tab shows it by step."""
        if not self.active:
            return
        try:
            from PIL import Image

            with Image.open(io.BytesIO(png)) as img:
                self.client.log_image(self.run_id, img.convert("RGB"), key=key, step=int(step))
        except Exception as exc:
            self._fail("log_image", exc)

    def log_dataset(self, manifest: Any, source: str | Path, name: str = "manifest") -> None:
        """The manifest (a DataFrame, or read from ``source``) as the run's ``training`` dataset input."""
        if not self.active:
            return
        try:
            import mlflow
            import pandas as pd

            frame = manifest if manifest is not None else pd.read_parquet(source)
            with warnings.catch_warnings():  # "source can be interpreted in multiple ways", pandas 4 notices
                warnings.simplefilter("ignore")
                dataset = mlflow.data.from_pandas(frame, source=str(source), name=name)
                self.client.log_inputs(self.run_id, datasets=[_dataset_input(dataset, "training")])
        except Exception as exc:
            self._fail("log_dataset", exc)

    def log_model(
        self, module: Any, example: Any, step: int, tags: Mapping[str, Any] | None = None
    ) -> str | None:
        """``module`` (images -> embeddings) as the run's MLflow pytorch model ``encoder``: pt2 format
        (``torch.export``, batch dimension dynamic), a signature inferred from ``example`` and the example
        itself. Returns the LoggedModel id (also the run tag ``maelab.encoder_model_id``).

        A model that cannot be exported only warns (the safetensors is the encoder of record); a backend
        failure turns tracking off as any other call does."""
        if not self.active:
            return None
        import torch

        try:
            with torch.no_grad():
                out = module(example)
        except Exception as exc:  # noqa: BLE001 - a model problem, not a tracking one
            warnings.warn(f"MLflow model not logged: the embedder failed ({exc})", stacklevel=2)
            return None
        try:
            import mlflow
            from mlflow.models import infer_signature

            info = mlflow.pytorch.log_model(
                module,
                name=MODEL_NAME,
                signature=infer_signature(example.numpy(), out.numpy()),
                input_example=example.numpy(),
                serialization_format="pt2",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                step=int(step),
                tags={k: str(v) for k, v in (tags or {}).items()},
            )
            self.client.set_tag(self.run_id, MODEL_ID_TAG, info.model_id)
            return info.model_id
        except Exception as exc:
            from mlflow.exceptions import MlflowException

            if isinstance(exc, MlflowException | OSError | ConnectionError):
                self._fail("log_model", exc)
            else:  # torch.export could not trace this encoder
                warnings.warn(f"MLflow model not logged ({type(exc).__name__}: {exc})", stacklevel=2)
            return None

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (``FAILED`` if tracking was lost mid-run: one last, bounded try)."""
        if self.run_id is None or self.client is None or not (self.enabled or self.lost):
            self._pop()
            return
        status = "FAILED" if self.lost else status
        try:
            if self._fluent:
                import mlflow

                self._fluent = False
                mlflow.end_run(status)
            else:
                self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            if self.enabled:
                self._fail("end", exc)
            else:
                log.info("MLflow run %s could not be closed (%s)", self.run_id, exc)
        self._pop()
        self.lost = False

    def _pop(self) -> None:
        """Take this run off MLflow's active-run stack and stop its system-metrics thread, without a call
        to the backend (a later run in this process must not find it still active)."""
        if not self._fluent and self.run_id is None:
            return
        try:
            from mlflow.tracking import fluent

            stack = fluent._active_run_stack.get()
            if stack and stack[-1].info.run_id == self.run_id:
                stack.pop()
            monitor = fluent.run_id_to_system_metrics_monitor.pop(self.run_id, None)
            if monitor is not None:
                monitor.finish()
        except Exception as exc:  # noqa: BLE001 - best effort clean-up
            log.debug("MLflow active-run clean-up: %s", exc)
        self._fluent = False


def _dataset_input(dataset: Any, context: str) -> Any:
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
