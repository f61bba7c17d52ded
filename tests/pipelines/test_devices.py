"""``train.devices: auto`` (conf/coco, conf/imagenet): every visible GPU, 1 without; the schema takes it."""

from __future__ import annotations

import pytest
import torch

from maelab.pipelines.pretrain.nodes import resolve_devices, run_tags
from maelab.schema import ConfigError, TrainConfig


def test_auto_counts_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_devices("auto") == 4 and resolve_devices(2) == 2 and resolve_devices(None) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_devices("auto") == 1


def test_schema_takes_auto_and_counts_only():
    assert TrainConfig(devices="auto").devices == "auto" and TrainConfig(devices=8).devices == 8
    for bad in ("autoo", 0):
        with pytest.raises((ConfigError, ValueError)):
            TrainConfig(devices=bad)


def test_torchrun_ranks_get_the_nodes_run_tags(monkeypatch):
    from maelab.train.tracking import TAGS_ENV, env_tags

    monkeypatch.setenv(TAGS_ENV, '{"maelab.env": "coco", "maelab.pipeline": "pretrain_rmae"}')
    assert env_tags() == run_tags({"name": "rmae"}, "coco")
    monkeypatch.setenv(TAGS_ENV, "[1]")
    with pytest.warns(RuntimeWarning, match="ignored"):
        assert env_tags() == {}
