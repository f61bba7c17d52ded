"""The teachers pipeline in memory on a tiny manifest: it fills the store, reports agreement with the online
teacher, and a second run computes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from maelab.datasets import TeacherStoreDataset
from maelab.pipelines.teachers import create_pipeline
from maelab.pipelines.teachers.nodes import check_params
from maelab.regions.store import RegionStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "teachers"))
from teacher_parts import TEACHER_ENC, save_teacher, write_images  # noqa: E402


def params(teacher: Path) -> dict:
    return {
        "compute": ["tiny"],
        "images": {"sources": ["toy"], "splits": ["train"]},
        "teachers": {"tiny": {"type": "maelab", "weights": str(teacher)}},
        "batch_size": 4,
        "shard_size": 3,
        "progress": False,
        "agreement": {"images": 4, "recipe": "toy", "seed": 0},
    }


RECIPES = {"toy": {"encoder": {"img_size": 32, "patch_size": 8}, "data": {"crop_scale": [0.3, 1.0]}}}


def test_teachers_pipeline_in_memory_is_incremental_and_reports_agreement(
    tmp_path, run_memory, monkeypatch
) -> None:
    manifest = write_images(tmp_path / "toy", 5)
    teacher = save_teacher(tmp_path / "teacher.safetensors")
    store_dir = tmp_path / "teachers"

    def run(**change):
        inputs = {
            "manifest": manifest,
            "teacher_store_previous": TeacherStoreDataset(str(store_dir)),
            "teacher_store": TeacherStoreDataset(str(store_dir)),
            "run_env": None,
        }
        extra = {"teachers": {**params(teacher), **change}, "recipes": RECIPES, "recipe_defaults": {}}
        out = run_memory(create_pipeline(), inputs, extra)
        assert isinstance(out["teacher_store"], RegionStore) and out["teacher_store"].path == store_dir
        return out["teachers_report"]["teachers"]["tiny"]

    first = run()
    assert (first["computed"], first["stored"], first["shards_written"]) == (5, 5, 2)
    assert RegionStore(store_dir)["tiny"].get("toy:train:0").shape == (TEACHER_ENC["embed_dim"], 4, 4)
    check = first["agreement"]
    assert check["recipe"] == "toy" and check["images"] == 4 and check["grid"] == [4, 4]
    assert check["identity"]["mean_cosine"] > 0.999
    assert check["wrong_flip"]["mean_cosine"] < check["views"]["mean_cosine"]

    assert check["identity"]["mean_cosine_centred"] > 0.999

    def never(*args, **kwargs):
        raise AssertionError("computed in a run with nothing to compute")

    with monkeypatch.context() as m:  # nothing changed: no teacher forward, for the store or the agreement
        m.setattr("maelab.teachers.store.TeacherSource.compute_batch", never)
        m.setattr("maelab.pipelines.teachers.nodes.agreement", never)
        second = run()
    assert (second["computed"], second["up_to_date"], second["shards_written"]) == (0, 5, 0)
    assert second["agreement"] == check

    third = run(agreement={"images": 3, "recipe": "toy", "seed": 1})  # other views: measured again
    assert third["computed"] == 0 and third["agreement"]["images"] == 3


def test_teachers_params_are_strict() -> None:
    with pytest.raises(ValueError, match=r"teachers\.batchsize: unknown key"):
        check_params({"batchsize": 2})
    with pytest.raises(ValueError, match=r"teachers\.agreement\.image: unknown key"):
        check_params({"agreement": {"image": 2}})


def test_a_store_recipe_gets_its_folder_and_its_pipeline_reads_the_store(tmp_path) -> None:
    from maelab.pipeline_registry import pretrain_pipelines
    from maelab.pipelines.pretrain.nodes import with_teacher_store

    recipe = {"name": "r", "data": {"teacher": {"mode": "store", "source": "tiny"}}}
    store = RegionStore(tmp_path / "teachers", codec="raw")
    got = with_teacher_store(recipe, store)["data"]["teacher"]["store"]
    assert got == str(tmp_path / "teachers" / "tiny")
    assert "store" not in recipe["data"]["teacher"]  # the input recipe is left alone
    online = {"name": "o", "data": {"teacher": {"mode": "online"}}}
    assert with_teacher_store(online, None) is online
    with pytest.raises(ValueError, match=r"data\.teacher\.source"):
        with_teacher_store({"name": "r", "data": {"teacher": {"mode": "store"}}}, store)
    with pytest.raises(ValueError, match="no teacher_store input"):
        with_teacher_store(recipe, None)

    base = {"encoder": {"img_size": 32, "patch_size": 8}, "heads": {"pixel": {"type": "pixel_decoder"}}}
    pipes = pretrain_pipelines(
        {
            "recipe_defaults": base,
            "recipes": {"online": {}, "stored": {"data": {"teacher": {"mode": "store", "source": "t"}}}},
        }
    )
    assert "teacher_store" in pipes["stored"].inputs() and "teacher_store" not in pipes["online"].inputs()
