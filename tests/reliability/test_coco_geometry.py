"""Hostile COCO geometry and RLE: refused by the validator with file, field and annotation id, before any
allocation (the detection dataset, built under a 4 GiB cap, reports it cleanly instead of OOM / segfault)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from maelab.data.cocojson import AnnotationError, load_instances, rle_counts


def base() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 7,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1, 2, 10, 10],
                "area": 100,
                "iscrowd": 0,
                "segmentation": [[1, 2, 11, 2, 11, 12, 1, 12]],
            }
        ],
    }


def _set(path: str, value):
    def edit(d: dict) -> dict:
        d = copy.deepcopy(d)
        *head, last = path.split(".")
        obj = d
        for k in head:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        obj[int(last) if last.isdigit() else last] = value
        return d

    return edit


BAD = {
    "nan polygon": (
        _set("annotations.0.segmentation", [[float("nan"), 2, 11, 2, 11, 12]]),
        "segmentation[0]",
    ),
    "inf polygon": (_set("annotations.0.segmentation", [[1, 2, float("inf"), 2, 11, 12]]), "segmentation[0]"),
    "1e8 polygon": (_set("annotations.0.segmentation", [[1, 2, 1e8, 2, 11, 1e8]]), "segmentation[0]"),
    "nan box": (_set("annotations.0.bbox", [float("nan"), 2, 10, 10]), "bbox"),
    "inf box": (_set("annotations.0.bbox", [1, 2, float("inf"), 10]), "bbox"),
    "1e12 box": (_set("annotations.0.bbox", [1, 2, 1e12, 10]), "bbox"),
    "bad rle string": (
        _set("annotations.0.segmentation", {"size": [48, 64], "counts": "\x7f\x7f!!garbage"}),
        "segmentation.counts",
    ),
    "rle string wrong total": (
        _set("annotations.0.segmentation", {"size": [48, 64], "counts": "0"}),
        "segmentation.counts",
    ),
    "nan area": (_set("annotations.0.area", float("nan")), "area"),
    "huge image": (_set("images.0.width", 10**9), "images[0].width"),
    "escaping file_name": (_set("images.0.file_name", "../../etc/passwd.jpg"), "images[0].file_name"),
    "absolute file_name": (_set("images.0.file_name", "/etc/x.jpg"), "images[0].file_name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_geometry_names_file_annotation_and_field(tmp_path: Path, case: str) -> None:
    edit, field = BAD[case]
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(edit(base())))  # json writes NaN / Infinity, as real broken files do
    with pytest.raises(AnnotationError) as e:
        load_instances(path)
    msg = str(e.value)
    assert msg.startswith("instances_train.json: ") and field in msg, msg
    if field.startswith(("segmentation", "bbox", "area")):
        assert "annotation id 7" in msg, msg


def test_rle_decoder_matches_pycocotools() -> None:
    import numpy as np
    from pycocotools import mask as mask_utils

    m = np.zeros((48, 64), np.uint8, order="F")
    m[5:30, 7:50] = 1
    m[40:, :3] = 1
    rle = mask_utils.encode(m)
    assert sum(rle_counts(rle["counts"].decode())) == 48 * 64
    runs = rle_counts(rle["counts"].decode())
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
    assert np.array_equal(flat, m.ravel(order="F"))


def test_good_file_passes(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(base()))
    assert load_instances(path)["annotations"][0]["id"] == 7


def test_deep_nesting_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AnnotationError, match="deep.json: JSON nested too deeply"):
        load_instances(path)


DETECTION = """
import json, sys
import pandas as pd
from maelab.transfer.data import DetectionSet
for path in sys.argv[1:]:
    coco = json.load(open(path))
    try:
        ds = DetectionSet(pd.DataFrame({"ann_id": [1]}), coco, 64, train=False, source_name=path)
        ds.ann_mask(coco["annotations"][0], 48, 64)
        print("KEPT", path)
    except ValueError as e:
        print("ERROR", e)
"""


def test_detection_set_refuses_under_memory_cap(tmp_path: Path, capped) -> None:
    """One capped process (4 GiB) builds the detection dataset on each hostile file: no OOM, no segfault."""
    cases = ["1e8 polygon", "nan polygon", "bad rle string", "1e12 box"]
    paths = []
    for i, case in enumerate(cases):
        paths.append(tmp_path / f"instances_{i}.json")
        paths[-1].write_text(json.dumps(BAD[case][0](base())))
    out = capped(DETECTION, *map(str, paths), timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(cases) and all(line.startswith("ERROR") for line in lines), lines
    for path, line in zip(paths, lines, strict=True):
        assert str(path) in line and "annotation id 7" in line, line
