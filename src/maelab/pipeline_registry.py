"""Project pipelines, registered explicitly (``find_pipelines`` in Kedro 1.7 filters by the requested
name and cannot see ``pretrain_<recipe>``)."""

from kedro.pipeline import Pipeline

from maelab.pipelines import ingest, interactive, pretrain, regions, report, rmae_full, transfer
from maelab.pipelines.pretrain.pipeline import pretrain_pipeline

# recipes with their own `kedro run --pipeline=pretrain_<name>` (each is defined in parameters_pretrain.yml)
RECIPES = ("mae", "rae", "rmae")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {
        "ingest": ingest.create_pipeline(),
        "regions": regions.create_pipeline(),
        "pretrain": pretrain.create_pipeline(),
        "transfer": transfer.create_pipeline(),
        "report": report.create_pipeline(),
        "interactive": interactive.create_pipeline(),
        "rmae_full": rmae_full.create_pipeline(),
    }
    for recipe in RECIPES:
        pipelines[f"pretrain_{recipe}"] = pretrain_pipeline(recipe)
    pipelines["__default__"] = pipelines["rmae_full"]
    return pipelines
