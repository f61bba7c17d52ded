"""``kedro run --pipelines=teachers``: precompute teacher features (MR-MAE) into the teacher-feature store."""

from maelab.pipelines.teachers.pipeline import create_pipeline

__all__ = ["create_pipeline"]
