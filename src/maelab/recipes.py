"""Recipes as plain dicts, without Kedro: ``recipe_defaults`` deep-merged with ``recipes[NAME]``.

Kedro-free so the strict config check (``maelab.schema``), which the engine runs, can resolve recipes;
``maelab.config`` reads the parameters with Kedro's loader and resolves them here.
"""

from __future__ import annotations

import copy
from typing import Any


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_recipe(params: dict, name: str) -> dict[str, Any]:
    """The full recipe ``name`` from a parameters dict; ``recipe["name"]`` is set to ``name``."""
    recipes = params.get("recipes", {})
    if name not in recipes:
        raise KeyError(f"unknown recipe {name!r}: parameters define {sorted(recipes)}")
    recipe = deep_merge(params.get("recipe_defaults", {}), recipes[name] or {})
    recipe["name"] = name
    return recipe
