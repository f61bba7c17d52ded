"""Recipes that combine parts (DESIGN.md): sound combinations build, unsound ones fail at start saying why."""

from __future__ import annotations

import pytest
import torch

from maelab.masking import MASKERS, Masker, MaskPlan
from maelab.models import build_pretrainer
from maelab.models.compat import IncompatibleRecipeError, check_compatible, plan_traits

ENC = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
PIX = dict(type="pixel_decoder", embed_dim=16, depth=1, num_heads=2)
REGION = dict(type="region", num_regions=2, enc_dim=16, dim=16, num_heads=2, enc_heads=2)


def recipe(masker: dict, **heads: dict) -> dict:
    return {"name": "combo", "encoder": ENC, "masker": masker, "heads": heads}


def test_traits_of_the_maskers():
    assert plan_traits(MASKERS["random"]((4, 4))) == {"full_grid", "random_order"}
    assert plan_traits(MASKERS["block"]((4, 4))) == {"full_grid"}  # kept ids in raster order


@pytest.mark.parametrize(
    "masker,region",
    [
        ({"type": "block", "ratio": 0.75, "block": 2}, {}),  # R-MAE with block masking, beta_R = beta_I
        ({"type": "random", "ratio": 0.75}, {"mask_ratio": 0.9}),  # beta_R != beta_I on random masks
    ],
)
def test_sound_combinations_build(masker, region):
    model = build_pretrainer(recipe(masker, pixel={**PIX, "downsample": 2}, region={**REGION, **region}))
    assert set(model.heads) == {"pixel", "region"}


def test_region_ratio_with_block_masks_fails_at_start_with_the_reason():
    """beta_R != beta_I cuts the region plan from the image plan's order; the block masker's kept ids are in
    raster order, so the region branch would see the top rows only: refused, naming the parts and the fix."""
    bad = recipe(
        {"type": "block", "ratio": 0.75, "block": 2}, pixel=PIX, region={**REGION, "mask_ratio": 0.9}
    )
    with pytest.raises(IncompatibleRecipeError) as err:
        build_pretrainer(bad)
    msg = str(err.value)
    assert "recipe combo" in msg and "heads.region (RegionHead)" in msg and "BlockMasker" in msg
    assert "'random_order'" in msg and "mask_ratio: null" in msg
    assert "heads.pixel" not in msg  # the pixel decoder is fine with block masks
    assert isinstance(err.value, ValueError)


class WindowMasker(Masker):
    """Stands in for LoMaR's window masker: plans [n, k*k] local to each window, not over the full grid."""

    plan_traits = frozenset({"windows"})

    def __call__(self, generator: torch.Generator | None = None) -> MaskPlan:
        return MaskPlan.from_noise(torch.rand(4, 4, generator=generator), 0.75)


def test_window_plans_cannot_feed_full_grid_heads(monkeypatch):
    """LoMaR's windows with a region head (the issue's example): the check is generic, so a masker that
    only declares its traits plugs in."""
    monkeypatch.setitem(MASKERS, "window", WindowMasker)
    with pytest.raises(IncompatibleRecipeError, match="heads.region .*'full_grid'") as err:
        build_pretrainer(recipe({"type": "window"}, region=REGION))
    assert "WindowMasker" in str(err.value)
    # every unmet need is listed, not just the first
    with pytest.raises(IncompatibleRecipeError) as err:
        build_pretrainer(recipe({"type": "window"}, pixel=PIX, region=REGION))
    assert "heads.pixel" in str(err.value) and "heads.region" in str(err.value)


def test_no_masker_and_heads_without_needs_pass():
    check_compatible(None, {"x": object()})
    check_compatible(MASKERS["block"]((4, 4)), {"x": torch.nn.Identity()})
