"""``interactive``: R-MAE's region branch as an interactive segmenter (R-MAE §4.2).

pretrain_<recipe>_recipe + pretrain_<recipe>_checkpoint + coco_annotations + params:interactive
    -> interactive_report, interactive_figure
"""

from __future__ import annotations

from kedro.pipeline import Pipeline, node

from maelab.pipelines.interactive.nodes import evaluate_interactive_segmentation


def create_pipeline(recipe: str = "rmae", **kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                evaluate_interactive_segmentation,
                {
                    "recipe": f"pretrain_{recipe}_recipe",
                    "checkpoint": f"pretrain_{recipe}_checkpoint",
                    "coco_annotations": "coco_annotations",
                    "params": "params:interactive",
                },
                ["interactive_report", "interactive_figure"],
                name=f"interactive_{recipe}",
                tags=["interactive"],
            )
        ]
    )
