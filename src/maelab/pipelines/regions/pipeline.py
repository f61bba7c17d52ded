"""The ``regions`` pipeline: manifest -> region store (incremental, parallel, safe to kill).

    manifest + region_store_previous + params:regions -> compute_regions -> region_store, regions_report

``region_store_previous`` and ``region_store`` are the same folder: the node adds what the earlier runs did
not store, writing shard by shard through the handle, and hands the store on to pre-training (R-MAE).
"""

from kedro.pipeline import Pipeline, node

from maelab.pipelines.regions.nodes import compute_regions


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                compute_regions,
                inputs=["manifest", "region_store_previous", "params:regions"],
                outputs=["region_store", "regions_report"],
                name="compute_regions",
            )
        ]
    )
