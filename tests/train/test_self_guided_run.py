"""Self-guided MAE in the engine: the phase switch lives in the checkpoint, so resume across it is exact."""

import torch
from fake_parts import tiny_recipe

from maelab.masking.self_guided import INFORMED, RANDOM
from maelab.models import build_pretrainer
from maelab.train.checkpoint import load_checkpoint
from maelab.train.engine import CHECKPOINT, masker_metrics, train

OFF = {"enabled": False}


def sgmae_recipe(**masker):
    recipe = tiny_recipe(steps=6, ckpt_every=2)
    recipe["name"] = "sgmae_tiny"
    recipe["masker"] = {"type": "self_guided", "ratio": 0.75, "monitor_every": 1, "monitor_size": 2, **masker}
    return recipe


def run(recipe, manifest, out, **kw):
    return train(
        recipe, manifest, out_dir=out, mlflow=OFF, progress=False, build_model=build_pretrainer, **kw
    )


def same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_resume_across_the_switch_is_bit_identical(manifest, tmp_path):
    recipe = sgmae_recipe(switch_at_step=2)
    full = run(recipe, manifest, tmp_path / "full")
    part = run(recipe, manifest, tmp_path / "part", stop_after=4)  # killed after the switch (step 2)
    saved = load_checkpoint(tmp_path / "part" / CHECKPOINT)["model"]
    assert saved["masker.run_state"].tolist()[:2] == [INFORMED, 2] and part.steps == 4
    rest = run(recipe, manifest, tmp_path / "part", resume=True)
    assert rest.start_step == 4 and full.history["loss"] == rest.history["loss"]  # exact floats
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT)["model"]
    b = load_checkpoint(tmp_path / "part" / CHECKPOINT)["model"]
    same_state(a, b)
    assert a["masker.rate_curve"].shape == (2, 1)  # the exploitation rates were measured and kept


def test_the_masker_reports_its_metrics():
    model = build_pretrainer(sgmae_recipe())
    metrics = masker_metrics(model)
    assert metrics["sgmae/phase"] == RANDOM and metrics["sgmae/switch_step"] == -1
    assert masker_metrics(torch.nn.Linear(1, 1)) == {}


def test_rates_phase_and_switch_step_reach_mlflow_with_pictures(manifest, tmp_path):
    from mlflow.tracking import MlflowClient

    from maelab.analysis.viz import training_pictures

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    settings = {"tracking_uri": uri, "artifact_location": (tmp_path / "art").as_uri(), "experiment": "t"}
    recipe = sgmae_recipe(switch_at_step=2)
    recipe["train"].update(steps=4, log_every=1, image_every=3)
    r = train(
        recipe,
        manifest,
        out_dir=tmp_path / "o",
        mlflow=settings,
        progress=False,
        build_model=build_pretrainer,
        pictures=training_pictures,
    )
    client = MlflowClient(uri)
    phase = [(m.step, m.value) for m in client.get_metric_history(r.mlflow_run_id, "sgmae/phase")]
    assert phase == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]  # step 2 (0-based) is the first informed one
    assert client.get_run(r.mlflow_run_id).data.metrics["sgmae/switch_step"] == 2
    curve = client.get_metric_history(r.mlflow_run_id, "sgmae/R_M_O/dec1")
    assert len(curve) == 4 and all(0 < m.value < 1 for m in curve)
    pngs = [a.path for a in client.list_artifacts(r.mlflow_run_id, "images") if a.path.endswith(".png")]
    assert any(p.startswith("images/reconstruction+step+3+") for p in pngs), pngs  # log_image, by step
    assert any(p.startswith("images/informed_mask+step+3+") for p in pngs), pngs  # informed masks by images


def test_the_informed_mask_picture_puts_each_mask_under_its_image():
    from maelab.analysis.viz import informed_mask_grid

    image = torch.zeros(2, 3, 16, 16)  # normalised 0: the ImageNet mean colour
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])  # 2 x 2 patches of 8 px
    mask = scores > 2.5
    grid = informed_mask_grid(image, scores, mask, scale=1)  # [3 * 16, 2 * 16, 3]
    assert grid.shape == (48, 32, 3)
    heat = grid[16:32, :, 0].astype(int)
    assert heat[0, 0] == 255 and heat[8, 8] == 0 and heat[8, 24] == 255  # most / least relevant patches
    masked = grid[32:48]
    gray = round(0.5 * 255)
    assert (masked[0, 0] == gray).all() and (masked[8, 8] != gray).any()  # masked / kept, first image
    assert (masked[8, 24] == gray).all() and (masked[0, 16] != gray).any()  # second image
