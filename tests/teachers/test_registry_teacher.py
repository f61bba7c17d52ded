"""A registry teacher: a tiny maelab encoder registered in a temp sqlite MLflow store resolves from
models:/NAME@ALIAS to a local file and loads as a teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from maelab.orchestration.teachers import resolve_teacher_weights
from maelab.teachers import build_teacher

CFG = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def test_registry_teacher_resolves_alias(mlflow_home):
    import mlflow
    from safetensors.torch import save_file

    from maelab.models.vit import build_encoder
    from maelab.orchestration import registry

    root = mlflow_home
    torch.manual_seed(0)
    enc = build_encoder(CFG)
    path = root / "encoder.safetensors"
    save_file(enc.state_dict(), str(path), metadata={"encoder_config": json.dumps(CFG)})
    registry.client()
    exp = mlflow.set_experiment("teachers-test")
    with mlflow.start_run(experiment_id=exp.experiment_id) as run:
        mlflow.log_artifact(str(path), artifact_path="encoder")
    version = registry.register_encoder(run.info.run_id, path, "mae")
    name = registry.model_name("mae", registry.arch_name(CFG))

    recipe = {
        "heads": {
            "mimic": {"type": "mimic", "teacher": {"type": "maelab", "weights": f"models:/{name}@champion"}}
        }
    }
    resolved = resolve_teacher_weights(recipe)
    assert recipe["heads"]["mimic"]["teacher"]["weights"].startswith("models:/")  # input left alone
    local = resolved["heads"]["mimic"]["teacher"]["weights"]
    assert Path(local).is_file() and version == 1
    teacher = build_teacher(resolved["heads"]["mimic"]["teacher"])
    torch.testing.assert_close(teacher.encoder.patch_embed.proj.weight, enc.patch_embed.proj.weight)
    assert teacher(torch.randn(1, 3, 32, 32)).features.shape == (1, 16, 64)


def test_unregistered_teacher_says_what_to_run(mlflow_home):
    import pytest

    from maelab.orchestration.teachers import resolve_weights

    with pytest.raises(LookupError, match="kedro run --pipelines=pretrain_mae"):
        resolve_weights("models:/maelab-mae-vit-t8-64-d6@champion")
    assert resolve_weights("some/local/file.pt") == "some/local/file.pt"
