"""Read the project's Kedro configuration outside a Kedro session (CLI, ``python -m maelab.train``).

A *recipe* is ``parameters["recipe_defaults"]`` deep-merged with ``parameters["recipes"][NAME]``.

Layers, each overriding the one before key by key (parameters, mlflow) or entry by entry (catalog):
``conf/base``, then the run env (``--env coco``, ``conf/imagenet``, ...), then ``conf/local`` (machine-local
paths and URIs, git-ignored), then ``kedro run --params``. Kedro's own loader reads base and one env only;
:class:`LayeredConfigLoader` adds ``conf/local`` over every env, so a data root in
``conf/local/parameters_ingest.yml`` works under ``--env coco`` as under the default env.
The config loader's class and arguments live here (``settings.py`` reads them), so reading config needs
no Kedro project settings; the training engine itself never reads config: its callers pass recipe and
settings.

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

from kedro.config import OmegaConfigLoader

from maelab.paths import PROJECT_ROOT, project_root
from maelab.recipes import deep_merge, resolve_recipe

__all__ = [
    "CONFIG_LOADER_ARGS",
    "LOCAL_ENV",
    "LayeredConfigLoader",
    "PROJECT_ROOT",
    "deep_merge",
    "cli",
    "load_config",
    "load_recipe",
    "mlflow_settings",
    "project_root",
    "resolve_recipe",
]

LOCAL_ENV = "local"  # the machine-local layer, read over every run env


class LayeredConfigLoader(OmegaConfigLoader):
    """Kedro's ``OmegaConfigLoader`` plus one layer: ``conf/<overlay_env>`` (``conf/local``) over the run env.

    ``kedro run --env coco`` reads ``conf/base``, then ``conf/coco``, then ``conf/local``, each merged with
    the key's ``merge_strategy`` (``soft`` for parameters: one leaf overrides one leaf; lists are
    replaced). With the run env ``local`` itself (Kedro's default) or ``base`` nothing changes.
    """

    def __init__(self, *args: Any, overlay_env: str | None = LOCAL_ENV, **kwargs: Any) -> None:
        self.overlay_env = overlay_env  # set first: the parent's constructor already reads "globals"
        super().__init__(*args, **kwargs)

    def overlay_path(self) -> Path | None:
        """``conf/<overlay_env>`` when it is read over the run env (it exists and is not the run env)."""
        run_env = self.env or self.default_run_env
        if not self.overlay_env or run_env in (self.overlay_env, self.base_env) or self._protocol != "file":
            return None
        path = Path(self.conf_source) / self.overlay_env
        return path if path.is_dir() else None

    def __getitem__(self, key: str) -> dict[str, Any]:
        config = super().__getitem__(key)
        overlay = self.overlay_path()
        if overlay is None or key not in self.config_patterns or key in getattr(self, "data", {}):
            return config
        local = self.load_and_merge_dir_config(
            str(overlay), self.config_patterns[key], key, set(), key == "credentials"
        )
        return self._merge_configs(config, local, key, str(overlay)) if local else config


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
    conf_source = Path(conf_source) if conf_source else project_root() / "conf"
    loader = LayeredConfigLoader(conf_source=str(conf_source), env=env, **CONFIG_LOADER_ARGS)
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


def cli(args) -> int:
    """``maelab config [KEY ...] [--env ENV] [--out FILE]``: the parameters a run of ``ENV`` sees, as YAML.

    DVC's ``config`` stage writes them to ``data/02_intermediate/parameters_resolved.yml``, which each stage
    tracks key by key, so an override in ``conf/<env>`` or ``conf/local`` reruns exactly its stages.
    """
    import yaml

    params = load_config("parameters", args.env)
    missing = [k for k in args.keys if k not in params]
    if missing:
        raise SystemExit(f"maelab config: no parameter {missing[0]!r} (have {sorted(params)})")
    chosen = {k: params[k] for k in args.keys} if args.keys else params
    envs = ["base"] if args.env == "base" else ["base", args.env or LOCAL_ENV, LOCAL_ENV]
    layers = " + ".join(f"conf/{e}" for e in dict.fromkeys(envs))
    text = f"# resolved parameters: {layers} (maelab config)\n" + yaml.safe_dump(
        chosen, sort_keys=False, allow_unicode=True
    )
    if not args.out:
        print(text, end="")
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return 0
