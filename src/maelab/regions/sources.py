"""Region sources: each turns one manifest row into label maps ``[S, H, W]`` at the image's full resolution.

R-MAE §4.1 / Table 1d ablates three sources, all behind :class:`RegionSource`:

- ``fh``: Felzenszwalb-Huttenlocher clustering, computed from the pixels (the default);
- ``coco_panoptic``: COCO panoptic ground truth, one layer, one label per segment;
- ``sam``: Segment-Anything masks computed elsewhere and read from a folder (nothing is run here).

Label convention, every source: ``0`` = no region (void / unlabelled), ``1..n`` = segments of that layer.
FH covers the whole image, so its maps never contain 0.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

Row = Mapping[str, Any] | pd.Series


def read_rgb(path: str | Path, row: Row | None = None) -> np.ndarray:
    """Decode an image to ``[H, W, 3]`` uint8, EXIF orientation applied (as the manifest's width/height are).

    With ``row``, the decoded size must match the manifest's ``width``/``height``.
    """
    with Image.open(path) as im:
        image = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    if row is not None:
        for field, got in (("height", image.shape[0]), ("width", image.shape[1])):
            want = row.get(field)
            if want is not None and not pd.isna(want) and int(want) != got:
                raise ValueError(f"{path}: decoded {field}={got} but the manifest says {field}={int(want)}")
    return image


def storage_dtype(maps: np.ndarray) -> np.dtype:
    """uint16 when every label is < 65536, else int32 — never a dtype that wraps (the official uint8 does)."""
    if maps.size and int(maps.min()) < 0:
        raise ValueError(f"region labels must be >= 0, got min {int(maps.min())}")
    return np.dtype(np.uint16) if maps.size == 0 or int(maps.max()) < 2**16 else np.dtype(np.int32)


def _fill(template: str, row: Row) -> Path:
    """Expand ``{root}``, ``{split}``, ``{source}`` in a configured path from the manifest row."""
    return Path(str(template).format(root=row["root"], split=row["split"], source=row["source"]))


class RegionSource(ABC):
    """Computes ``[S, H, W]`` int32 label maps for one manifest row; ``S`` = :attr:`layers`."""

    kind: ClassVar[str]
    needs_image: ClassVar[bool] = True  # False: compute() reads its own files and gets image=None

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Everything that changes the output; hashed into :attr:`fingerprint`."""

    @property
    def layers(self) -> list[str]:
        """Names of the ``S`` layers (e.g. FH scales); empty when the count varies per image."""
        return []

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"kind": self.kind, **self.params}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @abstractmethod
    def compute(self, image: np.ndarray | None, row: Row) -> np.ndarray: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.params})"


class FHSource(RegionSource):
    """Felzenszwalb & Huttenlocher (2004) on the full-resolution RGB image, one layer per scale.

    R-MAE §4.1 (after Hénaff et al. 2021): scales {500, 1000, 1500} on COCO and {1000} on ImageNet, each scale
    also being the minimum segment size. ``sigma`` defaults to 0.8: the official preprocessing
    (``create_fh_mask_for_coco.py``) passes only scale and min_size, so skimage's default 0.8 applies,
    which is also the value F&H use in their paper (§5).
    """

    kind = "fh"

    def __init__(
        self,
        name: str = "fh",
        scales: list[float] = (1000,),
        min_sizes: list[int] | None = None,
        sigma: float = 0.8,
    ) -> None:
        super().__init__(name)
        self.scales = [float(s) for s in scales]
        self.min_sizes = [int(m) for m in (min_sizes if min_sizes is not None else self.scales)]
        if not self.scales or len(self.min_sizes) != len(self.scales):
            raise ValueError(
                f"regions.sources.{name}: need one min_size per scale, got {scales} / {min_sizes}"
            )
        self.sigma = float(sigma)

    @property
    def params(self) -> dict[str, Any]:
        return {"scales": self.scales, "min_sizes": self.min_sizes, "sigma": self.sigma}

    @property
    def layers(self) -> list[str]:
        return [f"{s:g}" for s in self.scales]

    def compute(self, image: np.ndarray | None, row: Row) -> np.ndarray:
        from skimage.segmentation import felzenszwalb

        if image is None or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"{row['image_id']}: FH needs an [H, W, 3] image, got {getattr(image, 'shape', None)}"
            )
        maps = [
            felzenszwalb(image, scale=s, sigma=self.sigma, min_size=m).astype(np.int32)
            + 1  # 0 stays "no region"
            for s, m in zip(self.scales, self.min_sizes, strict=True)
        ]
        return np.stack(maps)  # [S, H, W]


class CocoPanopticSource(RegionSource):
    """COCO panoptic ground truth (R-MAE Table 1d): ``panoptic_{split}2017.json`` + its PNG folder.

    PNG pixel -> segment id ``R + 256 G + 256² B``; segments are numbered ``1..n`` in ``segments_info``
    order, id 0 and unlisted ids (void) map to 0. Rows are matched by ``ann_id`` (native COCO image id), else
    by file stem.
    """

    kind = "coco_panoptic"
    needs_image = False

    def __init__(
        self,
        name: str = "panoptic",
        annotations: str = "{root}/annotations/panoptic_{split}2017.json",
        png_dir: str = "{root}/annotations/panoptic_{split}2017",
    ) -> None:
        super().__init__(name)
        self.annotations, self.png_dir = annotations, png_dir
        self._cache: dict[Path, tuple[dict[int, dict], dict[str, dict]]] = {}  # per process, per JSON file

    @property
    def params(self) -> dict[str, Any]:
        return {"annotations": self.annotations, "png_dir": self.png_dir}

    @property
    def layers(self) -> list[str]:
        return ["panoptic"]

    def _annotations(self, path: Path) -> tuple[dict[int, dict], dict[str, dict]]:
        if path not in self._cache:
            if not path.is_file():
                raise FileNotFoundError(f"regions.sources.{self.name}.annotations: {path} does not exist")
            with open(path) as f:
                anns = json.load(f).get("annotations")
            if not isinstance(anns, list):
                raise ValueError(f"{path}: field 'annotations' missing or not a list")
            by_id = {int(a["image_id"]): a for a in anns}
            by_stem = {Path(a["file_name"]).stem: a for a in anns}
            self._cache[path] = (by_id, by_stem)
        return self._cache[path]

    def compute(self, image: np.ndarray | None, row: Row) -> np.ndarray:
        json_path = _fill(self.annotations, row)
        by_id, by_stem = self._annotations(json_path)
        ann = None
        if row.get("ann_id") is not None and not pd.isna(row["ann_id"]):
            ann = by_id.get(int(row["ann_id"]))
        ann = ann or by_stem.get(Path(str(row["path"])).stem)
        if ann is None:
            raise KeyError(
                f"{json_path}: no panoptic annotation for {row['image_id']} (field 'image_id'/'file_name')"
            )
        png = _fill(self.png_dir, row) / ann["file_name"]
        with Image.open(png) as im:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]  # [H, W]
        seg_ids = np.array([int(s["id"]) for s in ann.get("segments_info", [])], dtype=np.int64)
        # sorted lookup: position in segments_info + 1, or 0 when the id is not listed (void)
        order = np.argsort(seg_ids)
        pos = np.searchsorted(seg_ids[order], ids).clip(0, max(len(seg_ids) - 1, 0))
        hit = seg_ids[order][pos] == ids if len(seg_ids) else np.zeros_like(ids, dtype=bool)
        labels = np.where(hit, order[pos] + 1, 0).astype(np.int32)
        _check_hw(labels, row, png, "height/width")
        return labels[None]  # [1, H, W]


class SamSource(RegionSource):
    """Precomputed SAM regions, one ``{folder}/{image file stem}.npz`` per image ({root}, {split} expand).

    The file holds either
      ``masks``:  bool/uint8 ``[N, H, W]``, stacked binary masks (e.g. SAM's automatic mask generator), or
      ``labels``: integer ``[H, W]`` or ``[S, H, W]`` label maps, 0 = no region.
    Overlapping masks are packed greedily, largest first, into as few non-overlapping layers as needed, so
    every mask survives exactly; each layer is a label map ``1..n``.
    """

    kind = "sam"
    needs_image = False

    def __init__(self, name: str = "sam", folder: str = "data/01_raw/sam/{split}") -> None:
        super().__init__(name)
        self.folder = folder

    @property
    def params(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def compute(self, image: np.ndarray | None, row: Row) -> np.ndarray:
        path = _fill(self.folder, row) / f"{Path(str(row['path'])).stem}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no SAM regions for {row['image_id']}")
        with np.load(path, allow_pickle=False) as z:
            if "labels" in z:
                labels = z["labels"].astype(np.int64)
                labels = labels[None] if labels.ndim == 2 else labels
                if labels.ndim != 3 or (labels.size and labels.min() < 0):
                    raise ValueError(f"{path}: field 'labels' must be [H, W] or [S, H, W] with values >= 0")
                out = labels.astype(np.int32)
            elif "masks" in z:
                masks = z["masks"]
                if masks.ndim != 3:
                    raise ValueError(f"{path}: field 'masks' must be [N, H, W], got {masks.shape}")
                out = pack_masks(masks.astype(bool))
            else:
                raise ValueError(f"{path}: needs a field 'masks' or 'labels', has {sorted(z.files)}")
        _check_hw(out, row, path, "masks/labels")
        return out


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Binary masks ``[N, H, W]`` -> label layers ``[S, H, W]``, disjoint per layer (greedy, big first)."""
    n, h, w = masks.shape
    layers: list[np.ndarray] = []
    counts: list[int] = []
    for i in np.argsort(-masks.reshape(n, -1).sum(1), kind="stable"):
        m = masks[i]
        if not m.any():
            continue
        for li, layer in enumerate(layers):
            if not (layer[m] > 0).any():
                counts[li] += 1
                layer[m] = counts[li]
                break
        else:
            layers.append(np.where(m, 1, 0).astype(np.int32))
            counts.append(1)
    return np.stack(layers) if layers else np.zeros((1, h, w), np.int32)


def manifest_hw(row: Row) -> tuple[int, int] | None:
    """The row's ``(height, width)``, or None when the manifest does not give both."""
    hw = (row.get("height"), row.get("width"))
    return None if any(v is None or pd.isna(v) for v in hw) else (int(hw[0]), int(hw[1]))


def _check_hw(maps: np.ndarray, row: Row, path: Path, field: str) -> None:
    want = manifest_hw(row)
    if want is not None and tuple(maps.shape[-2:]) != want:
        raise ValueError(f"{path}: {field} are {maps.shape[-2:]} but the manifest image is {want}")


SOURCE_KINDS: dict[str, type[RegionSource]] = {c.kind: c for c in (FHSource, CocoPanopticSource, SamSource)}


def make_source(name: str, cfg: Mapping[str, Any]) -> RegionSource:
    """Build a source from its parameters block ``regions.sources.<name>`` (``type`` picks the kind)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", name)
    cfg.pop("splits", None)  # selection, not a source parameter
    cfg.pop("sources", None)
    if kind not in SOURCE_KINDS:
        raise ValueError(
            f"regions.sources.{name}.type: unknown {kind!r}, expected one of {sorted(SOURCE_KINDS)}"
        )
    try:
        return SOURCE_KINDS[kind](name, **cfg)
    except TypeError as e:
        raise ValueError(f"regions.sources.{name}: {e}") from None
