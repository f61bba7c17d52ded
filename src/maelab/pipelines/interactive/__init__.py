"""``interactive``: R-MAE's region branch as an interactive segmenter on held-out images (R-MAE §4.2)."""

from maelab.pipelines.interactive.pipeline import create_pipeline

__all__ = ["create_pipeline"]
