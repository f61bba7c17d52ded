"""The embedded ``scenes`` dataset: synthetic images for detection, segmentation and classification.

Each image holds 1-6 objects from :data:`CATEGORIES`, which differ by SHAPE only. Colour, texture, size
and rotation are drawn independently of the category, so no cue but shape gives the class away.
Objects are painted in order on a textured background; later ones occlude earlier ones, and every
annotation describes the VISIBLE part. Objects left with fewer than ``min_visible`` pixels are removed
before painting, so every painted object is annotated.

Everything is a function of ``(seed, split, index)``: the same config writes the same bytes.

On-disk layout under ``root`` (COCO-like)::

    images/<split>/<index:06d>.jpg         RGB image, size x size
    masks/<split>/<index:06d>.png          semantic mask, uint8: 0 = background, k = category id (1..C)
    annotations/instances_<split>.json     COCO instances: RLE of visible parts, iscrowd=0
    .scenes_stamp.json                     params hash; generation is skipped when it matches

Image-level class (``images[].scene_class`` in the JSON, the manifest's ``label``), by ``label``:

- ``dominant`` (the embedded default): one large SUBJECT per image (radius ``subject_min_scale`` to
  ``subject_max_scale``, centred in the middle 40% of the image, painted last so nothing occludes it)
  among ``min_objects - 1`` to ``max_objects - 1`` smaller distractors (``min_scale`` to ``max_scale``).
  The class is the subject's category. Detection and segmentation still annotate every instance. A small
  CNN learns this label to well above chance in a few hundred steps.
- ``largest_area`` (generator version 1): the category covering the largest visible area in the image
  (summed over its instances; ties -> the smaller category id). At CPU budgets, nothing learns it above
  about 15% (10 classes): telling the largest of 1-6 occluded, textured shapes apart is too hard.

``label`` = category id - 1, ``label_name`` = the category name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maelab.data.cocojson import write_json
from maelab.files import atomic_write_text
from maelab.pools import worker_pool
from maelab.progress import track

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: the ``dominant`` label (subject + distractors); ``largest_area`` draws as in 1
LABELS = ("largest_area", "dominant")
STAMP = ".scenes_stamp.json"
CATEGORIES = (
    "disc",
    "ellipse",
    "square",
    "triangle",
    "hexagon",
    "star",
    "ring",
    "cross",
    "crescent",
    "heart",
)
TEXTURES = ("solid", "stripes", "checks", "noise")


@dataclass(frozen=True)
class ScenesConfig:
    seed: int = 0
    size: int = 128  # images are size x size
    splits: dict[str, int] = field(default_factory=lambda: {"train": 2000, "val": 400})
    min_objects: int = 1
    max_objects: int = 6
    min_scale: float = 0.07  # object radius / size (radius of the area-equivalent disc)
    max_scale: float = 0.22
    min_visible: int = 24  # pixels; smaller visible parts are removed before painting
    image_format: str = "jpg"  # jpg | png
    jpeg_quality: int = 95
    label: str = "largest_area"  # largest_area | dominant (see the module docstring)
    subject_min_scale: float = 0.18  # dominant: the subject's radius / size
    subject_max_scale: float = 0.3

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ScenesConfig:
        """From an ``ingest.sources[]`` entry; non-generation keys (type, root, ...) are ignored."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        cfg = cls(**known)
        if not 1 <= cfg.min_objects <= cfg.max_objects:
            raise ValueError(
                f"scenes: need 1 <= min_objects <= max_objects, got {cfg.min_objects}, {cfg.max_objects}"
            )
        if cfg.image_format not in ("jpg", "png"):
            raise ValueError(f"scenes: image_format must be jpg or png, got {cfg.image_format!r}")
        if cfg.label not in LABELS:
            raise ValueError(f"scenes: label must be one of {LABELS}, got {cfg.label!r}")
        if not 0 < cfg.subject_min_scale <= cfg.subject_max_scale:
            raise ValueError(
                f"scenes: need 0 < subject_min_scale <= subject_max_scale, got "
                f"{cfg.subject_min_scale}, {cfg.subject_max_scale}"
            )
        if cfg.size < 16:
            raise ValueError(f"scenes: size must be >= 16, got {cfg.size}")
        return cfg

    def digest(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- shapes
def _polar_polygon(u: np.ndarray, v: np.ndarray, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Inside test for a polygon star-shaped around the origin, with vertices at (radius, angle)."""
    angles = np.mod(angles, 2 * np.pi)
    order = np.argsort(angles)
    radii, angles = radii[order], angles[order]
    rho, phi = np.hypot(u, v), np.mod(np.arctan2(v, u), 2 * np.pi)
    phi = np.where(phi < angles[0], phi + 2 * np.pi, phi)  # measure from the first vertex
    a = np.append(angles, angles[0] + 2 * np.pi)
    r = np.append(radii, radii[0])
    k = np.clip(np.searchsorted(a, phi, side="right") - 1, 0, len(angles) - 1)  # edge index per pixel
    ax, ay = r[k] * np.cos(a[k]), r[k] * np.sin(a[k])
    bx, by = r[k + 1] * np.cos(a[k + 1]), r[k + 1] * np.sin(a[k + 1])
    ex, ey = bx - ax, by - ay
    dx, dy = np.cos(phi), np.sin(phi)
    # the ray t*(dx, dy) meets the edge A + s*(B - A) at t = (A x E) / (d x E)
    t = (ax * ey - ay * ex) / (dx * ey - dy * ex)
    return rho <= t


def _regular(n: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    return np.ones(n), offset + np.arange(n) * 2 * np.pi / n


def _star(points: int = 5, inner: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    radii = np.tile([1.0, inner], points)
    return radii, np.arange(2 * points) * np.pi / points


def shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in its own frame (u right, v down, extent about [-1, 1])."""
    rho2 = u * u + v * v
    if name == "disc":
        return rho2 <= 1.0
    if name == "ellipse":
        return u * u + (v / 0.5) ** 2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        return _polar_polygon(u, v, *_regular(3, -np.pi / 2))
    if name == "hexagon":
        return _polar_polygon(u, v, *_regular(6))
    if name == "star":
        return _polar_polygon(u, v, *_star())
    if name == "ring":
        return (rho2 <= 1.0) & (rho2 >= 0.55**2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "crescent":
        return (rho2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.8**2)
    if name == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise KeyError(f"unknown shape {name!r}")


@cache
def _area_scale(name: str) -> float:
    """Factor that gives every shape the area of the unit disc, so size does not hint at the category."""
    g = ((np.arange(320) + 0.5) / 160 - 1.0) * 1.6  # covers [-1.6, 1.6]
    u, v = np.meshgrid(g, g)
    area = shape_mask(name, u, v).sum() * (3.2 / 320) ** 2
    return math.sqrt(math.pi / area)


# ----------------------------------------------------------------------------------------- textures
def _texture(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, base: np.ndarray, contrast: float
) -> np.ndarray:
    """``[..., 3]`` float texture at pixel coordinates ``xx, yy`` (any shape) around colour ``base``:
    solid, stripes, checks or noise, drawn uniformly."""
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    other = np.clip(base + rng.choice([-1, 1], 3) * contrast * rng.uniform(0.5, 1.0, 3), 0, 255)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 12.0)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "solid":
        return np.broadcast_to(base, (*xx.shape, 3)).astype(np.float32)
    if kind == "stripes":
        sel = np.floor(t / period) % 2 == 0
    elif kind == "checks":
        s = -xx * math.sin(angle) + yy * math.cos(angle)
        sel = (np.floor(t / period) + np.floor(s / period)) % 2 == 0
    else:  # noise: per-pixel grain around the base colour
        return base + rng.normal(0.0, contrast * 0.35, (*xx.shape, 1)).astype(np.float32)
    return np.where(sel[..., None], base, other).astype(np.float32)


def _colour(rng: np.random.Generator, avoid: np.ndarray | None = None, min_dist: float = 70.0) -> np.ndarray:
    """Uniform RGB, at least ``min_dist`` away from ``avoid`` (so objects stand out from the background)."""
    for _ in range(32):
        c = rng.uniform(0, 255, 3)
        if avoid is None or np.linalg.norm(c - avoid) >= min_dist:
            break
    return c.astype(np.float32)


# ------------------------------------------------------------------------------------------- render
def render(cfg: ScenesConfig, split: str, index: int) -> dict[str, Any]:
    """Draw one scene. Returns ``image [S, S, 3] uint8``, ``semantic [S, S] uint8``, ``objects`` in
    painting order (``category_id``, visible ``mask [S, S] bool``, ``full_area`` before occlusion,
    ``subject``) and ``scene_class`` (the image-level category id, by ``cfg.label``)."""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), index])
    S = cfg.size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5  # pixel centres, [S, S] each
    bg_base = rng.uniform(0, 255, 3).astype(np.float32)
    canvas = _texture(rng, xx, yy, bg_base, contrast=rng.uniform(10, 40)).copy()  # [S, S, 3]

    # 1. draw each object's parameters and full mask (computed inside its bounding square only)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    # dominant: the last object is the subject (large, central, painted on top)
    objs = []
    for k in range(n):
        subject = cfg.label == "dominant" and k == n - 1
        cat = int(rng.integers(len(CATEGORIES)))
        lo, hi = (cfg.subject_min_scale, cfg.subject_max_scale) if subject else (cfg.min_scale, cfg.max_scale)
        radius = S * rng.uniform(lo, hi)
        theta = rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(0.3 * S, 0.7 * S, 2) if subject else rng.uniform(0.1 * S, 0.9 * S, 2)
        r = radius * _area_scale(CATEGORIES[cat])
        reach = 1.2 * r  # every shape lies within 1.2 of its unit frame
        y0, y1 = max(0, int(cy - reach)), min(S, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(S, int(cx + reach) + 1)
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = (dx * math.cos(theta) + dy * math.sin(theta)) / r
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) / r
        full = np.zeros((S, S), bool)
        full[y0:y1, x0:x1] = shape_mask(CATEGORIES[cat], u, v)
        objs.append({"cat": cat, "full": full, "rng": rng.spawn(1)[0], "subject": subject})

    # 2. visibility: later objects cover earlier ones; drop objects with too little left (then recompute)
    while True:
        owner = np.full((S, S), -1, np.int16)
        for k, o in enumerate(objs):
            owner[o["full"]] = k
        areas = np.bincount(owner[owner >= 0].ravel(), minlength=len(objs))
        small = [k for k in range(len(objs)) if areas[k] < cfg.min_visible]
        if not small:
            break
        if len(small) == len(objs):  # tiny images: keep the most visible object, so a scene is never empty
            small = [k for k in small if k != int(areas.argmax())]
            if not small:  # only that object is left: keep it even below min_visible
                break
        objs = [o for k, o in enumerate(objs) if k not in small]

    # 3. paint (colour, texture and contrast independent of the category) and label the visible pixels
    semantic = np.zeros((S, S), np.uint8)
    objects = []
    for k, o in enumerate(objs):
        visible = owner == k
        if not visible.any():
            continue
        orng = o["rng"]
        colour = _colour(orng, avoid=bg_base)
        canvas[visible] = _texture(orng, xx[visible], yy[visible], colour, contrast=orng.uniform(20, 70))
        semantic[visible] = o["cat"] + 1
        objects.append(
            {
                "category_id": o["cat"] + 1,
                "mask": visible,
                "full_area": int(o["full"].sum()),
                "subject": o["subject"],
            }
        )
    image = np.clip(canvas, 0, 255).round().astype(np.uint8)
    subjects = [o["category_id"] for o in objects if o["subject"]]
    label = subjects[0] if subjects else scene_class(objects)  # the subject is on top: always visible
    return {"image": image, "semantic": semantic, "objects": objects, "scene_class": label}


def scene_class(objects: list[dict]) -> int:
    """The category id with the largest visible area (ties -> smaller id)."""
    totals: dict[int, int] = {}
    for o in objects:
        totals[o["category_id"]] = totals.get(o["category_id"], 0) + int(o["mask"].sum())
    return min(totals, key=lambda c: (-totals[c], c))


def _write_one(job: tuple[ScenesConfig, str, str, int]) -> dict[str, Any]:
    """Render and write one scene; return its COCO image entry and annotations (ids assigned later)."""
    cfg, root, split, index = job
    scene = render(cfg, split, index)
    stem = f"{index:06d}"
    img_rel = f"images/{split}/{stem}.{cfg.image_format}"
    mask_rel = f"masks/{split}/{stem}.png"
    kwargs = {"quality": cfg.jpeg_quality} if cfg.image_format == "jpg" else {}
    Image.fromarray(scene["image"]).save(Path(root) / img_rel, **kwargs)
    Image.fromarray(scene["semantic"], mode="L").save(Path(root) / mask_rel)
    anns = []
    for o in scene["objects"]:
        rle = mask_utils.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
        anns.append(
            {
                "category_id": o["category_id"],
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
                "area": int(o["mask"].sum()),
                "bbox": [float(x) for x in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    image = {
        "id": index + 1,
        "file_name": f"{stem}.{cfg.image_format}",
        "width": cfg.size,
        "height": cfg.size,
        "scene_class": scene["scene_class"],
        "semantic_mask": mask_rel,
    }
    return {"image": image, "annotations": anns}


def _stamp_ok(root: Path, cfg: ScenesConfig) -> bool:
    stamp = root / STAMP
    if not stamp.exists():
        return False
    try:
        info = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("digest") != cfg.digest():
        return False
    return all((root / f).exists() for f in info.get("files", []))


def generate(root: str | Path, cfg: ScenesConfig, workers: int = 2) -> dict[str, Any]:
    """Write the dataset under ``root`` unless a stamp with the same params hash says it is already there.

    Returns ``{"generated": bool, "images": n, "seconds": t}``.
    """
    root = Path(root)
    t0 = time.perf_counter()
    n_total = sum(cfg.splits.values())
    if _stamp_ok(root, cfg):
        log.info("scenes: %s is up to date (%d images), skipping generation", root, n_total)
        return {"generated": False, "images": n_total, "seconds": 0.0}
    for sub in ("images", "masks", "annotations"):  # our own output folders: start clean
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / STAMP).unlink(missing_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)]
    for name in CATEGORIES:  # fill the cache before forking, so workers inherit it
        _area_scale(name)
    jobs = [(cfg, str(root), split, i) for split, count in cfg.splits.items() for i in range(count)]
    for split in cfg.splits:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    bar = dict(total=len(jobs), desc="scenes", unit="img", mininterval=0.5)
    if workers <= 1 or len(jobs) < 64:
        results = [_write_one(j) for j in track(jobs, **bar)]
    else:
        with worker_pool(workers) as pool:
            chunk = max(1, min(32, len(jobs) // (workers * 8)))
            results = list(track(pool.map(_write_one, jobs, chunksize=chunk), **bar))
    files = []
    for split in cfg.splits:
        split_results = [res for job, res in zip(jobs, results, strict=True) if job[2] == split]
        images, annotations = [], []
        for res in split_results:
            images.append(res["image"])
            for ann in res["annotations"]:
                annotations.append({"id": len(annotations) + 1, "image_id": res["image"]["id"], **ann})
        ann_rel = f"annotations/instances_{split}.json"
        info = {
            "description": "maelab scenes (synthetic)",
            "version": GENERATOR_VERSION,
            "seed": cfg.seed,
            "label": cfg.label,
        }
        coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
        write_json(coco, root / ann_rel)
        files += [ann_rel] + [f"images/{split}/{im['file_name']}" for im in images]
        files += [im["semantic_mask"] for im in images]
    stamp = {"digest": cfg.digest(), "version": GENERATOR_VERSION, "config": asdict(cfg), "files": files}
    atomic_write_text(root / STAMP, json.dumps(stamp))
    seconds = time.perf_counter() - t0
    log.info(
        "scenes: generated %d images in %.1f s (%.0f images/s)",
        n_total,
        seconds,
        n_total / max(seconds, 1e-9),
    )
    return {"generated": True, "images": n_total, "seconds": round(seconds, 3)}
