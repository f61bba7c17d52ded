from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import felzenszwalb

from maelab.regions.sources import (
    CocoPanopticSource,
    FHSource,
    SamSource,
    make_source,
    pack_masks,
    read_rgb,
    storage_dtype,
)


def test_fh_matches_skimage_per_scale_and_shifts_labels(toy_manifest):
    row = toy_manifest.iloc[0].to_dict()
    image = read_rgb(Path(row["root"]) / row["path"], row)
    maps = FHSource("fh", scales=[20, 80], sigma=0.5).compute(image, row)
    assert maps.shape == (2, 40, 48) and maps.dtype == np.int32
    for i, s in enumerate([20, 80]):
        np.testing.assert_array_equal(maps[i], felzenszwalb(image, scale=s, sigma=0.5, min_size=s) + 1)
    assert maps.min() == 1  # FH covers the image: no "no region" pixel


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (16, 16)])
def test_fh_degenerate_images(hw):
    flat = np.full((*hw, 3), 77, np.uint8)
    maps = FHSource("fh", scales=[500, 1000]).compute(flat, {"image_id": "x"})
    assert maps.shape == (2, *hw) and (maps == 1).all()  # one segment, label 1


def test_read_rgb_checks_manifest_size(toy_manifest):
    row = toy_manifest.iloc[0].to_dict()
    row["width"] = 999
    with pytest.raises(ValueError, match=r"000\.png.*width"):
        read_rgb(Path(row["root"]) / row["path"], row)


def test_storage_dtype_never_wraps():
    assert storage_dtype(np.array([0, 255, 256])) == np.uint16
    assert storage_dtype(np.array([65535])) == np.uint16
    assert storage_dtype(np.array([65536])) == np.int32
    with pytest.raises(ValueError):
        storage_dtype(np.array([-1]))


def _panoptic(tmp_path: Path) -> dict:
    root = tmp_path / "coco"
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    ids = np.zeros((6, 8), np.int64)
    ids[:, :4] = 300 + 256 * 2  # segment id 812 (needs G), listed second
    ids[:3, 4:] = 5 + 256**2 * 1  # 65541 (needs B), listed first
    # rows 3.. of the right half stay 0 = void
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2], -1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "annotations" / "panoptic_val2017" / "000000000042.png")
    ann = {
        "annotations": [
            {"image_id": 42, "file_name": "000000000042.png", "segments_info": [{"id": 65541}, {"id": 812}]}
        ]
    }
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(ann))
    return {
        "image_id": "coco:val:42",
        "source": "coco",
        "split": "val",
        "root": str(root),
        "path": "val2017/000000000042.jpg",
        "ann_id": 42,
        "height": 6,
        "width": 8,
    }


def test_coco_panoptic_segments_to_labels(tmp_path):
    row = _panoptic(tmp_path)
    src = make_source("panoptic", {"type": "coco_panoptic"})
    maps = src.compute(None, row)
    assert maps.shape == (1, 6, 8)
    assert (maps[0, :, :4] == 2).all() and (maps[0, :3, 4:] == 1).all() and (maps[0, 3:, 4:] == 0).all()
    row["ann_id"] = None  # falls back to the file stem
    np.testing.assert_array_equal(src.compute(None, row), maps)


def test_coco_panoptic_errors_name_the_file(tmp_path):
    row = _panoptic(tmp_path)
    with pytest.raises(KeyError, match="panoptic_val2017.json"):
        CocoPanopticSource().compute(None, {**row, "ann_id": 7, "path": "val2017/000000000007.jpg"})
    with pytest.raises(ValueError, match="height/width"):
        CocoPanopticSource().compute(None, {**row, "height": 5})
    with pytest.raises(FileNotFoundError, match=r"annotations: .*panoptic_train2017.json"):
        CocoPanopticSource().compute(None, {**row, "split": "train"})


def test_sam_masks_pack_without_losing_overlaps(tmp_path):
    masks = np.zeros((3, 6, 6), bool)
    masks[0, :, :] = True  # whole image
    masks[1, :3, :3] = True  # overlaps 0
    masks[2, 3:, 3:] = True  # overlaps 0, not 1
    folder = tmp_path / "sam" / "train"
    folder.mkdir(parents=True)
    np.savez_compressed(folder / "img7.npz", masks=masks)
    row = {
        "image_id": "s:train:7",
        "source": "s",
        "split": "train",
        "root": "x",
        "path": "a/img7.jpg",
        "height": 6,
        "width": 6,
    }
    maps = SamSource("sam", folder=str(tmp_path / "sam" / "{split}")).compute(None, row)
    assert maps.shape == (2, 6, 6)  # the largest alone, then the two disjoint ones share a layer
    recovered = sorted(((m == v).sum(), (m == v).tobytes()) for m in maps for v in np.unique(m) if v)
    assert sorted((k.sum(), k.tobytes()) for k in masks) == recovered
    np.savez_compressed(folder / "img7.npz", labels=maps[1])
    np.testing.assert_array_equal(
        SamSource("sam", folder=str(tmp_path / "sam" / "{split}")).compute(None, row), maps[1:]
    )
    np.savez_compressed(folder / "img7.npz", other=maps)
    with pytest.raises(ValueError, match=r"img7\.npz.*'masks' or 'labels'"):
        SamSource("sam", folder=str(folder)).compute(None, row)
    with pytest.raises(FileNotFoundError, match="img8.npz"):
        SamSource("sam", folder=str(folder)).compute(None, {**row, "path": "img8.jpg"})


def test_pack_masks_empty():
    assert pack_masks(np.zeros((2, 3, 4), bool)).shape == (1, 3, 4)


def test_make_source_validates_and_fingerprints():
    a = make_source("fh", {"type": "fh", "scales": [500, 1000], "min_sizes": None, "splits": ["train"]})
    assert a.min_sizes == [500, 1000] and a.layers == ["500", "1000"]
    assert a.fingerprint == make_source("fh", {"scales": [500, 1000]}).fingerprint
    assert a.fingerprint != make_source("fh", {"scales": [500, 1000], "sigma": 0.5}).fingerprint
    with pytest.raises(ValueError, match="regions.sources.x.type"):
        make_source("x", {"type": "nope"})
    with pytest.raises(ValueError, match="regions.sources.fh"):
        make_source("fh", {"scales": [1], "min_sizes": [1, 2]})
    with pytest.raises(ValueError, match="regions.sources.fh"):
        make_source("fh", {"scale": [1]})
