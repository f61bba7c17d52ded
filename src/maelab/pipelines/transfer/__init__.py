"""Transfer pipeline: every (encoder, task) is one node; one metrics JSON per encoder."""

from maelab.pipelines.transfer.pipeline import create_pipeline

__all__ = ["create_pipeline"]
