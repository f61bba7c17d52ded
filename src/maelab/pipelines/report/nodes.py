"""Report node: all encoders' transfer metrics -> report.json, Markdown + CSV tables, a figure."""

from __future__ import annotations

from typing import Any

import pandas as pd

from maelab.analysis.report import make_report


def build_report(
    encoders: list[str],
    transfer: dict[str, Any],
    report: dict[str, Any],
    recipe_defaults: dict[str, Any],
    recipes: dict[str, Any],
    *metrics: dict[str, Any],
) -> tuple[dict[str, Any], str, pd.DataFrame, Any]:
    params = {"transfer": transfer, "report": report, "recipe_defaults": recipe_defaults, "recipes": recipes}
    return make_report(dict(zip(encoders, metrics, strict=True)), params)
