import importlib.util
from pathlib import Path

import pytest
import torch

from maelab.transfer.config import ConfigError, task_config
from maelab.transfer.supervised import SmallCNN, run_supervised_reference

_spec = importlib.util.spec_from_file_location("scenes_fixture", Path(__file__).parent / "scenes_fixture.py")
scenes_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenes_fixture)


def test_small_cnn_shapes_and_stages():
    model = SmallCNN(7, widths=(8, 16, 16))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 2


def test_supervised_reference_runs_over_seeds_and_refuses_an_encoder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = scenes_fixture.make_scenes(tmp_path, n_train=16, n_val=8, size=32)
    params = {
        "img_size": 32,
        "steps": 3,
        "warmup_steps": 1,
        "batch_size": 8,
        "widths": [8, 8],
        "seeds": [0, 1],
    }
    cfg = task_config("supervised_reference", {"device": "cpu", "tasks": {"supervised_reference": params}})
    out = run_supervised_reference(manifest, None, {}, cfg)
    assert 0.0 <= out["top1"] <= 100.0 and len(out["top1_seeds"]) == 2 and "top1_std" in out
    assert out["steps"] == 3 and out["train_images"] == 16
    with pytest.raises(ValueError, match="from scratch"):
        run_supervised_reference(manifest, "some/encoder.safetensors", {}, cfg)


def test_supervised_reference_config_refuses_an_unknown_optimizer():
    with pytest.raises(ConfigError, match=r"supervised_reference\.optimizer: expected adamw \| sgd"):
        task_config("supervised_reference", {"tasks": {"supervised_reference": {"optimizer": "lamb"}}})
