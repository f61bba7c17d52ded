"""Report pipeline: the paper-style table, report.json and plots from all transfer results."""

from maelab.pipelines.report.pipeline import create_pipeline

__all__ = ["create_pipeline"]
