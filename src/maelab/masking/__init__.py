"""Masking strategies; every one returns a ``MaskPlan``."""

from maelab.masking.context import MaskContext
from maelab.masking.focused import FocusedMasker  # registers masker type "focused"
from maelab.masking.maskers import MASKERS, BlockMasker, Masker, RandomMasker, build_masker, nested_plan
from maelab.masking.plan import MaskPlan
from maelab.masking.self_guided import SelfGuidedMasker
from maelab.masking.window import WindowMasker, WindowPlan

MASKERS["self_guided"] = SelfGuidedMasker  # self-guided MAE (Shi et al. 2024, §4), in the step
MASKERS["window"] = WindowMasker  # LoMaR (Chen et al. 2022, §1.4)

__all__ = [
    "MASKERS",
    "BlockMasker",
    "FocusedMasker",
    "MaskContext",
    "MaskPlan",
    "Masker",
    "RandomMasker",
    "SelfGuidedMasker",
    "WindowMasker",
    "WindowPlan",
    "build_masker",
    "nested_plan",
]
