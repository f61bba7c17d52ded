"""Read the project's Kedro configuration outside a Kedro session (CLI, ``python -m maelab.train``).

A *recipe* is ``parameters["recipe_defaults"]`` deep-merged with ``parameters["recipes"][NAME]``;
Kedro environments (``conf/imagenet``, ``conf/coco``, ``conf/local``) override ``conf/base`` key by key.
The config loader's arguments live here (``settings.py`` reads them), so reading config needs no Kedro
project settings; the training engine itself never reads config: its callers pass recipe and settings.

MLflow settings: ``conf/<env>/mlflow.yml`` (``tracking_uri``; ``conf/local`` overrides ``conf/base``),
overridden by ``$MLFLOW_TRACKING_URI``; relative paths (``sqlite:///mlruns/mlflow.db``) are taken
from the project root.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maelab.paths import PROJECT_ROOT, project_root
from maelab.recipes import deep_merge, resolve_recipe

__all__ = [
    "CONFIG_LOADER_ARGS",
    "PROJECT_ROOT",
    "deep_merge",
    "load_config",
    "load_recipe",
    "mlflow_settings",
    "project_root",
    "resolve_recipe",
]

CONFIG_LOADER_ARGS: dict[str, Any] = {
    "base_env": "base",
    "default_run_env": "local",
    # one file per stage: catalog_ingest.yml, parameters_pretrain.yml, ...
    "config_patterns": {
        "catalog": ["catalog*", "catalog*/**"],
        "parameters": ["parameters*", "parameters*/**"],
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
    # conf/imagenet may override one leaf of a recipe without restating the rest
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}


def load_config(
    kind: str = "parameters", env: str | None = None, conf_source: str | Path | None = None
) -> dict:
    """Load one kind of config (``parameters``, ``catalog``, ``mlflow``) the way ``kedro run --env`` does."""
    from kedro.config import OmegaConfigLoader

    conf_source = Path(conf_source) if conf_source else project_root() / "conf"
    loader = OmegaConfigLoader(conf_source=str(conf_source), env=env, **CONFIG_LOADER_ARGS)
    try:
        return dict(loader[kind])
    except KeyError:
        return {}


def load_recipe(name: str, env: str | None = None, conf_source: str | Path | None = None) -> dict[str, Any]:
    return resolve_recipe(load_config("parameters", env, conf_source), name)


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
