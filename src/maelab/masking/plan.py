"""Masks are data: a ``MaskPlan`` says which patches an image keeps.

Every branch of a training step (pixels, regions, teachers) reads the same plan, so a
variant never re-draws its own mask. Maskers that need only the image grid run in the
DataLoader workers and return one plan per sample (no batch dim); ``collate`` stacks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskPlan:
    """Which of the ``L`` patches are kept, for one sample ``[L]`` or a batch ``[B, L]``.

    ids_keep:    [.., L_keep] long, indices of the kept patches, in the order the encoder sees them
    ids_restore: [.., L]      long, ``argsort(concat(ids_keep, ids_masked))``: un-shuffles
                              ``[kept tokens, mask tokens]`` back to raster order
    mask:        [.., L]      bool, True where the patch is masked (removed)
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor

    @classmethod
    def from_noise(cls, noise: Tensor, mask_ratio: float) -> MaskPlan:
        """MAE's per-sample argsort of noise: the lowest ``(1 - ratio) * L`` noise values are kept.

        noise: [.., L] float. Same rule as He et al. 2022 (random_masking in the MAE code).
        """
        num_patches = noise.shape[-1]
        num_keep = int(num_patches * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=-1)
        return cls.from_shuffle(ids_shuffle, num_keep)

    @classmethod
    def from_shuffle(cls, ids_shuffle: Tensor, num_keep: int) -> MaskPlan:
        """Plan from a permutation whose first ``num_keep`` entries are the kept patches."""
        ids_restore = torch.argsort(ids_shuffle, dim=-1)
        mask = torch.ones(ids_shuffle.shape, dtype=torch.bool)
        mask[..., :num_keep] = False
        mask = torch.gather(mask.to(ids_shuffle.device), -1, ids_restore)
        return cls(ids_keep=ids_shuffle[..., :num_keep].clone(), ids_restore=ids_restore, mask=mask)

    @classmethod
    def from_mask(cls, mask: Tensor) -> MaskPlan:
        """Plan from a boolean mask ``[.., L]`` (True = masked); kept ids in raster order.

        Every sample must mask the same number of patches so plans stack into a batch.
        """
        # stable sort puts kept (False) first, each group in raster order
        ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=-1, stable=True)
        num_keep = int((~mask).sum(-1).flatten()[0]) if mask.numel() else 0
        if mask.dim() > 1 and not bool(((~mask).sum(-1) == num_keep).all()):
            raise ValueError("MaskPlan.from_mask: samples keep different numbers of patches")
        return cls.from_shuffle(ids_shuffle, num_keep)

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[-1]

    @property
    def num_patches(self) -> int:
        return self.mask.shape[-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskPlan:
        return MaskPlan(
            self.ids_keep.to(device, non_blocking=non_blocking),
            self.ids_restore.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
        )

    @staticmethod
    def collate(plans: list[MaskPlan]) -> MaskPlan:
        """Stack per-sample plans ``[L]`` into a batch plan ``[B, L]``."""
        return MaskPlan(
            torch.stack([p.ids_keep for p in plans]),
            torch.stack([p.ids_restore for p in plans]),
            torch.stack([p.mask for p in plans]),
        )
