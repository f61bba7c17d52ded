"""``rmae_full``: ingest -> regions -> pre-train (R-MAE + MAE) -> transfer -> report."""

from maelab.pipelines.rmae_full.pipeline import create_pipeline

__all__ = ["create_pipeline"]
