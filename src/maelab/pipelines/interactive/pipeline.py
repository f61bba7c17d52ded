"""``interactive``: ``pretrain_<recipe>_encoder`` -> ``interactive_report`` + ``interactive_figure``."""

from __future__ import annotations

from kedro.pipeline import Pipeline, node, pipeline

from maelab.pipelines.interactive.nodes import evaluate_interactive_segmentation


def create_pipeline(recipe: str = "rmae", **kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                evaluate_interactive_segmentation,
                [
                    f"pretrain_{recipe}_encoder",
                    "params:interactive",
                    "params:recipes",
                    "params:recipe_defaults",
                ],
                ["interactive_report", "interactive_figure"],
                name=f"interactive_{recipe}",
                tags=["interactive"],
            )
        ]
    )
