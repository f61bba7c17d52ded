"""Token-relation metrics (self-guided MAE Eq. 3, Eq. 4, §5.4) on hand-made inputs with known values."""

import math

import pytest
import torch

from maelab.analysis.token_relations import (
    attention_distance,
    attention_nmi,
    feature_variance,
    masked_token_variance,
    relation_kl,
    relation_profile,
    similarity_variance,
)

E0, E1 = [1.0, 0.0], [0.0, 1.0]


def test_feature_and_similarity_variance():
    # unit vectors e0, e1: mean (.5, .5), ||e0 - mean||^2 = .5
    assert feature_variance(torch.tensor([[E0, E1]])) == pytest.approx(0.5)
    assert feature_variance(torch.tensor([[E0, [2.0, 0.0]]])) == pytest.approx(0.0)  # same direction
    # e0, e0, e1: off-diagonal cosines [1, 1, 0, 0, 0, 0], mean 1/3, variance 2/9
    assert similarity_variance(torch.tensor([[E0, E0, E1]])) == pytest.approx(2 / 9)


def test_attention_distance_on_a_row_of_three_patches():
    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 0, 0] = 1.0  # CLS row: left out
    a[0, 0, 1, 3] = a[0, 0, 2, 2] = a[0, 0, 3, 1] = 1.0  # p0 -> p2 (2), p1 -> p1 (0), p2 -> p0 (2)
    assert attention_distance(a, (1, 3)) == pytest.approx(4 / 3)


def test_nmi_of_homogeneous_and_one_to_one_attention():
    n = 5
    assert attention_nmi(torch.full((2, 3, n, n), 1 / n)) == pytest.approx(0.0, abs=1e-6)
    assert attention_nmi(torch.eye(n).expand(2, 3, n, n)) == pytest.approx(1.0)


def test_masked_token_variance():
    x = torch.tensor([[[0.0], [2.0], [7.0]]])  # tokens 0 and 1 are mask tokens
    mask = torch.tensor([[True, True, False]])
    assert masked_token_variance(x, mask) == pytest.approx(1.0)


def test_relation_kl():
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    q = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    assert relation_kl(p, q) == pytest.approx(math.log(2) / 2)  # the mean over the two rows
    assert relation_kl(q, q, kind="cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="kind"):
        relation_kl(p, q, kind="l2")


def test_relation_profile_of_a_tiny_pretrainer():
    from maelab.masking import MaskPlan
    from maelab.models import build_pretrainer

    torch.manual_seed(0)
    recipe = {
        "encoder": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
        "masker": {"type": "random", "ratio": 0.75},
        "heads": {"pixel": {"type": "pixel_decoder", "embed_dim": 16, "depth": 2, "num_heads": 2}},
    }
    model = build_pretrainer(recipe).eval()
    plan = MaskPlan.from_noise(torch.rand(2, 16), 0.75)
    prof = relation_profile(model, torch.randn(2, 3, 32, 32), plan)
    assert {k: len(v) for k, v in prof.items()} == {
        "enc_sigma_f": 3,
        "enc_sigma_s": 3,
        "enc_attention_distance": 3,
        "enc_nmi": 3,
        "dec_sigma_f": 2,
        "dec_sigma_s": 2,
        "dec_masked_token_variance": 2,
    }
    assert all(0 <= v <= 1 for v in prof["enc_nmi"])
    assert all(0 < v < 4 * math.sqrt(2) for v in prof["enc_attention_distance"])  # within the 4x4 grid
    assert all(0 <= v <= 2 for v in prof["enc_sigma_f"] + prof["dec_sigma_f"])
