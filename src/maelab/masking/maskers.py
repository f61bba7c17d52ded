"""Maskers: one ``MaskPlan`` per sample, drawn from a ``torch.Generator`` so a seed fixes the plan.

Maskers that need only the patch grid (``in_step = False``) run in the DataLoader workers and return
``[L]`` plans that ``MaskPlan.collate`` stacks. A masker that needs the model's own features (the
self-guided "informed" masker) sets ``in_step = True`` and implements ``plan_batch(batch, context)``,
which the Pretrainer calls inside the training step when the batch carries no plan; ``context.model``
is then the model. Both kinds get a :class:`~maelab.masking.context.MaskContext` (step, epoch, total
steps), so a masker may change with training progress. One masker per run: the model's own
(``Pretrainer.masker``), which the engine hands to the dataset.

LoMaR (Chen et al. 2022, §1.4) fits the same shape: ``maelab.masking.window.WindowMasker`` samples ``n``
windows of ``k x k`` patches and masks a share inside each; its ``WindowPlan`` (a ``MaskPlan`` subclass) is
over the ``n*k*k`` window tokens plus ``window_ids: [n, k*k]``, each window token's index in the grid. An
encoder built with ``mask_token=True, window_size=k`` encodes the ``B * n`` windows as the batch,
``[B*n, 1+k*k, D]`` (see ``maelab.models.vit``). The package registers it as ``type: window``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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
    keep the ``int(L * (1 - ratio))`` lowest. Kept ids come in noise order, as in MAE, so any prefix of the
    plan's shuffle order is itself a uniform random plan (``plan_traits``: ``random_order``)."""

    plan_traits = frozenset({"full_grid", "random_order"})

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
    neighbourhood of patches is the unit that is masked or kept, counted as the official loader counts.

    Exactly ``int(L * (1 - ratio))`` patches are kept (so ``L_e = L * (1 - gamma)``, §3.1 and Tab. 2e, e.g.
    49 of 784 at gamma = 0.9375): blocks are shuffled, their patches listed block by block (block-major),
    and the first ``int(L * (1 - ratio))`` of that list are kept, so the last block reached may be partly
    visible. A grid that ``m`` does not divide (7 x 7 in Tab. 2a/2b) is covered by ``ceil(g / m)`` blocks
    per side, clipped at the bottom and right edges. Kept ids come in raster order (App. A: the mask
    indices are made in the data loader); the masked ones follow in block-major shuffle order.

    The kept ids carry no random order, so a sub-plan cut from the plan's shuffle order (a region mask
    ratio beta_R != beta_I, R-MAE Fig. 4a) would not be a random subset: ``plan_traits`` omits
    ``random_order`` and a recipe asking for one fails at start (``maelab.models.compat``).
    """

    plan_traits = frozenset({"full_grid"})

    def __init__(self, grid: Grid, ratio: float = 0.75, block: int | tuple[int, int] | list[int] = 2) -> None:
        super().__init__(grid)
        self.ratio = _check_ratio("BlockMasker", ratio)
        bh, bw = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
        if bh <= 0 or bw <= 0:
            raise ValueError(f"BlockMasker: masker.block must be positive, got {block!r}")
        self.block = (bh, bw)
        # MAE's rule, on patches (as MaskPlan.from_noise), not on blocks
        self.num_keep = int(self.num_patches * (1 - self.ratio))

    def block_patches(self) -> Tensor:
        """``[n_blocks, bh*bw]`` long: each block's patch ids in raster order, ``-1`` where clipped."""
        (gh, gw), (bh, bw) = self.grid, self.block
        nh, nw = -(-gh // bh), -(-gw // bw)  # ceil
        ids = torch.full((nh * bh, nw * bw), -1, dtype=torch.long)
        ids[:gh, :gw] = torch.arange(gh * gw).view(gh, gw)
        # [nh*bh, nw*bw] -> [nh, bh, nw, bw] -> [nh, nw, bh, bw] -> [nh*nw, bh*bw]
        return ids.view(nh, bh, nw, bw).permute(0, 2, 1, 3).reshape(nh * nw, bh * bw)

    def __call__(
        self, generator: torch.Generator | None = None, context: MaskContext | None = None
    ) -> MaskPlan:
        blocks = self.block_patches()  # [n_blocks, bh*bw]
        order = torch.argsort(torch.rand(blocks.shape[0], generator=generator))  # block shuffle
        ids_shuffle = blocks[order].flatten()  # block-major patch order, [n_blocks*bh*bw]
        ids_shuffle = ids_shuffle[ids_shuffle >= 0]  # drop the clipped slots: [L]
        kept = torch.sort(ids_shuffle[: self.num_keep]).values  # raster order
        return MaskPlan.from_shuffle(torch.cat([kept, ids_shuffle[self.num_keep :]]), self.num_keep)


def nested_plan(plan: MaskPlan, ratio: float | None) -> MaskPlan:
    """A second plan drawn from the SAME mask (R-MAE §4.2 "Mask ratios", Fig. 4a: share the random masks
    whenever possible): ``plan`` itself when ``ratio`` is None or keeps as many patches, else the plan's
    shuffle order ``argsort(ids_restore)`` cut after ``int(L * (1 - ratio))`` patches. The visible sets are
    nested (a higher ratio sees a subset of ``plan``'s visible patches); a uniform random subset only when
    the plan came from a masker with the ``random_order`` trait (``RandomMasker``). Works on ``[L]`` and
    ``[B, L]`` plans."""
    if ratio is None:
        return plan
    num_keep = int(plan.num_patches * (1 - float(ratio)))
    if num_keep == plan.num_keep:
        return plan
    return plan.recut(num_keep)  # the plan's own type, extra fields kept


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
