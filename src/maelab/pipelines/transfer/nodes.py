"""Transfer nodes: run one task for one encoder; merge one encoder's task results.

Every task's parameters are typed (:mod:`maelab.transfer.config`): a misspelt key stops the run naming the
key and the task. Annotations come from the ``coco_annotations`` dataset, the encoder from a parameter
(``transfer.encoders.<name>``) or the pre-training node's output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from maelab.pipelines.coco import instances
from maelab.transfer.config import DetectionConfig, SegmentationConfig, TaskConfig, task_config

log = logging.getLogger(__name__)


def needs_annotations(cfg: TaskConfig) -> bool:
    """Whether the task reads ``coco_annotations``: detection always; segmentation for its class count."""
    return isinstance(cfg, DetectionConfig) or (
        isinstance(cfg, SegmentationConfig) and not cfg.data.num_classes
    )


def run_task_config(
    manifest: pd.DataFrame,
    encoder_ref: str | None,
    encoder_defaults: dict[str, Any],
    cfg: TaskConfig,
    coco_annotations: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one typed task config -> its metrics (the task runners, called by name)."""
    from maelab.transfer import classification, detection, segmentation  # torch: when the node runs

    if cfg.TASK == "linear_probe":
        return classification.run_linear_probe(manifest, encoder_ref, encoder_defaults, cfg)
    if cfg.TASK == "finetune":
        return classification.run_finetune(manifest, encoder_ref, encoder_defaults, cfg)
    if cfg.TASK == "detection":
        data, lvis = cfg.data, cfg.data.evaluator == "lvis"
        train = instances(coco_annotations or {}, f"instances_{data.source}_{data.train_split}", lvis)
        val = instances(coco_annotations or {}, f"instances_{data.source}_{data.eval_split}", lvis)
        return detection.run_detection(manifest, encoder_ref, encoder_defaults, cfg, train, val)
    if cfg.TASK == "segmentation":
        name = f"instances_{cfg.data.sources[0]}_{cfg.data.train_split}"
        train = instances(coco_annotations or {}, name) if needs_annotations(cfg) else None
        return segmentation.run_segmentation(manifest, encoder_ref, encoder_defaults, cfg, train)
    raise ValueError(f"transfer: no runner for task {cfg.TASK!r}")


def encoder_reference(transfer: dict[str, Any], encoder: str, encoder_path: str | None) -> str | None:
    """The encoder to transfer: the pre-training output when given, else ``transfer.encoders.<encoder>``
    (a file, an MLflow URI, or null = random initialisation)."""
    if encoder_path is not None:
        return str(encoder_path).strip()
    encoders = transfer.get("encoders") or {}
    if encoder not in encoders:
        raise KeyError(f"parameters transfer.encoders: no entry {encoder!r} (have {sorted(encoders)})")
    return encoders[encoder]


def run_task(
    manifest: pd.DataFrame,
    transfer: dict[str, Any],
    recipe_defaults: dict[str, Any],
    coco_annotations: dict[str, Any] | None = None,
    encoder_path: str | None = None,
    *,
    encoder: str,
    task: str,
) -> dict[str, Any]:
    """Run ``task`` for encoder ``encoder`` -> ``{"status": "ok", **metrics}`` (or disabled / missing)."""
    cfg = task_config(task, transfer)
    if not cfg.enabled:
        return {"status": "disabled"}
    ref = encoder_reference(transfer, encoder, encoder_path)
    is_file = ref is not None and "://" not in str(ref) and ":/" not in str(ref)
    if is_file and not Path(ref).is_file():
        msg = f"transfer.encoders.{encoder}: encoder file {ref} does not exist"
        if transfer.get("on_missing", "error") == "skip":
            log.warning("%s: skipping %s", msg, task)
            return {"status": "missing", "reason": msg}
        raise FileNotFoundError(msg)
    log.info("transfer %s / %s", encoder, task)
    metrics = run_task_config(manifest, ref, dict(recipe_defaults.get("encoder", {})), cfg, coco_annotations)
    return {"status": "ok", **metrics}


def collect_metrics(
    *results: dict[str, Any], encoder: str, tasks: list[str], ran: list[str]
) -> dict[str, Any]:
    """One encoder's results: ``{"encoder": name, "tasks": {task: metrics}}`` in ``tasks`` order. ``ran``
    names the tasks of ``results``; a task without a node (off in the parameters) is
    ``{"status": "disabled"}``."""
    by_task = dict(zip(ran, results, strict=True))
    return {"encoder": encoder, "tasks": {t: by_task.get(t, {"status": "disabled"}) for t in tasks}}
