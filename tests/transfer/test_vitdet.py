import pytest
import torch

from maelab.models.vit import build_encoder
from maelab.transfer.vitdet import (
    SimpleFeaturePyramid,
    ViTDetBackbone,
    global_block_indices,
    window_partition,
    window_unpartition,
)

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)


def test_global_blocks_vit_b():
    assert global_block_indices(12) == [2, 5, 8, 11]
    assert global_block_indices(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("patch,grid", [(16, 64), (8, 16)])
def test_simple_pyramid_strides(patch, grid):
    fpn = SimpleFeaturePyramid(dim=32, patch_size=patch, out_channels=16)
    out = fpn(torch.randn(2, 32, grid, grid))
    size = grid * patch
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for key, stride in zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64], strict=True):
        assert out[key].shape == (2, 16, size // stride, size // stride), key


def test_window_partition_roundtrip_with_padding():
    x = torch.randn(2, 10, 7, 4)
    win, padded = window_partition(x, 4)
    assert win.shape == (2 * 3 * 2, 4, 4, 4) and padded == (12, 8)
    assert torch.equal(window_unpartition(win, 4, padded, (10, 7)), x)


def test_window_covering_grid_equals_global_attention():
    """A window as large as the grid is global attention: the windowed path must give the same maps."""
    enc = build_encoder(TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    windowed = ViTDetBackbone(enc, out_channels=16, window_size=8, global_blocks=[]).eval()
    glob = ViTDetBackbone(enc, out_channels=16, window_size=8, global_blocks=[0, 1, 2, 3]).eval()
    glob.pyramid.load_state_dict(windowed.pyramid.state_dict())
    a, b = windowed(x), glob(x)
    torch.testing.assert_close(a["2"], b["2"], atol=1e-5, rtol=1e-5)
    small = ViTDetBackbone(enc, out_channels=16, window_size=4, global_blocks=[]).eval()
    small.pyramid.load_state_dict(windowed.pyramid.state_dict())
    assert not torch.allclose(small(x)["2"], a["2"], atol=1e-4)


def test_backbone_rel_pos_and_padding():
    enc = build_encoder(TINY)
    bb = ViTDetBackbone(enc, out_channels=16, window_size=3, use_rel_pos=True)
    out = bb(torch.randn(2, 3, 48, 64))  # padded to 64 x 64
    assert out["0"].shape == (2, 16, 16, 16)
    out["0"].sum().backward()
    assert bb.rel_pos_h[1].grad is not None
    with pytest.raises(ValueError, match="larger than backbone img_size"):
        bb(torch.randn(1, 3, 96, 64))
