"""MR-MAE's FLOPs: the MAE step plus one teacher forward on the full image (and the mimic Linear)."""

import argparse
import json

import pytest
import torch

from maelab.analysis.flops import cli, count_gmacs
from maelab.config import load_recipe
from maelab.teachers.build import build_teacher, with_untrained_teachers


def test_tiny_mrmae_is_mae_plus_the_teacher_forward():
    mae, mrmae = load_recipe("mae"), with_untrained_teachers(load_recipe("mrmae"))
    from fvcore.nn import FlopCountAnalysis

    teacher = build_teacher(mrmae["heads"]["mimic"]["teacher"])
    teacher.set_fused_attn(False)
    image = torch.randn(1, 3, 64, 64)

    class Features(torch.nn.Module):  # tensors out, for the tracer
        def forward(self, x):
            return teacher(x).features

    fa = (
        FlopCountAnalysis(Features(), (image,))
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
    )
    teacher_g = fa.total() / 1e9
    proj_g = 16 * 192 * 192 / 1e9  # the mimic Linear on the 16 visible tokens
    # pixel head at weight 0.5 in both is the same network: the difference is the teacher and the Linear
    assert count_gmacs(mrmae) - count_gmacs(mae) == pytest.approx(teacher_g + proj_g, rel=0.02)


def test_vit_b_with_a_clip_b16_teacher(capsys):
    """ViT-B/224 MR-MAE with CLIP ViT-B/16: the teacher forward is ~17.6 GMACs on top of MAE's 9.8."""
    assert cli(argparse.Namespace(recipe="mrmae", env="imagenet", json=True)) == 0
    gmacs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gmacs"]
    assert gmacs == pytest.approx(9.795 + 17.58 + 0.03, abs=0.1)
