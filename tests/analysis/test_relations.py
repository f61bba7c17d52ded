"""``maelab analyze relations`` on two checkpoints of a tiny Pretrainer: JSON, picture and MLflow run."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.command import main

RECIPE = {
    "name": "tiny_sgmae",
    "encoder": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
    "masker": {"type": "random", "ratio": 0.75},
    "heads": {"pixel": {"type": "pixel_decoder", "embed_dim": 16, "depth": 2, "num_heads": 2}},
}


def _checkpoints(tmp_path):
    from maelab.models import build_pretrainer

    torch.manual_seed(0)
    model = build_pretrainer(RECIPE)
    paths = []
    for step in (10, 20):
        path = tmp_path / f"checkpoint_{step}.pt"
        torch.save({"model": model.state_dict(), "recipe": RECIPE, "step": step}, path)
        paths.append(path)
        with torch.no_grad():  # "training" between the two checkpoints
            for p in model.encoder.parameters():
                p.add_(0.5 * torch.randn_like(p))
    return paths


def _images(folder, n=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_analyze_relations_writes_json_picture_and_mlflow_run(tmp_path, capsys):
    import mlflow

    first, last = _checkpoints(tmp_path)
    images, out = _images(tmp_path / "imgs"), tmp_path / "out"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["analyze", "relations", "--checkpoint", str(first), "--checkpoint", str(last)]
    args += ["--images", str(images), "--limit", "3", "--out", str(out), "--tracking-uri", uri]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    result = json.loads((out / "relations.json").read_text())
    assert result["images"] == 3 and len(result["image_files"]) == 3
    assert [c["step"] for c in result["checkpoints"]] == [10, 20]
    early, final = (c["metrics"] for c in result["checkpoints"])
    for m in (early, final):
        assert {k: len(v) for k, v in m.items()} == {
            **dict.fromkeys(["enc_sigma_f", "enc_sigma_s", "enc_attention_distance", "enc_nmi"], 3),
            **dict.fromkeys(["enc_kl_attention", "enc_kl_cosine"], 3),
            **dict.fromkeys(["dec_sigma_f", "dec_sigma_s", "dec_masked_token_variance"], 2),
        }
        assert all(0 <= v <= 1 for v in m["enc_nmi"])
        assert all(0 < v < 4 * math.sqrt(2) for v in m["enc_attention_distance"])  # within the 4 x 4 grid
    assert final["enc_kl_attention"] == pytest.approx([0.0] * 3, abs=1e-6)  # Eq. 4's reference itself
    assert all(v > 1e-4 for v in early["enc_kl_attention"] + early["enc_kl_cosine"])
    assert early["enc_sigma_f"] != final["enc_sigma_f"]  # each checkpoint's own weights were loaded
    assert (out / "relations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(printed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "relations")) == [
        "relations/relations.json",
        "relations/relations.png",
    ]
    history = client.get_metric_history(run.info.run_id, "relations/enc_nmi")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(final["enc_nmi"])


def test_a_checkpoint_that_names_its_recipe_gets_it_from_the_config(tmp_path, monkeypatch):
    from maelab.analysis.relations import checkpoint_recipe

    first, _ = _checkpoints(tmp_path)
    state = torch.load(first, weights_only=True)
    torch.save({**state, "recipe": "tiny_sgmae"}, first)  # as the engine saves it: the name
    asked = []

    def load_recipe(name, env=None):
        asked.append((name, env))
        return RECIPE

    monkeypatch.setattr("maelab.config.load_recipe", load_recipe)
    assert checkpoint_recipe(first, None, "imagenet") == (RECIPE, 10)
    assert asked == [("tiny_sgmae", "imagenet")]


def test_analyze_relations_names_what_is_missing(tmp_path):
    (first, _) = _checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["analyze", "relations", "--checkpoint", str(first), "--images", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "o")])  # fmt: skip
    weights = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match="--recipe"):
        main(["analyze", "relations", "--checkpoint", str(weights), "--images", str(tmp_path),
              "--out", str(tmp_path / "o")])  # fmt: skip
