"""LoMaR's window masking (Chen et al. 2022, "Local Masked Reconstruction", §1.4 "Local vs. Global" and
"Implementation"; sections numbered as in shared/papers/lomar.txt, the arXiv version's §3): sample ``n``
square regions of ``K x K`` patches at random places in each image and mask a fixed share of the patches
inside every region; the encoder then sees each region on its own.

- ``n`` windows per image, each at a uniformly random top-left corner that keeps it inside the patch grid
  (windows of one image may overlap: the paper asks only for "different spatial locations" sampled at
  random, §1.4). Each image draws its own windows (Fig. 2).
- Inside each window exactly ``int(K^2 * r)`` patches are masked, chosen uniformly and independently per
  window (§1.4 "zero out a fixed percentage of patches within each region"; Fig. 5 picks r = 0.8, so 39 of
  49 patches are masked and 10 stay visible).
- Defaults: K = 7 (§2.6, Table 6), r = 0.8 (Fig. 5), n = 4 at 224 px; §2.1 uses n = 6 at 384 and n = 9 at 448
  (recipes set them). Table 6's window x views pairs: 5x8, 7x4, 9x3, 11x2, 14x1.

The plan (:class:`WindowPlan`) describes the sequence of window tokens, ``n * K^2`` of them, window after
window, raster order inside each window: ``mask [n*K^2]`` is True where a window token is masked,
``ids_keep`` / ``ids_restore`` are over that sequence, and ``window_ids [n, K^2]`` is each window token's
index in the full patch grid. A patch in two overlapping windows is two window tokens, masked or not in each
on its own. The plan is not over the whole grid, so it lacks the ``full_grid`` trait
(``maelab.models.compat``): the MAE pixel decoder and R-MAE's region head refuse it at start; it has
``windows``, which the LoMaR head needs.

``official_pairing: true`` reproduces how the released LoMaR code pairs images with windows, which the paper
does not describe: the ``n`` window offsets are drawn once per batch (shared by every image), the batch is
tiled ``n`` times (tile-major: entry ``t = j*B + b`` is view ``j`` of image ``b``) while the offsets are tiled
per entry (``t mod n``), so view ``j`` of image ``b`` gets offset ``(j*B + b) mod n``. When ``n`` divides the
batch size, every image sees one window, offset ``b mod n``, repeated ``n`` times (with different masks).
It needs the batch size, so with it the masker runs in the training step (``in_step``) instead of the
DataLoader workers. The default (false) follows the paper: independent windows per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from maelab.masking.context import MaskContext
from maelab.masking.maskers import Grid, Masker, _check_ratio
from maelab.masking.plan import MaskPlan

# LoMaR §2.1: views per image at each pre-training resolution with K = 7, p = 16 (ImageNet)
DEFAULT_VIEWS = {224: 4, 384: 6, 448: 9}


@dataclass(frozen=True)
class WindowPlan(MaskPlan):
    """A LoMaR plan for one sample (``[n*K^2]`` / ``[n, K^2]``) or a batch (leading ``B``).

    ids_keep / ids_restore / mask: over the ``n*K^2`` window tokens (window-major, raster order inside a
    window), as ``MaskPlan`` describes them for a sequence;
    window_ids: [.., n, K^2] long, each window token's index in the full ``gh x gw`` patch grid.
    """

    window_ids: Tensor

    @property
    def num_windows(self) -> int:
        return self.window_ids.shape[-2]

    @property
    def window_tokens(self) -> int:
        return self.window_ids.shape[-1]

    def window_mask(self) -> Tensor:
        """[.., n, K^2] bool: True where a window token is masked."""
        return self.mask.reshape(self.window_ids.shape)

    def per_window(self) -> MaskPlan:
        """The plan of each window on its own, ``[B*n, K^2]`` (kept ids in raster order): what an MAE-style
        encoder-decoder inside the windows (LoMaR Fig. 4) encodes and restores."""
        return MaskPlan.from_mask(self.window_mask().reshape(-1, self.window_tokens))


def window_grid_ids(grid: Grid, window: int, top: Tensor, left: Tensor) -> Tensor:
    """Grid indices of the ``K x K`` windows with top-left corners ``(top, left)`` (each ``[n]``), raster
    order inside each window: ``[n, K*K]`` long."""
    offs = torch.arange(window)
    rows = top[:, None, None] + offs[None, :, None]  # [n, K, 1]
    cols = left[:, None, None] + offs[None, None, :]  # [n, 1, K]
    return (rows * grid[1] + cols).reshape(top.shape[0], window * window)


class WindowMasker(Masker):
    """LoMaR's masker: ``views`` windows of ``window x window`` patches per image, ``int(window^2 * ratio)``
    masked inside each (see the module docstring for the paper's text and the ``official_pairing`` switch)."""

    plan_traits = frozenset({"windows"})

    def __init__(
        self,
        grid: Grid,
        ratio: float = 0.8,
        window: int = 7,
        views: int = 4,
        official_pairing: bool = False,
    ) -> None:
        super().__init__(grid)
        self.ratio = _check_ratio("WindowMasker", ratio)
        self.window, self.views = int(window), int(views)
        if self.window <= 0 or self.window > min(self.grid):
            raise ValueError(
                f"WindowMasker: masker.window {window} must be in [1, {min(self.grid)}] for grid {grid}"
            )
        if self.views <= 0:
            raise ValueError(f"WindowMasker: masker.views must be positive, got {views}")
        self.num_mask = int(self.window**2 * self.ratio)  # §1.4: a fixed share per window
        self.official_pairing = bool(official_pairing)
        self.in_step = self.official_pairing  # the official pairing needs the whole batch

    @property
    def tokens_per_window(self) -> int:
        return self.window * self.window

    def _corners(self, count: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``count`` uniform top-left corners keeping the window inside the grid: top, left ``[count]``."""
        gh, gw = self.grid
        top = torch.randint(0, gh - self.window + 1, (count,), generator=generator)
        left = torch.randint(0, gw - self.window + 1, (count,), generator=generator)
        return top, left

    def _masks(self, count: int, generator: torch.Generator | None) -> Tensor:
        """[count, K^2] bool: exactly ``num_mask`` True per row, uniform and independent per row."""
        noise = torch.rand(count, self.tokens_per_window, generator=generator)
        ranks = torch.argsort(torch.argsort(noise, dim=-1), dim=-1)  # each token's rank in its window
        return ranks < self.num_mask

    def _plan(self, window_ids: Tensor, masks: Tensor) -> WindowPlan:
        """Plan from ``window_ids [.., n, K^2]`` and ``masks [.., n, K^2]``."""
        lead = masks.shape[:-2]
        base = MaskPlan.from_mask(masks.reshape(*lead, -1))
        return WindowPlan(base.ids_keep, base.ids_restore, base.mask, window_ids)

    def __call__(
        self, generator: torch.Generator | None = None, context: MaskContext | None = None
    ) -> WindowPlan:
        """One image's plan (paper pairing): its own ``n`` windows, masks drawn per window."""
        if self.official_pairing:
            return super().__call__(generator, context)  # raises: runs in the step
        top, left = self._corners(self.views, generator)
        window_ids = window_grid_ids(self.grid, self.window, top, left)  # [n, K^2]
        return self._plan(window_ids, self._masks(self.views, generator))

    def batch_plan(self, batch_size: int, generator: torch.Generator | None = None) -> WindowPlan:
        """A ``[B, ...]`` plan with the released code's pairing: ``n`` offsets for the batch, view ``j`` of
        image ``b`` at offset ``(j*B + b) mod n`` (module docstring); masks still drawn per window."""
        n = self.views
        top, left = self._corners(n, generator)
        offsets = window_grid_ids(self.grid, self.window, top, left)  # [n, K^2]
        b = torch.arange(batch_size)[:, None]
        j = torch.arange(n)[None, :]
        window_ids = offsets[(j * batch_size + b) % n]  # [B, n, K^2]
        masks = self._masks(batch_size * n, generator).view(batch_size, n, -1)
        return self._plan(window_ids, masks)

    def plan_batch(self, batch: dict[str, Any], context: MaskContext) -> WindowPlan:
        """In-step (``official_pairing``): the batch's plan, on the image's device."""
        image = batch["image"]
        return self.batch_plan(image.shape[0]).to(image.device)
