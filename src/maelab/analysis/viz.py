"""Pictures: the MAE-style reconstruction grid (He et al. 2022, Fig. 2): masked / reconstruction / input,
R-MAE's region grid, self-guided MAE's informed masks (Shi et al. 2024, Fig. 5: image / relevance / mask),
and ``training_pictures``: what the engine logs to the tracker for a training step, with its rows and
columns labelled."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from maelab.data.view import IMAGENET_MEAN, IMAGENET_STD


def denormalize(
    x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """``[B, 3, H, W]`` normalised -> [0, 1]."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() * s + m).clamp(0, 1)


def pixel_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Patch mask ``[B, L]`` (True = masked) -> pixel mask ``[B, 1, H, W]`` for a square-ish grid."""
    b, num = mask.shape
    gh = int(round((num * size[0] / size[1]) ** 0.5))
    gw = num // gh
    grid = mask.float().view(b, 1, gh, gw)
    return F.interpolate(grid, size=size, mode="nearest")


def reconstruction_grid(
    image: Tensor, recon: Tensor, mask: Tensor, max_images: int = 8, scale: int = 2, gray: float = 0.5
) -> np.ndarray:
    """An ``[rows*H, cols*W, 3]`` uint8 grid. Columns are samples; rows: the masked input (masked
    patches gray), the reconstruction with the visible patches pasted back (as MAE shows it), the original.

    image, recon: [B, 3, H, W] in the input normalisation; mask: [B, L] bool (True = masked).
    """
    n = min(max_images, image.shape[0])
    img = denormalize(image[:n].detach().cpu())
    rec = denormalize(recon[:n].detach().cpu())
    m = pixel_mask(mask[:n].detach().cpu(), tuple(img.shape[-2:]))  # [n, 1, H, W]
    masked = img * (1 - m) + gray * m
    pasted = img * (1 - m) + rec * m
    rows = [torch.cat(list(r), dim=-1) for r in (masked, pasted, img)]  # each [3, H, n*W]
    grid = torch.cat(rows, dim=-2)  # [3, 3H, n*W]
    if scale > 1:
        grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


RECONSTRUCTION_ROWS = ("masked", "reconstruction", "original")
REGION_ROWS = ("masked image", "masked region", "predicted", "target")
INFORMED_MASK_ROWS = ("image", "relevance S", "informed mask")


def label_grid(
    array: np.ndarray, rows: Sequence[str], cols: Sequence[str], margin: int = 104, header: int = 16
) -> np.ndarray:
    """``array`` (a grid of ``len(rows)`` x ``len(cols)`` equal cells, ``[H, W, 3]`` uint8) with the row
    names in a white left margin and the column names in a white top strip."""
    h, w = array.shape[:2]
    cell_h, cell_w = h / len(rows), w / len(cols)
    canvas = Image.new("RGB", (w + margin, h + header), "white")
    canvas.paste(Image.fromarray(array), (margin, header))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, name in enumerate(rows):
        draw.text((4, header + int((i + 0.5) * cell_h) - 6), name, fill="black", font=font)
    for j, name in enumerate(cols):
        draw.text((margin + int(j * cell_w) + 2, 2), name, fill="black", font=font)
    return np.asarray(canvas)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def region_grid(
    image: Tensor,
    regions: Tensor,
    logits: Tensor,
    mask: Tensor,
    patch_size: int,
    max_images: int = 8,
    region: int = 0,
    scale: int = 2,
    gray: float = 0.5,
) -> np.ndarray:
    """R-MAE's region group (Fig. 5): an ``[4*H, cols*W, 3]`` uint8 grid, one column per sample (region slot
    ``region``). Rows: the masked image, the masked region (masked patches gray), the predicted region
    (probabilities, visible patches pasted), the target region.

    image: [B, 3, H, W] normalised; regions: [B, k, H, W]; logits: [B, k, L, p*p]; mask: [B, L] bool.
    """
    n = min(max_images, image.shape[0])
    img = denormalize(image[:n].detach().cpu())
    h, w = img.shape[-2:]
    m = pixel_mask(mask[:n].detach().cpu(), (h, w))  # [n, 1, H, W]
    target = regions[:n, region].detach().cpu().float()[:, None]  # [n, 1, H, W]
    p, gh, gw = patch_size, h // patch_size, w // patch_size
    lg = logits[:n, region].detach().cpu().float().sigmoid()  # [n, L, p*p]
    pred = lg.view(n, gh, gw, p, p).permute(0, 1, 3, 2, 4).reshape(n, 1, h, w)
    rows = [
        img * (1 - m) + gray * m,
        (target * (1 - m) + gray * m).expand(-1, 3, -1, -1),
        (target * (1 - m) + pred * m).expand(-1, 3, -1, -1),
        target.expand(-1, 3, -1, -1),
    ]
    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # [3, 4H, n*W]
    if scale > 1:
        grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def informed_mask_grid(
    image: Tensor, scores: Tensor, mask: Tensor, max_images: int = 8, scale: int = 2, gray: float = 0.5
) -> np.ndarray:
    """Self-guided MAE's informed masks next to their images: an ``[3*H, cols*W, 3]`` uint8 grid, one column
    per sample. Rows: the image, the relevance ``S`` of every patch to the target cluster (Eq. 8; min-max
    per image, dark to bright red), the masked input (masked patches gray; hint tokens stay visible).

    image: [B, 3, H, W] normalised; scores: [B, L]; mask: [B, L] bool (True = masked)."""
    n = min(max_images, image.shape[0])
    img = denormalize(image[:n].detach().cpu())
    size = tuple(img.shape[-2:])
    s = scores[:n].detach().cpu().float()
    lo, hi = s.min(-1, keepdim=True).values, s.max(-1, keepdim=True).values
    s = (s - lo) / (hi - lo).clamp_min(1e-12)  # [n, L] in [0, 1]
    heat = pixel_mask(s, size)  # [n, 1, H, W] (nearest: one value per patch)
    heat = torch.cat([heat, heat * 0.25, heat * 0.25], dim=1)  # [n, 3, H, W] red ramp
    m = pixel_mask(mask[:n].detach().cpu(), size)
    rows = [img, heat, img * (1 - m) + gray * m]
    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # [3, 3H, n*W]
    if scale > 1:
        grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def training_pictures(model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, bytes]:
    """PNGs of one training step, ``{name: png}``: ``reconstruction`` (the pixel reconstruction grid) when
    the model reconstructs pixels, ``<head>`` for every region head (R-MAE's region grid), and, once
    self-guided MAE's masker has switched, ``informed_mask`` (the step's informed masks beside their images
    and the relevance they came from: one more no-grad pass, on the picture's images only). The engine
    calls this with ``train(..., pictures=training_pictures)``; models only return tensors."""
    from maelab.masking.self_guided import INFORMED, SelfGuidedMasker
    from maelab.models.heads import LomarHead, PixelDecoderHead, RegionHead
    from maelab.models.heads.region import region_plan

    plan = getattr(outputs, "plan", None) or batch["plan"]
    heads = dict(getattr(model, "heads", {}))
    pics: dict[str, np.ndarray] = {}
    columns = [f"image {i}" for i in range(min(8, batch["image"].shape[0]))]  # the grids' max_images
    if hasattr(model, "reconstruct") and (
        not heads or any(isinstance(h, PixelDecoderHead) for h in heads.values())
    ):
        grid = reconstruction_grid(batch["image"], model.reconstruct(batch, outputs).float(), plan.mask)
        pics["reconstruction"] = label_grid(grid, RECONSTRUCTION_ROWS, columns)
    for name, head in heads.items():
        if isinstance(head, LomarHead) and name in outputs.outputs:  # LoMaR Fig. 6: one column per window
            windows = head.window_pictures(batch["image"], outputs.outputs[name], plan)
            n = min(8, windows[0].shape[0])
            grid = reconstruction_grid(*windows)
            pics["reconstruction"] = label_grid(grid, RECONSTRUCTION_ROWS, [f"window {i}" for i in range(n)])
        if isinstance(head, RegionHead) and name in outputs.outputs:
            rmask = region_plan(plan, head.mask_ratio).mask
            grid = region_grid(
                batch["image"], batch[head.key], outputs.outputs[name], rmask, head.spec.patch_size
            )
            pics[name] = label_grid(grid, REGION_ROWS, columns)
    masker = getattr(model, "masker", None)
    context = batch.get("context")
    step, epoch = (context.step, context.epoch) if context is not None else (0, 0)
    if isinstance(masker, SelfGuidedMasker) and masker.phase == INFORMED and step % masker.refresh_every == 0:
        images = batch["image"][:8]
        scores = masker.scores(model, images, epoch)
        grid = informed_mask_grid(images, scores, plan.mask[:8])
        pics["informed_mask"] = label_grid(grid, INFORMED_MASK_ROWS, columns[: images.shape[0]])
    return {name: png_bytes(array) for name, array in pics.items()}
