"""``kedro run --pipelines=ingest``: sources -> one image manifest, quarantine, COCO-format annotations."""

from maelab.pipelines.ingest.pipeline import create_pipeline

__all__ = ["create_pipeline"]
