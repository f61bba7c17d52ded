"""Full pre-training states registered beside the encoder, and continuing pre-training from them
(``train.init_from: models:/NAME@ALIAS``) exactly as an uninterrupted run goes on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from maelab.config import deep_merge, load_config, resolve_recipe
from maelab.orchestration import registry
from maelab.pipelines.pretrain.nodes import pretrain
from maelab.train.engine import train

_spec = importlib.util.spec_from_file_location(
    "pretrain_test", Path(__file__).parents[1] / "pipelines" / "test_pretrain.py"
)
_pretrain_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pretrain_test)
micro_manifest = _pretrain_test.micro_manifest

# constant lr (min_lr = lr, no warm-up): a 4-step run is the first 4 steps of a 6-step run
MICRO = {
    "encoder": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "data": {"num_workers": 0, "sources": ["micro"]},
    "heads": {"pixel": {"embed_dim": 16, "depth": 1, "num_heads": 2}},
    "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "log_every": 1,
              "ckpt_every": 0, "image_every": 0, "precision": "fp32", "device": "cpu"},
}  # fmt: skip


PARAMS = load_config("parameters")  # the repository's conf (the mlflow_home project root has none)


def micro_recipe(tmp_path: Path, out: str, **train) -> dict:
    params = PARAMS
    recipe = resolve_recipe(
        {"recipes": params["recipes"], "recipe_defaults": deep_merge(params["recipe_defaults"], MICRO)}, "mae"
    )
    recipe["train"].update(out_dir=str(tmp_path / out), **train)
    return recipe


def test_continue_from_the_registered_champion_goes_on_as_one_uninterrupted_run(tmp_path, mlflow_home):
    manifest = micro_manifest(tmp_path / "micro")
    first, *_ = pretrain(manifest, micro_recipe(tmp_path, "a"), None)
    name = "maelab-mae-vit-w32p8-32-d2"
    mv = registry.get_version(f"{name}@champion")
    assert int(mv.version) == first["registered_version"] == 1
    assert mv.tags["state_file"] == "state/state.pt" and mv.tags["state_step"] == "4"
    assert mv.tags["state_heads"] == "pixel_decoder"

    state = registry.read_full_state(registry.resolve_state(f"models:/{name}@champion"))
    assert state["step"] == 4 and state["data"]["consumed"] == 4 and state["optimizer"]["state"]
    assert state["recipe"]["name"] == "mae" and "encoder.cls_token" in state["model"]
    assert "decoder_pred.weight" in {k.split(".", 2)[-1] for k in state["model"]}  # the pixel head too

    uri = f"models:/{name}@champion"
    with pytest.raises(ValueError, match=r"at step 4; train.steps \(4\) .* must be larger"):
        pretrain(manifest, micro_recipe(tmp_path, "b", init_from=uri), None)  # nothing left to train
    cont, *_ = pretrain(manifest, micro_recipe(tmp_path, "c", steps=6, init_from=uri), None)
    assert cont["registered_version"] == 2
    whole = train(micro_recipe(tmp_path, "w", steps=6), manifest, mlflow=None)  # uninterrupted, untracked

    def losses(version: int) -> list[float]:
        path = registry.resolve_state(f"models:/{name}/{version}")
        return registry.read_full_state(path)["history"]["loss"]

    registered, continued, uninterrupted = losses(1), losses(2), whole.history["loss"]
    assert registered == uninterrupted[:4]  # the registered run is the start of the whole one
    # the continued run's history starts with the registered run's; its own first loss (step 5) and the
    # next are the uninterrupted run's, bit for bit on CPU fp32: the same weights, optimiser moments, data
    # position and RNG
    assert continued[:4] == registered and len(continued) == 6
    assert continued[4:] == uninterrupted[4:]
    assert abs(continued[4] - registered[-1]) < abs(uninterrupted[0] - registered[-1])  # no restart
    assert cont["mlflow_run_id"] not in (first["mlflow_run_id"], None)  # a new run; the registered one kept
    params = registry.client().get_run(cont["mlflow_run_id"]).data.params
    assert params["train.init_from_uri"] == uri
    assert registry.get_version(f"{name}/2").tags["state_step"] == "6"
    assert int(registry.get_version(f"{name}@champion").version) == 1  # registering does not promote
    assert np.isfinite(cont["last_loss"])


def test_a_version_without_a_state_or_a_missing_file_is_refused(tmp_path, fake_run):
    run, enc = fake_run(1)  # registered by hand: an encoder, no state
    registry.register_encoder(run, enc, "rmae")
    with pytest.raises(LookupError, match="has no full training state"):
        registry.resolve_state("models:/maelab-rmae-vit-t8-64@champion")
    with pytest.raises(FileNotFoundError, match="no such training state"):
        registry.resolve_state(tmp_path / "missing.pt")
