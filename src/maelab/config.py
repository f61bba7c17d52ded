"""Read the project's Kedro configuration outside a Kedro session (CLI, ``python -m maelab.train``).

A *recipe* is ``parameters["recipe_defaults"]`` deep-merged with ``parameters["recipes"][NAME]``;
Kedro environments (``conf/imagenet``, ``conf/coco``, ``conf/local``) override ``conf/base`` key by key.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_root() -> Path:
    """The Kedro project root: ``$MAELAB_PROJECT_ROOT``, the cwd if it holds ``conf/``, else the checkout."""
    env = os.environ.get("MAELAB_PROJECT_ROOT")
    if env:
        return Path(env)
    cwd = Path.cwd()
    return cwd if (cwd / "conf" / "base").is_dir() else PROJECT_ROOT


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(
    kind: str = "parameters", env: str | None = None, conf_source: str | Path | None = None
) -> dict:
    """Load one kind of config (``parameters``, ``catalog``, ``mlflow``) the way ``kedro run --env`` does."""
    from kedro.config import OmegaConfigLoader

    from maelab.settings import CONFIG_LOADER_ARGS

    conf_source = Path(conf_source) if conf_source else project_root() / "conf"
    loader = OmegaConfigLoader(conf_source=str(conf_source), env=env, **CONFIG_LOADER_ARGS)
    try:
        return dict(loader[kind])
    except KeyError:
        return {}


def resolve_recipe(params: dict, name: str) -> dict[str, Any]:
    """The full recipe ``name`` from a parameters dict; ``recipe["name"]`` is set to ``name``."""
    recipes = params.get("recipes", {})
    if name not in recipes:
        raise KeyError(f"unknown recipe {name!r}: parameters define {sorted(recipes)}")
    recipe = deep_merge(params.get("recipe_defaults", {}), recipes[name] or {})
    recipe["name"] = name
    return recipe


def load_recipe(name: str, env: str | None = None, conf_source: str | Path | None = None) -> dict[str, Any]:
    return resolve_recipe(load_config("parameters", env, conf_source), name)
