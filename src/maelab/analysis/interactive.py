"""Interactive segmentation with a pre-trained R-MAE (Nguyen et al., §4.2 and Fig. 6).

The region branch completes a region map from its visible patches. Used after pre-training, the visible
patches are the user's prompt: patches clicked inside the object (foreground, all ones), optionally
patches clicked outside it (background, all zeros), or — Fig. 6's proxy — the patches of a true region map
left visible at a high mask ratio. Any number of prompt patches works, from one to all but one.

    prob = segment_interactive(model, image, [27, 28])        # [H, W] probabilities
    maelab segment --recipe rmae --checkpoint data/06_models/pretrain/rmae/checkpoint.pt \
        --image img.jpg --patches 27,28 --out seg.png
    maelab segment --checkpoint models:/maelab-rmae-vit-t8-64-d6@champion --image img.jpg --patches 27,28 \
        --out seg.png                                          # the registered full state (its own recipe)

``evaluate_interactive`` measures mean IoU against held-out instance masks, next to the trivial baseline
"the union of the prompt patches" (for ``reveal`` prompts: the revealed foreground pixels).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from maelab.data.view import IMAGENET_MEAN, IMAGENET_STD
from maelab.files import read_weights
from maelab.masking.plan import MaskPlan
from maelab.models.heads.pixel import patchify
from maelab.models.heads.region import RegionHead, region_probs
from maelab.models.pretrainer import Pretrainer


def region_head(model: Pretrainer, name: str | None = None) -> RegionHead:
    """The model's region head (the one named ``name``, or the only one)."""
    found = {
        n: h for n, h in model.heads.items() if isinstance(h, RegionHead) and (name is None or n == name)
    }
    if len(found) != 1:
        raise ValueError(
            f"model has region heads {sorted(found)}; pass head= one name (recipe needs a 'region' head)"
        )
    return next(iter(found.values()))


def _patch_ids(ids: Iterable[int], num_patches: int, what: str) -> list[int]:
    out = sorted({int(i) for i in ids})
    bad = [i for i in out if not 0 <= i < num_patches]
    if bad:
        raise ValueError(f"{what}: patch ids {bad} are outside the grid [0, {num_patches})")
    return out


@torch.no_grad()
def segment_interactive(
    model: Pretrainer,
    image: Tensor,
    prompt_patches: Sequence[int],
    negative_patches: Sequence[int] = (),
    region: Tensor | None = None,
    image_visible: str = "all",
    head: str | None = None,
) -> Tensor:
    """Predicted region ``[H, W]`` (probabilities) for ``image [3, H, W]`` (ImageNet-normalised).

    prompt_patches: raster patch ids the user reveals. Without ``region`` they are foreground clicks
    (patches set to 1) and ``negative_patches`` background clicks (set to 0); with ``region [H, W]``
    (a binary map) the revealed patches take its values (Fig. 6). image_visible: ``"all"`` — the pixel
    encoder sees the whole image — or ``"prompt"`` — only the revealed patches, as in pre-training.
    Revealed patches are pasted into the output (they are known).
    """
    rh = region_head(model, head)
    spec, (h, w) = rh.spec, tuple(image.shape[-2:])
    n = spec.num_patches
    pos = _patch_ids(prompt_patches, n, "prompt_patches")
    neg = _patch_ids(negative_patches, n, "negative_patches")
    visible = sorted(set(pos) | set(neg))
    if not pos and region is None:
        raise ValueError("segment_interactive: give at least one prompt patch")
    if len(visible) >= n:
        raise ValueError(
            f"segment_interactive: {len(visible)} prompt patches leave nothing of the {n} to predict"
        )
    dev = next(model.parameters()).device
    p, (gh, gw) = spec.patch_size, spec.grid
    if region is None:  # clicks: fill the revealed patches with ones / zeros
        grid = torch.zeros(n)
        grid[pos] = 1.0
        region = grid.view(1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)[0, 0]
    region = region.float().to(dev)
    if tuple(region.shape) != (h, w):
        raise ValueError(f"segment_interactive: region is {tuple(region.shape)}, image is {(h, w)}")

    masked = torch.ones(1, n, dtype=torch.bool)
    masked[0, visible] = False
    rplan = MaskPlan.from_mask(masked).to(dev)
    if image_visible == "all":
        iplan = MaskPlan.from_mask(torch.zeros(1, n, dtype=torch.bool)).to(dev)
    elif image_visible == "prompt":
        iplan = rplan
    else:
        raise ValueError(
            f"segment_interactive: image_visible must be 'all' or 'prompt', got {image_visible!r}"
        )

    model.eval()
    latent = model.encoder.forward_features(image[None].to(dev), iplan)
    regions = region.expand(1, rh.num_regions, h, w)  # the same map in every slot; read slot 0
    logits, _ = rh.predict(latent, iplan, regions, rplan)
    prob = region_probs(logits[:, :1], spec)[0, 0]  # [H, W]
    known = (~masked[0]).float().view(1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)[0, 0]
    known = known.to(dev)
    return (prob * (1 - known) + region * known).cpu()


def iou(a: Tensor, b: Tensor) -> float:
    a, b = a.bool(), b.bool()
    union = (a | b).sum().item()
    return float((a & b).sum().item() / union) if union else 1.0


def patch_cover(mask: Tensor, p: int) -> Tensor:
    """Fraction of each patch's pixels inside ``mask [H, W]`` -> ``[L]``."""
    return patchify(mask.float()[None, None], p)[0].mean(-1)


def choose_prompts(mask: Tensor, p: int, kind: str, amount: float, generator: torch.Generator) -> list[int]:
    """``clicks``: ``int(amount)`` patches mostly inside the instance (at least the best-covered one);
    ``reveal``: a fraction ``amount`` of all patches, uniformly (Fig. 6's masked region maps)."""
    cover = patch_cover(mask, p)
    if kind == "clicks":
        inside = torch.nonzero(cover >= 0.5).flatten()
        if len(inside) == 0:
            inside = cover.argmax().view(1)
        pick = torch.randperm(len(inside), generator=generator)[: max(1, int(amount))]
        return inside[pick].tolist()
    if kind == "reveal":
        num = max(1, int(round(cover.numel() * amount)))
        return torch.randperm(cover.numel(), generator=generator)[:num].tolist()
    raise ValueError(f"choose_prompts: kind must be 'clicks' or 'reveal', got {kind!r}")


def prompt_baseline(mask: Tensor, prompts: Sequence[int], p: int, kind: str, grid: tuple[int, int]) -> Tensor:
    """The trivial answer: the union of the prompt patches (clicks), or the revealed foreground (reveal)."""
    gh, gw = grid
    g = torch.zeros(gh * gw)
    g[list(prompts)] = 1.0
    union = g.view(1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)[0, 0].bool()
    return union & mask.bool() if kind == "reveal" else union


def prompt_and_segment(
    model: Pretrainer,
    image: Tensor,
    mask: Tensor,
    kind: str,
    amount: float,
    image_visible: str,
    generator: torch.Generator,
) -> tuple[list[int], Tensor]:
    """One instance as it is scored: prompts drawn from ``mask [H, W]`` (:func:`choose_prompts`), then the
    predicted region ``[H, W]``; ``reveal`` prompts show the mask's own values at the revealed patches."""
    prompts = choose_prompts(mask, region_head(model).spec.patch_size, kind, amount, generator)
    region = mask.float() if kind == "reveal" else None
    return prompts, segment_interactive(model, image, prompts, region=region, image_visible=image_visible)


@torch.no_grad()
def evaluate_interactive(
    model: Pretrainer,
    samples: Iterable[tuple[Tensor, Tensor]],
    kind: str = "clicks",
    amount: float = 2,
    image_visible: str = "all",
    threshold: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean IoU of the predicted region vs the baseline, over every instance of every sample.

    samples: ``(image [3, H, W] ImageNet-normalised, instance masks [n, H, W] bool)`` at the model's size.
    """
    rh = region_head(model)
    p, grid = rh.spec.patch_size, rh.spec.grid
    g = torch.Generator().manual_seed(seed)
    pred_ious, base_ious = [], []
    for image, masks in samples:
        for m in masks:
            if not m.any():
                continue
            prompts, prob = prompt_and_segment(model, image, m, kind, amount, image_visible, g)
            pred_ious.append(iou(prob > threshold, m))
            base_ious.append(iou(prompt_baseline(m, prompts, p, kind, grid), m))
    if not pred_ious:
        raise ValueError("evaluate_interactive: no non-empty instance masks in the samples")
    return {
        "kind": kind,
        "amount": amount,
        "image_visible": image_visible,
        "instances": len(pred_ious),
        "miou": float(np.mean(pred_ious)),
        "baseline_miou": float(np.mean(base_ious)),
    }


# -- I/O helpers and the command -------------------------------------------------------------------
def load_image(path: str | Path, size: tuple[int, int]) -> Tensor:
    """RGB file -> ``[3, H, W]`` ImageNet-normalised, resized (bicubic) to ``size``."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read image: {err}") from err
    return image_tensor(arr, size)


def image_tensor(rgb: np.ndarray, size: tuple[int, int]) -> Tensor:
    """``[H0, W0, 3]`` uint8 -> ``[3, H, W]`` ImageNet-normalised, resized (bicubic) to ``size`` (H, W)."""
    arr = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def patch_at(x: float, y: float, size: tuple[int, int], grid: tuple[int, int]) -> int:
    """The raster patch id on the model's ``grid`` (rows, cols) of the pixel under point ``(x, y)`` of an
    image of ``size`` (H, W), whatever that size: the image is resized onto the grid as a whole, and pixel
    ``(i, j)`` belongs to the patch under its centre, row ``(2i + 1) * rows // 2H``, column likewise."""
    h, w = size
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"point ({x}, {y}) is outside the {w}x{h} image")
    gh, gw = grid
    return (2 * int(y) + 1) * gh // (2 * h) * gw + (2 * int(x) + 1) * gw // (2 * w)


def scenes_samples(
    annotations: dict | str | Path, root: str | Path, size: tuple[int, int], limit: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Held-out scenes images and their instance masks (COCO json: a file or its loaded dict), resized to
    ``size`` (masks nearest)."""
    from pycocotools.coco import COCO

    with _quiet():
        if isinstance(annotations, dict):
            coco = COCO()
            coco.dataset = annotations
            coco.createIndex()
        else:
            coco = COCO(str(annotations))
    out = []
    for img_id in sorted(coco.getImgIds())[:limit]:
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
        if not anns:
            continue
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).float()  # [n, h, w]
        masks = F.interpolate(masks[None], size=size, mode="nearest")[0].bool()
        out.append((load_image(Path(root) / info["file_name"], size), masks))
    return out


class _quiet:
    """Silence pycocotools' prints."""

    def __enter__(self) -> None:
        import contextlib
        import io

        self._ctx = contextlib.redirect_stdout(io.StringIO())
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def load_model(recipe: str | None, env: str | None, checkpoint: str | Path) -> Pretrainer:
    """A Pretrainer with the weights of ``checkpoint``: a registered full state (``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``, which carries its own recipe), or a file, for ``recipe`` (named in the config
    of ``env``)."""
    if str(checkpoint).startswith("models:/"):
        return model_from_registry(str(checkpoint), env)
    if not recipe:
        raise ValueError(f"{checkpoint}: a checkpoint file needs --recipe (a models:/ state carries its own)")
    from maelab.config import load_recipe

    return model_from_checkpoint(load_recipe(recipe, env), checkpoint)


def model_from_registry(uri: str, env: str | None = None, cache_dir: str | Path | None = None) -> Pretrainer:
    """The whole pre-trained model (encoder and heads) of the full state registered under ``uri``."""
    from maelab.models import build_pretrainer
    from maelab.orchestration.registry import read_full_state, resolve_state

    path = resolve_state(uri, env=env, cache_dir=cache_dir)
    state = read_full_state(path)
    model = build_pretrainer(state["recipe"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{uri} ({path}): weights do not fit the state's own recipe: {err}") from err
    return model.eval()


def model_from_checkpoint(recipe: dict[str, Any], checkpoint: str | Path) -> Pretrainer:
    """A Pretrainer for a resolved ``recipe`` with the weights of a training checkpoint (``checkpoint.pt``,
    loaded with ``weights_only=True``) or a safetensors file of the whole model's state dict."""
    from maelab.models import build_pretrainer

    path = Path(checkpoint)
    state = read_weights(path)[0]
    model = build_pretrainer(recipe)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        name = recipe.get("name", "<recipe>")
        raise ValueError(f"{path}: weights do not fit recipe {name!r} (field 'model'): {err}") from err
    return model.eval()


def example_figure(
    model: Pretrainer,
    samples: Sequence[tuple[Tensor, Tensor]],
    kind: str = "reveal",
    amount: float = 0.25,
    image_visible: str = "prompt",
    examples: int = 6,
    seed: int = 0,
    scale: int = 4,
) -> np.ndarray:
    """Rows of ``image + prompt | prediction | overlay | ground truth``, for the largest instance of each of
    the first ``examples`` samples: what ``evaluate_interactive`` scores, to look at."""
    p = region_head(model).spec.patch_size
    g = torch.Generator().manual_seed(seed)
    rows = []
    for image, masks in samples[:examples]:
        m = masks[int(masks.flatten(1).sum(1).argmax())]
        prompts, prob = prompt_and_segment(model, image, m, kind, amount, image_visible, g)
        panel = figure(image, prob, prompts, p, scale)
        truth = m.float().repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        truth = (truth[..., None].expand(-1, -1, 3).numpy() * 255).astype(np.uint8)
        rows.append(np.concatenate([panel, truth], axis=1))
    return np.concatenate(rows, axis=0)


def figure(image: Tensor, prob: Tensor, prompts: Sequence[int], p: int, scale: int = 4) -> np.ndarray:
    """``[H*s, 3*W*s, 3]`` uint8: image with the prompt patches outlined | prediction | overlay."""
    img = (
        image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    ).clamp(0, 1)
    h, w = img.shape[-2:]
    gw = w // p
    prompt_img = img.clone()
    for i in prompts:
        r, c = divmod(int(i), gw)
        prompt_img[:, r * p : (r + 1) * p, c * p : (c + 1) * p] = 0.5 * prompt_img[
            :, r * p : (r + 1) * p, c * p : (c + 1) * p
        ] + 0.5 * torch.tensor([1.0, 0.2, 0.2]).view(3, 1, 1)
    pred = prob.float().clamp(0, 1).expand(3, h, w)
    overlay = img * 0.5 + 0.5 * pred * torch.tensor([0.1, 1.0, 0.3]).view(3, 1, 1)
    grid = torch.cat([prompt_img, pred, overlay], dim=-1)
    grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _ids(text: str | None) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()] if text else []


def cli(args: argparse.Namespace) -> int:
    """``maelab segment [--recipe R] [--env E] --checkpoint PATH|models:/NAME@ALIAS --image IMG --patches i,j
    [--negative k] [--image-visible all|prompt] --out PNG``: writes the figure and prints the patch grid."""
    model = load_model(args.recipe, args.env, args.checkpoint)
    enc = model.encoder
    image = load_image(args.image, enc.img_size)
    prompts = _ids(args.patches)
    prob = segment_interactive(model, image, prompts, _ids(args.negative), image_visible=args.image_visible)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    Image.fromarray(figure(image, prob, prompts, enc.patch_size)).save(tmp, format="PNG")
    tmp.replace(out)
    print(json.dumps({"out": str(out), "grid": list(enc.grid), "area": float((prob > 0.5).float().mean())}))
    return 0


def eval_cli(args: argparse.Namespace) -> int:
    """``maelab segment-eval --recipe R --checkpoint PATH [--annotations JSON --root DIR]
    [--kind clicks|reveal]
    [--amount A] [--limit N] [--json]``: mean IoU vs the union-of-prompts baseline on held-out scenes."""
    model = load_model(args.recipe, args.env, args.checkpoint)
    samples = scenes_samples(args.annotations, args.root, model.encoder.img_size, args.limit)
    result = evaluate_interactive(model, samples, args.kind, args.amount, args.image_visible, seed=args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['instances']} instances, {args.kind} {args.amount}: mIoU {result['miou']:.3f} "
            f"vs baseline {result['baseline_miou']:.3f}"
        )
    return 0 if math.isfinite(result["miou"]) else 1
