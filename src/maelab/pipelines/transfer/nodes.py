"""Transfer nodes: run one task for one encoder; merge one encoder's task results."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from maelab.config import deep_merge

log = logging.getLogger(__name__)

TASKS = ("linear_probe", "knn_probe", "seg_probe", "finetune", "detection", "segmentation")
RUNNERS = {
    "linear_probe": "maelab.transfer.probes:run_linear_probe_seeds",
    "knn_probe": "maelab.transfer.probes:run_knn_probe",
    "seg_probe": "maelab.transfer.probes:run_seg_probe",
    "finetune": "maelab.transfer.classification:run_finetune",
    "detection": "maelab.transfer.detection:run_detection",
    "segmentation": "maelab.transfer.segmentation:run_segmentation",
}
SUPERVISED = "supervised_reference"  # an encoder name whose only task is maelab.transfer.supervised
RUNNERS[SUPERVISED] = "maelab.transfer.supervised:run_supervised_reference"


def task_config(transfer: dict[str, Any], task: str) -> dict[str, Any]:
    """``transfer.tasks.<task>`` with the shared ``data`` and ``device`` merged underneath."""
    tasks = transfer.get("tasks", {})
    if task not in tasks:
        raise KeyError(f"parameters transfer.tasks: no entry {task!r} (have {sorted(tasks)})")
    shared = {"data": transfer.get("data", {}), "device": transfer.get("device", "auto")}
    return deep_merge(shared, tasks[task] or {})


def run_task(
    manifest: pd.DataFrame,
    transfer: dict[str, Any],
    recipe_defaults: dict[str, Any],
    encoder_path: str | None = None,
    *,
    encoder: str,
    task: str,
) -> dict[str, Any]:
    """Run ``task`` for encoder ``encoder`` -> its metrics dict.

    The encoder is ``encoder_path`` when an upstream node produced it (``rmae_full``: the pre-training
    output), else ``transfer.encoders[encoder]``.
    """
    import importlib

    encoders = transfer.get("encoders", {})
    if encoder == SUPERVISED:  # the task's ceiling: a CNN trained with labels, reported as its fine-tune row
        if task != "finetune":
            return {"status": "disabled"}
        task, encoders = SUPERVISED, {**encoders, SUPERVISED: None}
    if encoder_path is None and encoder not in encoders:
        raise KeyError(f"parameters transfer.encoders: no entry {encoder!r} (have {sorted(encoders)})")
    cfg = task_config(transfer, task)
    if not cfg.get("enabled", True):
        return {"status": "disabled"}
    ref = encoder_path.strip() if encoder_path is not None else encoders[encoder]
    is_file = ref is not None and "://" not in str(ref) and ":/" not in str(ref)
    if is_file and not Path(ref).is_file():
        msg = f"transfer.encoders.{encoder}: encoder file {ref} does not exist"
        if transfer.get("on_missing", "error") == "skip":
            log.warning("%s: skipping %s", msg, task)
            return {"status": "missing", "reason": msg}
        raise FileNotFoundError(msg)
    module, func = RUNNERS[task].split(":")
    run = getattr(importlib.import_module(module), func)
    log.info("transfer %s / %s", encoder, task)
    metrics = run(manifest, ref, dict(recipe_defaults.get("encoder", {})), cfg)
    return {"status": "ok", **metrics}


def collect_metrics(encoder: str, tasks: list[str], *results: dict[str, Any]) -> dict[str, Any]:
    """One encoder's results: ``{"encoder": name, "tasks": {task: metrics}}``."""
    return {"encoder": encoder, "tasks": dict(zip(tasks, results, strict=True))}
