"""``transfer``: one node per (encoder, enabled task), namespace ``transfer.<encoder>`` in kedro viz.

    manifest + params:transfer + params:recipe_defaults [+ coco_annotations] [+ pretrain_<e>_encoder]
        -> <task> -> transfer_<e>_<task> ... -> collect -> transfer_<e>_metrics

The registry builds it from the parameters (``transfer.evaluate``, the enabled tasks); a composed pipeline
passes ``encoder_inputs`` so transfer reads what pre-training wrote. The name ``supervised_reference`` is
no encoder: its one node, ``finetune``, trains the supervised CNN (``transfer.tasks.supervised_reference``).
"""

from __future__ import annotations

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from maelab.pipelines.transfer.nodes import collect_metrics, needs_annotations, run_task
from maelab.transfer.config import ENCODER_TASKS, SUPERVISED_ENCODER, TASKS, task_config


def _bind(func, **kwargs):
    return update_wrapper(partial(func, **kwargs), func)


def metrics_dataset(encoder: str) -> str:
    return f"transfer_{encoder}_metrics"


def evaluated_encoders(transfer: dict) -> list[str]:
    """``transfer.evaluate`` (a list, so an env replaces it whole), else the keys of ``transfer.encoders``."""
    names = list(transfer.get("evaluate") or transfer.get("encoders") or [])
    if not names:
        raise ValueError("parameters transfer: neither `evaluate` nor `encoders` names an encoder")
    return names


def create_pipeline(
    encoders: list[str],
    transfer: dict,
    encoder_inputs: dict[str, str] | None = None,
    tasks: list[str] | None = None,
    **kwargs,
) -> Pipeline:
    """``transfer``: the parameters' ``transfer`` block (tasks switched off there get no node; their
    metrics say ``disabled``). ``encoder_inputs`` maps an encoder name to the dataset holding its file path
    (e.g. ``pretrain_rmae_encoder``)."""
    tasks = list(tasks or ENCODER_TASKS)
    configs = {task: task_config(task, transfer) for task in TASKS}  # a misspelt key fails here, at once
    ran = [task for task in tasks if configs[task].enabled]
    reference_ran = ["finetune"] if configs["supervised_reference"].enabled and "finetune" in tasks else []
    encoder_inputs = encoder_inputs or {}
    nodes = []
    for enc in encoders:
        enc_ran = reference_ran if enc == SUPERVISED_ENCODER else ran
        for task in enc_ran:
            inputs = {
                "manifest": "manifest",
                "transfer": "params:transfer",
                "recipe_defaults": "params:recipe_defaults",
            }
            if enc != SUPERVISED_ENCODER and needs_annotations(configs[task]):
                inputs["coco_annotations"] = "coco_annotations"
            if enc in encoder_inputs:
                inputs["encoder_path"] = encoder_inputs[enc]
            nodes.append(
                node(
                    _bind(run_task, encoder=enc, task=task),
                    inputs=inputs,
                    outputs=f"transfer_{enc}_{task}",
                    name=task,
                    namespace=f"transfer.{enc}",
                    tags=["transfer", task],
                )
            )
        nodes.append(
            node(
                _bind(collect_metrics, encoder=enc, tasks=tasks, ran=enc_ran),
                inputs=[f"transfer_{enc}_{task}" for task in enc_ran],
                outputs=metrics_dataset(enc),
                name="collect",
                namespace=f"transfer.{enc}",
                tags=["transfer"],
            )
        )
    return Pipeline(nodes)
