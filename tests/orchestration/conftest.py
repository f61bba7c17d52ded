"""Fixtures for orchestration tests: an isolated MLflow sqlite store and fake pre-training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENCODER_CFG = {"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 12, "num_heads": 3}


def write_encoder(path: Path, cfg: dict | None = None, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"w": torch.randn(4, 4, generator=g)},
        str(path),
        metadata={"encoder_config": json.dumps(cfg or ENCODER_CFG)},
    )
    return path


@pytest.fixture
def fake_run(mlflow_home: Path):
    """``fake_run(seed, log=True) -> (run_id, encoder_path)``: a run that logged ``encoder/<file>``."""
    import mlflow

    from maelab.orchestration import registry

    registry.client()
    exp = mlflow.set_experiment("maelab-test")
    assert exp.artifact_location

    def make(seed: int = 0, log: bool = True, cfg: dict | None = None) -> tuple[str, Path]:
        enc = write_encoder(
            mlflow_home / "data" / "06_models" / f"s{seed}" / "encoder.safetensors", cfg, seed
        )
        with mlflow.start_run(experiment_id=exp.experiment_id) as run:
            mlflow.log_param("seed", seed)
            if log:
                mlflow.log_artifact(str(enc), artifact_path="encoder")
        return run.info.run_id, enc

    return make
