"""Flat per-encoder metrics for ``dvc metrics show / diff``: one ``{name: number}`` dict per report row.

``report.json`` holds a list of rows, which DVC cannot tabulate; these files sit beside it
(``data/08_reporting/metrics/<encoder>.json``) with the numeric fields of each row (linear_top1,
finetune_top1, box_ap, mask_ap, miou, their spreads, gmacs). Missing values (a task not run) are left out,
so DVC shows ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def flat_metrics(report: dict[str, Any], encoders: Sequence[str]) -> list[dict[str, float]]:
    """The numeric fields of ``report["rows"]``' row for each of ``encoders`` (rows are keyed by
    ``recipe``), in ``encoders`` order; an encoder without a row gets ``{}``."""
    rows = {str(row.get("recipe")): row for row in report.get("rows", [])}
    return [_numbers(rows.get(name, {})) for name in encoders]


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {
        key: value
        for key, value in row.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
