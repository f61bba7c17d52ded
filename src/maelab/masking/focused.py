"""MR-MAE's focused mimicking (Gao et al., "Mimic before Reconstruct", §3.3): "we select the most salient
tokens in teacher network's attention maps for visible feature mimicking".

An in-step masker (``in_step = True``): in the training step, the teacher of the recipe's mimic head sees
the full image (the same augmented view as the student) and its [CLS] token's attention to the patches in
block ``layer`` (averaged over heads, resampled to the student's grid) ranks the patches; the
``int(L * (1 - ratio))`` most salient are the visible set the encoder sees and the mimic loss reads, the
rest are masked and reconstructed. Ties keep raster order. The teacher runs once per step: the mimic head
reuses the features of that same forward.

Defaults (the paper gives none): ``ratio`` 0.75 (MAE's and the paper's 25 % visible tokens), ``layer`` -1
(the teacher's last block, the attention maps the paper shows in Fig. 5 and DINO's saliency). ``head``
names the mimic head whose teacher ranks the patches (default: the first head that has a teacher).

The kept ids come in saliency order (most salient first); the order is not random, so ``plan_traits``
omits ``random_order`` (a nested sub-plan of it would not be a random subset).
"""

from __future__ import annotations

from typing import Any

import torch

from maelab.masking.context import MaskContext
from maelab.masking.maskers import MASKERS, Grid, Masker, _check_ratio
from maelab.masking.plan import MaskPlan


class FocusedMasker(Masker):
    """Visible set = the teacher's most salient patches (MR-MAE §3.3), chosen in the step."""

    in_step = True
    plan_traits = frozenset({"full_grid"})

    def __init__(self, grid: Grid, ratio: float = 0.75, layer: int = -1, head: str | None = None) -> None:
        super().__init__(grid)
        self.ratio = _check_ratio("FocusedMasker", ratio)
        self.layer, self.head = int(layer), head
        self.num_keep = int(self.num_patches * (1 - self.ratio))  # MAE's rule, as MaskPlan.from_noise

    def saliency_head(self, model: Any) -> Any:
        """The head whose teacher ranks the patches (it has ``teacher_saliency(image, layer)``)."""
        heads = getattr(model, "heads", None)
        if heads is None:
            raise ValueError("masker focused: the model has no heads (the masker needs the Pretrainer)")
        if self.head is not None:
            if self.head not in heads or not hasattr(heads[self.head], "teacher_saliency"):
                raise ValueError(
                    f"masker.head {self.head!r} is not a head with a teacher (have {sorted(heads)})"
                )
            return heads[self.head]
        for head in heads.values():
            if hasattr(head, "teacher_saliency"):
                return head
        raise ValueError(
            "masker focused: the recipe has no head with a teacher (a mimic head) to rank patches"
        )

    def saliency(self, batch: dict[str, Any], context: MaskContext) -> torch.Tensor:
        """[B, L] the teacher's CLS attention on the student's grid."""
        if context.model is None:
            raise ValueError("masker focused runs in the step: its context needs the model")
        return self.saliency_head(context.model).teacher_saliency(batch["image"], self.layer)

    @torch.no_grad()
    def plan_batch(self, batch: dict[str, Any], context: MaskContext) -> MaskPlan:
        scores = self.saliency(batch, context).float()  # [B, L]
        if scores.shape[-1] != self.num_patches:
            raise ValueError(
                f"masker focused: saliency has {scores.shape[-1]} patches, grid has {self.num_patches}"
            )
        ids_shuffle = torch.argsort(-scores, dim=-1, stable=True)  # most salient first; ties in raster order
        return MaskPlan.from_shuffle(ids_shuffle, self.num_keep)


MASKERS["focused"] = FocusedMasker
