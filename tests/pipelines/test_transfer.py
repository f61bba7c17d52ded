"""End-to-end: `transfer` then `report` on a micro config (generated scenes, tiny encoders, a few steps)."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from maelab.models.vit import build_encoder

_spec = importlib.util.spec_from_file_location(
    "scenes_fixture", Path(__file__).parents[1] / "transfer" / "scenes_fixture.py"
)
scenes_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_fixture)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)

MICRO = {
    "recipe_defaults": {"encoder": TINY},
    "transfer": {
        "evaluate": ["tiny", "random_init"],
        "encoders": {"tiny": "data/06_models/pretrain/tiny/encoder.safetensors", "random_init": None},
        "data": {"max_eval_images": 4},
        "tasks": scenes_fixture.MICRO_TASKS,
    },
}


@pytest.mark.slow
def test_transfer_and_report_end_to_end(kedro_project, kedro_run, monkeypatch):
    from maelab import pipeline_registry
    from maelab.pipelines.report.pipeline import create_pipeline as report_pipeline
    from maelab.pipelines.transfer.pipeline import create_pipeline as transfer_pipeline

    # only this stage's pipelines: another stage's registry entry must not break this test
    monkeypatch.setattr(
        pipeline_registry,
        "register_pipelines",
        lambda: {"transfer": transfer_pipeline(), "report": report_pipeline()},
    )

    project = kedro_project
    scenes_fixture.make_scenes(project, n_train=4, n_val=4, size=32)
    enc_path = project / "data/06_models/pretrain/tiny/encoder.safetensors"
    enc_path.parent.mkdir(parents=True)
    save_file(
        build_encoder(TINY).state_dict(),
        str(enc_path),
        metadata={"encoder_config": json.dumps(TINY), "recipe": "tiny"},
    )
    (project / "conf/local/parameters_transfer.yml").write_text(yaml.safe_dump(MICRO))

    transfer = transfer_pipeline()  # encoder names from conf/local: tiny, random_init
    assert {n.name for n in transfer.nodes} >= {"transfer.tiny.detection", "transfer.random_init.collect"}
    kedro_run(project, "transfer")
    for name in ("tiny", "random_init"):
        metrics = json.loads((project / f"data/07_model_output/transfer_{name}.json").read_text())
        tasks = metrics["tasks"]
        assert set(tasks) == {
            "linear_probe",
            "knn_probe",
            "seg_probe",
            "finetune",
            "detection",
            "segmentation",
        }
        assert all(t["status"] == "ok" for t in tasks.values())
        assert 0 <= tasks["linear_probe"]["top1"] <= 100 and 0 <= tasks["detection"]["mask_ap"] <= 100
        assert tasks["segmentation"]["num_classes"] == 11  # 10 shapes + background
    assert json.loads((project / "data/07_model_output/transfer_tiny.json").read_text())["tasks"]["finetune"][
        "encoder"
    ].endswith("tiny/encoder.safetensors")

    kedro_run(project, "report")
    report = json.loads((project / "data/08_reporting/report.json").read_text())
    assert [r["recipe"] for r in report["rows"]] == ["tiny", "random_init"]
    assert set(report["rows"][0]) >= {
        "recipe",
        "gmacs",
        "linear_top1",
        "finetune_top1",
        "box_ap",
        "mask_ap",
        "miou",
    }
    assert (project / "data/08_reporting/report.md").read_text().startswith("| pre-training")
    assert (project / "data/08_reporting/report_vs_gmacs.png").stat().st_size > 1000

    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'report'")
    assert len(runs) == 1 and "metrics.tiny.linear_top1" in runs.columns
