"""Each transfer env builds nodes only for the tasks its data can serve: COCO has no image-level labels and
ADE20K only scene categories, so no kNN probe there; the supervised CNN is the embedded task's ceiling, so
the paper envs do not train it."""

from __future__ import annotations

from pathlib import Path

import pytest

from maelab.config import load_config
from maelab.pipelines.transfer.pipeline import create_pipeline, evaluated_encoders
from maelab.transfer.config import ENCODER_TASKS, task_config

CONF = Path(__file__).resolve().parents[2] / "conf"

BASE_TASKS = {"linear_probe", "knn_probe", "fg_probe", "finetune", "detection", "segmentation"}
TASKS_BY_ENV = {
    None: BASE_TASKS,
    "benchmark": BASE_TASKS | {"seg_probe"},  # every encoder task
    "imagenet": {"linear_probe", "knn_probe", "finetune"},
    "coco": {"detection"},
    "ade20k": {"segmentation"},
}


def test_the_benchmark_env_runs_every_encoder_task() -> None:
    assert set(ENCODER_TASKS) == TASKS_BY_ENV["benchmark"]


def transfer_nodes(env: str | None) -> tuple[list[str], set[tuple[str, str]]]:
    transfer = load_config("parameters", env, CONF)["transfer"]
    encoders = evaluated_encoders(transfer)
    nodes = create_pipeline(encoders, transfer).nodes
    pairs = {tuple(n.name.split(".")[1:]) for n in nodes if not n.name.endswith(".collect")}
    return encoders, pairs  # (encoder, task)


@pytest.mark.parametrize("env", list(TASKS_BY_ENV))
def test_each_env_runs_only_the_tasks_its_data_serves(env: str | None) -> None:
    encoders, pairs = transfer_nodes(env)
    pretrained = [e for e in encoders if e != "supervised_reference"]
    assert pretrained == ["mae", "rmae", "random_init"]
    assert {(e, t) for e, t in pairs if e != "supervised_reference"} == {
        (e, t) for e in pretrained for t in TASKS_BY_ENV[env]
    }
    with_reference = env in (None, "benchmark")  # the CNN ceiling belongs to the embedded scenes task
    assert ("supervised_reference" in encoders) is with_reference
    assert (("supervised_reference", "finetune") in pairs) is with_reference


def test_imagenet_knn_is_dinos_protocol_at_the_paper_size() -> None:
    cfg = task_config("knn_probe", load_config("parameters", "imagenet", CONF)["transfer"])
    assert (cfg.img_size, cfg.patch_size, cfg.pool, cfg.standardize) == (224, 16, "cls", False)
    assert (cfg.k, cfg.temperature) == (20, 0.07)
