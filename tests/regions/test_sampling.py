from __future__ import annotations

import numpy as np
import pytest
import torch

from maelab.data.view import View
from maelab.masking.plan import MaskPlan
from maelab.regions.sampling import RegionExtra, eligible_segments, region_mask_ratio
from maelab.regions.store import SourceStore

H, W, P = 48, 64, 8  # source image; views are 32x32 with 8-px patches -> L = 16


def _store(tmp_path, maps: dict[str, np.ndarray]) -> SourceStore:
    store = SourceStore(tmp_path / "fh")
    store.append([(k, "", v) for k, v in maps.items()])
    return store


def _blocky(seed: int, layers: int = 3) -> np.ndarray:
    """[S, H, W] labels 1..n in random rectangles of several sizes (layer i coarser than i-1)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((layers, H, W), np.int64)
    for s in range(layers):
        cell = 4 * (s + 1)
        grid = rng.integers(1, 40 * (s + 1), size=(H // cell + 1, W // cell + 1))
        out[s] = np.kron(grid, np.ones((cell, cell), np.int64))[:H, :W]
    return out


def _row(image_id: str) -> dict:
    return {"image_id": image_id, "height": H, "width": W}


def _visible_pixels(mask: torch.Tensor, hw=(32, 32)) -> torch.Tensor:
    gh, gw = hw[0] // P, hw[1] // P
    return (~mask).view(gh, gw).repeat_interleave(P, 0).repeat_interleave(P, 1)


def _views(n: int, seed: int = 0) -> list[View]:
    g = torch.Generator().manual_seed(seed)
    views = [View.random_resized_crop((H, W), (32, 32), (0.1, 1.0), generator=g) for _ in range(n)]
    return [*views, View(5, 7, 20, 30, (32, 32), True), View(0, 0, H, W, (32, 32), False)]


def test_view_keeps_labels_aligned_with_colours(tmp_path):
    hw = (96, 128)
    grid = np.random.default_rng(0).permutation(300)[:12].reshape(3, 4) + 1
    labels = np.kron(grid, np.ones((32, 32), np.int64))[None]  # [1, 96, 128], 32-px blocks
    palette = np.zeros((labels.max() + 1, 3))
    palette[:, 0] = np.arange(len(palette)) % 256  # red + 256 green = label
    palette[:, 1] = np.arange(len(palette)) // 256
    image = torch.as_tensor(palette[labels[0]]).permute(2, 0, 1).float()  # [3, H, W]: colour = label
    extra = RegionExtra(_store(tmp_path, {"a": labels}))
    flipped = 0
    g = torch.Generator().manual_seed(0)
    views = [View.random_resized_crop(hw, (32, 32), (0.1, 1.0), generator=g) for _ in range(12)]
    for view in [*views, View(5, 7, 40, 60, (32, 32), True)]:
        got = extra.load({"image_id": "a", "height": hw[0], "width": hw[1]}, view)[0].long()  # [32, 32]
        rgb = view.apply(image)  # the image's own (bicubic, antialiased) path
        decoded = rgb[0].round().long() + 256 * rgb[1].round().long()
        # away from label edges bicubic only sees one colour, so it must decode to the stored label. Radius 3:
        # antialiased bicubic reaches 2 output px, and View.apply_labels samples at the pixel's top-left
        # (floor(i * in / out)) rather than its centre, up to half an output pixel off the bicubic grid.
        # The outer 3 px are left out: the crop may end in a sliver that nearest never samples.
        win = got.unfold(0, 7, 1).unfold(1, 7, 1)  # [26, 26, 7, 7] around pixels 3..28
        interior = torch.zeros_like(got, dtype=torch.bool)
        interior[3:-3, 3:-3] = (win == got[3:-3, 3:-3, None, None]).all(-1).all(-1)
        assert interior.float().mean() > 0.1, view
        assert torch.equal(decoded[interior], got[interior]), view
        flipped += view.flip
    assert flipped >= 2


def test_every_sampled_region_has_a_visible_patch(tmp_path):
    store = _store(tmp_path, {f"i{j}": _blocky(j) for j in range(4)})
    extra = RegionExtra(store, k=8)
    g = torch.Generator().manual_seed(0)
    for j, view in enumerate(_views(20, seed=3)):
        plan = MaskPlan.from_noise(torch.rand(16, generator=g), 0.75)
        sample = {"plan": plan}
        extra(sample, _row(f"i{j % 4}"), view, g)
        regions, labels = sample["regions"], extra.load(_row(f"i{j % 4}"), view)
        assert regions.shape == (8, 32, 32) and regions.dtype == torch.bool and not sample["regions_fallback"]
        vis = _visible_pixels(plan.mask)
        for r in regions:
            assert (r & vis).any()
            # each region is exactly one segment of one layer
            assert any(torch.equal(r, labels[s] == labels[s][r].flatten()[0]) for s in range(3))


def test_any_pixel_rule_and_min_patches():
    labels = torch.ones(1, 16, 16, dtype=torch.int32)  # 2x2 patches of 8 px
    labels[0, 0:2, 0:2] = 2  # inside patch 0 only
    labels[0, 6:10, 6:10] = 3  # 4 pixels in each of the 4 patches
    labels[0, 12:16, 0:4] = 4  # inside patch 2 only
    mask = torch.tensor([True, True, False, True])  # only patch 2 visible
    layer, lab = eligible_segments(labels, mask)
    assert lab.tolist() == [1, 3, 4] and layer.tolist() == [0, 0, 0]  # 2 is hidden; 3 shows one pixel corner
    _, lab = eligible_segments(labels, mask, min_patches=2)
    assert lab.tolist() == [1, 3]  # 4 touches a single patch
    labels[0] = 0  # void everywhere (e.g. panoptic unlabelled)
    assert len(eligible_segments(labels, mask)[1]) == 0


@pytest.mark.parametrize("fallback", ["full", "empty"])
def test_fallback_when_nothing_is_visible(tmp_path, fallback):
    store = _store(tmp_path, {"a": _blocky(0), "void": np.zeros((1, H, W), np.int64)})
    extra = RegionExtra(store, k=4, fallback=fallback)
    view = View(0, 0, H, W, (32, 32), False)
    all_masked = MaskPlan.from_mask(torch.ones(16, dtype=torch.bool))
    some_visible = MaskPlan.from_noise(torch.rand(16), 0.5)
    for image_id, plan in (("a", all_masked), ("void", some_visible)):
        sample = {"plan": plan}
        extra(sample, _row(image_id), view, torch.Generator().manual_seed(0))
        assert sample["regions_fallback"] and sample["regions"].shape == (4, 32, 32)
        assert bool(sample["regions"].all()) == (fallback == "full") and bool(sample["regions"].any()) == (
            fallback == "full"
        )
    # "full" keeps the guarantee whenever any patch is visible
    sample = {"plan": some_visible}
    RegionExtra(store, k=4)(sample, _row("void"), view, torch.Generator())
    assert all((r & _visible_pixels(some_visible.mask)).any() for r in sample["regions"])


def test_sampling_modes_and_determinism(tmp_path):
    labels = np.ones((1, H, W), np.int64)
    labels[0, :, 32:] = 2  # two segments
    store = _store(tmp_path, {"two": labels, "many": _blocky(1)})
    view, plan = View(0, 0, H, W, (32, 32), False), MaskPlan.from_mask(torch.zeros(16, dtype=torch.bool))

    def draw(extra: RegionExtra, image_id: str, seed: int) -> torch.Tensor:
        sample = {"plan": plan}
        extra(sample, _row(image_id), view, torch.Generator().manual_seed(seed))
        return sample["regions"]

    # official (replacement=False): fewer segments than k -> each repeated evenly
    r = draw(RegionExtra(store, k=8, replacement=False), "two", 0)
    left = r[:, 0, 0]
    assert int(left.sum()) == 4
    # with >= k segments: all distinct
    r = draw(RegionExtra(store, k=8, replacement=False), "many", 0)
    assert len({x.numpy().tobytes() for x in r}) == 8
    # paper default (with replacement) is reproducible from the generator and varies with it
    extra = RegionExtra(store, k=8)
    assert torch.equal(draw(extra, "many", 7), draw(extra, "many", 7))
    assert not torch.equal(draw(extra, "many", 7), draw(extra, "many", 8))


def test_errors_and_from_params(tmp_path):
    store = _store(tmp_path, {"a": _blocky(0)})
    extra = RegionExtra.from_params({"source": "fh", "k": 3, "fallback": "empty"}, root=tmp_path)
    assert extra.k == 3 and extra.fallback == "empty" and extra.store.path == store.path
    view = View(0, 0, H, W, (32, 32), False)
    with pytest.raises(ValueError, match="height"):
        extra(
            {"plan": MaskPlan.from_noise(torch.rand(16), 0.75)},
            {"image_id": "a", "height": 10, "width": W},
            view,
            torch.Generator(),
        )
    with pytest.raises(ValueError, match="square patches"):
        extra({"plan": MaskPlan.from_noise(torch.rand(15), 0.75)}, _row("a"), view, torch.Generator())
    with pytest.raises(ValueError, match="fallback"):
        RegionExtra(store, fallback="largest")


def test_eligibility_uses_the_region_plan(tmp_path):
    """R-MAE Fig. 4a (beta_R != beta_I): a segment seen only in patches the region plan masks is not drawn."""
    labels = np.ones((1, H, W), np.int64)  # view 32x32 = the top-left 32x32 of the 48x64 source, 4x4 patches
    labels[0, 0:8, 0:8] = 2  # patch 0 only
    store = _store(tmp_path, {"a": labels})
    view = View(0, 0, 32, 32, (32, 32), False)
    # image plan keeps patches 0, 5 (in this shuffle order); the region plan at beta_R = 15/16 keeps only 5
    rest = [i for i in range(16) if i not in (5, 0)]
    plan = MaskPlan.from_shuffle(torch.tensor([5, 0, *rest]), 2)
    heads = {"pixel": {"type": "pixel_decoder"}, "region": {"type": "region", "mask_ratio": 15 / 16}}
    by_image = RegionExtra(store, k=8)
    by_region = RegionExtra.from_params({"source": "fh", "k": 8}, root=tmp_path, heads=heads)
    assert by_region.mask_ratio == pytest.approx(15 / 16) and by_image.mask_ratio is None

    def labels_drawn(extra: RegionExtra) -> set[int]:
        drawn = set()
        for seed in range(10):
            sample = {"plan": plan}
            extra(sample, _row("a"), view, torch.Generator().manual_seed(seed))
            drawn |= {2 if bool(r[0, 0]) else 1 for r in sample["regions"]}
        return drawn

    assert labels_drawn(by_image) == {1, 2}  # patch 0 is visible to the image
    assert labels_drawn(by_region) == {1}  # ... but masked for the regions


def test_region_mask_ratio_from_heads():
    assert region_mask_ratio(None) is None
    assert region_mask_ratio({"pixel": {"type": "pixel_decoder"}, "region": {"type": "region"}}) is None
    assert region_mask_ratio({"r": {"type": "region", "mask_ratio": 0.6}}) == 0.6
    with pytest.raises(ValueError, match="disagree"):
        region_mask_ratio({"a": {"type": "region", "mask_ratio": 0.6}, "b": {"type": "region"}})
