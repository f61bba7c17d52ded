import argparse
import json

import pytest

from maelab.analysis.flops import cli, count_gmacs
from maelab.config import load_recipe


def test_mae_vit_b16_matches_papers(capsys):
    """R-MAE Table 1e: MAE ViT-B/16, 224 px, mask 0.75, decoder 8x512 = 9.7b (official model: 9.795)."""
    assert cli(argparse.Namespace(recipe="mae", env="imagenet", json=True)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert result["recipe"] == "mae"
    assert result["gmacs"] == pytest.approx(9.7, abs=0.2)
    assert result["gmacs"] == pytest.approx(9.795, abs=0.01)


def test_gmacs_track_mask_ratio_and_decoder():
    """Fewer kept tokens -> fewer MACs; a deeper decoder -> more. Tiny recipe, fast."""
    base = load_recipe("mae")
    gm = count_gmacs(base)
    assert 0.0 < gm < 1.0
    less_kept = {**base, "masker": {"type": "random", "ratio": 0.9}}
    assert count_gmacs(less_kept) < gm
    deeper = {**base, "heads": {"pixel": {**base["heads"]["pixel"], "depth": 4}}}
    assert count_gmacs(deeper) > gm
