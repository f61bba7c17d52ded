"""Registry teachers: ``models:/NAME@ALIAS`` (or ``/VERSION``, ``runs:/...``) -> a local safetensors file,
through ``maelab.orchestration.registry.resolve_encoder`` (the same resolution transfer uses).

Callers that build models from a recipe (the pretrain node, ``maelab flops``, ``maelab bench``) run
:func:`resolve_teacher_weights` first, so the engine and the models never talk to MLflow. It lives here, not
in ``maelab.teachers``, because the registry reads ``conf/`` through Kedro's config loader.
"""

from __future__ import annotations

import copy
from typing import Any

from maelab.teachers.build import REGISTRY_SCHEMES


def resolve_weights(ref: str, env: str | None = None) -> str:
    """A local path for a teacher's ``weights``: registry URIs resolved, anything else unchanged."""
    if not str(ref).startswith(REGISTRY_SCHEMES):
        return str(ref)
    from maelab.orchestration.registry import resolve_encoder

    try:
        return str(resolve_encoder(str(ref), env=env))
    except LookupError as err:
        raise LookupError(
            f"teacher weights {ref}: {err}. Register that encoder first (for conf/base's mrmae recipes: "
            "`kedro run --pipelines=pretrain_mae`), or set the teacher's weights to a local file"
        ) from err


def teacher_configs(recipe: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, cfg)`` for every teacher the recipe's heads name (``heads.<h>.teacher`` or
    ``heads.<h>.teachers.<t>``)."""
    out = []
    for hname, head in (recipe.get("heads") or {}).items():
        if isinstance(head.get("teacher"), dict):
            out.append((f"heads.{hname}.teacher", head["teacher"]))
        for tname, cfg in (head.get("teachers") or {}).items():
            out.append((f"heads.{hname}.teachers.{tname}", cfg))
    return out


def resolve_teacher_weights(recipe: dict[str, Any], env: str | None = None) -> dict[str, Any]:
    """A copy of ``recipe`` whose teachers' registry URIs are local file paths (the recipe itself is kept)."""
    if not teacher_configs(recipe):
        return recipe
    recipe = copy.deepcopy(recipe)
    for _, cfg in teacher_configs(recipe):
        if cfg.get("weights") is not None:
            cfg["weights"] = resolve_weights(cfg["weights"], env)
    return recipe
