"""Bounded MLflow REST calls for this process: the engine's tracker, the registry and the report share them.

MLflow's defaults (120 s read timeout, 7 retries, backoff factor 2) stall a run ~20 min on a dead server.
Ours: about 11 s per call at worst (2 attempts x 5 s + 1 s backoff). The environment still wins.
"""

from __future__ import annotations

import os

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
