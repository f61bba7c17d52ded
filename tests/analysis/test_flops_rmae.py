"""R-MAE FLOPs (Table 1b/e, Table 8): the region branch is cheap, and only the batch variant scales with k."""

from __future__ import annotations

import argparse
import json

import pytest

from maelab.analysis.flops import cli, count_gmacs
from maelab.config import load_recipe


def gmacs_cli(recipe: str, capsys) -> float:
    assert cli(argparse.Namespace(recipe=recipe, env="imagenet", json=True)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gmacs"]


def test_vit_b16_rmae_and_rae_match_the_paper(capsys):
    mae, rmae, rae = (gmacs_cli(r, capsys) for r in ("mae", "rmae", "rae"))
    assert mae == pytest.approx(9.7, abs=0.2)
    assert mae < rmae <= 1.06 * mae  # paper: 9.8b vs 9.7b (length variant, 1 x 128-d blocks, k = 8)
    assert rae == pytest.approx(4.7, abs=0.3)  # Table 8, "RAE, default"


def tiny(variant: str, k: int) -> dict:
    recipe = load_recipe("rae")
    head = {**recipe["heads"]["region"], "variant": variant, "num_regions": k}
    return {**recipe, "heads": {"region": head}}


def test_batch_variant_grows_linearly_in_k_and_length_variant_does_not():
    cost = {(v, k): count_gmacs(tiny(v, k)) for v in ("length", "batch") for k in (2, 4, 8)}
    per_region = {v: (cost[v, 8] - cost[v, 2]) / 6 for v in ("length", "batch")}
    # batch: every region re-runs the decoder over N tokens, so cost = a + b k with a large b
    assert per_region["batch"] == pytest.approx((cost["batch", 4] - cost["batch", 2]) / 2, rel=0.02)
    assert per_region["batch"] > 3 * per_region["length"]
    assert cost["batch", 8] > 1.5 * cost["batch", 2]
    # length: k queries share one decoder pass; going from 2 to 8 regions adds little on top of the encoder
    assert cost["length", 8] < 1.3 * cost["length", 2]
