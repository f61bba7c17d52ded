"""Malformed annotation JSON: the error names the file and the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from maelab.data.cocojson import AnnotationError, load_instances, load_panoptic

VALID = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 3}],
    "categories": [{"id": 1, "name": "x"}, {"id": 5, "name": "y"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0,
         "segmentation": [[0, 0, 2, 0, 2, 2]]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 3], "area": 12, "iscrowd": 1,
         "segmentation": {"size": [3, 4], "counts": [0, 12]}},
    ],
}  # fmt: skip


def _write(tmp_path: Path, data, name: str = "instances_val2017.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _broken(edit) -> dict:
    data = copy.deepcopy(VALID)
    edit(data)
    return data


def test_valid_file_loads(tmp_path: Path) -> None:
    assert load_instances(_write(tmp_path, VALID)) == VALID


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["annotations"][1].update(bbox=[1, 2]),
            "instances_val2017.json: annotations[1].bbox: expected 4 numbers",
        ),
        (
            lambda d: d["annotations"][0].update(bbox=[0, 0, "2", 2]),
            "annotations[0].bbox: expected 4 numbers",
        ),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, -1, 2]), "annotations[0].bbox: negative width"),
        (lambda d: d["annotations"][0].pop("image_id"), "annotations[0].image_id: missing"),
        (lambda d: d["annotations"][0].update(image_id=7), "annotations[0].image_id: 7 is not in images"),
        (
            lambda d: d["annotations"][0].update(category_id=2),
            "annotations[0].category_id: 2 is not in categories",
        ),
        (lambda d: d["annotations"][0].update(iscrowd=2), "annotations[0].iscrowd: expected 0 or 1"),
        (
            lambda d: d["annotations"][0].update(segmentation=[[0, 0, 1]]),
            "annotations[0].segmentation[0]: a polygon",
        ),
        (
            lambda d: d["annotations"][1]["segmentation"].update(counts=[0, 5]),
            "annotations[1].segmentation.counts",
        ),
        (
            lambda d: d["annotations"][1]["segmentation"].update(size=[4, 4]),
            "annotations[1].segmentation.size",
        ),
        (lambda d: d["annotations"][1].update(id=1), "annotations[1].id: duplicate annotation id 1"),
        (lambda d: d["images"][0].update(width=0), "images[0].width: expected a positive integer"),
        (lambda d: d["images"][0].pop("file_name"), "images[0].file_name: missing"),
        (lambda d: d["categories"][1].update(id="5"), "categories[1].id: expected an integer"),
        (lambda d: d.pop("images"), "instances_val2017.json: images: missing"),
        (lambda d: d.update(annotations={}), "annotations: expected a list"),
    ],
)
def test_malformed_instances_name_file_and_field(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(AnnotationError) as err:
        load_instances(_write(tmp_path, _broken(edit)))
    assert message in str(err.value)
    assert str(err.value).startswith("instances_val2017.json: ")


def test_invalid_json_syntax_names_file_and_position(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"instances_val2017\.json: invalid JSON at line 2 column"):
        load_instances(_write(tmp_path, '{"images": [],\n "annotations": [,]}'))


def test_lvis_images_may_use_coco_url(tmp_path: Path) -> None:
    data = _broken(
        lambda d: (
            d["images"][0].update(coco_url="http://x/train2017/a.jpg") or d["images"][0].pop("file_name")
        )
    )
    for ann in data["annotations"]:
        ann.pop("iscrowd")
    load_instances(_write(tmp_path, data, "lvis_v1_val.json"), lvis=True)
    with pytest.raises(AnnotationError, match=r"lvis_v1_val\.json: images\[0\]\.coco_url: missing"):
        load_instances(
            _write(tmp_path, _broken(lambda d: d["images"][0].pop("file_name")), "lvis_v1_val.json"),
            lvis=True,
        )


def test_malformed_panoptic(tmp_path: Path) -> None:
    pan = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 3}],
        "categories": [{"id": 1, "name": "x", "isthing": 1}],
        "annotations": [
            {"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3, "category_id": 9}]}
        ],
    }
    with pytest.raises(
        AnnotationError, match=r"panoptic_val2017\.json: annotations\[0\]\.segments_info\[0\]\.category_id"
    ):
        load_panoptic(_write(tmp_path, pan, "panoptic_val2017.json"))
