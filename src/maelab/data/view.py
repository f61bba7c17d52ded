"""One random view of an image (MAE's RandomResizedCrop + horizontal flip), as plain data.

The same ``View`` is applied to the image (bicubic) and to anything aligned with it
(region maps, semantic masks: nearest), so crops, flips and resizes never drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The ImageNet normalisation every image in maelab gets (MAE and timm use the same constants)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class View:
    """Crop box ``[top:top+height, left:left+width]`` in source pixels, then resize to ``size``, then flip."""

    top: int
    left: int
    height: int
    width: int
    size: tuple[int, int]  # output (H, W)
    flip: bool

    @classmethod
    def random_resized_crop(
        cls,
        src_hw: tuple[int, int],
        size: tuple[int, int],
        scale: tuple[float, float],
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> View:
        """torchvision's RandomResizedCrop rule (10 tries, then a centre crop), drawn from ``generator``."""
        src_h, src_w = src_hw
        area = src_h * src_w
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * torch.rand((), generator=generator).item()

        flip = torch.rand((), generator=generator).item() < flip_p
        for _ in range(10):
            target_area = area * uniform(*scale)
            aspect = math.exp(uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= src_w and 0 < h <= src_h:
                top = int(torch.randint(0, src_h - h + 1, (), generator=generator))
                left = int(torch.randint(0, src_w - w + 1, (), generator=generator))
                return cls(top, left, h, w, tuple(size), flip)
        # fallback: the largest centre crop within the ratio range
        in_ratio = src_w / src_h
        if in_ratio < ratio[0]:
            w, h = src_w, round(src_w / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = src_h, round(src_h * ratio[1])
        else:
            w, h = src_w, src_h
        return cls((src_h - h) // 2, (src_w - w) // 2, h, w, tuple(size), flip)

    @classmethod
    def center(cls, src_hw: tuple[int, int], size: tuple[int, int]) -> View:
        """Deterministic view: resize the shorter side then centre-crop (evaluation)."""
        src_h, src_w = src_hw
        scale = max(size[0] / src_h, size[1] / src_w)
        h, w = round(size[0] / scale), round(size[1] / scale)
        return cls((src_h - h) // 2, (src_w - w) // 2, h, w, tuple(size), False)

    def apply(self, image: Tensor, mode: str = "bicubic") -> Tensor:
        """Apply to a float image ``[C, H, W]`` (antialiased, as torchvision's RandomResizedCrop)."""
        crop = image[..., self.top : self.top + self.height, self.left : self.left + self.width]
        out = F.interpolate(crop[None], size=self.size, mode=mode, align_corners=False, antialias=True)[0]
        return out.flip(-1) if self.flip else out

    def apply_labels(self, labels: np.ndarray | Tensor) -> Tensor:
        """Apply to an integer label map ``[H, W]`` or ``[S, H, W]``, nearest (labels never mix)."""
        t = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, Tensor) else labels
        squeeze = t.dim() == 2
        t = t[None] if squeeze else t
        # nearest on int64 is exact for any label value (no float rounding above 2**24)
        crop = t[..., self.top : self.top + self.height, self.left : self.left + self.width]
        # sample at output pixel centres, as bicubic with align_corners=False: floor((i + 0.5) * in / out)
        out_h, out_w = self.size
        rows = ((2 * torch.arange(out_h) + 1) * self.height // (2 * out_h)).clamp_max(self.height - 1)
        cols = ((2 * torch.arange(out_w) + 1) * self.width // (2 * out_w)).clamp_max(self.width - 1)
        out = crop[..., rows[:, None], cols[None, :]]
        out = out.flip(-1) if self.flip else out
        return out[0] if squeeze else out
