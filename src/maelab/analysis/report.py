"""Paper-style comparison of pre-training variants: one row per encoder (R-MAE Tab. 1 style).

Columns: pre-training GMACs per image (``maelab.analysis.flops.count_gmacs``), linear-probe, kNN and
fine-tune top-1, COCO box / mask AP, ADE20K-style mIoU, linear-segmentation-probe mIoU; accuracies and APs
in percent. A metric evaluated over several seeds is the mean, with its standard deviation in
``<column>_std`` (the Markdown table shows ``mean ± std``).

The supervised reference (``maelab.transfer.supervised``) enters as one more result, named
``supervised_reference``, whose ``finetune`` task is the CNN's run: its top-1 lands in ``finetune_top1``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

REFERENCE = "supervised_reference"  # the CNN trained with labels (maelab.transfer.supervised)
COLUMN_TITLES = {
    "recipe": "pre-training",
    "gmacs": "GMACs",
    "linear_top1": "lin. top-1",
    "knn_top1": "kNN top-1",
    "finetune_top1": "ft. top-1",
    "seg_probe_miou": "lin. seg. mIoU",
    "fg_probe_miou": "lin. fg. mIoU",
    "box_ap": "AP^box",
    "mask_ap": "AP^mask",
    "miou": "mIoU",
}


def pretrain_gmacs(name: str, encoder_ref: Any, params: dict[str, Any]) -> float | None:
    """GMACs of one pre-training forward of recipe ``name``; 0 for a random init; None if not countable."""
    if encoder_ref is None:
        return 0.0
    recipes = params.get("recipes") or {}
    if name not in recipes:
        return None
    try:
        from maelab.analysis.flops import count_gmacs
        from maelab.config import resolve_recipe

        return round(float(count_gmacs(resolve_recipe(params, name))), 4)
    except Exception as err:  # a recipe the counter cannot build must not sink the report
        log.warning("report: no GMACs for %s: %s", name, err)
        return None


def _metric(result: dict[str, Any], task: str, key: str) -> float | None:
    value = (result.get("tasks", {}).get(task) or {}).get(key)
    return (
        None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 3)
    )


def build_rows(
    results: dict[str, dict[str, Any]], metric_map: dict[str, list[str]], gmacs: dict[str, float | None]
) -> list[dict[str, Any]]:
    """``[{"recipe": name, "gmacs": ..., <column>: value or None, [<column>_std: std,] ...}]`` in the order
    of ``results``; ``<column>_std`` is there when the task reports ``<metric>_std`` (several seeds)."""
    rows = []
    for name, result in results.items():
        row: dict[str, Any] = {"recipe": name, "gmacs": gmacs.get(name)}
        for column, (task, key) in metric_map.items():
            row[column] = _metric(result, task, key)
            std = _metric(result, task, f"{key}_std")
            if std is not None:
                row[f"{column}_std"] = std
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-Markdown table; missing values as an em dash, the best value per column in bold."""
    if not rows:
        return "_no results_\n"
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if not c.endswith("_std")]
    best = {}  # per column, among the encoders (the supervised reference is a ceiling, not a contender)
    for c in columns[2:]:
        values = [r[c] for r in rows if r.get(c) is not None and r["recipe"] != REFERENCE]
        best[c] = max(values) if values else None

    return render_table(rows, columns, best, COLUMN_TITLES, {"gmacs": "{:.3g}"})


def render_table(
    rows: list[dict[str, Any]],
    columns: list[str],
    best: dict[str, Any],
    titles: dict[str, str],
    formats: dict[str, str],
) -> str:
    """GitHub Markdown of ``rows``: missing values as an em dash, ``best[c]`` in bold, ``mean ± std`` where a
    row has ``<c>_std``; numbers as ``formats[c]`` (default one decimal), a std under 0.05 with two decimals
    (so that a small spread does not read as none)."""

    def cell(c: str, r: dict[str, Any]) -> str:
        v = r.get(c)
        if v is None:
            return "—"
        if c == "recipe":
            return str(v)
        text = formats.get(c, "{:.1f}").format(v)
        text = f"**{text}**" if c in best and v == best[c] and len(rows) > 1 else text
        std = r.get(f"{c}_std")
        return text if std is None else f"{text} ± {std:.{1 if std >= 0.05 else 2}f}"

    head = "| " + " | ".join(titles.get(c, c) for c in columns) + " |"
    rule = "|" + "|".join(":---" if c == "recipe" else "---:" for c in columns) + "|"
    body = ["| " + " | ".join(cell(c, r) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def plot_vs_gmacs(rows: list[dict[str, Any]], columns: list[str]):
    """One panel per metric: value against pre-training GMACs per image, each point labelled by recipe."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = [c for c in columns if any(r.get(c) is not None for r in rows)] or columns[:1]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.0), squeeze=False)
    for ax, c in zip(axes[0], cols, strict=True):
        for r in rows:
            if r.get(c) is None:
                continue
            x = r["gmacs"] if r["gmacs"] is not None else 0.0
            ax.scatter([x], [r[c]], s=30)
            ax.annotate(r["recipe"], (x, r[c]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("pre-training GMACs / image")
        ax.set_title(COLUMN_TITLES.get(c, c))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def use_project_experiment() -> None:
    """Point MLflow at the project's tracking store (bounded HTTP) and experiment (``conf/*/mlflow.yml``)."""
    import mlflow

    from maelab.mlflow_http import bounded_http
    from maelab.orchestration.registry import tracking_uri

    bounded_http()
    mlflow.set_tracking_uri(tracking_uri())
    try:
        from maelab.config import load_config

        experiment = load_config("mlflow").get("experiment", "maelab")
    except Exception:
        experiment = "maelab"
    mlflow.set_experiment(experiment)


def log_to_mlflow(
    report: dict[str, Any], table_md: str, fig, results: dict[str, dict[str, Any]]
) -> str | None:
    """Log every number and the artifacts to one MLflow run (``report-<date>-<hex>``), and each encoder's
    numbers to a child run of it named after the encoder; returns the report run's id."""
    import mlflow

    from maelab.train.tracking import flatten, unique_run_name

    use_project_experiment()
    with mlflow.start_run(run_name=unique_run_name("report"), tags={"maelab.kind": "report"}) as run:
        for row in report["rows"]:
            log_encoder_run(row, results.get(row["recipe"], {}), flatten)
        for row in report["rows"]:
            mlflow.log_metrics(
                {f"{row['recipe']}.{k}": float(v) for k, v in row.items() if k != "recipe" and v is not None}
            )
        mlflow.log_dict(report, "report/report.json")
        mlflow.log_text(table_md, "report/report.md")
        mlflow.log_figure(fig, "report/report_vs_gmacs.png")
        for name, result in results.items():
            mlflow.log_dict(result, f"report/transfer_{name}.json")
            flat = {
                k: v
                for k, v in flatten(result.get("tasks", {})).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            mlflow.log_metrics({f"{name}.{k}": float(v) for k, v in flat.items() if math.isfinite(float(v))})
        return run.info.run_id


def log_encoder_run(row: dict[str, Any], result: dict[str, Any], flatten) -> str:
    """A child run of the active run for one encoder: the report's columns under one name each
    (``linear_top1``, ``box_ap``, ...) and every task number as ``<task>.<metric>``, so MLflow's run
    comparison lines the encoders up metric by metric. Returns the child run's id."""
    import mlflow

    tags = {"maelab.kind": "transfer", "maelab.encoder": str(row["recipe"])}
    with mlflow.start_run(run_name=str(row["recipe"]), nested=True, tags=tags) as child:
        columns = {k: v for k, v in row.items() if k != "recipe" and isinstance(v, int | float)}
        tasks = flatten(result.get("tasks", {}))
        numbers = {
            **{k: v for k, v in tasks.items() if isinstance(v, int | float) and not isinstance(v, bool)},
            **columns,
        }
        mlflow.log_metrics({k: float(v) for k, v in numbers.items() if math.isfinite(float(v))})
        return child.info.run_id


def make_report(
    results: dict[str, dict[str, Any]], params: dict[str, Any]
) -> tuple[dict[str, Any], str, pd.DataFrame, Any]:
    """report.json, the Markdown table, the CSV table and the figure, from all encoders' transfer results."""
    cfg = params.get("report") or {}
    metric_map = {k: list(v) for k, v in (cfg.get("metrics") or {}).items()}
    encoders = (params.get("transfer") or {}).get("encoders") or {}
    gmacs = {name: pretrain_gmacs(name, encoders.get(name, name), params) for name in results}
    rows = build_rows(results, metric_map, gmacs)
    report = {"rows": rows}
    table = markdown_table(rows)
    fig = plot_vs_gmacs(rows, list(metric_map))
    if cfg.get("mlflow", True):  # an outage must not lose the report: warn and return it for saving
        try:
            report_run = log_to_mlflow(report, table, fig, results)
            log.info("report logged to MLflow run %s", report_run)
        except Exception as exc:
            warnings.warn(f"report: MLflow logging failed ({type(exc).__name__}: {exc})", RuntimeWarning, 2)
    return report, table, pd.DataFrame(rows), fig
