"""Pre-training nodes: resolve a recipe from parameters once; train it in-process (one device) or through
torchrun (``train.devices > 1``) and return the report, the encoder path, the model path and the losses.

What later stages read is reproducible (DVC hashes it): ``encoder.safetensors`` and ``model.safetensors``
(the whole pre-training model's weights, sorted headers) and their paths relative to the project root.
The engine's ``checkpoint.pt`` (optimiser state, RNG, MLflow run id) and ``result.json`` are for resuming
only; timings and run ids go to the report (a metrics file), per-step losses to a CSV (``dvc plots``)."""

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

from maelab.config import project_root, resolve_recipe
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
    tags = json.dumps(run_tags(recipe, env))  # rank 0's tracker reads them (maelab.train.tracking.TAGS_ENV)
    proc = subprocess.run(
        cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", "MAELAB_MLFLOW_TAGS": tags}, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun for recipe {recipe.get('name')!r} failed with exit code {proc.returncode}"
        )
    return json.loads((out / RESULT).read_text())


def resolve_devices(devices: int | str | None) -> int:
    """``train.devices``: a count, or ``auto`` = every GPU this machine shows (1 without one)."""
    if devices in (None, ""):
        return 1
    if str(devices).lower() == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    return int(devices)


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


MODEL = "model.safetensors"  # the whole pre-training model's weights, beside encoder.safetensors


def project_relative(path: str | Path) -> str:
    """``path`` relative to the project root when it lies under it (no absolute paths in DVC outs)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return str(path)


def loss_table(history: dict[str, list[float]]) -> pd.DataFrame:
    """Per-step ``loss``, ``lr`` and ``loss/<head>`` columns with ``step`` from 1 (``dvc plots`` reads it)."""
    n = len(history.get("loss", []))
    columns = {k: v for k, v in history.items() if len(v) == n}
    return pd.DataFrame({"step": range(1, n + 1), **columns})


def export_model(checkpoint: str | Path) -> tuple[Path, dict[str, list[float]]]:
    """Write ``model.safetensors`` (the model's weights only) beside ``checkpoint``; returns its path and
    the checkpoint's loss history."""
    from maelab.files import save_safetensors
    from maelab.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint, required=("model", "history"))
    path = save_safetensors(
        Path(checkpoint).with_name(MODEL), state["model"], {"step": str(state.get("step"))}
    )
    return path, state["history"]


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
    *,
    register_encoder: bool = True,
) -> tuple[dict[str, Any], str, str, pd.DataFrame]:
    """Train a resolved recipe -> (report, encoder path, model weights path, per-step losses).

    run_env: the Kedro env of this run (MLflow settings come from ``conf/<env>/mlflow.yml``).
    region_store: the store R-MAE's region branch reads (the ``regions`` pipeline writes it).
    teacher_store: the store MR-MAE's mimic head reads in store mode (the ``teachers`` pipeline writes it).
    register_encoder: register the encoder in the MLflow registry (``compare`` does not: its short runs
    are no candidates).
    """
    from maelab.orchestration.registry import resolve_init_from  # train.init_from: models:/ -> a file
    from maelab.orchestration.teachers import resolve_teacher_weights  # MR-MAE: models:/ URIs -> files
    from maelab.train.engine import train

    recipe = with_teacher_store(with_region_store(recipe, region_store), teacher_store)
    recipe = resolve_teacher_weights(recipe, run_env)
    recipe = resolve_init_from(recipe, run_env)
    devices = resolve_devices(recipe["train"].get("devices"))
    if devices > 1:
        report = launch_torchrun(recipe, manifest, devices, run_env)
    else:
        from maelab.analysis.viz import training_pictures
        from maelab.config import mlflow_settings

        tracking = {**mlflow_settings(run_env), "tags": run_tags(recipe, run_env)}
        report = train(recipe, manifest, mlflow=tracking, pictures=training_pictures).report()
    log.info(
        "pretrain %s: %d steps, loss %.4f -> %.4f, %.1f img/s, %.0f s",
        recipe["name"],
        report["steps"],
        report["first_loss"],
        report["last_loss"],
        report["images_per_s"],
        report["wall_s"],
    )
    if register_encoder:
        register(report, recipe, run_env)
    model_path, history = export_model(report["checkpoint_path"])
    return report, project_relative(report["encoder_path"]), project_relative(model_path), loss_table(history)


def run_tags(recipe: dict[str, Any], env: str | None) -> dict[str, str]:
    """The MLflow tags of a pre-training run made by this node: Kedro env and pipeline."""
    return {"maelab.env": env or "local", "maelab.pipeline": f"pretrain_{recipe['name']}"}


def register(report: dict[str, Any], recipe: dict[str, Any], env: str | None) -> None:
    """Register the encoder as ``maelab-<recipe>-<arch>`` (alias ``candidate``; the first version is also
    ``champion``) and the full training state beside it. A tracking backend that fails only warns: the
    trained encoder and checkpoint are on disk either way."""
    if not report.get("mlflow_run_id"):
        return
    from maelab.orchestration.registry import register_encoder, register_state

    try:
        report["registered_version"] = register_encoder(
            report["mlflow_run_id"], report["encoder_path"], recipe["name"], env=env
        )
        register_state(report["mlflow_run_id"], report["checkpoint_path"], recipe, env=env)
    except Exception as err:  # noqa: BLE001 - the registry is optional infrastructure
        log.warning("could not register the %s encoder and state in MLflow: %s", recipe["name"], err)
