"""Transfer numbers in MLflow: one child run per encoder under the report run, each metric under one name
(``linear_top1``, ``box_ap``, ``linear_probe.top1``), so the UI compares encoders metric by metric."""

from __future__ import annotations

from maelab.analysis.report import make_report

METRICS = {"linear_top1": ["linear_probe", "top1"], "box_ap": ["detection", "box_ap"]}
RESULTS = {
    "mae": {"tasks": {"linear_probe": {"top1": 30.5}, "detection": {"box_ap": 4.0}}},
    "rmae": {"tasks": {"linear_probe": {"top1": 33.0}, "detection": {"box_ap": float("nan")}}},
}


def test_each_encoder_gets_a_child_run_with_one_name_per_metric(mlflow_home):
    from mlflow import MlflowClient

    from maelab.orchestration.registry import tracking_uri

    params = {"report": {"metrics": METRICS, "mlflow": True}, "transfer": {"encoders": {}}, "recipes": {}}
    make_report(RESULTS, params)
    make_report(RESULTS, params)
    c = MlflowClient(tracking_uri())
    exp = c.get_experiment_by_name("maelab")
    reports = c.search_runs([exp.experiment_id], "tags.`maelab.kind` = 'report'")
    assert len(reports) == 2 and len({r.info.run_name for r in reports}) == 2  # unique names
    parent = reports[0].info.run_id
    children = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    by_name = {r.info.run_name: r.data for r in children}
    assert set(by_name) == {"mae", "rmae"}
    assert by_name["mae"].metrics["linear_top1"] == 30.5 and by_name["rmae"].metrics["linear_top1"] == 33.0
    assert by_name["mae"].metrics["linear_probe.top1"] == 30.5 and by_name["mae"].metrics["box_ap"] == 4.0
    assert "box_ap" not in by_name["rmae"].metrics  # NaN: not logged
    assert (
        by_name["rmae"].tags["maelab.encoder"] == "rmae" and by_name["rmae"].tags["maelab.kind"] == "transfer"
    )
