"""The teacher-feature store: a frozen teacher's dense patch features of every image, computed once
(MR-MAE §3.2 with the teacher run ahead of training), read back in training with each view's crop and flip.

Layout and machinery are the region store's (``maelab.regions.store`` / ``maelab.regions.build``), one
folder per teacher under the catalog path (``data/04_feature/teachers/<name>``): ``meta.json``,
``index.parquet`` and content-named shards, written atomically under the store's lock, incremental by
``(image_id, content_hash, fingerprint)`` and safe to kill (a killed build leaves whole shards that are
indexed or unreferenced; the next run computes the rest and removes the strays). A record is one image's
features ``[C, h, w]`` in float16 (codec ``raw``).

What is stored. The teacher sees the whole image, resized (aspect not kept) to its own input size with the
training view's resize (``View.apply``: bicubic, antialiased, then clamped and ImageNet-normalised), so the
stored ``[C, h, w]`` map covers the full image extent on the teacher's patch grid. That resolution is fixed
per teacher: ``teacher.img_size / teacher.patch_size`` (14x14 for CLIP ViT-B/16, 8x8 for the tiny MAE).

Reading back (:func:`resample_view`). A training view is a crop box of the source image, resized to the
student's input and maybe flipped. Each student patch centre, mapped back into source pixels, is sampled
bilinearly from the stored map (``grid_sample``, ``align_corners=False``, border clamp: the convention of
:func:`maelab.teachers.base.resample_tokens`), then the flip is applied. For the identity view at the
teacher's own size this returns the online features exactly; for a crop it differs from the online teacher,
which sees the crop alone at full resolution (other context, other scale): :func:`agreement` measures it.

The fingerprint of a stored teacher hashes its architecture keys and the SHA-256 of its weights file, so a
new registry version (a new champion) makes every record stale, and a recipe whose teacher differs from the
stored one is refused at start.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from maelab.data.decode import load_rgb
from maelab.data.manifest import image_path
from maelab.data.view import IMAGENET_MEAN, IMAGENET_STD, View
from maelab.models.heads.mimic import store_fed_head, stored_features_key
from maelab.regions.sources import RegionSource, manifest_hw
from maelab.regions.store import SourceStore
from maelab.teachers.base import Grid, Teacher
from maelab.teachers.build import build_teacher, local_weights

STORE_CODEC = "raw"  # float16 features: lzma/zlib save ~10 % at many times the cost
DTYPES = ("float16", "float32")


@cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # noqa: ARG001 - size/mtime key the cache
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(path: str | None) -> str:
    """SHA-256 of a weights file (``"random"`` for an untrained teacher); cached per (path, size, mtime)."""
    if path is None:
        return "random"
    st = os.stat(path)
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def teacher_fingerprint(cfg: Mapping[str, Any], where: str = "teacher") -> tuple[str, dict[str, Any]]:
    """``(fingerprint, params)`` of a teacher config whose weights are a local file (or ``random``): the
    architecture keys plus the weights' SHA-256 (a file's path does not matter, its bytes do)."""
    params = {k: v for k, v in dict(cfg).items() if k != "weights"}
    params["weights_sha256"] = weights_digest(local_weights(cfg.get("weights"), f"{where}.weights"))
    blob = json.dumps({"kind": "teacher", **params}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16], params


def load_view_image(row: Mapping[str, Any], view: View) -> Tensor:
    """``[3, H, W]`` ImageNet-normalised: the row's image through ``view`` exactly as pre-training makes a
    sample (``maelab.train.data.PretrainDataset``), decode errors naming the file."""
    path = image_path(row)
    try:
        arr = np.asarray(load_rgb(path))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"teachers: {path} (image_id {row['image_id']}): cannot decode: {exc}") from exc
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    img = view.apply(img, mode="bicubic").clamp_(0.0, 1.0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img - mean) / std


def full_view(src_hw: tuple[int, int], size: Grid) -> View:
    """The whole image resized to ``size`` (no crop, no flip): what the store's teacher sees."""
    return View(0, 0, int(src_hw[0]), int(src_hw[1]), (int(size[0]), int(size[1])), False)


class TeacherSource(RegionSource):
    """A teacher as a store source: ``compute_batch(rows)`` -> one ``[C, h, w]`` float16 map per row.

    ``cfg``: the teacher config (``maelab.teachers.build_teacher``) with its weights already a local file.
    The model is built lazily (once per process), so the source pickles into pool workers as its config.
    """

    kind = "teacher"
    store_kind = "teachers"  # the build's progress label

    def __init__(
        self,
        name: str,
        cfg: Mapping[str, Any],
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str = "float16",
        teacher: Teacher | None = None,
    ) -> None:
        super().__init__(name)
        if dtype not in DTYPES:
            raise ValueError(f"teachers.dtype {dtype!r}: choose one of {DTYPES}")
        if batch_size < 1:
            raise ValueError(f"teachers.batch_size must be >= 1, got {batch_size}")
        self.cfg, self.batch_size, self.device, self.dtype = dict(cfg), int(batch_size), device, dtype
        self._fingerprint, self._params = teacher_fingerprint(self.cfg, f"teachers.teachers.{name}")
        self._teacher = teacher

    @property
    def params(self) -> dict[str, Any]:
        return {**self._params, "dtype": self.dtype}

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"fp": self._fingerprint, "dtype": self.dtype}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = build_teacher(dict(self.cfg), where=f"teachers.teachers.{self.name}")
        return self._teacher.to(self.device)

    def compute(self, image: Any, row: Mapping[str, Any]) -> np.ndarray:
        return self.compute_batch([dict(row)])[0]

    def compute_batch(self, rows: list[dict[str, Any]]) -> list[np.ndarray]:
        """``[C, h, w]`` features of each row's whole image, run ``batch_size`` images at a time."""
        teacher = self.teacher
        out: list[np.ndarray] = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            images = torch.stack(
                [load_view_image(r, full_view(source_hw(r), teacher.img_size)) for r in chunk]
            )
            feats = teacher(images.to(self.device)).features  # [B, h*w, C] on the teacher's grid
            h, w = teacher.grid
            maps = feats.transpose(1, 2).reshape(len(chunk), -1, h, w)  # [B, C, h, w]
            out.extend(m for m in maps.to(getattr(torch, self.dtype)).cpu().numpy())
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_teacher": None}  # workers build their own teacher


def source_hw(row: Mapping[str, Any]) -> tuple[int, int]:
    """The row's image size from the manifest (its ``height``/``width`` fields)."""
    hw = manifest_hw(row)
    if hw is None:
        raise ValueError(
            f"manifest row {row.get('image_id')!r}: fields 'height'/'width' are needed for teachers"
        )
    return hw


def resample_view(features: Tensor, view: View, src_hw: tuple[int, int], grid: Grid) -> Tensor:
    """A stored ``[C, h, w]`` map (the whole image) -> ``[gh*gw, C]`` on the student's ``grid`` for ``view``:
    bilinear samples at the student's patch centres mapped into the source image, then the view's flip."""
    src_h, src_w = (float(s) for s in src_hw)
    gh, gw = int(grid[0]), int(grid[1])
    ys = view.top + (torch.arange(gh, dtype=torch.float64) + 0.5) * view.height / gh  # source pixels
    xs = view.left + (torch.arange(gw, dtype=torch.float64) + 0.5) * view.width / gw
    gy, gx = torch.meshgrid(ys / src_h * 2 - 1, xs / src_w * 2 - 1, indexing="ij")  # [-1, 1] = image edges
    where = torch.stack([gx, gy], dim=-1).float()[None]  # [1, gh, gw, 2] as (x, y)
    out = F.grid_sample(
        features[None].float(), where, mode="bilinear", padding_mode="border", align_corners=False
    )[0]  # [C, gh, gw]
    if view.flip:
        out = out.flip(-1)
    return out.flatten(1).transpose(0, 1)  # [gh*gw, C]


class TeacherExtra:
    """Sample extra (``data.teacher.mode: store``): ``sample[key]`` = the stored features of the sample's
    image under its view, ``[L, C]`` on the student's grid (float16, as stored; the head computes in fp32)."""

    def __init__(self, store: SourceStore | str | Path, grid: Grid, key: str) -> None:
        self.store = store if isinstance(store, SourceStore) else SourceStore(store)
        self.grid, self.key = (int(grid[0]), int(grid[1])), key

    def __call__(
        self, sample: dict[str, Any], row: Mapping[str, Any], view: View, generator: torch.Generator
    ) -> None:
        stored = torch.from_numpy(np.array(self.store.get(str(row["image_id"]))))  # [C, h, w]
        sample[self.key] = resample_view(stored, view, source_hw(row), self.grid).to(stored.dtype)


def check_store_matches(store: SourceStore, cfg: Mapping[str, Any], where: str) -> None:
    """The store was built by this very teacher (same architecture keys and weights bytes), else fail."""
    meta = store.meta
    if not meta:
        raise FileNotFoundError(
            f"{store.meta_path}: no teacher-feature store here; run `kedro run --pipelines=teachers` first"
        )
    stored = {k: v for k, v in (meta.get("params") or {}).items() if k != "dtype"}
    fingerprint, params = teacher_fingerprint(cfg, where)
    if _plain(stored) != _plain(params):
        raise ValueError(
            f"{store.meta_path}: the store holds another teacher ({stored}) than the recipe's {where} "
            f"({params}, fingerprint {fingerprint}); rebuild it with `kedro run --pipelines=teachers`"
        )


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def extra_from_params(params: Mapping[str, Any], recipe: Mapping[str, Any]) -> TeacherExtra:
    """``data.teacher`` (mode store) -> the extra, after checking the store holds the head's teacher."""
    head = store_fed_head(dict(recipe.get("heads") or {}), params.get("head"))
    cfg = recipe["heads"][head]["teacher"]
    if not params.get("store"):
        raise ValueError(
            "recipe data.teacher: field 'store' (the teacher store folder) is not set; run through the Kedro "
            "pretrain pipeline, which reads it from the teacher_store dataset"
        )
    store = SourceStore(params["store"])
    check_store_matches(store, cfg, f"heads.{head}.teacher")
    enc = recipe["encoder"]
    size = enc["img_size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    grid = (hw[0] // enc["patch_size"], hw[1] // enc["patch_size"])
    return TeacherExtra(store, grid, stored_features_key(head))


def _centre(maps: Tensor) -> Tensor:
    """[B, L, C] minus each map's mean over its L patches."""
    maps = maps.float()
    return maps - maps.mean(dim=1, keepdim=True)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)  # [..., L]


@torch.no_grad()
def agreement(
    teacher: Teacher,
    store: SourceStore,
    rows: pd.DataFrame,
    grid: Grid,
    size: Grid,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    images: int = 64,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Mean cosine over patches between the store's features (resampled per view) and the online teacher on
    the same views at the student's ``size``/``grid``: ``views`` = training views (RandomResizedCrop with
    ``crop_scale`` and a random flip, seeded), ``identity`` = the whole image unflipped, ``wrong_flip`` =
    the whole image with the store read mirrored (a control: it must be clearly lower).

    ``mean_cosine`` compares the raw features; ``mean_cosine_centred`` first subtracts each map's mean over
    its patches (a feature all patches share, e.g. a flat background's, lifts the raw cosine of any pairing,
    the wrong flip's included; the centred one says whether the *spatial* pattern agrees)."""
    rows = rows.sort_values("image_id", kind="stable").reset_index(drop=True)
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    g = torch.Generator().manual_seed(seed + 1)
    sums: dict[str, list[Tensor]] = {"views": [], "identity": [], "wrong_flip": []}
    centred: dict[str, list[Tensor]] = {kind: [] for kind in sums}
    for i in range(0, len(pick), batch_size):
        chunk = [rows.iloc[j].to_dict() for j in pick[i : i + batch_size]]
        for kind in sums:
            views = []
            for r in chunk:
                hw = source_hw(r)
                if kind == "views":
                    views.append(View.random_resized_crop(hw, tuple(size), tuple(crop_scale), generator=g))
                else:
                    views.append(full_view(hw, size))
            images_t = torch.stack([load_view_image(r, v) for r, v in zip(chunk, views, strict=True)])
            online = teacher.dense(images_t, grid)[0]  # [B, L, C]
            stored = []
            for r, v in zip(chunk, views, strict=True):
                read = (
                    View(v.top, v.left, v.height, v.width, v.size, not v.flip) if kind == "wrong_flip" else v
                )
                feats = torch.from_numpy(np.array(store.get(str(r["image_id"]))))
                stored.append(resample_view(feats, read, source_hw(r), grid))
            stored_t = torch.stack(stored)  # [B, L, C]
            sums[kind].append(_cosine(online, stored_t).flatten())
            centred[kind].append(_cosine(_centre(online), _centre(stored_t)).flatten())
    out: dict[str, Any] = {"images": len(pick), "grid": list(grid), "size": list(size), "seed": seed}
    for kind, parts in sums.items():
        cos = torch.cat(parts)
        out[kind] = {
            "mean_cosine": round(float(cos.mean()), 5),
            "min_cosine": round(float(cos.min()), 5),
            "mean_cosine_centred": round(float(torch.cat(centred[kind]).mean()), 5),
        }
    return out
