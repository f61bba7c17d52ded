"""MR-MAE recipes: the Table 3 rows, the teachers of Fig. 4, the paper recipe (§4.1) and the offline base
recipe whose teacher is the MAE encoder pretrain_mae registers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maelab.config import load_config, resolve_recipe
from maelab.masking import MaskPlan
from maelab.models import build_pretrainer
from maelab.orchestration.registry import arch_name, model_name

CONF = Path(__file__).resolve().parents[2] / "conf"
ROWS = ("mrmae_lr_only", "mrmae", "mrmae_focused", "mrmae_fusion", "mrmae_conflict", "mrmae_lm_only")


@pytest.fixture(scope="module")
def params():
    return {env: load_config("parameters", env, CONF) for env in (None, "imagenet")}


def parts(r: dict) -> tuple:
    heads = {h["type"] for h in r["heads"].values()}
    return (
        "pixel_decoder" in heads or "decoder_mimic" in heads,  # L_R
        "mimic" in heads,  # L_M on the encoder's visible tokens
        "decoder_mimic" in heads,  # high-level target after the decoder (conflict)
        r["masker"]["type"] == "focused",
        bool(r.get("fusion_layers")),
    )


@pytest.mark.parametrize("env", [None, "imagenet"])
def test_table3_rows(params, env):
    got = {name: parts(resolve_recipe(params[env], name)) for name in ROWS}
    assert got == {  # (L_R, L_M, conflict, focused, fusion)
        "mrmae_lr_only": (True, False, False, False, False),
        "mrmae": (True, True, False, False, False),
        "mrmae_focused": (True, True, False, True, False),
        "mrmae_fusion": (True, True, False, True, True),
        "mrmae_conflict": (True, False, True, True, True),
        "mrmae_lm_only": (False, True, False, True, True),
    }
    r = resolve_recipe(params[env], "mrmae")
    assert r["heads"]["pixel"]["weight"] == r["heads"]["mimic"]["weight"] == 0.5  # §4.1


def test_base_teacher_is_the_registered_mae_encoder(params):
    mae = resolve_recipe(params[None], "mae")
    want = f"models:/{model_name('mae', arch_name(mae['encoder']))}@champion"
    for name in ROWS[1:]:
        r = resolve_recipe(params[None], name)
        teachers = [h["teacher"] for h in r["heads"].values() if "teacher" in h]
        assert teachers and all(t == {"type": "maelab", "weights": want} for t in teachers), name


def test_paper_recipe(params):
    r = resolve_recipe(params["imagenet"], "mrmae_paper")
    t = r["train"]
    assert (t["epochs"], t["warmup_epochs"], t["lr"], t["weight_decay"]) == (400, 80, 1.5e-4, 0.05)
    assert t["batch_size"] * t["accum_steps"] * t["devices"] == 1024
    assert r["heads"]["pixel"]["depth"] == 8 and r["masker"]["ratio"] == 0.75
    assert (
        r["heads"]["mimic"]["teacher"]["type"] == "clip"
        and r["heads"]["mimic"]["teacher"]["model"] == "ViT-B-16"
    )
    assert r["encoder"]["embed_dim"] == 768 and r["encoder"]["patch_size"] == 16
    teachers = {
        n: {
            h["teacher"]["type"]
            for h in resolve_recipe(params["imagenet"], n)["heads"].values()
            if "teacher" in h
        }
        for n in ("mrmae", "mrmae_dino", "mrmae_clip_dino")
    }
    assert teachers == {"mrmae": {"clip"}, "mrmae_dino": {"dino"}, "mrmae_clip_dino": {"clip", "dino"}}


@pytest.mark.parametrize("name", ROWS)
def test_base_rows_build_and_step_offline(params, name, tmp_path):
    """Every base row builds with the teacher file resolved (here a saved MAE-sized encoder) and steps."""
    from safetensors.torch import save_file

    from maelab.models.vit import build_encoder

    r = resolve_recipe(params[None], name)
    enc_cfg = resolve_recipe(params[None], "mae")["encoder"]
    path = tmp_path / "mae_encoder.safetensors"
    save_file(
        build_encoder(enc_cfg).state_dict(), str(path), metadata={"encoder_config": json.dumps(enc_cfg)}
    )
    for head in r["heads"].values():
        if "teacher" in head:
            head["teacher"]["weights"] = str(path)
    model = build_pretrainer(r)
    batch = {"image": torch.randn(2, 3, 64, 64)}
    if not model.masker.in_step:  # worker-side masker: the plan comes with the batch
        batch["plan"] = MaskPlan.collate([model.masker(torch.Generator().manual_seed(i)) for i in range(2)])
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.losses) == set(r["heads"])
