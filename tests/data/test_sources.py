"""Every source type on a tiny tree in its real on-disk format, through the ingest nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy.io import savemat

from maelab.data.cocojson import AnnotationError
from maelab.data.manifest import MANIFEST_COLUMNS, image_path, mask_file
from maelab.data.sources import read_source
from maelab.pipelines.ingest import nodes


def _img(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def _ingest(tmp_path: Path, *sources: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict]]:
    params = {
        "workers": 0,
        "min_side": 16,
        "cache": str(tmp_path / "cache.parquet"),
        "sources": list(sources),
    }
    candidates, annotations = nodes.list_images(params, nodes.prepare_sources(params))
    decoded, _ = nodes.decode_images(candidates, params)
    manifest, quarantine = nodes.build_manifest(candidates, decoded)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    return manifest, quarantine, nodes.export_annotations(annotations, manifest)


def _coco_api(data: dict) -> COCO:
    api = COCO()
    api.dataset = data
    api.createIndex()
    return api


# -------------------------------------------------------------------------------------------- COCO
def make_coco(root: Path) -> None:
    """COCO 2017 layout: crowd RLE, compressed RLE, polygons, category ids with gaps, an image with no
    annotations, unlabeled2017 without its image_info json, panoptic JSON + PNGs for val."""
    sizes = {1: (64, 48), 2: (40, 40), 3: (32, 32), 10: (48, 32)}
    for iid, (w, h) in sizes.items():
        _img(root / ("val2017" if iid == 10 else "train2017") / f"{iid:012d}.jpg", w, h, seed=iid)
    for iid in (100, 101):
        _img(root / "unlabeled2017" / f"{iid:012d}.jpg", 24, 24, seed=iid)
    cats = [{"id": i, "name": f"c{i}", "supercategory": "s"} for i in (1, 3, 7, 90)]  # ids with gaps
    crowd = np.zeros((48, 64), np.uint8)
    crowd[10:20, 5:25] = 1
    rle_list = {"size": [48, 64], "counts": []}  # uncompressed RLE, column-major runs, starting with zeros
    flat, run, val = crowd.flatten(order="F"), 0, 0
    for x in flat:
        if x != val:
            rle_list["counts"].append(run)
            run, val = 0, x
        run += 1
    rle_list["counts"].append(run)
    small = np.zeros((40, 40), np.uint8)
    small[2:12, 3:9] = 1
    rle_str = mask_utils.encode(np.asfortranarray(small))
    train = {
        "info": {"description": "tiny"},
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": sizes[i][0], "height": sizes[i][1]}
                   for i in (1, 2, 3)],
        "annotations": [
            {"id": 5, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 50.0, "bbox": [30, 5, 10, 10],
             "segmentation": [[30, 5, 40, 5, 40, 15, 30, 15]]},
            {"id": 6, "image_id": 1, "category_id": 7, "iscrowd": 1, "area": float(crowd.sum()),
             "bbox": [5, 10, 20, 10], "segmentation": rle_list},
            {"id": 9, "image_id": 2, "category_id": 3, "iscrowd": 0, "area": float(small.sum()),
             "bbox": [3, 2, 6, 10], "segmentation": {"size": [40, 40], "counts": rle_str["counts"].decode()}},
        ],  # image 3 has no annotations
        "categories": cats,
    }  # fmt: skip
    val = {
        "images": [{"id": 10, "file_name": f"{10:012d}.jpg", "width": 48, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "iscrowd": 0, "area": 16.0, "bbox": [0, 0, 4, 4],
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}
        ],
        "categories": cats,
    }  # fmt: skip
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    pan_png = np.zeros((32, 48, 3), np.uint8)
    pan_png[:, :24, 0] = 3  # segment id 3 = R + 256 G + 256^2 B
    (root / "annotations" / "panoptic_val2017").mkdir()
    Image.fromarray(pan_png).save(root / "annotations" / "panoptic_val2017" / f"{10:012d}.png")
    pan = {
        "images": val["images"],
        "annotations": [
            {
                "image_id": 10,
                "file_name": f"{10:012d}.png",
                "segments_info": [{"id": 3, "category_id": 1, "iscrowd": 0}],
            }
        ],
        "categories": [{"id": 1, "name": "c1", "isthing": 1}],
    }
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(pan))


def test_coco_layout(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    make_coco(root)
    manifest, quarantine, exported = _ingest(tmp_path, {"type": "coco", "root": str(root)})

    assert len(quarantine) == 0
    assert sorted(manifest["split"].unique()) == ["train", "unlabeled", "val"]
    assert manifest.groupby("split").size().to_dict() == {"train": 3, "unlabeled": 2, "val": 1}
    assert sorted(manifest.loc[manifest.split == "unlabeled", "ann_id"]) == [
        100,
        101,
    ]  # ids from the file names
    assert all(image_path(r).exists() for _, r in manifest.iterrows())
    assert set(exported) == {"instances_coco_train", "instances_coco_val", "panoptic_coco_val"}

    train = exported["instances_coco_train"]
    api = _coco_api(train)
    assert sorted(api.getCatIds()) == [1, 3, 7, 90]
    assert sorted(api.getImgIds()) == [1, 2, 3] and api.getAnnIds(imgIds=[3]) == []
    rows = manifest[manifest.split == "train"].set_index("ann_id")
    for im in train["images"]:  # ids = ann_id, file names resolvable from the manifest
        assert im["file_name"] == rows.loc[im["id"], "path"]
        assert (Path(train["info"]["maelab_root"]) / im["file_name"]).exists()
    crowd = api.loadAnns([6])[0]
    assert crowd["iscrowd"] == 1 and api.annToMask(crowd).sum() == crowd["area"] == 200
    assert api.annToMask(api.loadAnns([9])[0]).sum() == 60  # compressed RLE string
    assert api.annToMask(api.loadAnns([5])[0]).sum() > 0  # polygon

    pan = exported["panoptic_coco_val"]
    png = Path(pan["info"]["maelab_root"]) / pan["annotations"][0]["file_name"]
    assert png.exists() and np.asarray(Image.open(png))[0, 0, 0] == 3


def test_coco_missing_split_and_quarantined_image(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    make_coco(root)
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        read_source({"type": "coco", "root": str(root), "splits": ["test"]})
    (root / "train2017" / f"{2:012d}.jpg").write_bytes(
        b""
    )  # image 2 becomes bad: it and its annotation leave
    manifest, quarantine, exported = _ingest(
        tmp_path, {"type": "coco", "root": str(root), "splits": ["train"]}
    )
    assert quarantine["reason"].tolist() == ["empty file (0 bytes)"]
    assert sorted(im["id"] for im in exported["instances_coco_train"]["images"]) == [1, 3]
    assert all(a["image_id"] != 2 for a in exported["instances_coco_train"]["annotations"])


def test_json_size_disagreeing_with_file_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    make_coco(root)
    _img(root / "val2017" / f"{10:012d}.jpg", 32, 48)  # the JSON says 48x32
    _, quarantine, exported = _ingest(tmp_path, {"type": "coco", "root": str(root), "splits": ["val"]})
    assert "size 32x48 != 48x32" in quarantine["reason"].iloc[0]
    assert exported["instances_coco_val"]["images"] == []


# -------------------------------------------------------------------------------------------- LVIS
def test_lvis_v1(tmp_path: Path) -> None:
    from lvis import LVIS

    coco = tmp_path / "coco"
    _img(coco / "train2017" / f"{1:012d}.jpg", 64, 48)
    _img(coco / "val2017" / f"{7:012d}.jpg", 32, 32)
    lvis_dir = tmp_path / "lvis"
    lvis_dir.mkdir()
    cats = [{"id": 1, "name": "aerosol_can", "synset": "aerosol.n.02", "frequency": "c", "image_count": 1,
             "instance_count": 1, "synonyms": ["aerosol_can"], "def": "a can"}]  # fmt: skip
    val = {
        "info": {}, "licenses": [], "categories": cats,
        "images": [  # LVIS val images come from COCO train2017 and val2017: the path is in coco_url
            {"id": 1, "coco_url": "http://images.cocodataset.org/train2017/000000000001.jpg", "width": 64,
             "height": 48, "neg_category_ids": [], "not_exhaustive_category_ids": []},
            {"id": 7, "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg", "width": 32,
             "height": 32, "neg_category_ids": [1], "not_exhaustive_category_ids": []},
        ],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 100.0, "bbox": [0, 0, 10, 10],
                         "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}],
    }  # fmt: skip
    (lvis_dir / "lvis_v1_val.json").write_text(json.dumps(val))
    manifest, quarantine, exported = _ingest(
        tmp_path, {"type": "lvis", "root": str(coco), "annotations": str(lvis_dir)}
    )
    assert len(quarantine) == 0
    assert sorted(manifest["path"]) == ["train2017/000000000001.jpg", "val2017/000000000007.jpg"]
    assert set(manifest["split"]) == {"val"}
    out = tmp_path / "instances_lvis_val.json"
    out.write_text(json.dumps(exported["instances_lvis_val"]))
    api = LVIS(str(out))  # the LVIS API reads what we wrote
    assert sorted(api.get_img_ids()) == [1, 7]
    assert api.load_imgs([7])[0]["neg_category_ids"] == [1]


# ------------------------------------------------------------------------------------- ImageFolder
def test_imagefolder(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    _img(root / "train" / "n02" / "x.JPEG", 20, 20)
    _img(root / "train" / "n01" / "a.JPEG", 24, 20)
    _img(root / "train" / "n01" / "sub" / "b.jpeg", 20, 24)
    _img(root / "val" / "n02" / "ILSVRC2012_val_00000001.JPEG", 30, 20)
    (root / "train" / "n01" / "README.txt").write_text("not an image, and not listed")
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    manifest, quarantine, _ = _ingest(
        tmp_path, {"type": "imagefolder", "root": str(root), "class_names": str(names)}
    )
    assert len(quarantine) == 0 and len(manifest) == 4
    got = {
        p: (int(lab), name)
        for p, lab, name in zip(manifest.path, manifest.label, manifest.label_name, strict=True)
    }
    assert got == {
        "train/n01/a.JPEG": (0, "tench"),
        "train/n01/sub/b.jpeg": (0, "tench"),
        "train/n02/x.JPEG": (1, "goldfish"),
        "val/n02/ILSVRC2012_val_00000001.JPEG": (1, "goldfish"),
    }
    _img(root / "val" / "n03" / "y.JPEG", 20, 20)
    with pytest.raises(ValueError, match="val/n03 is not a class of train/"):
        read_source({"type": "imagefolder", "root": str(root)})


# ------------------------------------------------------------------------------------------ ADE20K
def test_ade20k(tmp_path: Path) -> None:
    base = tmp_path / "ade" / "ADEChallengeData2016"
    for split, folder, n in (("train", "training", 3), ("val", "validation", 1)):
        for i in range(1, n + 1):
            stem = f"ADE_{split}_{i:08d}"
            _img(base / "images" / folder / f"{stem}.jpg", 32, 24, seed=i)
            if stem == "ADE_train_00000002":
                continue  # no mask: quarantined
            w = 30 if stem == "ADE_train_00000003" else 32  # wrong mask size: quarantined
            (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((24, w), 5, np.uint8)).save(base / "annotations" / folder / f"{stem}.png")
    (base / "sceneCategories.txt").write_text(
        "ADE_train_00000001 bathroom\nADE_val_00000001 airport_terminal\n"
    )
    manifest, quarantine, exported = _ingest(tmp_path, {"type": "ade20k", "root": str(tmp_path / "ade")})
    assert exported == {}
    assert sorted(manifest["image_id"]) == ["ade20k:train:ADE_train_00000001", "ade20k:val:ADE_val_00000001"]
    for _, row in manifest.iterrows():
        assert mask_file(row).exists() and np.asarray(Image.open(mask_file(row))).max() == 5
    assert manifest.set_index("split").loc["train", "label_name"] == "bathroom"
    reasons = dict(zip(quarantine["image_id"], quarantine["reason"], strict=True))
    assert reasons["ade20k:train:ADE_train_00000002"].startswith("missing mask")
    assert reasons["ade20k:train:ADE_train_00000003"] == "mask size 30x24 != image size 32x24"


# -------------------------------------------------------------------------------------- Flowers102
def test_flowers102(tmp_path: Path) -> None:
    root = tmp_path / "flowers"
    for i in range(1, 7):
        _img(root / "jpg" / f"image_{i:05d}.jpg", 20, 20, seed=i)
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 2, 102, 3]], np.uint8)})
    savemat(
        root / "setid.mat",
        {"trnid": np.array([[1, 3]]), "valid": np.array([[5]]), "tstid": np.array([[2, 4, 6]])},
    )
    manifest, quarantine, _ = _ingest(tmp_path, {"type": "flowers102", "root": str(root)})
    assert len(quarantine) == 0
    got = {p: (s, int(lab)) for p, s, lab in zip(manifest.path, manifest.split, manifest.label, strict=True)}
    assert got == {
        "jpg/image_00001.jpg": ("train", 0),
        "jpg/image_00003.jpg": ("train", 1),
        "jpg/image_00005.jpg": ("val", 101),
        "jpg/image_00002.jpg": ("test", 0),
        "jpg/image_00004.jpg": ("test", 1),
        "jpg/image_00006.jpg": ("test", 2),
    }
    savemat(root / "setid.mat", {"trnid": np.array([[1, 3]]), "valid": np.array([[5]])})
    with pytest.raises(AnnotationError, match=r"setid\.mat: tstid: missing"):
        read_source({"type": "flowers102", "root": str(root)})
    savemat(
        root / "setid.mat", {"trnid": np.array([[1, 9]]), "valid": np.array([[5]]), "tstid": np.array([[2]])}
    )
    with pytest.raises(AnnotationError, match=r"setid\.mat: trnid: image 9 > 6 labels"):
        read_source({"type": "flowers102", "root": str(root)})


def test_unknown_source_type_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown type 'kitti'"):
        read_source({"type": "kitti", "root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="coco source: root .* not found"):
        read_source({"type": "coco", "root": str(tmp_path / "absent")})
