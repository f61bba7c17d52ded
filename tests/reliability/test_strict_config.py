"""Misspelt or out-of-range parameters stop the run before any work, naming the key (and the range)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maelab.config import load_config, resolve_recipe
from maelab.schema import ConfigError, check_ingest, check_parameters, check_recipe
from maelab.train.__main__ import apply_sets

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def params() -> dict:
    return load_config("parameters", conf_source=REPO / "conf")


def _recipe(params: dict, *sets: str) -> dict:
    return apply_sets(resolve_recipe(copy.deepcopy(params), "mae"), list(sets))


def test_shipped_parameters_pass(params: dict) -> None:
    for env in (None, "imagenet", "coco", "ade20k", "benchmark"):
        check_parameters(load_config("parameters", env, conf_source=REPO / "conf"))


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("train.stepz=3", "train.stepz"),
        ("trian.steps=3", "trian"),
        ("encoder.dept=3", "encoder.dept"),
        ("masker.ratoi=0.5", "masker.ratoi"),
        ("heads.pixel.depht=1", "heads.pixel.depht"),
        ("data.regions.kk=4", "data.regions.kk"),
    ],
)
def test_unknown_recipe_key_is_named(params: dict, item: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_recipe(_recipe(params, item))
    assert str(e.value).startswith(f"recipe 'mae': {key}: unknown key"), str(e.value)


@pytest.mark.parametrize(
    ("item", "key", "allowed"),
    [
        ("train.steps=-5", "train.steps", "[1, inf)"),
        ("masker.ratio=0.0", "masker.ratio", "(0.0, 1.0)"),
        ("masker.ratio=1.0", "masker.ratio", "(0.0, 1.0)"),
        ("train.batch_size=0", "train.batch_size", "[1, inf)"),
        ("train.accum_steps=0", "train.accum_steps", "[1, inf)"),
        ("train.precision=fp8", "train.precision", ""),
        ("encoder.patch_size=0", "encoder.patch_size", "[1, inf)"),
        ("encoder.depth=x", "encoder.depth", "valid integer"),
    ],
)
def test_out_of_range_value_names_key_and_range(params: dict, item: str, key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_recipe(_recipe(params, item))
    assert f": {key}: " in str(e.value) and allowed in str(e.value), str(e.value)


def test_misspelt_ingest_key_is_named(params: dict) -> None:
    ingest = {**params["ingest"], "sourcs": [{"type": "photos", "root": "x"}]}
    with pytest.raises(ConfigError, match=r"ingest\.sourcs: unknown key; did you mean 'sources'"):
        check_ingest(ingest)
    bad_source = {**params["ingest"], "sources": [{"type": "coco", "root": "x", "panoptc": True}]}
    with pytest.raises(ConfigError, match=r"ingest\.sources\[0\]\.panoptc: unknown key"):
        check_ingest(bad_source)
    scenes = params["ingest"]["sources"][0]
    assert scenes["type"] == "scenes" and scenes["label"] == "dominant"  # the scenes label option passes
    bad_scenes = {**params["ingest"], "sources": [{**scenes, "subject_max_scal": 0.3}]}
    with pytest.raises(ConfigError, match=r"ingest\.sources\[0\]\.subject_max_scal: unknown key"):
        check_ingest(bad_scenes)


def test_train_cli_stops_before_any_work(tmp_path: Path) -> None:
    """``python -m maelab.train --set train.stepz=3`` exits non-zero at once, writing nothing."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MAELAB_PROJECT_ROOT": str(REPO)}
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "maelab.train",
            "--recipe",
            "mae",
            "--set",
            "train.stepz=3",
            "--no-mlflow",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "train.stepz: unknown key" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_kedro_params_typo_stops_before_any_node(kedro_project: Path, kedro_run) -> None:
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
        kedro_run(kedro_project, "ingest", {"recipe_defaults.train.stepz": 3})
    assert not any((kedro_project / "data" / "01_raw").iterdir())  # ingest never started
