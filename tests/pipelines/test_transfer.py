"""The transfer and report pipelines in memory on a micro config (generated scenes, a tiny encoder and a
random one, a few steps), and the transfer nodes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from maelab.config import load_config
from maelab.models.vit import build_encoder
from maelab.pipelines import report, transfer
from maelab.pipelines.transfer.nodes import collect_metrics, encoder_reference, run_task
from maelab.transfer.config import ConfigError

_spec = importlib.util.spec_from_file_location(
    "scenes_fixture", Path(__file__).parents[1] / "transfer" / "scenes_fixture.py"
)
scenes_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_fixture)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def micro_transfer(encoder_file: Path) -> dict:
    return {
        "evaluate": ["tiny", "random_init"],
        "encoders": {"tiny": str(encoder_file), "random_init": None},
        "device": "cpu",
        "data": {"sources": ["scenes"], "max_eval_images": 4},
        "tasks": scenes_fixture.MICRO_TASKS,
    }


@pytest.fixture
def scenes(tmp_path, monkeypatch):
    """Micro scenes (manifest paths relative to tmp_path, the cwd), their annotations, a tiny encoder file."""
    manifest = scenes_fixture.make_scenes(tmp_path, n_train=4, n_val=4, size=32)
    monkeypatch.chdir(tmp_path)
    annotations = {
        f"instances_scenes_{s}": json.loads(
            (tmp_path / f"data/03_primary/instances_scenes_{s}.json").read_text()
        )
        for s in ("train", "val")
    }
    enc = tmp_path / "tiny.safetensors"
    save_file(build_encoder(TINY).state_dict(), str(enc), metadata={"encoder_config": json.dumps(TINY)})
    return manifest, annotations, enc


def test_transfer_in_memory(scenes, run_memory) -> None:
    manifest, annotations, enc = scenes
    params = {"transfer": micro_transfer(enc), "recipe_defaults": {"encoder": TINY}}
    pipe = transfer.create_pipeline(["tiny", "supervised_reference"], params["transfer"])
    # the supervised reference is no encoder: one node, its fine-tune row, trains the CNN
    assert {n.name for n in pipe.nodes if n.namespace == "transfer.supervised_reference"} == {
        "transfer.supervised_reference.finetune",
        "transfer.supervised_reference.collect",
    }
    out = run_memory(pipe, {"manifest": manifest, "coco_annotations": annotations}, params)
    tasks = out["transfer_tiny_metrics"]["tasks"]
    assert list(tasks) == [
        "linear_probe",
        "knn_probe",
        "seg_probe",
        "fg_probe",
        "finetune",
        "detection",
        "segmentation",
    ]
    assert all(t["status"] == "ok" for t in tasks.values())
    assert 0 <= tasks["linear_probe"]["top1"] <= 100 and 0 <= tasks["detection"]["mask_ap"] <= 100
    assert tasks["segmentation"]["num_classes"] == 11  # 10 shapes + background, from the annotations
    assert tasks["seg_probe"]["num_classes"] == 11 and 0 <= tasks["seg_probe"]["miou"] <= 100
    assert tasks["fg_probe"]["num_classes"] == 2 and 0 <= tasks["fg_probe"]["miou"] <= 100
    assert "top1_std" not in tasks["knn_probe"] and tasks["knn_probe"]["seeds"] == [0]  # one seed: no spread
    assert tasks["finetune"]["encoder"] == str(enc)
    reference = out["transfer_supervised_reference_metrics"]["tasks"]
    assert reference["finetune"]["status"] == "ok" and reference["finetune"]["model"] == "SmallCNN"
    assert 0 <= reference["finetune"]["top1"] <= 100
    assert all(t == {"status": "disabled"} for name, t in reference.items() if name != "finetune")


def test_report_in_memory_rows_follow_the_encoders(run_memory) -> None:
    def metrics(top1):
        return {"tasks": {"linear_probe": {"status": "ok", "top1": top1}, "finetune": {"status": "disabled"}}}

    params = {
        "transfer": {"encoders": {"b": None, "a": None}},
        "recipe_defaults": {"encoder": TINY},
        "recipes": {},
        "report": {**load_config("parameters")["report"], "mlflow": False},
    }
    inputs = {"transfer_b_metrics": metrics(40.0), "transfer_a_metrics": metrics(30.0)}
    out = run_memory(report.create_pipeline(["b", "a"]), inputs, params)
    rows = out["report"]["rows"]
    assert [r["recipe"] for r in rows] == ["b", "a"] and rows[0]["linear_top1"] == 40.0
    assert rows[1]["finetune_top1"] is None  # disabled: no figure
    assert out["report_table_md"].startswith("| pre-training") and len(out["report_table_csv"]) == 2
    assert out["report_metrics_b"]["linear_top1"] == 40.0 and out["report_metrics_a"]["linear_top1"] == 30.0
    assert "finetune_top1" not in out["report_metrics_a"]  # no figure: DVC shows "-"


def test_a_switched_off_task_has_no_node_and_reports_disabled(scenes) -> None:
    _, _, enc = scenes
    params = micro_transfer(enc)
    params["tasks"] = {**params["tasks"], "detection": {"enabled": False}}
    pipe = transfer.create_pipeline(["tiny"], params)
    assert {n.name for n in pipe.nodes} == {
        "transfer.tiny.linear_probe",
        "transfer.tiny.knn_probe",
        "transfer.tiny.seg_probe",
        "transfer.tiny.fg_probe",
        "transfer.tiny.finetune",
        "transfer.tiny.segmentation",
        "transfer.tiny.collect",
    }
    merged = collect_metrics(
        {"top1": 1},
        {"top1": 2},
        encoder="tiny",
        tasks=["linear_probe", "finetune", "detection", "segmentation"],
        ran=["linear_probe", "finetune"],
    )
    assert merged["tasks"]["detection"] == {"status": "disabled"}
    assert list(merged["tasks"]) == ["linear_probe", "finetune", "detection", "segmentation"]


def test_a_misspelt_transfer_key_stops_the_run_naming_key_and_task(scenes) -> None:
    manifest, annotations, enc = scenes
    params = micro_transfer(enc)
    params["tasks"] = {**params["tasks"], "finetune": {**params["tasks"]["finetune"], "layer_decayy": 0.7}}
    with pytest.raises(ConfigError, match=r"transfer\.tasks\.finetune: unknown key 'layer_decayy'"):
        transfer.create_pipeline(["tiny"], params)  # when the pipeline is made, before any node runs
    with pytest.raises(ConfigError, match=r"transfer\.tasks\.finetune: unknown key 'layer_decayy'"):
        run_task(manifest, params, {"encoder": TINY}, annotations, encoder="tiny", task="finetune")
    # a task no listed encoder runs is checked too (the supervised reference's CNN)
    params = micro_transfer(enc)
    params["tasks"] = {**params["tasks"], "supervised_reference": {"widthz": [8]}}
    with pytest.raises(ConfigError, match=r"transfer\.tasks\.supervised_reference: unknown key 'widthz'"):
        transfer.create_pipeline(["tiny"], params)


def test_encoder_reference_and_missing_files(scenes, tmp_path) -> None:
    manifest, _, enc = scenes
    params = micro_transfer(enc)
    assert encoder_reference(params, "tiny", None) == str(enc)
    assert (
        encoder_reference(params, "tiny", f" {tmp_path}/pre.safetensors\n") == f"{tmp_path}/pre.safetensors"
    )
    with pytest.raises(KeyError, match="transfer.encoders: no entry 'mae'"):
        encoder_reference(params, "mae", None)
    params["encoders"]["tiny"] = str(tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match="encoder file .*gone.safetensors does not exist"):
        run_task(manifest, params, {"encoder": TINY}, encoder="tiny", task="finetune")
    skipped = run_task(manifest, {**params, "on_missing": "skip"}, {}, encoder="tiny", task="finetune")
    assert skipped["status"] == "missing"
