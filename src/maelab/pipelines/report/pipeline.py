"""``report``: ``transfer_<encoder>_metrics`` for every encoder -> report.json, tables, figure; then
report.json -> ``report_metrics_<encoder>`` (flat files for ``dvc metrics show``)."""

from __future__ import annotations

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from maelab.analysis.flat_metrics import flat_metrics
from maelab.pipelines.report.nodes import build_report
from maelab.pipelines.transfer.pipeline import metrics_dataset


def create_pipeline(encoders: list[str], **kwargs) -> Pipeline:
    """Rows in ``encoders`` order (the registry passes the transfer pipeline's list)."""
    return Pipeline(
        [
            node(
                update_wrapper(partial(build_report, list(encoders)), build_report),
                inputs=["params:transfer", "params:report", "params:recipe_defaults", "params:recipes"]
                + [metrics_dataset(e) for e in encoders],
                outputs=["report", "report_table_md", "report_table_csv", "report_plot"],
                name="build_report",
                namespace="report",
                tags=["report"],
            ),
            node(
                update_wrapper(partial(flat_metrics, encoders=list(encoders)), flat_metrics),
                inputs="report",
                outputs=[f"report_metrics_{e}" for e in encoders],
                name="flat_metrics",
                namespace="report",
                tags=["report"],
            ),
        ]
    )
