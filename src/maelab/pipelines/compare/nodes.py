"""Compare nodes: a recipe under the compare budget; its pre-training with peak memory measured per recipe;
its row; the table.

The training itself is the ``pretrain`` node's (in-process or torchrun), without registering the encoder:
the compare runs are short and are no candidates for the registry.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from maelab.orchestration.teachers import teacher_configs
from maelab.pipelines.pretrain.nodes import pretrain
from maelab.recipes import deep_merge, resolve_recipe
from maelab.regions.store import RegionStore

log = logging.getLogger(__name__)


def resolve(
    recipes: dict[str, Any],
    recipe_defaults: dict[str, Any],
    compare: dict[str, Any],
    teacher_encoder: str | None = None,
    *,
    recipe_name: str,
) -> dict[str, Any]:
    """``recipe_name`` resolved, then ``compare.budget`` merged into its ``train`` block and
    ``compare.overrides.<recipe_name>`` over the whole recipe. ``teacher_encoder``: the path of the compared
    encoder (``compare.teachers.<recipe_name>``) that every teacher of the recipe loads."""
    recipe = resolve_recipe({"recipes": recipes, "recipe_defaults": recipe_defaults}, recipe_name)
    recipe = deep_merge(recipe, {"train": dict(compare.get("budget") or {})})
    recipe = deep_merge(recipe, (compare.get("overrides") or {}).get(recipe_name) or {})
    if teacher_encoder is not None:
        teachers = teacher_configs(recipe)
        if not teachers:
            raise ValueError(
                f"parameters compare.teachers.{recipe_name}: recipe {recipe_name!r} has no teacher "
                "(no heads.<h>.teacher)"
            )
        for _, cfg in teachers:
            cfg["weights"] = str(teacher_encoder).strip()
    return recipe


def _reset_peak_memory() -> None:
    """Start a new peak for this recipe: CUDA's allocator statistics, and on Linux the process's peak RSS
    (``/proc/self/clear_refs`` 5 resets VmHWM and what ``getrusage`` reports)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the whole process so far
        log.warning("compare: cannot reset the peak RSS; peak_mem_mb covers the process so far")


def _peak_rss_mb() -> float | None:
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def train(
    manifest: pd.DataFrame,
    recipe: dict[str, Any],
    run_env: str | None,
    region_store: RegionStore | None = None,
) -> tuple[dict[str, Any], str, str]:
    """Pre-train one compared recipe -> (report, encoder path, model weights path); the report's
    ``peak_mem_mb`` is this recipe's own peak (see ``maelab.analysis.compare``)."""
    import torch

    _reset_peak_memory()
    report, encoder, model, _ = pretrain(manifest, recipe, run_env, region_store, register_encoder=False)
    train_cfg = recipe["train"]
    on_cuda = torch.cuda.is_available() and str(train_cfg.get("device") or "auto") != "cpu"
    rss = _peak_rss_mb()
    if not on_cuda and int(train_cfg.get("devices") or 1) == 1 and rss is not None:
        report["peak_mem_mb"] = round(rss, 1)  # else the engine's: CUDA's, or torchrun's rank 0
    return report, encoder, model


def row(
    recipe: dict[str, Any],
    pretrain_report: dict[str, Any],
    transfer_metrics: dict[str, Any],
    report: dict[str, Any],
    *,
    recipe_name: str,
) -> dict[str, Any]:
    """The table row of one recipe: GMACs, pre-training costs, transfer metrics (``report.metrics``)."""
    from maelab.analysis.compare import compare_row

    gmacs = None
    try:
        from maelab.analysis.flops import count_gmacs
        from maelab.teachers.build import with_untrained_teachers

        gmacs = float(count_gmacs(with_untrained_teachers(recipe)))
    except Exception as err:  # a recipe the counter cannot trace must not sink the table
        log.warning("compare: no GMACs for %s: %s", recipe_name, err)
    metric_map = {k: list(v) for k, v in ((report or {}).get("metrics") or {}).items()}
    return compare_row(recipe_name, recipe, pretrain_report, transfer_metrics, metric_map, gmacs)


def build_table(
    compare: dict[str, Any], *rows: dict[str, Any]
) -> tuple[dict[str, Any], str, pd.DataFrame, Any]:
    """compare.json, compare.md, compare.csv and the plot, in ``compare.recipes`` order; logged to MLflow
    unless ``compare.mlflow`` is false."""
    from maelab.analysis.compare import make_compare

    return make_compare(
        list(rows), compare.get("plot_metric", "linear_top1"), bool(compare.get("mlflow", True))
    )
