"""report.json rows -> one flat {name: number} dict per encoder (what `dvc metrics show` tabulates)."""

from __future__ import annotations

import math

from maelab.analysis.flat_metrics import flat_metrics


def test_numeric_fields_per_encoder_in_order() -> None:
    report = {
        "rows": [
            {"recipe": "mae", "linear_top1": 20.5, "finetune_top1": 8, "box_ap": 0.1, "mask_ap": None,
             "miou": 10.0, "note": "x", "ok": True, "bad": math.nan},
            {"recipe": "rmae", "linear_top1": 22.0},
        ]
    }  # fmt: skip
    mae, missing, rmae = flat_metrics(report, ["mae", "none", "rmae"])
    assert mae == {"linear_top1": 20.5, "finetune_top1": 8, "box_ap": 0.1, "miou": 10.0}
    assert missing == {} and rmae == {"linear_top1": 22.0}
