"""``pretrain_<recipe>``: train one recipe (MAE, R-MAE, ...) with the engine in ``maelab.train``."""

from maelab.pipelines.pretrain.pipeline import create_pipeline

__all__ = ["create_pipeline"]
