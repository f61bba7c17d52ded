"""Prefect 3 flows over the Kedro pipelines; deployments are in ``prefect.yaml`` next to this file.

Each Kedro pipeline runs as one Prefect task through ``KedroSession`` (so Kedro hooks, MLflow tracking
included, fire as under ``kedro run``). Flows:

- ``kedro_flow``: any list of Kedro pipelines, in order; publishes ``report.json`` (``compare.json`` after
  ``compare``) as a markdown artifact. The ``compare`` deployment runs it on a schedule.
- ``regions_precompute``: ingest, then the region store; ``shards > 1`` runs shards on a Dask cluster.
- ``rmae_retrain``: pre-train a recipe, evaluate it, register the encoder as ``candidate`` and promote it
  to ``champion`` only if it beats the champion on a metric. Every decision goes to MLflow tags,
  a Prefect artifact and ``data/08_reporting/retrain_decisions.jsonl``.

Run one locally (ephemeral Prefect, no server): ``python pipelines/flows.py regions_precompute``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from maelab.config import project_root
from maelab.orchestration import run_kedro_pipeline
from maelab.orchestration.retrain import (
    compare_and_promote,
    metric_from_report,
    pretrain_result,
    published_tables,
    read_json,
)
from maelab.orchestration.retrain import report_markdown as _report_markdown


def _project(project: str | None) -> Path:
    """The Kedro project the flow works on; exported so registry and config helpers agree with it."""
    path = Path(project).resolve() if project else project_root()
    os.environ["MAELAB_PROJECT_ROOT"] = str(path)
    return path


@task(name="kedro-run", task_run_name="kedro-{name}", retries=2, retry_delay_seconds=30)
def kedro_task(
    name: str,
    env: str | None = None,
    params: dict[str, Any] | None = None,
    project: str | None = None,
    namespaces: list[str] | None = None,
) -> list[str]:
    """``kedro run --pipelines=NAME`` as a Prefect task (retried twice: I/O and worker hiccups)."""
    logger = get_run_logger()
    logger.info(
        "kedro run --pipelines=%s --env=%s params=%s namespaces=%s", name, env, params or {}, namespaces
    )
    outputs = run_kedro_pipeline(name, env=env, params=params, project_path=project, namespaces=namespaces)
    logger.info("kedro pipeline %s done; free outputs: %s", name, outputs or "none")
    return outputs


@task(name="publish-report")
def publish_report(project: str, key: str = "maelab-report", table: str = "report.json") -> str | None:
    path = Path(project) / "data" / "08_reporting" / table
    if not path.is_file():
        get_run_logger().warning("no report at %s; nothing published", path)
        return None
    markdown = _report_markdown(read_json(path, "report"), title=f"maelab report ({path.name})")
    create_markdown_artifact(markdown=markdown, key=key, description=str(path))
    return markdown


@flow(name="maelab-kedro", log_prints=True)
def kedro_flow(
    pipelines: list[str] = ["ingest"],  # noqa: B006  (Prefect needs a JSON-able default)
    env: str | None = None,
    params: dict[str, Any] | None = None,
    project: str | None = None,
) -> dict[str, list[str]]:
    """Run Kedro pipelines one after another (each waits for the previous); publish the report if made."""
    root = str(_project(project))
    done = {name: kedro_task(name, env, params, root) for name in pipelines}
    for table, key in published_tables(pipelines):  # report.json and/or compare.json as markdown
        publish_report(root, key, table)
    return done


@flow(name="maelab-region-shards")
def _region_shards(shards: int, env: str | None, params: dict[str, Any] | None, root: str, shard_param: str):
    """``shards`` copies of the regions pipeline, each given ``{shard_param: {index, count}}``."""
    futures = [
        kedro_task.submit(
            "regions", env, {**(params or {}), shard_param: {"index": i, "count": shards}}, root
        )
        for i in range(shards)
    ]
    return [f.result() for f in futures]


@flow(name="regions-precompute", log_prints=True)
def regions_precompute(
    env: str | None = None,
    params: dict[str, Any] | None = None,
    shards: int = 1,
    ingest: bool = True,
    shard_param: str = "regions.shard",
    project: str | None = None,
) -> list[str]:
    """Ingest (optional), then the region store; ``shards > 1`` runs shards on a local Dask cluster."""
    root = str(_project(project))
    if ingest:
        kedro_task("ingest", env, params, root)
    if shards <= 1:
        return kedro_task("regions", env, params, root)
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": shards, "threads_per_worker": 1, "processes": True})
    return _region_shards.with_options(task_runner=runner)(shards, env, params, root, shard_param)


@flow(name="rmae-retrain", log_prints=True)
def rmae_retrain(
    env: str | None = None,
    recipe: str = "rmae",
    metric: str = "linear_top1",
    higher_is_better: bool = True,
    min_delta: float = 0.0,
    precompute: list[str] = ["ingest", "regions"],  # noqa: B006
    evaluate: list[str] = ["transfer", "report"],  # noqa: B006
    params: dict[str, Any] | None = None,
    project: str | None = None,
) -> dict[str, Any]:
    """Pre-train ``recipe``, evaluate, register (candidate); champion only only if better on ``metric``."""
    from maelab.orchestration import registry

    logger = get_run_logger()
    root = _project(project)
    for name in precompute:
        kedro_task(name, env, params, str(root))
    kedro_task(f"pretrain_{recipe}", env, params, str(root))
    for name in evaluate:
        kedro_task(name, env, params, str(root))

    result = pretrain_result(root, recipe)
    version = registry.register_encoder(result["mlflow_run_id"], result["encoder_path"], recipe, env=env)
    name = registry.model_name(recipe, registry.arch_name(registry.encoder_config(result["encoder_path"])))
    report_path = root / "data" / "08_reporting" / "report.json"
    value = (
        metric_from_report(read_json(report_path, "report"), recipe, metric)
        if report_path.is_file()
        else None
    )
    logger.info("registered %s version %s; %s = %s", name, version, metric, value)

    record = compare_and_promote(
        name,
        version,
        value,
        metric=metric,
        higher_is_better=higher_is_better,
        min_delta=min_delta,
        env=env,
        extra={"recipe": recipe, "env": env or "", "mlflow_run_id": result["mlflow_run_id"]},
    )
    logger.info("decision for %s v%s: %s (%s)", name, version, record.action, record.reason)
    create_markdown_artifact(
        markdown=f"# Retrain decision: {record.action}\n\n{record.markdown()}\n",
        key=f"retrain-decision-{recipe}".lower().replace("_", "-"),
        description=f"{name} v{version}",
    )
    if report_path.is_file():
        publish_report(str(root))
    return {
        "model": name,
        "version": version,
        "action": record.action,
        "reason": record.reason,
        metric: value,
    }


if __name__ == "__main__":  # python pipelines/flows.py FLOW [JSON params]
    import json

    flows = {"kedro_flow": kedro_flow, "regions_precompute": regions_precompute, "rmae_retrain": rmae_retrain}
    if len(sys.argv) < 2 or sys.argv[1] not in flows:
        sys.exit(f'usage: python {sys.argv[0]} {{{",".join(flows)}}} [\'{{"env": "base"}}\']')
    print(flows[sys.argv[1]](**(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})))
