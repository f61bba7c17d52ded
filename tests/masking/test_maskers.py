import pytest
import torch

from maelab.masking import BlockMasker, MaskPlan, RandomMasker, build_masker, nested_plan


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


# long-seq MAE, counted as the official loader: exactly int(L * (1 - gamma)) patches kept (§3.1, Tab. 2)
@pytest.mark.parametrize(
    "grid,ratio,block,want",
    [
        ((28, 28), 0.75, 2, 196),  # the default, 448 px / p16 (Tab. 1)
        ((28, 28), 0.75, 4, 196),  # Tab. 2d, m = 4x4: 12.25 blocks
        ((28, 28), 0.9375, 2, 49),  # Tab. 2e row 1: L_e = 49
        ((14, 14), 0.75, 2, 49),  # 224 / p16 with m = 2: 12.25 blocks
        ((7, 7), 0.75, 2, 12),  # Tab. 2a/2b, L = 49: a grid m does not divide
    ],
)
def test_block_masker_keeps_what_the_official_loader_keeps(grid, ratio, block, want):
    masker = build_masker({"type": "block", "ratio": ratio, "block": block}, grid=grid)
    assert isinstance(masker, BlockMasker)
    for seed in range(3):
        plan = masker(torch.Generator().manual_seed(seed))
        _check_plan(plan, grid[0] * grid[1], want)
        assert torch.equal(plan.ids_keep, torch.sort(plan.ids_keep).values)  # raster order


def _blocks_mixed(mask: torch.Tensor, grid, block) -> tuple[int, int]:
    """(blocks partly masked, blocks in all) for the ceil-and-clip block tiling of ``grid``."""
    (gh, gw), (bh, bw) = grid, block
    grid_mask = mask.view(gh, gw)
    mixed = total = 0
    for i in range(0, gh, bh):
        for j in range(0, gw, bw):
            cell = grid_mask[i : i + bh, j : j + bw]
            mixed += int(bool(cell.any()) and not bool(cell.all()))
            total += 1
    return mixed, total


@pytest.mark.parametrize(
    "grid,block,ratio",
    [((8, 8), 2, 0.75), ((28, 28), 2, 0.75), ((28, 28), 4, 0.75), ((14, 14), 2, 0.75), ((7, 7), 2, 0.75),
     ((6, 9), (3, 3), 0.5), ((5, 7), (2, 3), 0.6)],
)  # fmt: skip
def test_block_masker_masks_whole_blocks_but_one(grid, block, ratio):
    masker = build_masker({"type": "block", "ratio": ratio, "block": block}, grid=grid)
    n = grid[0] * grid[1]
    ever_mixed = False
    for seed in range(20):
        plan = masker(torch.Generator().manual_seed(seed))
        _check_plan(plan, n, int(n * (1 - ratio)))
        mixed, total = _blocks_mixed(plan.mask, grid, masker.block)
        assert mixed <= 1, f"seed {seed}: {mixed} blocks partly masked"
        ever_mixed |= mixed == 1
    bh, bw = masker.block
    if grid[0] % bh == 0 and grid[1] % bw == 0 and int(n * (1 - ratio)) % (bh * bw):
        assert ever_mixed  # a kept count that is not a whole number of blocks shows its partial block


def test_block_masker_draws_blocks_uniformly():
    """Every block (clipped edge ones too) is reached first about as often: the shuffle is over blocks."""
    masker = BlockMasker((7, 7), 0.75, 2)
    first = torch.zeros(49)
    for seed in range(400):
        plan = masker(torch.Generator().manual_seed(seed))
        first[plan.ids_keep] += 1
    per_block = [
        first.view(7, 7)[i : i + 2, j : j + 2].mean() for i in range(0, 7, 2) for j in range(0, 7, 2)
    ]
    rate = torch.stack(per_block) / 400  # each of the 16 blocks is kept about 12/49 of the time
    assert rate.min() > 0.12 and rate.max() < 0.40


def test_nested_plan_cuts_the_shuffle_order():
    plan = RandomMasker((8, 8), 0.5)(torch.Generator().manual_seed(0))
    assert nested_plan(plan, None) is plan and nested_plan(plan, 0.5) is plan
    harder = nested_plan(plan, 0.75)
    assert harder.num_keep == 16 and torch.equal(harder.ids_keep, plan.ids_keep[:16])
    assert not harder.mask[~plan.mask].all() and harder.mask[plan.mask].all()  # subset of the visible
    batch = MaskPlan.collate([plan, plan])
    assert nested_plan(batch, 0.75).ids_keep.shape == (2, 16)


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
        build_masker({"type": "block", "block": 0}, grid=(8, 8))
    with pytest.raises(ValueError, match="masker.ratio"):
        build_masker({"type": "random", "ratio": 1.5}, grid=(8, 8))
    with pytest.raises(ValueError, match="bad field"):
        build_masker({"type": "random", "ratoi": 0.5}, grid=(8, 8))
