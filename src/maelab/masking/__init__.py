"""Masking strategies; every one returns a ``MaskPlan``."""

from maelab.masking.context import MaskContext
from maelab.masking.focused import FocusedMasker  # registers masker type "focused"
from maelab.masking.maskers import MASKERS, BlockMasker, Masker, RandomMasker, build_masker, nested_plan
from maelab.masking.plan import MaskPlan

__all__ = [
    "MASKERS",
    "BlockMasker",
    "FocusedMasker",
    "MaskContext",
    "MaskPlan",
    "Masker",
    "RandomMasker",
    "build_masker",
    "nested_plan",
]
