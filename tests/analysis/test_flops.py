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


def test_longseq_448_is_about_4x_the_384d_mae(capsys):
    """Long-seq MAE §3.3: L = 784 at 448 px costs ~4x the L = 196 MAE with the same 384-d decoder (App. A)."""

    def gmacs(recipe: str) -> float:
        assert cli(argparse.Namespace(recipe=recipe, env="coco", json=True)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gmacs"]

    longseq, baseline = gmacs("longseq_448"), gmacs("longseq_baseline")
    assert longseq == pytest.approx(33.1, abs=0.7)
    assert baseline == pytest.approx(7.5, abs=0.2)
    assert 3.5 < longseq / baseline < 5.0
    shorter = gmacs("longseq_2e_ld196")  # Tab. 2e row 3: the decoder on 196 tokens is much cheaper
    assert shorter < longseq - 10
