"""What every pre-training head looks like to the Pretrainer.

A head reads the encoder's output for the kept tokens, the shared ``MaskPlan`` and the batch (image
plus any extras: region maps, teacher features), and returns its unweighted loss and its output:

    loss, output = head(latent, plan, batch, intermediates)

- R-MAE's region head reads ``batch["regions"]`` and the same plan, and decodes from ``latent``.
- MR-MAE's mimic head projects the visible tokens of ``latent`` (or a fusion of ``intermediates``,
  §3.3 "Multi-layer fusion") onto ``batch["teacher"]`` gathered at ``plan.ids_keep``.
A head that needs encoder blocks besides the last lists their indices in ``layers``; the Pretrainer
runs ``forward_intermediates`` once for all heads and passes ``{block index: [B, 1+L_keep, D]}``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from maelab.masking.plan import MaskPlan
from maelab.models.vit import EncoderSpec


class Head(nn.Module):
    """Base class for heads; subclasses take ``spec: EncoderSpec`` first, then their recipe keys."""

    layers: tuple[int, ...] = ()  # encoder block indices this head reads besides the final output

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(
        self, latent: Tensor, plan: MaskPlan, batch: dict[str, Any], intermediates: dict[int, Tensor]
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to the head) kept out of weight decay besides ndim <= 1."""
        return set()

    def example_batch(self, batch_size: int) -> dict[str, Tensor]:
        """Extra batch entries this head reads (zeros of the right shape), for FLOP counting and tests."""
        return {}
