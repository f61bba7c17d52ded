"""R-MAE FLOPs (Table 1b/e, Table 8): the region branch is cheap, and only the batch variant scales with k."""

from __future__ import annotations

import argparse
import json

import pytest

from maelab.analysis.flops import cli, count_gmacs, gmacs_by_part
from maelab.config import load_recipe


def gmacs_cli(recipe: str, capsys) -> float:
    assert cli(argparse.Namespace(recipe=recipe, env="imagenet", json=True)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gmacs"]


def test_vit_b16_rmae_and_rae_match_the_paper(capsys):
    mae, rmae, rae = (gmacs_cli(r, capsys) for r in ("mae", "rmae", "rae"))
    assert mae == pytest.approx(9.7, abs=0.2)
    assert mae < rmae <= 1.06 * mae  # paper: 9.8b vs 9.7b (length variant, 1 x 128-d blocks, k = 8)
    assert rae == pytest.approx(4.7, abs=0.3)  # Table 8, "RAE, default"


def test_parts_add_up_and_name_what_the_region_branch_spends():
    recipe = load_recipe("rmae", "imagenet")
    parts = gmacs_by_part(recipe)
    assert sum(parts.values()) == pytest.approx(count_gmacs(recipe), rel=1e-3)
    region = {k: v for k, v in parts.items() if k.startswith("region.")}
    # the 3-layer predictor runs on k x N = 8 x 196 expanded tokens: the branch's largest part
    assert max(region, key=region.get) == "region.predictor"
    # the region encoder embeds only the visible patches (embedding all N would cost 4x more)
    assert region["region.region_embed"] < 0.2 * region["region.predictor"]
    assert sum(region.values()) < 0.06 * count_gmacs(load_recipe("mae", "imagenet"))


def tiny(variant: str, k: int) -> dict:
    """The tiny RAE with the region branch scaled to the encoder as at ViT-B (768 : 128 = 192 : 32)."""
    recipe = load_recipe("rae")
    head = {**recipe["heads"]["region"], "variant": variant, "num_regions": k}
    head.update(enc_dim=32, dim=32, num_heads=4, enc_heads=4)
    return {**recipe, "heads": {"region": head}}


def test_batch_variant_grows_linearly_in_k_and_length_variant_does_not():
    cost = {(v, k): count_gmacs(tiny(v, k)) for v in ("length", "batch") for k in (2, 4, 8)}
    per_region = {v: (cost[v, 8] - cost[v, 2]) / 6 for v in ("length", "batch")}
    # batch: every region re-runs the decoder over N tokens, so cost = a + b k with a large b
    assert per_region["batch"] == pytest.approx((cost["batch", 4] - cost["batch", 2]) / 2, rel=0.02)
    assert per_region["batch"] > 2.5 * per_region["length"]
    assert cost["batch", 8] > 1.15 * cost["batch", 2]
    # length: the k queries share one decoder pass; what remains per region (its encoder pass over the
    # visible patches, its expanded N x p_D map and predictor) adds little on top of the pixel encoder
    assert cost["length", 8] < 1.1 * cost["length", 2]
