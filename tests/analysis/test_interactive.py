"""Interactive segmentation with R-MAE's region branch (§4.2, Fig. 6)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.analysis.interactive import (
    choose_prompts,
    cli,
    evaluate_interactive,
    iou,
    prompt_baseline,
    segment_interactive,
)
from maelab.config import load_recipe
from maelab.models import build_pretrainer

ENC = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def model(variant: str = "length"):
    torch.manual_seed(0)
    head = {"type": "region", "variant": variant, "num_regions": 4, "enc_dim": 32, "dim": 32, "num_heads": 4,
            "enc_heads": 4}  # fmt: skip
    recipe = {"encoder": ENC, "masker": {"type": "random"}, "heads": {"region": head}}
    return build_pretrainer(recipe).eval()


@pytest.mark.parametrize("variant", ["length", "batch", "channel"])
def test_any_number_of_prompts_from_one_to_all_but_one(variant):
    m, image = model(variant), torch.randn(3, 32, 32)
    for prompts in ([5], list(range(8)), list(range(15))):
        for visible in ("all", "prompt"):
            prob = segment_interactive(m, image, prompts, image_visible=visible)
            assert prob.shape == (32, 32) and prob.min() >= 0 and prob.max() <= 1
            r, c = divmod(prompts[0], 4)
            assert bool((prob[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] == 1).all())  # prompt patches are known
    neg = segment_interactive(m, image, [5], negative_patches=[0])
    assert bool((neg[:8, :8] == 0).all())
    with pytest.raises(ValueError, match="at least one"):
        segment_interactive(m, image, [])
    with pytest.raises(ValueError, match="nothing"):
        segment_interactive(m, image, list(range(16)))
    with pytest.raises(ValueError, match="outside the grid"):
        segment_interactive(m, image, [16])


def test_prompts_and_baseline():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 8:16] = True  # exactly patches 5 and 9
    g = torch.Generator().manual_seed(0)
    clicks = choose_prompts(mask, 8, "clicks", 4, g)
    assert sorted(clicks) == [5, 9]  # only patches mostly inside the instance
    assert iou(prompt_baseline(mask, clicks, 8, "clicks", (4, 4)), mask) == 1.0
    assert iou(prompt_baseline(mask, [5], 8, "clicks", (4, 4)), mask) == 0.5
    reveal = choose_prompts(mask, 8, "reveal", 0.25, g)
    assert len(reveal) == 4
    assert bool((prompt_baseline(mask, reveal, 8, "reveal", (4, 4)) <= mask).all())


def test_evaluate_reports_model_and_baseline():
    m = model()
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16, :16] = True
    masks[1, 20:, 4:30] = True
    samples = [(torch.randn(3, 32, 32), masks)]
    for kind, amount in (("clicks", 1), ("reveal", 0.25)):
        out = evaluate_interactive(m, samples, kind, amount)
        assert out["instances"] == 2
        assert 0.0 <= out["miou"] <= 1.0 and 0.0 < out["baseline_miou"] <= 1.0


def test_cli_writes_a_figure(tmp_path, capsys):
    recipe = load_recipe("rmae")
    torch.manual_seed(0)
    torch.save({"model": build_pretrainer(recipe).state_dict()}, tmp_path / "checkpoint.pt")
    size = recipe["encoder"]["img_size"]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    args = argparse.Namespace(recipe="rmae", env=None, checkpoint=str(tmp_path / "checkpoint.pt"),
                              image=str(tmp_path / "a.png"), patches="9,10", negative="", image_visible="all",
                              out=str(tmp_path / "out" / "seg.png"))  # fmt: skip
    assert cli(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with Image.open(result["out"]) as im:
        assert im.size[0] == 3 * im.size[1]
    bad = argparse.Namespace(**{**vars(args), "checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        cli(bad)
