"""The registered encoder is an MLflow pytorch model: after a tiny pre-training, ``models:/NAME@champion``
loads with ``mlflow.pytorch.load_model`` and embeds the logged input example as the encoder does."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from fake_parts import tiny_recipe, write_images  # noqa: E402

from maelab.config import mlflow_settings  # noqa: E402
from maelab.models import build_encoder  # noqa: E402
from maelab.models.embedder import ImageEmbedder  # noqa: E402
from maelab.orchestration import registry  # noqa: E402
from maelab.train.engine import train  # noqa: E402
from maelab.train.tracking import MODEL_ID_TAG  # noqa: E402


def test_champion_loads_with_mlflow_pytorch_and_embeds_like_the_encoder(mlflow_home, tmp_path) -> None:
    import mlflow
    from mlflow.models import Model
    from safetensors.torch import load_file

    manifest = write_images(tmp_path / "images")
    settings = {**mlflow_settings(), "tags": {"maelab.env": "test", "maelab.pipeline": "pretrain_tiny"}}
    result = train(tiny_recipe(steps=2), manifest, out_dir=tmp_path / "out", mlflow=settings, progress=False)
    version = registry.register_encoder(result.mlflow_run_id, result.encoder_path, "mae")
    c = registry.client()
    run = c.get_run(result.mlflow_run_id)
    name = registry.model_name("mae", registry.arch_name(registry.encoder_config(result.encoder_path)))
    mv = c.get_model_version(name, str(version))
    assert mv.source == f"models:/{run.data.tags[MODEL_ID_TAG]}"  # the version is the LoggedModel

    loaded = mlflow.pytorch.load_model(f"models:/{name}@champion")
    assert isinstance(loaded, torch.nn.Module)
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "m"))
    meta = Model.load(local)
    example = torch.from_numpy(np.asarray(meta.load_input_example(local), dtype=np.float32))
    assert example.shape == (2, 3, 32, 32)
    sig = meta.signature.to_dict()
    assert json.loads(sig["inputs"])[0]["tensor-spec"]["shape"] == [-1, 3, 32, 32]
    assert json.loads(sig["outputs"])[0]["tensor-spec"]["shape"] == [-1, 32]

    enc = build_encoder(registry.encoder_config(result.encoder_path))
    enc.load_state_dict(load_file(result.encoder_path))
    want = ImageEmbedder(enc).eval()(example)
    got = loaded(example)
    assert got.shape == (2, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert loaded(torch.cat([example] * 3)).shape == (6, 32)  # the batch dimension is dynamic

    # the safetensors still resolves from the registry (transfer, serve), and is readable by others
    path = registry.resolve_encoder(f"models:/{name}@champion")
    assert path.name == "encoder.safetensors"
    assert load_file(path).keys() == load_file(result.encoder_path).keys()
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044
    # run hygiene: git + caller tags, a unique name, the manifest as a dataset input
    tags = run.data.tags
    assert tags["maelab.env"] == "test" and tags["maelab.pipeline"] == "pretrain_tiny"
    assert tags["mlflow.runName"].startswith("tiny-") and tags["mlflow.runName"] != "tiny"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["manifest"]
