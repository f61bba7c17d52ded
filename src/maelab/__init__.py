"""maelab: masked-autoencoder pre-training for Vision Transformers, as a Kedro project."""

__version__ = "0.1.0"
