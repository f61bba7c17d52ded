"""Maskers: one ``MaskPlan`` per sample, drawn from a ``torch.Generator`` so a seed fixes the plan.

Maskers that need only the patch grid (``in_step = False``) run in the DataLoader workers and return
``[L]`` plans that ``MaskPlan.collate`` stacks. A masker that needs the model's own features (the
self-guided "informed" masker) sets ``in_step = True`` and implements ``plan_batch(batch, context)``,
which the Pretrainer calls inside the training step when the batch carries no plan; ``context.model``
is then the model. Both kinds get a :class:`~maelab.masking.context.MaskContext` (step, epoch, total
steps), so a masker may change with training progress. One masker per run: the model's own
(``Pretrainer.masker``), which the engine hands to the dataset.

LoMaR (Chen et al. 2022, §3) fits the same shape: a window masker samples ``n`` windows of ``k x k``
patches and masks a ratio inside each. It returns a ``MaskPlan`` subclass (extra tensor fields survive
``collate``, ``to`` and FLOP tracing) whose ``mask`` is on the full grid ``[L]`` (True inside a window where
masked) plus ``window_ids: [n, k*k]``, each window token's index in the grid (raster order in the window).
An encoder built with ``mask_token=True, window_size=k`` replaces the masked patches by its mask token and
encodes the ``B * n`` windows as the batch, ``[B*n, 1+k*k, D]`` (see ``maelab.models.vit``).
"""

from __future__ import annotations

from typing import Any

import torch

from maelab.masking.context import MaskContext
from maelab.masking.plan import MaskPlan

Grid = tuple[int, int]


class Masker:
    """Base class: ``masker(generator, context) -> MaskPlan``, ``[L]`` tensors for a ``grid = (gh, gw)``."""

    in_step: bool = False

    def __init__(self, grid: Grid) -> None:
        gh, gw = int(grid[0]), int(grid[1])
        if gh <= 0 or gw <= 0:
            raise ValueError(f"{type(self).__name__}: grid must be positive, got {grid}")
        self.grid: Grid = (gh, gw)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def __call__(
        self, generator: torch.Generator | None = None, context: MaskContext | None = None
    ) -> MaskPlan:
        raise NotImplementedError(f"{type(self).__name__} makes its plan inside the step (plan_batch)")

    def plan_batch(self, batch: dict[str, Any], context: MaskContext) -> MaskPlan:
        """In-step maskers: a ``[B, L]`` plan from the batch and ``context.model``."""
        raise NotImplementedError(f"{type(self).__name__} runs in the DataLoader workers, not in the step")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_ratio(name: str, ratio: float) -> float:
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{name}: masker.ratio must be in [0, 1), got {ratio!r}")
    return float(ratio)


class RandomMasker(Masker):
    """MAE's random masking (He et al. 2022, §3 "Masking"): per-sample uniform noise, argsort,
    keep the ``int(L * (1 - ratio))`` lowest. Kept ids come in noise order, as in MAE."""

    def __init__(self, grid: Grid, ratio: float = 0.75) -> None:
        super().__init__(grid)
        self.ratio = _check_ratio("RandomMasker", ratio)

    def __call__(
        self, generator: torch.Generator | None = None, context: MaskContext | None = None
    ) -> MaskPlan:
        noise = torch.rand(self.num_patches, generator=generator)  # [L]
        return MaskPlan.from_noise(noise, self.ratio)


class BlockMasker(Masker):
    """Long-sequence MAE's joint masking (Hu et al. 2022, §3.3 "Decoupled mask size"): the ``m x m``
    neighbourhood of patches is the unit that is masked or kept, so the mask is a union of whole blocks.

    ``int(n_blocks * (1 - ratio))`` blocks are kept (MAE's rule, on the block grid); the grid must be
    divisible by the block. Kept ids come in raster order.
    """

    def __init__(self, grid: Grid, ratio: float = 0.75, block: int | tuple[int, int] | list[int] = 2) -> None:
        super().__init__(grid)
        self.ratio = _check_ratio("BlockMasker", ratio)
        bh, bw = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
        gh, gw = self.grid
        if bh <= 0 or bw <= 0 or gh % bh or gw % bw:
            raise ValueError(f"BlockMasker: masker.block {block!r} must divide the patch grid {self.grid}")
        self.block = (bh, bw)

    def __call__(
        self, generator: torch.Generator | None = None, context: MaskContext | None = None
    ) -> MaskPlan:
        (gh, gw), (bh, bw) = self.grid, self.block
        nh, nw = gh // bh, gw // bw
        block_plan = MaskPlan.from_noise(torch.rand(nh * nw, generator=generator), self.ratio)
        # [nh*nw] -> [nh, 1, nw, 1] -> [nh, bh, nw, bw] -> [gh*gw]: each block's value on its m x m patches
        mask = block_plan.mask.view(nh, 1, nw, 1).expand(nh, bh, nw, bw).reshape(gh * gw)
        return MaskPlan.from_mask(mask)


MASKERS: dict[str, type[Masker]] = {"random": RandomMasker, "block": BlockMasker}


def build_masker(cfg: dict[str, Any], grid: Grid) -> Masker:
    """A masker from ``recipe["masker"]`` (``type`` picks the class, other keys go to its constructor)."""
    cfg = dict(cfg or {})
    kind = cfg.pop("type", "random")
    if kind not in MASKERS:
        raise ValueError(f"masker.type {kind!r} is unknown; choose one of {sorted(MASKERS)}")
    try:
        return MASKERS[kind](grid, **cfg)
    except TypeError as err:
        raise ValueError(f"masker ({kind}): bad field in {cfg}: {err}") from err
