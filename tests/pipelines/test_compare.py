"""``compare``: the settings check, the pipeline the registry builds from parameters_compare.yml, an in-memory
run on micro configs (MAE, then MR-MAE with the compare's own MAE as its teacher), the table, and
``kedro run --pipelines=compare`` end to end on a micro project."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from maelab.config import deep_merge, load_config
from maelab.pipeline_registry import build_pipelines
from maelab.pipelines import compare, ingest, regions
from maelab.pipelines.compare.nodes import resolve

_spec = importlib.util.spec_from_file_location(
    "scenes_fixture", Path(__file__).parents[1] / "transfer" / "scenes_fixture.py"
)
scenes_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_fixture)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
PIXEL = {"embed_dim": 16, "depth": 1, "num_heads": 2}
REGION = {"num_regions": 2, "dim": 16, "enc_dim": 16, "num_heads": 2, "enc_heads": 2}
MICRO_TASKS = {"linear_probe": scenes_fixture.MICRO_TASKS["linear_probe"]}


@pytest.fixture(scope="module")
def params():
    return load_config("parameters")


def micro_pretrain(base: dict, out_dir: Path | str) -> dict:
    defaults = deep_merge(
        base["recipe_defaults"],
        {
            "encoder": TINY,
            "data": {"num_workers": 0},
            "train": {"steps": 50, "batch_size": 4, "out_dir": str(out_dir), "log_every": 1},
        },
    )
    recipes = {
        "mae": deep_merge(base["recipes"]["mae"], {"heads": {"pixel": PIXEL}}),
        "mrmae": deep_merge(base["recipes"]["mrmae"], {"heads": {"pixel": PIXEL}}),
        "rmae": deep_merge(
            base["recipes"]["rmae"], {"data": {"regions": {"k": 2}}, "heads": {"pixel": PIXEL}}
        ),
    }
    recipes["rmae"]["heads"]["region"] = deep_merge(recipes["rmae"]["heads"]["region"], REGION)
    return {"recipe_defaults": defaults, "recipes": recipes}


MICRO_COMPARE = {
    "recipes": ["mae", "mrmae"],
    "teachers": {"mrmae": "mae"},
    "budget": {"steps": 3, "warmup_steps": 1, "ckpt_every": 0, "image_every": 0},
    "tasks": ["linear_probe"],
    "mlflow": False,
}


# -- the settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,match",
    [
        ({"recipez": ["mae"]}, r"compare.recipez: unknown key"),
        ({"recipes": ["mae", "nope"]}, r"compare.recipes: 'nope' is not a recipe"),
        ({"recipes": []}, r"compare.recipes: must be a non-empty list"),
        ({"teachers": {"mrmae": "rmae"}}, r"compare.teachers.mrmae: 'rmae' must be another compared"),
        ({"teachers": {"mrmae": "mrmae"}}, r"compare.teachers.mrmae"),
        ({"teachers": {"nope": "mae"}}, r"compare.teachers.nope: not a recipe"),
        ({"budget": {"stepz": 3}}, r"compare.budget.stepz: unknown train key"),
        ({"overrides": {"nope": {}}}, r"compare.overrides.nope: not a recipe"),
        ({"tasks": ["linear"]}, r"compare.tasks: 'linear' is not a transfer task"),
    ],
)
def test_a_bad_compare_block_fails_naming_the_key(params, change, match):
    with pytest.raises(ValueError, match=match):
        compare.compare_settings({**MICRO_COMPARE, **change}, params["recipes"])


def test_the_default_compares_every_method_and_the_combinations(params):
    cfg = compare.compare_settings(params["compare"], params["recipes"])
    need = {"mae", "rmae", "lomar", "mrmae", "sgmae", "longseq", "rmae_block", "rmae_longseq", "rmae_mimic"}
    assert need <= set(cfg["recipes"])
    assert cfg["teachers"] == {"mrmae": "mae", "rmae_mimic": "mae"}
    assert "linear_probe" in cfg["tasks"]
    # a recipe left out keeps its teacher and overrides in the file, unused
    fewer = compare.compare_settings({**params["compare"], "recipes": ["mae", "mrmae"]}, params["recipes"])
    assert fewer["teachers"] == {"mrmae": "mae"}


# -- the pipeline the registry builds --------------------------------------------------------------------
def test_the_registry_builds_compare_from_the_parameters(params):
    pipe = build_pipelines(params)["compare"]
    names = params["compare"]["recipes"]
    for name in names:
        assert {n.name for n in pipe.nodes if n.namespace == f"compare.{name}"} == {
            f"compare.{name}.resolve_recipe",
            f"compare.{name}.train",
        }
        reads = {n.name for n in pipe.nodes if f"compare_{name}_encoder" in n.inputs}
        assert f"transfer.compare_{name}.linear_probe" in reads
    resolve_mrmae = next(n for n in pipe.nodes if n.name == "compare.mrmae.resolve_recipe")
    assert "compare_mae_encoder" in resolve_mrmae.inputs  # the teacher: the compare's own MAE
    trains_with_regions = {
        n.name for n in pipe.nodes if "region_store" in n.inputs and n.name.endswith(".train")
    }
    assert trains_with_regions == {
        f"compare.{n}.train" for n in ("rmae", "rmae_block", "rmae_longseq", "rmae_mimic")
    }
    table = next(n for n in pipe.nodes if n.name == "compare_table.build_table")
    assert table.inputs == ["params:compare"] + [f"compare_{n}_row" for n in names]
    assert table.outputs == ["compare", "compare_table_md", "compare_table_csv", "compare_plot"]
    free = {d for d in pipe.inputs() if not d.startswith("params:")}
    assert free == {"region_store_previous", "run_env"}  # everything else is made in the run
    assert not any(d.startswith("pretrain_") for d in pipe.all_outputs())  # pretrain's outputs untouched


def test_resolve_applies_budget_overrides_and_teacher(params):
    cfg = {**MICRO_COMPARE, "overrides": {"mrmae": {"masker": {"ratio": 0.5}}}}
    r = resolve(
        params["recipes"], params["recipe_defaults"], cfg, " /x/enc.safetensors\n", recipe_name="mrmae"
    )
    assert (
        r["train"]["steps"] == 3
        and r["train"]["batch_size"] == params["recipe_defaults"]["train"]["batch_size"]
    )
    assert r["masker"]["ratio"] == 0.5 and r["heads"]["mimic"]["teacher"]["weights"] == "/x/enc.safetensors"
    with pytest.raises(ValueError, match="compare.teachers.mae: recipe 'mae' has no teacher"):
        resolve(params["recipes"], params["recipe_defaults"], cfg, "/x", recipe_name="mae")


def test_the_prefect_compare_deployment_runs_it_on_a_schedule_and_publishes_the_table():
    from maelab.orchestration.retrain import published_tables

    conf = yaml.safe_load((Path(__file__).parents[2] / "pipelines/prefect.yaml").read_text())
    (dep,) = [d for d in conf["deployments"] if d["name"] == "compare"]
    assert dep["entrypoint"] == "flows.py:kedro_flow" and dep["parameters"]["pipelines"] == ["compare"]
    assert dep["schedules"][0]["cron"] and dep["schedules"][0]["active"]
    assert published_tables(["ingest", "compare"]) == [("compare.json", "maelab-compare")]
    assert published_tables(["rmae_full", "report"]) == [("report.json", "maelab-report")]


# -- in memory on micro configs ---------------------------------------------------------------------------
def test_compare_in_memory_mae_then_mrmae_on_its_encoder(tmp_path, monkeypatch, params, run_memory):
    monkeypatch.setattr("maelab.config.mlflow_settings", lambda env=None: {"enabled": False})
    manifest = scenes_fixture.make_scenes(tmp_path, n_train=8, n_val=4, size=32)
    monkeypatch.chdir(tmp_path)
    pre = micro_pretrain(params, tmp_path / "models")
    transfer = {
        "encoders": {},
        "device": "cpu",
        "data": {"sources": ["scenes"], "max_eval_images": 4},
        "tasks": MICRO_TASKS,
    }
    pipe = compare.create_pipeline(MICRO_COMPARE, pre, transfer)
    pipe = pipe - ingest.create_pipeline() - regions.create_pipeline()
    inputs = {"manifest": manifest, "run_env": None}
    all_params = {**pre, "compare": MICRO_COMPARE, "transfer": transfer, "report": params["report"]}
    out = run_memory(pipe, inputs, all_params)

    mae_enc = out["compare_mae_encoder"]
    assert mae_enc == str(tmp_path / "models/mae/encoder.safetensors") and Path(mae_enc).is_file()
    mrmae = out["compare_mrmae_recipe"]
    assert mrmae["heads"]["mimic"]["teacher"]["weights"] == mae_enc and mrmae["train"]["steps"] == 3
    assert set(out["compare_mrmae_report"]["heads"]) == {"pixel", "mimic"}
    rows = out["compare"]["rows"]
    assert [r["recipe"] for r in rows] == ["mae", "mrmae"]
    for r in rows:
        assert r["steps"] == 3 and r["images"] == 12 and r["gmacs"] > 0, r
        assert r["pretrain_wall_s"] > 0 and r["images_per_s"] > 0 and r["peak_mem_mb"] > 0, sorted(r.items())
        assert 0 <= r["linear_top1"] <= 100 and "knn_top1" not in r, r
    assert rows[1]["gmacs"] > rows[0]["gmacs"]  # MR-MAE pays for its teacher's forward
    assert out["compare_table_md"].count("\n") == 4 and list(out["compare_table_csv"]["recipe"]) == [
        "mae",
        "mrmae",
    ]
    assert len(out["compare_plot"].axes) == 2


# -- kedro run --pipelines=compare end to end ------------------------------------------------------------
MICRO_INGEST = {
    "workers": 0,
    "sources": [
        {
            "type": "scenes",
            "root": "data/01_raw/scenes",
            "seed": 3,
            "size": 64,
            "splits": {"train": 12, "val": 6},
        }
    ],
}
MICRO_REGIONS = {"workers": 0, "shard_size": 8, "progress": False, "sources": {"fh": {"scales": [20, 60]}}}


@pytest.mark.slow
def test_kedro_run_compare_writes_the_table_and_logs_it(kedro_project: Path, kedro_run, params) -> None:
    local = kedro_project / "conf/local"
    pre = micro_pretrain(params, "data/06_models/compare")
    pre["recipe_defaults"]["train"]["out_dir"] = "data/06_models/pretrain"
    (local / "parameters_ingest.yml").write_text(yaml.safe_dump({"ingest": MICRO_INGEST}))
    (local / "parameters_regions.yml").write_text(yaml.safe_dump({"regions": MICRO_REGIONS}))
    (local / "parameters_pretrain.yml").write_text(yaml.safe_dump(pre))
    (local / "parameters_transfer.yml").write_text(
        yaml.safe_dump({"transfer": {"data": {"max_eval_images": 4}, "tasks": MICRO_TASKS}})
    )
    micro = {**MICRO_COMPARE, "recipes": ["mae", "rmae", "mrmae"], "mlflow": True}
    micro["budget"] = {**micro["budget"], "batch_size": 4, "out_dir": "data/06_models/compare"}
    (local / "parameters_compare.yml").write_text(yaml.safe_dump({"compare": micro}))
    kedro_run(kedro_project, "compare")

    reporting = kedro_project / "data/08_reporting"
    rows = json.loads((reporting / "compare.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["mae", "rmae", "mrmae"]
    for r in rows:
        for key in ("gmacs", "pretrain_wall_s", "images_per_s", "peak_mem_mb", "linear_top1"):
            assert isinstance(r[key], float) and r[key] >= 0, (r["recipe"], key)
    assert rows[1]["gmacs"] > rows[0]["gmacs"]  # R-MAE's region branch costs something
    assert (reporting / "compare.md").read_text().startswith("| pre-training |")
    assert (reporting / "compare.csv").read_text().splitlines()[0].startswith("recipe,gmacs,")
    with Image.open(reporting / "compare_vs_cost.png") as plot:
        assert plot.width > plot.height > 100
    teacher = json.loads((kedro_project / "data/06_models/compare/mrmae/resolved_recipe.json").read_text())
    assert teacher["heads"]["mimic"]["teacher"]["weights"].endswith("compare/mae/encoder.safetensors")
    assert not (kedro_project / "data/06_models/pretrain").exists()  # compare keeps to its own folders

    import mlflow

    from maelab.orchestration.registry import list_models, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(experiment_names=["maelab"], filter_string="attributes.run_name = 'compare'")
    assert len(runs) == 1 and runs["metrics.mrmae.linear_top1"].notna().all()
    assert np.isclose(runs["metrics.rmae.gmacs"].iloc[0], rows[1]["gmacs"])
    assert not list_models()  # the compare's short runs are not registered
