"""Transfer nodes: run one task for one encoder; merge one encoder's task results.

Every task's parameters are typed (:mod:`maelab.transfer.config`): a misspelt key stops the run naming the
key and the task. Annotations come from the ``coco_annotations`` dataset, the encoder from a parameter
(``transfer.encoders.<name>``) or the pre-training node's output.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from maelab.pipelines.coco import instances
from maelab.transfer.config import (
    SUPERVISED_ENCODER,
    DetectionConfig,
    SegmentationConfig,
    SegProbeConfig,
    SupervisedReferenceConfig,
    TaskConfig,
    task_config,
)

log = logging.getLogger(__name__)


def needs_annotations(cfg: TaskConfig) -> bool:
    """Whether the task reads ``coco_annotations``: detection always; the segmentation fine-tune and the
    linear segmentation probe for their class count."""
    return isinstance(cfg, DetectionConfig) or (
        isinstance(cfg, SegmentationConfig | SegProbeConfig) and not cfg.data.num_classes
    )


def run_task_config(
    manifest: pd.DataFrame,
    encoder_ref: str | None,
    encoder_defaults: dict[str, Any],
    cfg: TaskConfig,
    coco_annotations: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one typed task config -> its metrics (the task runners, called by name)."""
    from maelab.transfer import classification, detection, probes, segmentation, supervised  # torch: at run

    def train_instances() -> dict[str, Any] | None:  # the class count of the segmentation tasks
        name = f"instances_{cfg.data.sources[0]}_{cfg.data.train_split}"
        return instances(coco_annotations or {}, name) if needs_annotations(cfg) else None

    if cfg.TASK == "linear_probe":
        return probes.run_linear_probe(manifest, encoder_ref, encoder_defaults, cfg)
    if cfg.TASK == "knn_probe":
        return probes.run_knn_probe(manifest, encoder_ref, encoder_defaults, cfg)
    if isinstance(cfg, SegProbeConfig):  # class-wise, or foreground / background (FgProbeConfig)
        return probes.run_seg_probe(manifest, encoder_ref, encoder_defaults, cfg, train_instances())
    if cfg.TASK == "finetune":
        return classification.run_finetune(manifest, encoder_ref, encoder_defaults, cfg)
    if cfg.TASK == "detection":
        data, lvis = cfg.data, cfg.data.evaluator == "lvis"
        train = instances(coco_annotations or {}, f"instances_{data.source}_{data.train_split}", lvis)
        val = instances(coco_annotations or {}, f"instances_{data.source}_{data.eval_split}", lvis)
        return detection.run_detection(manifest, encoder_ref, encoder_defaults, cfg, train, val)
    if cfg.TASK == "segmentation":
        return segmentation.run_segmentation(manifest, encoder_ref, encoder_defaults, cfg, train_instances())
    if cfg.TASK == "supervised_reference":
        return supervised.run_supervised_reference(manifest, encoder_ref, encoder_defaults, cfg)
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
    """Run ``task`` for encoder ``encoder`` -> ``{"status": "ok", **metrics}`` (or disabled / missing).

    The encoder ``supervised_reference`` has no encoder file: its ``finetune`` is the supervised CNN
    (``transfer.tasks.supervised_reference``), the ceiling the report shows in the fine-tune column.
    """
    if encoder == SUPERVISED_ENCODER:
        return run_supervised_reference(manifest, transfer, recipe_defaults, task)
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
    t0 = time.perf_counter()
    metrics = run_task_config(manifest, ref, dict(recipe_defaults.get("encoder", {})), cfg, coco_annotations)
    log.info(result_line(encoder, task, metrics, time.perf_counter() - t0))
    return {"status": "ok", **metrics}


HEADLINE = ("top1", "top5", "box_ap", "mask_ap", "miou", "ap", "final_loss")  # what a result line shows


def result_line(encoder: str, task: str, metrics: dict[str, Any], seconds: float) -> str:
    """``transfer mae / linear_probe: top1 20.75, top5 68.08 (12.3 s)``: one line per finished task."""
    shown = [f"{k} {metrics[k]:.4g}" for k in HEADLINE if isinstance(metrics.get(k), int | float)]
    return f"transfer {encoder} / {task}: {', '.join(shown) or 'done'} ({seconds:.1f} s)"


def run_supervised_reference(
    manifest: pd.DataFrame, transfer: dict[str, Any], recipe_defaults: dict[str, Any], task: str
) -> dict[str, Any]:
    """The ``supervised_reference`` encoder's ``task``: its ``finetune`` is the supervised CNN."""
    if task != "finetune":
        raise ValueError(f"transfer: the {SUPERVISED_ENCODER} row has only a finetune task, not {task!r}")
    cfg = task_config(SupervisedReferenceConfig.TASK, transfer)
    if not cfg.enabled:
        return {"status": "disabled"}
    log.info("transfer %s / %s", SUPERVISED_ENCODER, cfg.TASK)
    t0 = time.perf_counter()
    metrics = run_task_config(manifest, None, dict(recipe_defaults.get("encoder", {})), cfg)
    log.info(result_line(SUPERVISED_ENCODER, cfg.TASK, metrics, time.perf_counter() - t0))
    return {"status": "ok", **metrics}


def collect_metrics(
    *results: dict[str, Any], encoder: str, tasks: list[str], ran: list[str]
) -> dict[str, Any]:
    """One encoder's results: ``{"encoder": name, "tasks": {task: metrics}}`` in ``tasks`` order. ``ran``
    names the tasks of ``results``; a task without a node (off in the parameters) is
    ``{"status": "disabled"}``."""
    by_task = dict(zip(ran, results, strict=True))
    return {"encoder": encoder, "tasks": {t: by_task.get(t, {"status": "disabled"}) for t in tasks}}
