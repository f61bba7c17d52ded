"""Masks are data: a ``MaskPlan`` says which patches an image keeps.

Every branch of a training step (pixels, regions, teachers) reads the same plan, so a
variant never re-draws its own mask. Maskers that need only the image grid run in the
DataLoader workers and return one plan per sample (no batch dim); ``collate`` stacks them.

A masker may return a subclass with more tensor fields (LoMaR's window ids, a self-guided masker's
scores): ``collate``, ``to`` and ``tensors``/``from_tensors`` work field by field from the dataclass
fields, so the extra fields survive DataLoader workers, device moves and FLOP tracing unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

P = TypeVar("P", bound="MaskPlan")


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

    def recut(self: P, num_keep: int) -> P:
        """The same shuffle order (``argsort(ids_restore)``) cut after ``num_keep`` patches: nested visible
        sets; extra fields of a subclass are kept."""
        base = MaskPlan.from_shuffle(torch.argsort(self.ids_restore, dim=-1), num_keep)
        return replace(self, ids_keep=base.ids_keep, ids_restore=base.ids_restore, mask=base.mask)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every field's tensor, in field order (what ``from_tensors`` takes back)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_tensors(cls: type[P], *tensors: Tensor) -> P:
        """Inverse of ``tensors``: the plan of this type from its fields in order (e.g. after tracing)."""
        return cls(*tensors)

    def to(self: P, device: torch.device | str, non_blocking: bool = False) -> P:
        """The same plan type with every tensor field on ``device``."""
        return type(self)(**{f.name: _to(getattr(self, f.name), device, non_blocking) for f in fields(self)})

    @staticmethod
    def collate(plans: list[P]) -> P:
        """Stack per-sample plans ``[L]`` into a batch plan ``[B, L]`` of the first plan's type; every
        tensor field is stacked, other fields must agree across the batch."""
        cls = type(plans[0])
        if any(type(p) is not cls for p in plans):
            raise TypeError(f"MaskPlan.collate: mixed plan types {sorted({type(p).__name__ for p in plans})}")
        return cls(**{f.name: _stack([getattr(p, f.name) for p in plans], f.name) for f in fields(cls)})


def _to(value: Any, device: torch.device | str, non_blocking: bool) -> Any:
    return value.to(device, non_blocking=non_blocking) if isinstance(value, Tensor) else value


def _stack(values: list[Any], name: str) -> Any:
    if isinstance(values[0], Tensor):
        return torch.stack(values)
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"MaskPlan.collate: field {name!r} is not a tensor and differs across the batch")
    return values[0]
