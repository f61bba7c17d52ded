import pytest
import torch
from fake_parts import FakeMasker, tiny_recipe

from maelab.train.data import EpochBatchSampler, PretrainDataset, build_loader


def batches(ds, n, **kw):
    loader, _ = build_loader(ds, batch_size=4, seed=0, **kw)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_masks_and_views_reproducible_across_workers(manifest):
    ds = PretrainDataset(manifest, tiny_recipe(), seed=3, masker=FakeMasker((4, 4)))
    a = batches(ds, 5, num_workers=0)
    b = batches(ds, 5, num_workers=2)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["plan"].mask, y["plan"].mask)
        assert torch.equal(x["plan"].ids_keep, y["plan"].ids_keep)
        assert x["plan"].mask.shape == (4, 16) and int(x["plan"].mask[0].sum()) == 12
    # the next epoch is a different permutation and different masks
    assert not torch.equal(a[0]["index"], a[3]["index"]) or not torch.equal(
        a[0]["plan"].mask, a[3]["plan"].mask
    )


def test_resume_position_skips_exactly(manifest):
    ds = PretrainDataset(manifest, tiny_recipe(), seed=0, masker=FakeMasker((4, 4)))
    full = batches(ds, 7)  # 12 images / batch 4: 3 batches per epoch
    resumed = batches(ds, 3, start=(1, 1))  # skip 4 batches = epoch 1, batch 1
    for x, y in zip(full[4:], resumed, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])


def test_sharding_covers_the_global_batch():
    one = EpochBatchSampler(12, 4, seed=1)
    r0 = EpochBatchSampler(12, 2, seed=1, rank=0, world=2)
    r1 = EpochBatchSampler(12, 2, seed=1, rank=1, world=2)
    b, b0, b1 = next(iter(one)), next(iter(r0)), next(iter(r1))
    assert sorted(b) == sorted(b0 + b1)
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatchSampler(3, 4)


def test_sample_extras_follow_the_view(manifest):
    def coords(sample, row, view, g):  # a label map of column indices must stay aligned with the image
        w = int(row["width"])
        sample["cols"] = view.apply_labels(torch.arange(w).expand(int(row["height"]), w))

    ds = PretrainDataset(manifest, tiny_recipe(), seed=0, masker=FakeMasker((4, 4)), extras=[coords])
    s = ds[(0, 0)]
    assert s["cols"].shape == (32, 32)
    assert set(s) >= {"image", "plan", "cols", "index", "image_id"}


def test_filters_and_bad_files_are_named(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"data.sources=\['coco'\]"):
        PretrainDataset(manifest, {**tiny_recipe(), "data": {"sources": ["coco"]}})
    bad = manifest.copy()
    (tmp_path / "images" / "img000.png").write_bytes(b"not a png")
    ds = PretrainDataset(bad, tiny_recipe(), masker=FakeMasker((4, 4)))
    with pytest.raises(ValueError, match=r"img000.png: cannot decode"):
        ds[(0, 0)]


def test_images_are_decoded_upright_as_ingest_saw_them(tmp_path):
    """An EXIF-rotated JPEG trains in its upright orientation (as ingest and the region maps see it)."""
    import pandas as pd
    from PIL import Image

    from maelab.data.manifest import conform

    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    row = {
        "image_id": "scenes:train:0",
        "source": "scenes",
        "split": "train",
        "root": str(tmp_path),
        "path": "rotated.jpg",
        "width": 20,
        "height": 40,
        "content_hash": "x",
    }
    ds = PretrainDataset(conform(pd.DataFrame([row])), tiny_recipe(), seed=0)
    assert tuple(ds.load_image(ds.rows.iloc[0]).shape) == (3, 40, 20)


def test_sample_extras_come_from_the_registry(manifest, monkeypatch):
    """A new extra (MR-MAE's teacher features, say) is one registered factory picked by its data key."""
    from maelab.train import data as data_mod

    made = []

    def teacher(params, recipe):
        made.append(params)
        return lambda sample, row, view, g: sample.__setitem__("teacher", torch.full((2,), params["dim"]))

    monkeypatch.setitem(data_mod.SAMPLE_EXTRAS, "teacher", teacher)
    recipe = tiny_recipe()
    assert data_mod.recipe_extras(recipe) == []  # no key, no extra
    recipe["data"]["teacher"] = {"dim": 7}
    ds = PretrainDataset(manifest, recipe, seed=0, masker=FakeMasker((4, 4)))
    assert made == [{"dim": 7}]
    assert torch.equal(ds[(0, 0)]["teacher"], torch.full((2,), 7))
    with pytest.raises(ValueError, match="registered twice"):
        data_mod.register_extra("teacher")(teacher)
