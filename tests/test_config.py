"""conf/local is read over every run env (``LayeredConfigLoader``), and the data-root hint names it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from maelab.config import load_config


def _coco(root: Path) -> Path:
    """The smallest COCO 2017 layout: one annotated 32x32 image in train2017 and one in val2017."""
    cats = [{"id": 1, "name": "square", "supercategory": "shape"}]
    for split, iid in (("train", 1), ("val", 2)):
        pixels = np.random.default_rng(iid).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        (root / f"{split}2017").mkdir(parents=True)
        Image.fromarray(pixels).save(root / f"{split}2017" / f"{iid:012d}.jpg")
        instances = {
            "images": [{"id": iid, "file_name": f"{iid:012d}.jpg", "width": 32, "height": 32}],
            "annotations": [
                {"id": iid, "image_id": iid, "category_id": 1, "iscrowd": 0, "area": 64.0,
                 "bbox": [4, 4, 8, 8], "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]}
            ],
            "categories": cats,
        }  # fmt: skip
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(instances))
    return root


def _local(project: Path, name: str, content: dict) -> Path:
    path = project / "conf" / "local" / name
    path.write_text(yaml.safe_dump(content))
    return path


def test_local_layers_over_any_env(kedro_project: Path) -> None:
    _local(kedro_project, "parameters_ingest.yml", {"ingest": {"workers": 0}})
    _local(kedro_project, "mlflow.yml", {"experiment": "mine"})
    coco = load_config("parameters", "coco", kedro_project / "conf")
    assert coco["ingest"]["workers"] == 0  # base 2 < coco 16 < local 0
    assert coco["ingest"]["sources"][0]["type"] == "coco"  # the env's keys that local leaves alone stay
    assert load_config("mlflow", "imagenet", kedro_project / "conf")["experiment"] == "mine"
    assert load_config("parameters", "base", kedro_project / "conf")["ingest"]["workers"] == 2  # base alone
    assert load_config("parameters", None, kedro_project / "conf")["ingest"]["workers"] == 0  # default: local


def test_ingest_env_coco_reads_the_data_root_from_conf_local(kedro_project: Path, kedro_run, tmp_path: Path):
    root = _coco(tmp_path / "my_coco")
    source = {"type": "coco", "root": str(root), "splits": ["train", "val"], "panoptic": False}
    _local(kedro_project, "parameters_ingest.yml", {"ingest": {"workers": 0, "sources": [source]}})
    kedro_run(kedro_project, "ingest", env="coco")
    manifest = pd.read_parquet(kedro_project / "data" / "02_intermediate" / "manifest.parquet")
    assert sorted(manifest["split"]) == ["train", "val"]
    assert set(manifest["root"]) == {str(root)}


def test_a_missing_data_root_names_the_file_that_sets_it(kedro_project: Path, kedro_run, tmp_path: Path):
    missing = tmp_path / "nowhere"
    source = {"type": "coco", "root": str(missing), "splits": ["train"]}
    hint = _local(kedro_project, "parameters_ingest.yml", {"ingest": {"workers": 0, "sources": [source]}})
    with pytest.raises(Exception) as err:
        kedro_run(kedro_project, "ingest", env="coco")
    text = "".join(str(e) for e in _chain(err.value))
    assert str(missing) in text  # the root came from conf/local: the file the hint names is read
    assert str(hint.relative_to(kedro_project)) in text


def _chain(exc: BaseException | None):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__
