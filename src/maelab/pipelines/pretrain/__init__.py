"""``pretrain``: train one recipe (MAE, R-MAE, ...) with the engine in ``maelab.train``."""
