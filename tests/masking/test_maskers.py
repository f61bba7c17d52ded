import pytest
import torch

from maelab.masking import BlockMasker, MaskPlan, RandomMasker, build_masker


def _check_plan(plan: MaskPlan, num_patches: int, num_keep: int) -> None:
    assert plan.mask.shape == plan.ids_restore.shape == (num_patches,)
    assert plan.ids_keep.shape == (num_keep,)
    assert int((~plan.mask).sum()) == num_keep
    assert not plan.mask[plan.ids_keep].any()  # kept ids are exactly the unmasked patches
    assert torch.equal(torch.sort(plan.ids_restore).values, torch.arange(num_patches))


@pytest.mark.parametrize("grid,ratio", [((8, 8), 0.75), ((14, 14), 0.75), ((6, 10), 0.6), ((4, 4), 0.0)])
def test_random_masker_exact_count(grid, ratio):
    masker = build_masker({"type": "random", "ratio": ratio}, grid=grid)
    assert isinstance(masker, RandomMasker) and not masker.in_step
    num_patches = grid[0] * grid[1]
    plan = masker(torch.Generator().manual_seed(0))
    _check_plan(plan, num_patches, int(num_patches * (1 - ratio)))


def test_random_masker_matches_mae_noise_rule():
    masker = RandomMasker((4, 4), 0.75)
    plan = masker(torch.Generator().manual_seed(3))
    noise = torch.rand(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plan.ids_keep, torch.argsort(noise)[:4])


@pytest.mark.parametrize(
    "cfg", [{"type": "random", "ratio": 0.75}, {"type": "block", "ratio": 0.75, "block": 2}]
)
def test_maskers_reproducible(cfg):
    masker = build_masker(cfg, grid=(8, 8))
    a = masker(torch.Generator().manual_seed(7))
    b = masker(torch.Generator().manual_seed(7))
    c = masker(torch.Generator().manual_seed(8))
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("grid,block,ratio", [((8, 8), 2, 0.75), ((28, 28), 2, 0.75), ((6, 9), (3, 3), 0.5)])
def test_block_masker_masks_whole_blocks(grid, block, ratio):
    masker = build_masker({"type": "block", "ratio": ratio, "block": block}, grid=grid)
    assert isinstance(masker, BlockMasker)
    bh, bw = masker.block
    gh, gw = grid
    n_blocks = (gh // bh) * (gw // bw)
    keep_blocks = int(n_blocks * (1 - ratio))
    for seed in range(5):
        plan = masker(torch.Generator().manual_seed(seed))
        _check_plan(plan, gh * gw, keep_blocks * bh * bw)
        blocks = plan.mask.view(gh // bh, bh, gw // bw, bw)
        # every block is all-masked or all-kept
        assert torch.equal(blocks.all(dim=(1, 3)), blocks.any(dim=(1, 3)))
        assert int((~blocks.any(dim=(1, 3))).sum()) == keep_blocks


def test_plans_collate_to_batch():
    masker = RandomMasker((8, 8), 0.75)
    g = torch.Generator().manual_seed(0)
    batch = MaskPlan.collate([masker(g) for _ in range(3)])
    assert batch.ids_keep.shape == (3, 16) and batch.mask.shape == (3, 64)
    assert not torch.equal(batch.mask[0], batch.mask[1])  # per-sample noise


def test_bad_config_errors_name_the_field():
    with pytest.raises(ValueError, match="masker.type"):
        build_masker({"type": "nope"}, grid=(4, 4))
    with pytest.raises(ValueError, match="masker.block"):
        build_masker({"type": "block", "block": 3}, grid=(8, 8))
    with pytest.raises(ValueError, match="masker.ratio"):
        build_masker({"type": "random", "ratio": 1.5}, grid=(8, 8))
    with pytest.raises(ValueError, match="bad field"):
        build_masker({"type": "random", "ratoi": 0.5}, grid=(8, 8))
