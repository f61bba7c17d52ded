"""The ``regions`` pipeline: manifest -> region store (incremental, parallel, safe to kill)."""

from kedro.pipeline import Pipeline, node

from maelab.pipelines.regions.nodes import compute_regions


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                compute_regions,
                inputs=["manifest", "region_store", "params:regions"],
                outputs="regions_report",
                name="compute_regions",
            )
        ]
    )
