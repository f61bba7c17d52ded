"""Recipes and config overrides as plain dicts, without Kedro, merged by OmegaConf.

A recipe is ``recipe_defaults`` merged with ``recipes[NAME]``. Kedro-free so the strict config check
(``maelab.schema``), which the engine runs, can resolve recipes; ``maelab.config`` reads the parameters
with Kedro's loader and resolves them here. ``--set`` / ``--params`` dotted overrides go through OmegaConf
too (its dotlist grammar: YAML scalars and ``[lists]``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

_FLAGS = {"allow_objects": True}  # plain Python values pass through untouched (no DictConfig types)


def _plain(conf: Any) -> Any:
    return OmegaConf.to_container(conf, resolve=False)  # a "${...}" string stays text


def _clear_clashes(base: Any, override: Any) -> Any:
    """``base`` with None where ``override`` puts a list over a mapping or a mapping over a list, which
    OmegaConf refuses to merge: the override replaces such a value, as any other non-mapping does."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return base
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = _clear_clashes(old, value)
        elif isinstance(old, dict | list) and isinstance(value, dict | list):
            out[key] = None
    return out


def deep_merge(base: dict, *overrides: dict) -> dict:
    """``overrides`` merged into ``base`` in order (``OmegaConf.merge``): mappings merge key by key,
    anything else (lists included) is replaced. A new dict; the inputs are not changed."""
    conf = OmegaConf.create(base or {}, flags=_FLAGS)
    for override in overrides:
        merged = _clear_clashes(_plain(conf), override or {})
        conf = OmegaConf.merge(
            OmegaConf.create(merged, flags=_FLAGS), OmegaConf.create(override or {}, flags=_FLAGS)
        )
    return _plain(conf)


def apply_dotlist(config: dict, items: list[str]) -> dict:
    """``["train.steps=10"]`` -> ``config`` with ``config["train"]["steps"] = 10`` (a new dict).

    Values are parsed by OmegaConf (``10`` -> int, ``1e-3`` -> float, ``[1,2]`` -> list, ``null``).
    Raises ValueError for an item without ``=`` or whose path runs through a value that is no mapping.
    """
    for item in items:
        if "=" not in item:
            raise ValueError(f"{item!r}: expected KEY.PATH=VALUE")
        *parents, _ = item.split("=", 1)[0].strip().split(".")
        node: Any = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                raise ValueError(f"{item!r}: {part!r} is not a mapping")
    return deep_merge(config, _plain(OmegaConf.from_dotlist(list(items))))


def nest_dotted(params: dict[str, Any] | None) -> dict[str, Any]:
    """``{"train.steps": 2}`` -> ``{"train": {"steps": 2}}`` (what ``kedro run --params`` does with dots);
    later keys merge into earlier ones."""
    conf = OmegaConf.create({}, flags=_FLAGS)
    for key, value in (params or {}).items():
        OmegaConf.update(conf, str(key), value, merge=True, force_add=True)
    return _plain(conf)


def resolve_recipe(params: dict, name: str) -> dict[str, Any]:
    """The full recipe ``name`` from a parameters dict; ``recipe["name"]`` is set to ``name``."""
    recipes = params.get("recipes", {})
    if name not in recipes:
        raise KeyError(f"unknown recipe {name!r}: parameters define {sorted(recipes)}")
    recipe = deep_merge(params.get("recipe_defaults", {}), recipes[name] or {})
    recipe["name"] = name
    return recipe
