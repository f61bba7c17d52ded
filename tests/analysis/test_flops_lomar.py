"""LoMaR's cost: 7x7 windows x 4 at ViT-B/16 224 = 17.4 +- 0.5 GMACs, 1.8x MAE (R-MAE Table 5); linear in
the views at 448 (9), below MAE there (Chen et al. 2022, §1.4 "O(hw + n m^4)")."""

import argparse
import json

import pytest

from maelab.analysis.flops import cli, count_gmacs
from maelab.config import load_recipe


def _gmacs(capsys, recipe: str) -> float:
    assert cli(argparse.Namespace(recipe=recipe, env="imagenet", json=True)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gmacs"]


def test_lomar_224_is_17_4_gmacs_and_1_8x_mae(capsys):
    lomar = _gmacs(capsys, "lomar")
    assert lomar == pytest.approx(17.4, abs=0.5)
    assert lomar / _gmacs(capsys, "mae") == pytest.approx(1.8, abs=0.05)


def test_lomar_448_grows_with_the_views():
    g448 = count_gmacs(load_recipe("lomar_448", "imagenet"))
    # 9 views: ~9/4 of the 224 encoder plus the patch embedding of the bigger image; MAE at 448 is 43.2
    assert g448 == pytest.approx(39.6, abs=0.5)
