"""Pre-training nodes: resolve a recipe from parameters once; train it in-process (one device) or through
torchrun (``train.devices > 1``) and return the report, the encoder path and the checkpoint path."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from maelab.config import resolve_recipe
from maelab.regions.store import RegionStore

log = logging.getLogger(__name__)


def resolve(recipes: dict[str, Any], recipe_defaults: dict[str, Any], *, recipe_name: str) -> dict[str, Any]:
    """The full recipe ``recipe_name`` (``recipe_defaults`` deep-merged with ``recipes.<name>``)."""
    return resolve_recipe({"recipes": recipes, "recipe_defaults": recipe_defaults}, recipe_name)


PICTURES = "maelab.analysis.viz:training_pictures"  # what the engine logs as pictures (train draws none)


def launch_torchrun(
    recipe: dict[str, Any], manifest: pd.DataFrame, devices: int, env: str | None
) -> dict[str, Any]:
    """``torchrun --standalone --nproc_per_node=devices -m maelab.train`` on this machine; returns its report.

    The resolved recipe and the manifest go through files in the run's output folder, so runtime
    parameter overrides reach every rank. Multi-node runs call torchrun directly (see README).
    """
    from maelab.train.engine import RESULT, out_dir_for  # torch: imported when a node runs, not at registry

    out = out_dir_for(recipe)
    out.mkdir(parents=True, exist_ok=True)
    recipe_file, manifest_file = out / "recipe.json", out / "manifest.parquet"
    recipe_file.write_text(json.dumps(recipe, indent=2))
    manifest.to_parquet(manifest_file)
    (out / RESULT).unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={devices}",
        "-m",
        "maelab.train",
        "--recipe-file",
        str(recipe_file),
        "--manifest",
        str(manifest_file),
        "--out-dir",
        str(out),
        "--pictures",
        PICTURES,
    ]
    if env:
        cmd += ["--env", env]
    log.info("launching %s", " ".join(cmd))
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun for recipe {recipe.get('name')!r} failed with exit code {proc.returncode}"
        )
    return json.loads((out / RESULT).read_text())


def with_region_store(recipe: dict[str, Any], region_store: RegionStore | None) -> dict[str, Any]:
    """The recipe with ``data.regions.store`` set to its source's folder in the ``region_store`` dataset."""
    regions = recipe.get("data", {}).get("regions")
    if not regions:
        return recipe
    if region_store is None:
        raise ValueError(
            f"recipe {recipe.get('name')!r} reads regions (data.regions) but its pipeline has no "
            "region_store input"
        )
    recipe = copy.deepcopy(recipe)
    recipe["data"]["regions"]["store"] = str(region_store[regions.get("source", "fh")].path)
    return recipe


def with_teacher_store(recipe: dict[str, Any], teacher_store: RegionStore | None) -> dict[str, Any]:
    """The recipe with ``data.teacher.store`` set to its teacher's folder in the ``teacher_store`` dataset
    (``data.teacher.mode: store``; online recipes are returned unchanged)."""
    teacher = recipe.get("data", {}).get("teacher") or {}
    if teacher.get("mode") != "store":
        return recipe
    if teacher_store is None:
        raise ValueError(
            f"recipe {recipe.get('name')!r} reads stored teacher features (data.teacher.mode: store) but its "
            "pipeline has no teacher_store input"
        )
    if not teacher.get("source"):
        raise ValueError(
            f"recipe {recipe.get('name')!r}: data.teacher.source (the stored teacher, a key of "
            "teachers.teachers) is needed in store mode"
        )
    recipe = copy.deepcopy(recipe)
    recipe["data"]["teacher"]["store"] = str(teacher_store[teacher["source"]].path)
    return recipe


def pretrain(
    manifest: pd.DataFrame,
    recipe: dict[str, Any],
    run_env: str | None,
    region_store: RegionStore | None = None,
    teacher_store: RegionStore | None = None,
) -> tuple[dict[str, Any], str, str]:
    """Train a resolved recipe -> (report, encoder path, checkpoint path).

    run_env: the Kedro env of this run (MLflow settings come from ``conf/<env>/mlflow.yml``).
    region_store: the store R-MAE's region branch reads (the ``regions`` pipeline writes it).
    teacher_store: the store MR-MAE's mimic head reads in store mode (the ``teachers`` pipeline writes it).
    """
    from maelab.orchestration.teachers import resolve_teacher_weights  # MR-MAE: models:/ URIs -> files
    from maelab.train.engine import train

    recipe = with_teacher_store(with_region_store(recipe, region_store), teacher_store)
    recipe = resolve_teacher_weights(recipe, run_env)
    devices = int(recipe["train"].get("devices") or 1)
    if devices > 1:
        report = launch_torchrun(recipe, manifest, devices, run_env)
    else:
        from maelab.analysis.viz import training_pictures
        from maelab.config import mlflow_settings

        report = train(recipe, manifest, mlflow=mlflow_settings(run_env), pictures=training_pictures).report()
    log.info(
        "pretrain %s: %d steps, loss %.4f -> %.4f, %.1f img/s, %.0f s",
        recipe["name"],
        report["steps"],
        report["first_loss"],
        report["last_loss"],
        report["images_per_s"],
        report["wall_s"],
    )
    register(report, recipe, run_env)
    return report, str(Path(report["encoder_path"])), str(Path(report["checkpoint_path"]))


def register(report: dict[str, Any], recipe: dict[str, Any], env: str | None) -> None:
    """Register the encoder as ``maelab-<recipe>-<arch>`` (alias ``candidate``; the first version is also
    ``champion``). A tracking backend that fails only warns: the trained encoder is on disk either way."""
    if not report.get("mlflow_run_id"):
        return
    from maelab.orchestration.registry import register_encoder

    try:
        report["registered_version"] = register_encoder(
            report["mlflow_run_id"], report["encoder_path"], recipe["name"], env=env
        )
    except Exception as err:  # noqa: BLE001 - the registry is optional infrastructure
        log.warning("could not register the %s encoder in MLflow: %s", recipe["name"], err)
