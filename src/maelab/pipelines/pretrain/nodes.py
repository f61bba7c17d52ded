"""Pre-training node: resolve the recipe from parameters, train in-process (one device) or through
torchrun (``train.devices > 1``), and return the report and the encoder path."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from maelab.config import resolve_recipe

log = logging.getLogger(__name__)


def recipe_from_params(recipes: dict[str, Any], recipe_defaults: dict[str, Any], name: str) -> dict[str, Any]:
    return resolve_recipe({"recipes": recipes, "recipe_defaults": recipe_defaults}, name)


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


def pretrain(
    manifest: pd.DataFrame,
    recipes: dict[str, Any],
    recipe_defaults: dict[str, Any],
    *upstream: Any,
    recipe_name: str,
) -> tuple[dict[str, Any], str]:
    """Train ``recipe_name`` -> (report, encoder path). MLflow: ``conf/$KEDRO_ENV/mlflow.yml``.

    ``upstream`` are outputs this run must wait for (e.g. the region store's report), not read here.
    """
    from maelab.train.engine import train

    recipe = recipe_from_params(recipes, recipe_defaults, recipe_name)
    env = os.environ.get("KEDRO_ENV")
    devices = int(recipe["train"].get("devices") or 1)
    if devices > 1:
        report = launch_torchrun(recipe, manifest, devices, env)
    else:
        from maelab.analysis.viz import training_pictures
        from maelab.config import mlflow_settings

        report = train(recipe, manifest, mlflow=mlflow_settings(env), pictures=training_pictures).report()
    log.info(
        "pretrain %s: %d steps, loss %.4f -> %.4f, %.1f img/s, %.0f s",
        recipe_name,
        report["steps"],
        report["first_loss"],
        report["last_loss"],
        report["images_per_s"],
        report["wall_s"],
    )
    register(report, recipe, env)
    return report, str(Path(report["encoder_path"]))


def pretrain_configured(
    manifest: pd.DataFrame, recipes: dict[str, Any], recipe_defaults: dict[str, Any], recipe_name: str
) -> tuple[dict[str, Any], str]:
    """``pretrain`` for the recipe named in parameters (``params:pretrain.recipe``)."""
    return pretrain(manifest, recipes, recipe_defaults, recipe_name=recipe_name)


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
