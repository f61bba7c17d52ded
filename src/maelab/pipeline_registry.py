"""Project pipelines, made from the parameters: one ``pretrain_<recipe>`` per entry of ``recipes`` (adding a
recipe to ``parameters_pretrain.yml`` adds its pipeline), the transfer nodes of the encoders in
``transfer.evaluate`` and of the enabled tasks, ``rmae_full`` composed from them, and ``compare`` (every
recipe in ``compare.recipes`` trained, transferred and tabulated).

The parameters are those of the run's Kedro env: ``kedro run --env X`` exports ``KEDRO_ENV`` before the
pipelines are loaded (``maelab.hooks`` does the same for sessions created in code).
"""

from __future__ import annotations

import os

from kedro.pipeline import Pipeline

from maelab.config import load_config, resolve_recipe
from maelab.pipelines import (
    compare,
    ingest,
    interactive,
    pretrain,
    regions,
    report,
    rmae_full,
    teachers,
    transfer,
)
from maelab.pipelines.transfer.pipeline import evaluated_encoders


def pretrain_pipelines(params: dict) -> dict[str, Pipeline]:
    """``{recipe: pretrain_<recipe> pipeline}`` for every recipe in the parameters."""
    recipes = params.get("recipes")
    if not isinstance(recipes, dict) or not recipes:
        raise ValueError("parameters_pretrain.yml: `recipes` must map recipe names to recipes")
    out = {}
    for name in recipes:
        recipe = resolve_recipe(params, name)
        data = recipe.get("data", {})
        out[name] = pretrain.create_pipeline(
            name,
            uses_regions=bool(data.get("regions")),
            uses_teacher_store=(data.get("teacher") or {}).get("mode") == "store",
        )
    return out


def build_pipelines(params: dict) -> dict[str, Pipeline]:
    """Every registered pipeline for a parameters dict (what ``kedro registry list`` shows)."""
    trainers = pretrain_pipelines(params)
    transfer_params = params.get("transfer") or {}
    encoders = evaluated_encoders(transfer_params)
    composed = (params.get("rmae_full") or {}).get("encoders") or encoders
    interactive_recipe = (params.get("interactive") or {}).get("recipe", "rmae")
    default_recipe = (params.get("pretrain") or {}).get("recipe", "mae")
    if default_recipe not in trainers:
        raise ValueError(
            f"parameters pretrain.recipe: {default_recipe!r} is not in recipes ({sorted(trainers)})"
        )
    pipelines = {
        "ingest": ingest.create_pipeline(),
        "regions": regions.create_pipeline(),
        "teachers": teachers.create_pipeline(),
        "pretrain": trainers[default_recipe],
        "transfer": transfer.create_pipeline(encoders, transfer_params),
        "report": report.create_pipeline(encoders),
        "interactive": interactive.create_pipeline(interactive_recipe),
        "rmae_full": rmae_full.create_pipeline(composed, trainers, transfer_params, interactive_recipe),
    }
    if params.get("compare"):
        pretrain_params = {k: params.get(k) or {} for k in ("recipes", "recipe_defaults")}
        pipelines["compare"] = compare.create_pipeline(params["compare"], pretrain_params, transfer_params)
    pipelines.update({f"pretrain_{name}": pipe for name, pipe in trainers.items()})
    pipelines["__default__"] = pipelines["rmae_full"]
    return pipelines


def register_pipelines() -> dict[str, Pipeline]:
    return build_pipelines(load_config("parameters", os.environ.get("KEDRO_ENV")))
