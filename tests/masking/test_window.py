"""LoMaR's window masker (Chen et al. 2022, §1.4): windows inside the grid, exact masked counts, independent
windows per image, the released code's pairing behind a switch, and plans that survive DataLoader workers."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from maelab.masking import MaskPlan, WindowMasker, WindowPlan, build_masker
from maelab.masking.window import window_grid_ids
from maelab.train.data import collate


def _corners(plan: WindowPlan, grid: tuple[int, int], k: int) -> list[tuple[int, int]]:
    """Top-left corner (row, col) of every window of a one-sample plan, checking each is a K x K square."""
    out = []
    for ids in plan.window_ids:
        rows, cols = ids // grid[1], ids % grid[1]
        top, left = int(rows.min()), int(cols.min())
        assert torch.equal(ids, window_grid_ids(grid, k, torch.tensor([top]), torch.tensor([left]))[0])
        out.append((top, left))
    return out


@pytest.mark.parametrize(
    "grid,k,views,ratio,masked",
    [
        ((14, 14), 7, 4, 0.8, 39),  # 224 px, the default: 39 of 49 masked
        ((24, 24), 7, 6, 0.8, 39),  # 384 px (§2.1)
        ((28, 28), 7, 9, 0.8, 39),  # 448 px (§2.1)
        ((14, 14), 5, 8, 0.75, 18),  # Table 6
        ((14, 14), 14, 1, 0.9, 176),  # Table 6, one window = the grid; Fig. 5's 90%
        ((10, 6), 3, 5, 0.3, 2),  # rectangular grid, Fig. 5's 30%
    ],
)
def test_windows_inside_the_grid_with_exact_masked_count(grid, k, views, ratio, masked):
    masker = build_masker({"type": "window", "ratio": ratio, "window": k, "views": views}, grid=grid)
    assert isinstance(masker, WindowMasker) and not masker.in_step
    assert masker.num_mask == int(k * k * ratio) == masked
    for seed in range(20):
        plan = masker(torch.Generator().manual_seed(seed))
        assert isinstance(plan, WindowPlan)
        assert plan.window_ids.shape == (views, k * k) and plan.mask.shape == (views * k * k,)
        assert int(plan.window_ids.min()) >= 0 and int(plan.window_ids.max()) < grid[0] * grid[1]
        for top, left in _corners(plan, grid, k):
            assert 0 <= top <= grid[0] - k and 0 <= left <= grid[1] - k
        assert plan.window_mask().sum(-1).tolist() == [masked] * views
        # ids_keep are exactly the visible window tokens
        assert plan.ids_keep.shape == (views * (k * k - masked),)
        assert not plan.mask[plan.ids_keep].any()


def test_every_corner_is_reachable():
    masker = WindowMasker((9, 9), window=7, views=4)
    seen = set()
    for seed in range(100):
        seen |= set(_corners(masker(torch.Generator().manual_seed(seed)), (9, 9), 7))
    assert seen == {(t, left) for t in range(3) for left in range(3)}


def test_windows_and_masks_independent_per_image_and_window():
    masker = WindowMasker((14, 14), views=4)
    plans = [masker(torch.Generator().manual_seed(s)) for s in range(8)]
    corners = [tuple(_corners(p, (14, 14), 7)) for p in plans]
    assert len(set(corners)) == 8  # every image draws its own windows
    assert any(len(set(c)) > 1 for c in corners)  # and the windows of one image differ
    wm = torch.stack([p.window_mask() for p in plans]).view(-1, 49)  # 32 windows
    assert len({tuple(m.tolist()) for m in wm}) == 32  # masks drawn per window


def test_official_pairing_reproduces_the_released_tiling():
    batch = 8
    paper = WindowMasker((14, 14), views=4)
    official = build_masker({"type": "window", "views": 4, "official_pairing": True}, grid=(14, 14))
    assert official.in_step  # it needs the batch: made in the step
    with pytest.raises(NotImplementedError):
        official(torch.Generator().manual_seed(0))
    plan = official.batch_plan(batch, torch.Generator().manual_seed(0))
    assert isinstance(plan, WindowPlan) and plan.window_ids.shape == (batch, 4, 49)
    assert plan.mask.shape == (batch, 4 * 49)
    offsets = plan.window_ids[:4, 0]  # view 0 of images 0..3 = offsets 0..3
    for b in range(batch):
        for j in range(4):
            # tile-major batch (t = j*B + b) against per-entry tiled offsets (t mod n)
            assert torch.equal(plan.window_ids[b, j], offsets[(j * batch + b) % 4])
            # n divides B: one window per image, repeated n times
            assert torch.equal(plan.window_ids[b, j], plan.window_ids[b, 0])
    # only n distinct windows in the whole batch, and different masks for the repeats
    assert len({tuple(w.tolist()) for w in plan.window_ids.view(-1, 49)}) <= 4
    assert not torch.equal(plan.window_mask()[0, 0], plan.window_mask()[0, 1])
    assert plan.window_mask().sum(-1).eq(39).all()
    # the paper's pairing differs: different windows across the views of one image and across images
    paired = MaskPlan.collate([paper(torch.Generator().manual_seed(s)) for s in range(batch)])
    distinct_per_image = [len({tuple(w.tolist()) for w in paired.window_ids[b]}) for b in range(batch)]
    assert max(distinct_per_image) > 1
    assert len({tuple(w.tolist()) for w in paired.window_ids.view(-1, 49)}) > 4


def test_official_pairing_when_views_do_not_divide_the_batch():
    masker = WindowMasker((14, 14), views=4, official_pairing=True)
    plan = masker.batch_plan(6, torch.Generator().manual_seed(1))
    offsets = plan.window_ids[:4, 0]
    for b in range(6):
        for j in range(4):
            assert torch.equal(plan.window_ids[b, j], offsets[(j * 6 + b) % 4])


def test_official_pairing_in_the_step_gives_a_batch_plan_on_the_image_device():
    masker = WindowMasker((8, 8), window=4, views=2, official_pairing=True)
    from maelab.masking import MaskContext

    plan = masker.plan_batch({"image": torch.zeros(4, 3, 64, 64)}, MaskContext())
    assert plan.window_ids.shape == (4, 2, 16) and plan.mask.device.type == "cpu"


class _Plans(Dataset):
    def __init__(self) -> None:
        self.masker = WindowMasker((14, 14), views=4)

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return {"plan": self.masker(torch.Generator().manual_seed(i))}


def test_plan_survives_a_two_worker_dataloader():
    loader = DataLoader(_Plans(), batch_size=3, num_workers=2, collate_fn=collate)
    got = [b["plan"] for b in loader]
    assert [type(p) for p in got] == [WindowPlan, WindowPlan]
    want = [_Plans()[i]["plan"] for i in range(6)]
    for i, p in enumerate(want):
        batch = got[i // 3]
        assert torch.equal(batch.window_ids[i % 3], p.window_ids)
        assert torch.equal(batch.mask[i % 3], p.mask) and torch.equal(batch.ids_keep[i % 3], p.ids_keep)
    assert got[0].window_ids.shape == (3, 4, 49) and got[0].mask.shape == (3, 196)


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"window": 15}, "masker.window"),
        ({"views": 0}, "masker.views"),
        ({"ratio": 1.0}, "masker.ratio"),
    ],
)
def test_bad_config_names_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_masker({"type": "window", **cfg}, grid=(14, 14))
