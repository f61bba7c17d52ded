"""Transfer datasets read from the manifest: image labels, semantic masks, COCO-format instances.

Images are normalised with the ImageNet mean/std the encoders were pre-trained with, except for
detection, where torchvision's Mask R-CNN transform normalises inside the model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from maelab.data.cocojson import check_instances
from maelab.data.decode import load_rgb
from maelab.data.manifest import image_path, mask_file, select_rows
from maelab.data.view import IMAGENET_MEAN, IMAGENET_STD, View

IGNORE_INDEX = 255


def select(
    manifest: pd.DataFrame, sources: list[str], split: str, need: str | None = None, limit: int | None = None
) -> pd.DataFrame:
    """Rows of ``sources`` in ``split``; ``need``: a column that must be non-null (label, mask_path, ann_id);
    ``limit`` keeps the first rows (a CPU budget; manifest order is deterministic)."""
    rows = select_rows(manifest, sources, [split], allow_empty=True)
    if need is not None:
        rows = rows[rows[need].notna()]
    if rows.empty:
        have = sorted(set(zip(manifest["source"].astype(str), manifest["split"].astype(str), strict=True)))
        what = f" with a {need}" if need else ""
        raise ValueError(
            f"manifest: no rows{what} for sources={list(sources)} split={split!r}; present: {have}"
        )
    return (rows.iloc[: int(limit)] if limit else rows).reset_index(drop=True)


def read_image(row: pd.Series) -> Tensor:
    """[3, H, W] float in [0, 1]."""
    img = np.asarray(load_rgb(image_path(row)), dtype=np.float32) / 255.0
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def normalize(img: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img - mean) / std


class ClassificationSet(Dataset):
    """Image + label. Train: RandomResizedCrop(scale) + flip, then optionally RandAugment and random erasing
    (MAE fine-tune, Table 9: ``rand-m9-mstd0.5-inc1``, erasing 0.25); eval: resize + centre crop.

    Every random draw comes from a seed of ``(seed, epoch, index)``, so a run is reproducible whatever the
    number of workers (timm's RandAugment draws from Python's ``random``: its state is swapped per sample).
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        size: int,
        train: bool,
        scale: tuple[float, float] = (0.08, 1.0),
        seed: int = 0,
        rand_augment: str | None = None,
        erase_prob: float = 0.0,
    ):
        self.rows, self.size, self.train, self.scale, self.seed = rows, int(size), train, tuple(scale), seed
        self.labels = torch.tensor(rows["label"].astype("int64").to_numpy())
        self.epoch = 0
        self.erase_prob = float(erase_prob)
        self.rand_augment = None
        if train and rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
            hparams = {"translate_const": int(self.size * 0.45), "img_mean": fill}
            self.rand_augment = rand_augment_transform(rand_augment, hparams)
            for op in self.rand_augment.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = read_image(self.rows.iloc[i])  # [3, H, W]
        hw, size = tuple(img.shape[-2:]), (self.size, self.size)
        if not self.train:
            return normalize(View.center(hw, size).apply(img).clamp(0, 1)), self.labels[i]
        sample_seed = self.seed * 1_000_003 + self.epoch * 10_007 + i
        gen = torch.Generator().manual_seed(sample_seed)
        img = View.random_resized_crop(hw, size, self.scale, generator=gen).apply(img).clamp(0, 1)
        if self.rand_augment is not None:
            img = seeded(sample_seed, self.rand_augment, img)
        img = normalize(img)
        if self.erase_prob > 0 and torch.rand((), generator=gen) < self.erase_prob:
            img = random_erase(img, gen)
        return img, self.labels[i]


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op for every level: ``PosterizeIncreasing`` at magnitude 10 keeps 0 bits, which Pillow
    < 10 turned into a black image (what the MAE recipe trained with) and Pillow 13 rejects."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, int(bits_to_keep))


def seeded(seed: int, transform: Any, img: Tensor) -> Tensor:
    """``transform`` (a PIL transform drawing from Python's ``random``) on ``img [3, H, W]`` in [0, 1], with
    ``random`` seeded by ``seed`` for the call and restored after."""
    import random

    pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    state = random.getstate()
    random.seed(seed)
    try:
        pil = transform(pil)
    finally:
        random.setstate(state)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def random_erase(
    img: Tensor, gen: torch.Generator, area: tuple[float, float] = (0.02, 1 / 3), ratio: float = 0.3
) -> Tensor:
    """Random erasing, pixel mode (Zhong et al.; timm ``RandomErasing(mode="pixel", max_count=1)``): one box
    of ``area`` x the image with aspect in ``[ratio, 1/ratio]`` (log-uniform), filled with N(0, 1) noise
    (the image is normalised). Up to 10 tries to fit a box; the image is returned unchanged if none fits."""
    _, h, w = img.shape
    for _ in range(10):
        target = float(torch.empty(()).uniform_(*area, generator=gen)) * h * w
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(ratio), -math.log(ratio), generator=gen)))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, (), generator=gen))
            left = int(torch.randint(0, w - ew + 1, (), generator=gen))
            out = img.clone()
            out[:, top : top + eh, left : left + ew] = torch.randn(
                img.shape[0], eh, ew, generator=gen, dtype=img.dtype
            )
            return out
    return img


class SegmentationSet(Dataset):
    """Image + semantic mask (``mask_path`` PNG). ``reduce_zero_label``: 0 -> ignore, c -> c-1 (mmseg ADE20K).

    Train: random resized crop (``scale``) + flip, nearest on the mask. Eval: the image resized to
    ``size`` x ``size`` and the mask at its original resolution (logits are resized back, as mmseg's
    whole-image inference does).
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        size: int,
        train: bool,
        scale: tuple[float, float] = (0.5, 1.0),
        reduce_zero_label: bool = False,
        seed: int = 0,
    ):
        self.rows, self.size, self.train, self.scale = rows, int(size), train, tuple(scale)
        self.reduce_zero_label, self.seed, self.epoch = reduce_zero_label, seed, 0

    def __len__(self) -> int:
        return len(self.rows)

    def read_mask(self, row: pd.Series) -> Tensor:
        path = mask_file(row)
        if path is None:
            raise ValueError(f"manifest: image_id {row['image_id']}: field mask_path is null")
        m = torch.from_numpy(np.asarray(Image.open(path), dtype=np.int64).copy())
        if m.dim() != 2:
            raise ValueError(f"{path}: expected a single-channel label PNG, got shape {tuple(m.shape)}")
        if self.reduce_zero_label:
            m = torch.where(m == 0, IGNORE_INDEX, m - 1)
            m[m == IGNORE_INDEX - 1] = IGNORE_INDEX
        return m

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        row = self.rows.iloc[i]
        img, mask = read_image(row), self.read_mask(row)  # [3, H, W], [H, W]
        hw, size = tuple(img.shape[-2:]), (self.size, self.size)
        if self.train:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
            view = View.random_resized_crop(hw, size, self.scale, generator=gen)
            return normalize(view.apply(img).clamp(0, 1)), view.apply_labels(mask)
        img = F.interpolate(img[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
        return normalize(img.clamp(0, 1)), mask


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, **kwargs: Any) -> DataLoader:
    """A task's shuffled training loader: ``batch_size`` capped at the set, seeded, no partial batch."""
    return DataLoader(
        dataset,
        min(int(batch_size), len(dataset)),
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        **kwargs,
    )


def collate_eval(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    """Stack images; keep targets of different sizes as a list."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


# ------------------------------------------------------------------------------------ detection
def category_maps(coco: dict) -> tuple[dict[int, int], dict[int, int]]:
    """COCO category id -> contiguous label 1..K (0 = background for torchvision) and back."""
    ids = sorted(int(c["id"]) for c in coco["categories"])
    to_label = {cid: i + 1 for i, cid in enumerate(ids)}
    return to_label, {v: k for k, v in to_label.items()}


class DetectionSet(Dataset):
    """Image [3, H, W] in [0, 1] + Mask R-CNN target (boxes xyxy, labels 1..K, masks [N, H, W] uint8).

    ``rows`` must carry ``ann_id`` (the image id in ``coco``). Train applies large-scale jitter
    (ViTDet §4.1, Ghiasi et al. 2021): resize the long side to ``size * U(lsj)``, random crop to
    ``size`` x ``size``, horizontal flip; the backbone pads to ``size`` x ``size``. Eval returns the
    original image (the model's transform resizes it and maps predictions back).
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        coco: dict,
        size: int,
        train: bool,
        lsj: tuple[float, float] = (0.1, 2.0),
        seed: int = 0,
        source_name: str = "instances",
    ):
        from pycocotools import mask as mask_utils

        check_instances(coco, source_name)  # bad geometry or RLE fails here, before pycocotools allocates
        self.mask_utils = mask_utils
        self.rows, self.size, self.train, self.lsj, self.seed, self.epoch = (
            rows,
            int(size),
            train,
            tuple(lsj),
            seed,
            0,
        )
        self.to_label, _ = category_maps(coco)
        self.images = {int(im["id"]): im for im in coco["images"]}
        self.anns: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            self.anns.setdefault(int(ann["image_id"]), []).append(ann)
        missing = [int(a) for a in rows["ann_id"] if int(a) not in self.images]
        if missing:
            raise ValueError(f"{source_name}: manifest ann_id {missing[:5]} not among the JSON's images[].id")

    def __len__(self) -> int:
        return len(self.rows)

    def ann_mask(self, ann: dict, h: int, w: int) -> np.ndarray:
        seg = ann.get("segmentation")
        if not seg:  # box-only annotation: the box as its mask
            x, y, bw, bh = ann["bbox"]
            m = np.zeros((h, w), np.uint8)
            m[int(y) : int(math.ceil(y + bh)), int(x) : int(math.ceil(x + bw))] = 1
            return m
        if isinstance(seg, list):
            rle = self.mask_utils.merge(self.mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = self.mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return self.mask_utils.decode(rle)

    def target(self, image_id: int, h: int, w: int) -> dict[str, Tensor]:
        anns = [
            a
            for a in self.anns.get(image_id, [])
            if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1
        ]
        boxes = torch.tensor(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns
            ],
            dtype=torch.float32,
        ).reshape(-1, 4)
        labels = torch.tensor([self.to_label[int(a["category_id"])] for a in anns], dtype=torch.int64)
        masks = (
            torch.from_numpy(np.stack([self.ann_mask(a, h, w) for a in anns]))
            if anns
            else torch.zeros(0, h, w, dtype=torch.uint8)
        )
        return {"boxes": boxes, "labels": labels, "masks": masks}

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        row = self.rows.iloc[i]
        img = read_image(row)
        h, w = img.shape[-2:]
        image_id = int(row["ann_id"])
        tgt = self.target(image_id, h, w)
        tgt["image_id"] = torch.tensor(image_id)
        if self.train:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
            img, tgt = large_scale_jitter(img, tgt, self.size, self.lsj, gen)
        return img, tgt


def large_scale_jitter(
    img: Tensor, tgt: dict[str, Tensor], size: int, scale_range: tuple[float, float], gen: torch.Generator
) -> tuple[Tensor, dict[str, Tensor]]:
    """LSJ: long side -> ``size * s``, s ~ U(range); random ``size`` crop when larger; random h-flip."""
    h, w = img.shape[-2:]
    s = scale_range[0] + (scale_range[1] - scale_range[0]) * torch.rand((), generator=gen).item()
    r = size * s / max(h, w)
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[
        0
    ].clamp(0, 1)
    masks = tgt["masks"]
    if masks.shape[0]:
        masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
    else:
        masks = torch.zeros(0, nh, nw, dtype=torch.uint8)
    boxes = tgt["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    top = int(torch.randint(0, nh - size + 1, (), generator=gen)) if nh > size else 0
    left = int(torch.randint(0, nw - size + 1, (), generator=gen)) if nw > size else 0
    ch, cw = min(nh, size), min(nw, size)
    img, masks = img[:, top : top + ch, left : left + cw], masks[:, top : top + ch, left : left + cw]
    boxes = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
    if torch.rand((), generator=gen).item() < 0.5:
        img, masks = img.flip(-1), masks.flip(-1)
        boxes = torch.stack([cw - boxes[:, 2], boxes[:, 1], cw - boxes[:, 0], boxes[:, 3]], dim=1)
    # drop instances that the crop removed (degenerate box or empty mask)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 1) & ((boxes[:, 3] - boxes[:, 1]) > 1)
    if masks.shape[0]:
        keep &= masks.flatten(1).any(1).bool()
    out = {k: v for k, v in tgt.items() if k not in ("boxes", "labels", "masks")}
    out.update(boxes=boxes[keep], labels=tgt["labels"][keep], masks=masks[keep])
    return img, out


def collate_detection(
    batch: list[tuple[Tensor, dict[str, Any]]],
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    return [b[0] for b in batch], [b[1] for b in batch]
