"""``compare``: every method's recipe pre-trained on the same data and budget, each encoder transferred, one
table (``data/08_reporting/compare.{md,csv,json}``) and a plot of accuracy against pre-training cost."""

from maelab.pipelines.compare.pipeline import compare_settings, create_pipeline

__all__ = ["compare_settings", "create_pipeline"]
