"""``ImageEmbedder``: a pre-trained encoder as a plain ``images -> embeddings`` module (the MLflow model).

Input: ``[N, 3, H, W]`` float images in the encoder's normalisation (ImageNet mean/std) at the pre-training
``img_size``. Output: ``[N, D]``, the CLS token after the final norm (the linear probe's ``pool: cls``); an
encoder that splits the image into windows (LoMaR) gives one CLS per window, averaged.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn


class ImageEmbedder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        feats = self.encoder.forward_features(images)  # [N*n, 1+L', D] (n windows per image, 1 without)
        cls = feats[:, 0]  # [N*n, D]
        return cls.reshape(images.shape[0], -1, cls.shape[-1]).mean(1)  # [N, D]


def image_embedder(encoder: nn.Module) -> ImageEmbedder:
    """An fp32 CPU copy of ``encoder`` as an ``ImageEmbedder`` in eval mode (training is untouched)."""
    return ImageEmbedder(copy.deepcopy(encoder).float().cpu()).eval()
