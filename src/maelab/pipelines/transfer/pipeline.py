"""``transfer``: one node per (encoder, task), grouped under namespace ``transfer.<encoder>`` in kedro viz.

Compose with ``create_pipeline(encoders=["rmae", "mae", "random_init"])``; tasks switch off in
parameters (``transfer.tasks.<task>.enabled``) or here (``tasks=[...]``).
"""

from __future__ import annotations

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from maelab.pipelines.transfer.nodes import TASKS, collect_metrics, run_task

DEFAULT_ENCODERS = ("mae", "rmae", "random_init")


def configured_encoders() -> list[str]:
    """Encoder names from the project's parameters: ``transfer.evaluate`` (a list, so an env replaces it
    whole; ``encoders`` is a dict and merges), else the keys of ``transfer.encoders``, else the defaults."""
    try:
        from maelab.config import load_config

        transfer = load_config("parameters").get("transfer") or {}
        names = list(transfer.get("evaluate") or transfer.get("encoders") or [])
    except Exception:
        names = []
    return names or list(DEFAULT_ENCODERS)


def _bind(func, **kwargs):
    return update_wrapper(partial(func, **kwargs), func)


def metrics_dataset(encoder: str) -> str:
    return f"transfer_{encoder}_metrics"


def create_pipeline(
    encoders: list[str] | None = None,
    tasks: list[str] | None = None,
    encoder_inputs: dict[str, str] | None = None,
    **kwargs,
) -> Pipeline:
    """``encoder_inputs`` maps an encoder name to the dataset holding its file path (e.g.
    ``pretrain_rmae_encoder``), so a composed pipeline runs transfer after pre-training."""
    encoders = list(encoders) if encoders else configured_encoders()
    tasks = list(tasks) if tasks else list(TASKS)
    encoder_inputs = encoder_inputs or {}
    nodes = []
    for enc in encoders:
        upstream = [encoder_inputs[enc]] if enc in encoder_inputs else []
        for task in tasks:
            nodes.append(
                node(
                    _bind(run_task, encoder=enc, task=task),
                    inputs=["manifest", "params:transfer", "params:recipe_defaults", *upstream],
                    outputs=f"transfer_{enc}_{task}",
                    name=task,
                    namespace=f"transfer.{enc}",
                    tags=["transfer", task],
                )
            )
        collect = update_wrapper(partial(collect_metrics, enc, tasks), collect_metrics)
        nodes.append(
            node(
                collect,
                inputs=[f"transfer_{enc}_{task}" for task in tasks],
                outputs=metrics_dataset(enc),
                name="collect",
                namespace=f"transfer.{enc}",
                tags=["transfer"],
            )
        )
    return Pipeline(nodes)
