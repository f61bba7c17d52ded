"""``kedro run --pipelines=regions``: precompute region maps (FH / panoptic / SAM) into the region store."""

from maelab.pipelines.regions.pipeline import create_pipeline

__all__ = ["create_pipeline"]
