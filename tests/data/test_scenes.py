"""The generated scenes: deterministic, annotations consistent with the pixels, regeneration skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maelab.data.scenes import CATEGORIES, ScenesConfig, generate, render, scene_class, shape_mask

SMALL = ScenesConfig(seed=3, size=48, splits={"train": 12, "val": 4})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, SMALL, workers=0)
    generate(b, SMALL, workers=0)
    generate(c, ScenesConfig(seed=4, size=48, splits={"train": 12, "val": 4}), workers=0)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len([f for f in fa if f.startswith("images/")]) == 16
    assert fa == fb
    assert fa["images/train/000000.jpg"] != fc["images/train/000000.jpg"]


def test_parallel_generation_matches_serial(tmp_path: Path) -> None:
    cfg = ScenesConfig(seed=1, size=32, splits={"train": 70})
    generate(tmp_path / "serial", cfg, workers=0)
    generate(tmp_path / "pool", cfg, workers=2)
    assert _files(tmp_path / "serial") == _files(tmp_path / "pool")


def test_annotations_match_pixels(tmp_path: Path) -> None:
    root = tmp_path / "scenes"
    generate(root, ScenesConfig(seed=0, size=64, splits={"val": 20}), workers=0)
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(CATEGORIES) + 1))
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for im in coco["images"]:
        anns = by_image[im["id"]]
        assert 1 <= len(anns) <= 6
        semantic = np.asarray(Image.open(root / im["semantic_mask"]))
        assert semantic.shape == (64, 64) and semantic.dtype == np.uint8
        union = np.zeros_like(semantic, dtype=bool)
        area_by_cat: dict[int, int] = {}
        for ann in anns:
            m = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert ann["area"] == m.sum() == mask_utils.area(ann["segmentation"]) > 0
            assert (semantic[m] == ann["category_id"]).all()  # the semantic PNG agrees with every instance
            assert not (union & m).any()  # visible parts never overlap
            union |= m
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert ann["iscrowd"] == 0
            area_by_cat[ann["category_id"]] = area_by_cat.get(ann["category_id"], 0) + int(m.sum())
        assert ((semantic > 0) == union).all()  # every object pixel belongs to exactly one annotation
        best = max(area_by_cat.values())
        assert im["scene_class"] == min(c for c, a in area_by_cat.items() if a == best)


def test_scene_contents() -> None:
    cfg = ScenesConfig(seed=0, size=96, splits={"train": 200})
    cats, counts = set(), []
    for i in range(120):
        scene = render(cfg, "train", i)
        assert scene["image"].shape == (96, 96, 3) and scene["image"].dtype == np.uint8
        cats |= {o["category_id"] for o in scene["objects"]}
        counts.append(len(scene["objects"]))
    assert len(cats) == len(CATEGORIES) >= 8
    assert min(counts) >= 1 and max(counts) == 6 and len(set(counts)) >= 4
    # occlusion happens: some objects are partly covered (visible part smaller than the shape in the image)
    occluded = [
        o["mask"].sum() < o["full_area"] for i in range(20) for o in render(cfg, "train", i)["objects"]
    ]
    assert 0 < sum(occluded) < len(occluded)


def test_colour_does_not_give_the_class_away() -> None:
    """Mean object colour per category is about the same (colour is drawn independently of shape)."""
    cfg = ScenesConfig(seed=5, size=64, splits={"train": 300})
    means: dict[int, list[np.ndarray]] = {}
    for i in range(300):
        scene = render(cfg, "train", i)
        for o in scene["objects"]:
            means.setdefault(o["category_id"], []).append(scene["image"][o["mask"]].mean(0))
    per_cat = np.array([np.mean(v, 0) for v in means.values()])  # [C, 3]
    assert np.abs(per_cat - per_cat.mean(0)).max() < 30  # uniform colours average near 127 in every category


def test_shapes_differ_and_have_equal_area() -> None:
    g = (np.arange(200) + 0.5) / 100 - 1.0
    u, v = np.meshgrid(g * 1.3, g * 1.3)
    masks = {c: shape_mask(c, u, v) for c in CATEGORIES}
    for i, a in enumerate(CATEGORIES):
        for b in CATEGORIES[i + 1 :]:
            assert (masks[a] != masks[b]).mean() > 0.02, (a, b)
    assert (
        scene_class(
            [{"category_id": 4, "mask": np.ones(3, bool)}, {"category_id": 2, "mask": np.ones(3, bool)}]
        )
        == 2
    )


def test_generation_is_skipped_when_stamp_matches(tmp_path: Path) -> None:
    root = tmp_path / "scenes"
    first = generate(root, SMALL, workers=0)
    assert first["generated"] and first["images"] == 16
    mtime = (root / "images" / "train" / "000000.jpg").stat().st_mtime_ns
    assert generate(root, SMALL, workers=0)["generated"] is False
    assert (root / "images" / "train" / "000000.jpg").stat().st_mtime_ns == mtime
    # a deleted output or changed parameters regenerate (and stale files go)
    (root / "masks" / "val" / "000001.png").unlink()
    assert generate(root, SMALL, workers=0)["generated"]
    smaller = ScenesConfig(seed=3, size=48, splits={"train": 5})
    assert generate(root, smaller, workers=0)["generated"]
    assert len(list((root / "images" / "train").iterdir())) == 5 and not (root / "images" / "val").exists()


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="min_objects"):
        ScenesConfig.from_params({"type": "scenes", "root": "x", "min_objects": 0})
    with pytest.raises(ValueError, match="image_format"):
        ScenesConfig.from_params({"image_format": "gif"})


def test_tiny_scenes_terminate_with_one_object_left() -> None:
    """At 32 px a lone object can fall below min_visible; rendering must keep it, not loop forever."""
    from maelab.data.scenes import ScenesConfig, render

    cfg = ScenesConfig(size=32)
    for i in range(30):
        assert len(render(cfg, "train", i)["objects"]) >= 1


def test_dominant_label_is_the_unoccluded_subject() -> None:
    """label=dominant: one large subject, painted last (never occluded), is the class; the distractors are
    smaller and every instance is still annotated."""
    cfg = ScenesConfig.from_params(
        {
            "seed": 2,
            "size": 64,
            "label": "dominant",
            "min_objects": 2,
            "max_objects": 5,
            "min_scale": 0.05,
            "max_scale": 0.12,
            "min_visible": 12,
        }
    )
    labels = []
    for i in range(60):
        scene = render(cfg, "train", i)
        subjects = [o for o in scene["objects"] if o["subject"]]
        assert len(subjects) == 1 and scene["objects"][-1] is subjects[0]
        subject = subjects[0]
        assert subject["mask"].sum() == subject["full_area"]  # nothing covers it
        assert all(o["full_area"] < subject["full_area"] for o in scene["objects"][:-1])
        assert scene["scene_class"] == subject["category_id"]
        labels.append(scene["scene_class"])
    assert len(set(labels)) >= 8
    assert ScenesConfig.from_params({"label": "dominant"}).digest() != ScenesConfig().digest()


def test_largest_area_label_is_kept_as_an_option() -> None:
    scene = render(SMALL, "train", 0)
    assert not any(o["subject"] for o in scene["objects"])
    assert scene["scene_class"] == scene_class(scene["objects"])
    with pytest.raises(ValueError, match="label"):
        ScenesConfig.from_params({"label": "biggest"})
