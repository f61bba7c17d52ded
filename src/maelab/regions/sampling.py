"""Feed regions to training: a DataLoader *sample extra* that adds ``sample["regions"]`` ``[k, H, W]``.

R-MAE Appendix A: "we first sample the mask applied to the image, then sample from region maps that have
*at least* one visible foreground patch", and §4.1: k = 8 regions per image, sampled randomly with
replacement.
So, for one sample:

1. read the image's ``[S, H0, W0]`` maps from the store and apply the SAME :class:`~maelab.data.view.View`
   as the image (nearest: labels never mix);
2. a segment (one label of one layer; label 0 = no region) is *eligible* when at least one of its pixels
   falls in a patch the *region branch* sees: the region plan, i.e. ``sample["plan"]`` itself (beta_R =
   beta_I, the default) or, with the region head's ``mask_ratio`` (beta_R != beta_I, Fig. 4a), the nested
   plan cut from it (``maelab.masking.nested_plan``, the one the head uses) — "any pixel", as in the
   official code, which reduces each region map to patches with ``any`` and keeps regions with ``any``
   visible patch;
   ``min_patches`` (default 1 = off) additionally drops segments touching fewer patches (official
   ``filter_small_patches`` uses 2);
3. draw ``k`` eligible segments uniformly over all layers together (the official code concatenates the
   scales' binary maps before sampling), with replacement by default (paper); ``replacement=False`` follows
   the official code (distinct when there are >= k, else every segment repeated evenly, then shuffled);
4. no eligible segment (every patch masked, or only void visible): ``fallback="full"`` gives k whole-image
   regions (they do have a visible patch whenever any patch is visible); ``"empty"`` gives k all-zero maps
   (official behaviour). ``sample["regions_fallback"]`` says whether it happened.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maelab.data.view import View
from maelab.masking import nested_plan
from maelab.regions.sources import manifest_hw
from maelab.regions.store import SourceStore


def patch_grid(hw: tuple[int, int], num_patches: int) -> tuple[int, int, int]:
    """``(patch, grid_h, grid_w)`` for square patches tiling ``hw`` into ``num_patches``."""
    h, w = hw
    p = math.isqrt(h * w // num_patches) if num_patches else 0
    if p == 0 or h % p or w % p or (h // p) * (w // p) != num_patches:
        raise ValueError(f"regions: a {h}x{w} view does not tile into {num_patches} square patches")
    return p, h // p, w // p


def eligible_segments(labels: Tensor, mask: Tensor, min_patches: int = 1) -> tuple[Tensor, Tensor]:
    """Segments with a visible patch: ``(layer ids [n], labels [n])``, sorted by (layer, label).

    labels: [S, H, W] int; mask: [L] bool (True = masked). A segment is visible if any of its pixels lies in a
    visible patch; with ``min_patches`` > 1 it must also touch that many patches (visible or not).
    """
    s, h, w = labels.shape
    num_patches = mask.numel()
    p, gh, gw = patch_grid((h, w), num_patches)
    visible_px = (~mask).view(gh, gw).repeat_interleave(p, 0).repeat_interleave(p, 1)  # [H, W]
    if min_patches > 1:
        pid = ((torch.arange(h)[:, None] // p) * gw + torch.arange(w)[None, :] // p).flatten()  # [H*W]
    layers, labs = [], []
    for i in range(s):
        lab = labels[i].long()
        n = int(lab.max()) + 1
        keep = torch.bincount(lab[visible_px], minlength=n) > 0  # [n] any pixel in a visible patch
        if min_patches > 1:  # distinct (label, patch) pairs -> patches touched per label
            touched = torch.bincount(
                torch.unique(lab.flatten() * num_patches + pid) // num_patches, minlength=n
            )
            keep &= touched >= min_patches
        keep[0] = False  # label 0: no region
        ids = keep.nonzero().squeeze(1)
        layers.append(torch.full_like(ids, i))
        labs.append(ids)
    return torch.cat(layers), torch.cat(labs)


def choose(n: int, k: int, replacement: bool, generator: torch.Generator | None) -> Tensor:
    """``k`` indices into ``n`` candidates."""
    if replacement:
        return torch.randint(n, (k,), generator=generator)
    if n >= k:
        return torch.randperm(n, generator=generator)[:k]
    tiled = torch.arange(n).repeat(math.ceil(k / n))
    return tiled[torch.randperm(len(tiled), generator=generator)][:k]


def region_mask_ratio(heads: Mapping[str, Any] | None) -> float | None:
    """beta_R of the recipe's region head (``mask_ratio`` of its ``type: region`` head), or None."""
    ratios = {
        cfg.get("mask_ratio")
        for cfg in (heads or {}).values()
        if isinstance(cfg, Mapping) and cfg.get("type") == "region"
    }
    if len(ratios) > 1:
        raise ValueError(
            f"heads: region heads disagree on mask_ratio {sorted(ratios, key=str)}; the sampler needs one"
        )
    return next(iter(ratios), None)


class RegionExtra:
    """Sample extra ``extra(sample, row, view, generator)``: ``sample["regions"]`` = ``[k, H, W]`` bool.

    store: a :class:`SourceStore` or its folder (e.g. ``data/04_feature/regions/fh``).
    Needs ``sample["plan"]`` (the image's MaskPlan, ``[L]``), so it must run after the masker.
    mask_ratio: the region head's beta_R (None = the image plan's); eligibility uses the region plan.
    """

    def __init__(
        self,
        store: SourceStore | str | Path,
        k: int = 8,
        *,
        min_patches: int = 1,
        replacement: bool = True,
        fallback: str = "full",
        key: str = "regions",
        mask_ratio: float | None = None,
    ) -> None:
        if fallback not in ("full", "empty"):
            raise ValueError(f"RegionExtra.fallback: expected 'full' or 'empty', got {fallback!r}")
        if k < 1:
            raise ValueError(f"RegionExtra.k must be >= 1, got {k}")
        self.store = store if isinstance(store, SourceStore) else SourceStore(store)
        self.k, self.min_patches, self.replacement = k, min_patches, replacement
        self.fallback, self.key = fallback, key
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        root: str | Path = "data/04_feature/regions",
        heads: Mapping[str, Any] | None = None,
    ) -> RegionExtra:
        """From a recipe block, e.g. ``{source: fh, k: 8, replacement: true, fallback: full}``; ``heads``
        (the recipe's heads block) gives the region head's beta_R for eligibility."""
        p = dict(params)
        source = p.pop("source", "fh")
        store = p.pop("store", None) or Path(root) / source
        allowed = {"k", "min_patches", "replacement", "fallback", "key"}
        kwargs = {key: v for key, v in p.items() if key in allowed}
        return cls(store, **kwargs, mask_ratio=region_mask_ratio(heads))

    def load(self, row: Mapping[str, Any], view: View) -> Tensor:
        """The row's maps after ``view``: ``[S, H, W]`` int32."""
        maps = self.store.get(str(row["image_id"]))
        want = manifest_hw(row)
        if want is not None and tuple(maps.shape[1:]) != want:
            raise ValueError(
                f"{self.store.index_path}: regions of {row['image_id']!r} are {maps.shape[1:]} (fields "
                f"'height'/'width') but the manifest image is {want}; re-run the regions pipeline"
            )
        return view.apply_labels(maps.astype(np.int32))

    def __call__(
        self, sample: dict[str, Any], row: Mapping[str, Any], view: View, generator: torch.Generator
    ) -> None:
        labels = self.load(row, view)  # [S, H, W]
        if sample["plan"].mask.dim() != 1:
            raise ValueError(
                f"RegionExtra: expected a per-sample plan [L], got mask {tuple(sample['plan'].mask.shape)}"
            )
        mask = nested_plan(sample["plan"], self.mask_ratio).mask  # [L] True = masked for the region branch
        layer, lab = eligible_segments(labels, mask.cpu(), self.min_patches)
        _, h, w = labels.shape
        if len(lab) == 0:
            fill = self.fallback == "full"
            sample[self.key] = torch.full((self.k, h, w), fill, dtype=torch.bool)
            sample[f"{self.key}_fallback"] = True
            return
        pick = choose(len(lab), self.k, self.replacement, generator)
        sample[self.key] = labels[layer[pick]] == lab[pick][:, None, None]  # [k, H, W] bool
        sample[f"{self.key}_fallback"] = False
