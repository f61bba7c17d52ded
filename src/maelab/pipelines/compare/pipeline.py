"""``compare``: the methods side by side, declared in ``parameters_compare.yml``:

    ingest -> manifest; regions -> region_store
    for every recipe in compare.recipes (namespace ``compare.<recipe>``):
        params:recipes + params:recipe_defaults + params:compare [+ compare_<teacher>_encoder]
            -> resolve_recipe -> compare_<recipe>_recipe   (the recipe under compare.budget / overrides)
        manifest + compare_<recipe>_recipe + run_env [+ region_store]
            -> train -> compare_<recipe>_report, compare_<recipe>_encoder, compare_<recipe>_checkpoint
        compare_<recipe>_encoder -> transfer (compare.tasks, encoder ``compare_<recipe>``)
            -> transfer_compare_<recipe>_metrics
        compare_<recipe>_recipe + _report + transfer_compare_<recipe>_metrics + params:report
            -> row (namespace ``compare_table.<recipe>``) -> compare_<recipe>_row
    every row -> build_table (namespace ``compare_table``)
        -> compare, compare_table_md, compare_table_csv, compare_plot

A recipe in ``compare.teachers`` (MR-MAE and its combinations) gets the named compared recipe's encoder as
the weights of its teachers, so the run needs nothing registered beforehand; Kedro orders the teacher's
training first. The compare outputs never touch ``pretrain_<recipe>_*`` (own datasets and ``out_dir``).
"""

from __future__ import annotations

from functools import partial, update_wrapper
from typing import Any

from kedro.pipeline import Pipeline, node

from maelab.pipelines import ingest, regions, transfer
from maelab.pipelines.compare import nodes
from maelab.pipelines.transfer.pipeline import metrics_dataset
from maelab.recipes import resolve_recipe
from maelab.transfer.config import ENCODER_TASKS

KEYS = ("recipes", "teachers", "budget", "overrides", "tasks", "plot_metric", "mlflow")


def _bind(func, **kwargs):
    return update_wrapper(partial(func, **kwargs), func)


def _fail(key: str, what: str) -> None:
    raise ValueError(f"parameters_compare.yml: compare.{key}: {what}")


def compare_settings(compare: Any, recipes: dict[str, Any]) -> dict[str, Any]:
    """The ``compare`` block checked against the recipes; every problem names its key."""
    from maelab.schema import TrainConfig

    if not isinstance(compare, dict):
        _fail("", "must be a mapping (recipes, teachers, budget, overrides, tasks, plot_metric, mlflow)")
    for key in compare:
        if key not in KEYS:
            _fail(str(key), f"unknown key (allowed: {', '.join(KEYS)})")
    names = compare.get("recipes")
    if not isinstance(names, list) or not names or len(set(names)) != len(names):
        _fail("recipes", "must be a non-empty list of distinct recipe names")
    for name in names:
        if name not in recipes:
            _fail("recipes", f"{name!r} is not a recipe (parameters_pretrain.yml has {sorted(recipes)})")
    teachers = _teachers(compare.get("teachers") or {}, names, recipes)
    for key in compare.get("budget") or {}:
        if key not in TrainConfig.model_fields:
            _fail(f"budget.{key}", f"unknown train key (allowed: {', '.join(TrainConfig.model_fields)})")
    for name in compare.get("overrides") or {}:
        if name not in recipes:
            _fail(f"overrides.{name}", f"not a recipe (parameters_pretrain.yml has {sorted(recipes)})")
    tasks = list(compare.get("tasks") or ["linear_probe"])
    for task in tasks:
        if task not in ENCODER_TASKS:
            _fail("tasks", f"{task!r} is not a transfer task ({', '.join(ENCODER_TASKS)})")
    return {**compare, "tasks": tasks, "teachers": teachers}


def _teachers(teachers: dict[str, str], names: list[str], recipes: dict[str, Any]) -> dict[str, str]:
    """``compare.teachers`` of the compared recipes; a recipe left out of ``recipes`` keeps its entry in the
    file, unused (so are its ``overrides``)."""
    out = {}
    for name, teacher in teachers.items():
        if name not in recipes:
            _fail(f"teachers.{name}", f"not a recipe (parameters_pretrain.yml has {sorted(recipes)})")
        if name in names:
            if teacher not in names or teacher == name:
                _fail(f"teachers.{name}", f"{teacher!r} must be another compared recipe ({names})")
            out[name] = teacher
    return out


def _recipe_pipeline(name: str, teacher: str | None, uses_regions: bool) -> Pipeline:
    resolve_inputs = ["params:recipes", "params:recipe_defaults", "params:compare"]
    if teacher:
        resolve_inputs.append(f"compare_{teacher}_encoder")
    train_inputs = {"manifest": "manifest", "recipe": f"compare_{name}_recipe", "run_env": "run_env"}
    if uses_regions:
        train_inputs["region_store"] = "region_store"
    return Pipeline(
        [
            node(
                _bind(nodes.resolve, recipe_name=name),
                resolve_inputs,
                f"compare_{name}_recipe",
                name="resolve_recipe",
            ),
            node(
                nodes.train,
                train_inputs,
                [f"compare_{name}_report", f"compare_{name}_encoder", f"compare_{name}_checkpoint"],
                name="train",
            ),
        ],
        namespace=f"compare.{name}",
        prefix_datasets_with_namespace=False,
        tags=["compare"],
    )


def _row_node(name: str) -> Pipeline:
    """Namespace ``compare_table.<recipe>``: a row comes after transfer, so in ``compare.<recipe>`` it would
    interrupt that namespace (Kedro groups a namespace only when no path leaves it and comes back)."""
    return Pipeline(
        [
            node(
                _bind(nodes.row, recipe_name=name),
                [
                    f"compare_{name}_recipe",
                    f"compare_{name}_report",
                    metrics_dataset(f"compare_{name}"),
                    "params:report",
                ],
                f"compare_{name}_row",
                name="row",
            ),
        ],
        namespace=f"compare_table.{name}",
        prefix_datasets_with_namespace=False,
        tags=["compare"],
    )


def create_pipeline(compare: dict, pretrain_params: dict, transfer_params: dict, **kwargs) -> Pipeline:
    """``compare``: the parameters' ``compare`` block; ``pretrain_params``: ``recipes`` and
    ``recipe_defaults``; ``transfer_params``: the ``transfer`` block (its task settings are used as they are,
    for the tasks in ``compare.tasks``)."""
    cfg = compare_settings(compare, pretrain_params.get("recipes") or {})
    pipe = ingest.create_pipeline() + regions.create_pipeline()
    for name in cfg["recipes"]:
        recipe = resolve_recipe(pretrain_params, name)
        uses_regions = bool((recipe.get("data") or {}).get("regions"))
        pipe += _recipe_pipeline(name, cfg["teachers"].get(name), uses_regions) + _row_node(name)
    encoders = [f"compare_{name}" for name in cfg["recipes"]]
    pipe += transfer.create_pipeline(
        encoders,
        transfer_params,
        encoder_inputs={e: f"{e}_encoder" for e in encoders},
        tasks=cfg["tasks"],
    ).tag("compare")
    pipe += Pipeline(
        [
            node(
                nodes.build_table,
                ["params:compare"] + [f"compare_{name}_row" for name in cfg["recipes"]],
                ["compare", "compare_table_md", "compare_table_csv", "compare_plot"],
                name="build_table",
                namespace="compare_table",
                tags=["compare"],
            )
        ]
    )
    return pipe
