"""``report``: consumes ``transfer_<encoder>_metrics`` for every encoder (the transfer pipeline's list)."""

from __future__ import annotations

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from maelab.pipelines.report.nodes import build_report
from maelab.pipelines.transfer.pipeline import configured_encoders, metrics_dataset


def create_pipeline(encoders: list[str] | None = None, **kwargs) -> Pipeline:
    encoders = list(encoders) if encoders else configured_encoders()
    return Pipeline(
        [
            node(
                update_wrapper(partial(build_report, encoders), build_report),
                inputs=["params:transfer", "params:report", "params:recipe_defaults", "params:recipes"]
                + [metrics_dataset(e) for e in encoders],
                outputs=["report", "report_table_md", "report_table_csv", "report_plot"],
                name="build_report",
                namespace="report",
                tags=["report"],
            )
        ]
    )
