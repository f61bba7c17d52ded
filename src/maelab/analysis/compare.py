"""The ``compare`` table: every method's recipe pre-trained on the same data with the same budget, each
encoder transferred, one row per recipe (``kedro run --pipelines=compare``).

A row holds the cost of pre-training next to what it bought:

- ``gmacs``: multiply-accumulates of one training forward of one image (``maelab.analysis.flops``; teachers
  included, so MR-MAE pays for its teacher);
- ``steps``, ``images`` (optimiser steps x effective batch), ``pretrain_wall_s`` and ``images_per_s`` (as the
  engine reports them);
- ``peak_mem_mb``: the training process's peak resident memory during this recipe's pre-training (CPU; the
  peak is reset before each recipe, DataLoader worker processes not included) or CUDA
  ``max_memory_allocated`` on a GPU;
- ``first_loss`` / ``last_loss``: the engine's 20-step means of the total loss;
- the transfer metrics of ``report.metrics`` whose task ran (``<column>_std`` over seeds where there are
  several).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import pandas as pd

from maelab.analysis.report import COLUMN_TITLES, build_rows, render_table

log = logging.getLogger(__name__)

COST_COLUMNS = (
    "gmacs",
    "steps",
    "images",
    "pretrain_wall_s",
    "images_per_s",
    "peak_mem_mb",
    "first_loss",
    "last_loss",
)
TITLES = {
    **COLUMN_TITLES,
    "steps": "steps",
    "images": "images",
    "pretrain_wall_s": "pre-train s",
    "images_per_s": "img/s",
    "peak_mem_mb": "peak MiB",
    "first_loss": "loss first",
    "last_loss": "loss last",
}
FORMATS = {
    "gmacs": "{:.3g}",
    "steps": "{:d}",
    "images": "{:d}",
    "first_loss": "{:.3f}",
    "last_loss": "{:.3f}",
}


def _round(value: Any, digits: int = 3) -> Any:
    return round(float(value), digits) if isinstance(value, int | float) and math.isfinite(value) else None


def compare_row(
    name: str,
    recipe: dict[str, Any],
    pretrain_report: dict[str, Any],
    transfer_metrics: dict[str, Any],
    metric_map: dict[str, list[str]],
    gmacs: float | None,
) -> dict[str, Any]:
    """One row of the table (see the module docstring for the columns)."""
    train = recipe.get("train") or {}
    steps = int(pretrain_report.get("steps") or 0)
    per_step = int(train.get("batch_size", 1)) * int(train.get("accum_steps", 1))
    per_step *= int(pretrain_report.get("world_size") or 1)
    row: dict[str, Any] = {
        "recipe": name,
        "gmacs": _round(gmacs, 4),
        "steps": steps,
        "images": steps * per_step,
        "pretrain_wall_s": _round(pretrain_report.get("wall_s"), 2),
        "images_per_s": _round(pretrain_report.get("images_per_s"), 1),
        "peak_mem_mb": _round(pretrain_report.get("peak_mem_mb"), 0),
        "first_loss": _round(pretrain_report.get("first_loss"), 4),
        "last_loss": _round(pretrain_report.get("last_loss"), 4),
    }
    ran = {t for t, r in (transfer_metrics.get("tasks") or {}).items() if (r or {}).get("status") == "ok"}
    metrics = {c: tk for c, tk in metric_map.items() if tk[0] in ran}
    transfer_row = build_rows({name: transfer_metrics}, metrics, {})[0]
    row.update({k: v for k, v in transfer_row.items() if k not in ("recipe", "gmacs")})
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: costs as measured, transfer metrics as ``mean ± std`` with the best of each in bold."""
    if not rows:
        return "_no results_\n"
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if not c.endswith("_std")]
    columns = [c for c in columns if c == "recipe" or any(r.get(c) is not None for r in rows)]
    metrics = [c for c in columns if c != "recipe" and c not in COST_COLUMNS]
    best = {c: max(r[c] for r in rows if r.get(c) is not None) for c in metrics}

    return render_table(rows, columns, best, TITLES, FORMATS)


def plot_vs_cost(rows: list[dict[str, Any]], metric: str):
    """``metric`` (with its std as an error bar) against two pre-training costs: wall time, and compute
    (GMACs per image x images seen, in TMACs; the backward pass not counted)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    costs = {
        "pretrain_wall_s": "pre-training wall time (s)",
        "tmacs": "pre-training compute (forward TMACs)",
    }
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), squeeze=False)
    for ax, (cost, label) in zip(axes[0], costs.items(), strict=True):
        for r in rows:
            y = r.get(metric)
            x = r.get("pretrain_wall_s") if cost != "tmacs" else _tmacs(r)
            if y is None or x is None:
                continue
            ax.errorbar([x], [y], yerr=[r.get(f"{metric}_std") or 0.0], fmt="o", ms=5, capsize=2)
            ax.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(TITLES.get(metric, metric))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{TITLES.get(metric, metric)} against pre-training cost", fontsize=10)
    fig.tight_layout()
    return fig


def _tmacs(row: dict[str, Any]) -> float | None:
    if row.get("gmacs") is None or not row.get("images"):
        return None
    return row["gmacs"] * row["images"] / 1e3


def log_to_mlflow(table: dict[str, Any], table_md: str, fig) -> str | None:
    """Every number and the artifacts in one MLflow run named ``compare``; returns its run id."""
    import mlflow

    from maelab.analysis.report import use_project_experiment

    use_project_experiment()
    with mlflow.start_run(run_name="compare") as run:
        for row in table["rows"]:
            mlflow.log_metrics(
                {
                    f"{row['recipe']}.{k}": float(v)
                    for k, v in row.items()
                    if k != "recipe" and isinstance(v, int | float) and math.isfinite(float(v))
                }
            )
        mlflow.log_dict(table, "compare/compare.json")
        mlflow.log_text(table_md, "compare/compare.md")
        mlflow.log_figure(fig, "compare/compare_vs_cost.png")
        return run.info.run_id


def make_compare(
    rows: list[dict[str, Any]], plot_metric: str = "linear_top1", mlflow: bool = True
) -> tuple[dict[str, Any], str, pd.DataFrame, Any]:
    """compare.json (``{"rows": [...]}``), the Markdown table, the CSV table and the figure."""
    table = {"rows": rows}
    table_md = markdown_table(rows)
    fig = plot_vs_cost(rows, plot_metric)
    if mlflow:  # an outage must not lose the table: warn and return it for saving
        try:
            log.info("compare logged to MLflow run %s", log_to_mlflow(table, table_md, fig))
        except Exception as exc:
            warnings.warn(f"compare: MLflow logging failed ({type(exc).__name__}: {exc})", RuntimeWarning, 2)
    return table, table_md, pd.DataFrame(rows), fig
