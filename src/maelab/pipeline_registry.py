"""Project pipelines: every folder under ``maelab/pipelines`` with a ``create_pipeline``,
plus ``pretrain_<recipe>`` for each pre-training recipe."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from maelab.pipelines.pretrain.pipeline import pretrain_pipeline

# recipes with their own `kedro run --pipeline=pretrain_<name>` (each is defined in parameters_pretrain.yml)
RECIPES = ("mae", "rae", "rmae")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    for recipe in RECIPES:
        pipelines[f"pretrain_{recipe}"] = pretrain_pipeline(recipe)
    pipelines["__default__"] = pipelines.get("ingest", Pipeline([]))
    return pipelines
