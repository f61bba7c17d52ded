"""Masking strategies; every one returns a ``MaskPlan``."""

from maelab.masking.context import MaskContext
from maelab.masking.maskers import MASKERS, BlockMasker, Masker, RandomMasker, build_masker, nested_plan
from maelab.masking.plan import MaskPlan
from maelab.masking.window import WindowMasker, WindowPlan

MASKERS["window"] = WindowMasker  # LoMaR (Chen et al. 2022, §1.4)

__all__ = [
    "MASKERS",
    "BlockMasker",
    "MaskContext",
    "MaskPlan",
    "Masker",
    "RandomMasker",
    "WindowMasker",
    "WindowPlan",
    "build_masker",
    "nested_plan",
]
