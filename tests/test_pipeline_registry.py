"""The registry builds every pipeline from the parameters; datasets connect the stages of rmae_full."""

from __future__ import annotations

import copy

import pytest

from maelab.config import load_config
from maelab.pipeline_registry import build_pipelines
from maelab.transfer.config import ConfigError


@pytest.fixture(scope="module")
def params():
    return load_config("parameters")


def producers_and_readers(pipeline, dataset):
    made = {n.name for n in pipeline.nodes if dataset in n.outputs}
    read = {n.name for n in pipeline.nodes if dataset in n.inputs}
    return made, read


def test_every_recipe_gets_its_pretrain_pipeline(params):
    extra = copy.deepcopy(params)
    extra["recipes"]["new_recipe"] = {"masker": {"ratio": 0.5}}
    pipelines = build_pipelines(extra)
    for name in extra["recipes"]:
        assert {n.name for n in pipelines[f"pretrain_{name}"].nodes} == {
            f"pretrain_{name}.resolve_recipe",
            f"pretrain_{name}.train",
        }
    assert "region_store" in pipelines["pretrain_rmae"].inputs()  # it reads regions (data.regions)
    assert "region_store" not in pipelines["pretrain_mae"].inputs()
    assert pipelines["pretrain"] is pipelines[f"pretrain_{params['pretrain']['recipe']}"]


def test_rmae_full_joins_its_stages_through_datasets(params):
    full = build_pipelines(params)["rmae_full"]
    assert producers_and_readers(full, "region_store") == ({"compute_regions"}, {"pretrain_rmae.train"})
    made, read = producers_and_readers(full, "coco_annotations")
    assert made == {"export_annotations"}
    assert read >= {"transfer.rmae.detection", "transfer.mae.segmentation", "interactive_rmae"}
    assert producers_and_readers(full, "pretrain_rmae_checkpoint") == (
        {"pretrain_rmae.train"},
        {"interactive_rmae"},
    )
    made, read = producers_and_readers(full, "pretrain_mae_encoder")
    assert made == {"pretrain_mae.train"} and "transfer.mae.finetune" in read
    free = {d for d in full.inputs() if not d.startswith("params:")}
    assert free == {"region_store_previous", "run_env"}  # every other dataset is made in the run
    report = next(n for n in full.nodes if n.name == "report.build_report")
    assert report.inputs[-4:] == [
        "transfer_rmae_metrics",
        "transfer_mae_metrics",
        "transfer_random_init_metrics",
        "transfer_supervised_reference_metrics",  # the supervised CNN: its one node is its fine-tune
    ]
    reference = {n.name for n in full.nodes if n.namespace == "transfer.supervised_reference"}
    assert reference == {"transfer.supervised_reference.finetune", "transfer.supervised_reference.collect"}


def test_a_misspelt_transfer_key_fails_when_the_pipelines_are_made(params):
    bad = copy.deepcopy(params)
    bad["transfer"]["tasks"]["segmentation"]["layer_decayy"] = 0.7
    with pytest.raises(ConfigError, match=r"transfer\.tasks\.segmentation: unknown key 'layer_decayy'"):
        build_pipelines(bad)


def test_rmae_full_must_pretrain_the_interactive_recipe(params):
    bad = copy.deepcopy(params)
    bad["rmae_full"] = {"encoders": ["mae", "random_init"]}
    with pytest.raises(ValueError, match="interactive.recipe: 'rmae' is not pre-trained in rmae_full"):
        build_pipelines(bad)
