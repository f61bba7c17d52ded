"""COCO-format JSON (instances, LVIS v1, panoptic): load with checks that name the file and the field.

A malformed file raises :class:`AnnotationError` such as
``instances_val2017.json: annotations[12].bbox: expected 4 numbers, got [1, 2]``.
The checks follow the COCO data format (cocodataset.org/#format-data) and LVIS v1 (Gupta et al. 2019, §3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

from maelab.files import atomic_write_text

_NUMBER = (int, float)
MAX_SIDE = 1 << 16  # pixels: larger images (or RLE sizes) are refused before anything is allocated


class AnnotationError(ValueError):
    """A malformed annotation file; the message starts with ``<file>: <field>:``."""


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"{path.name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path.name}: not UTF-8 text ({e.reason})") from None
    except RecursionError:
        raise AnnotationError(f"{path.name}: JSON nested too deeply to read") from None


def write_json(obj: Any, path: str | Path) -> None:
    """Compact JSON, written atomically. ``json.dumps`` (C encoder), not ``json.dump`` (pure Python)."""
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


class _Checker:
    """Small helpers that raise with ``<file>: <where>: <what>``."""

    def __init__(self, name: str):
        self.name = name
        self.context = ""  # e.g. " (annotation id 7)", appended to every message

    def fail(self, where: str, what: str) -> None:
        raise AnnotationError(f"{self.name}: {where}: {what}{self.context}")

    def field(self, obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict):
            self.fail(where, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            self.fail(f"{where}.{key}" if where else key, "missing")
        return obj[key]

    def list_of_dicts(self, data: dict, key: str) -> list[dict]:
        items = self.field(data, key, "")
        if not isinstance(items, list):
            self.fail(key, f"expected a list, got {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                self.fail(f"{key}[{i}]", f"expected an object, got {type(item).__name__}")
        return items

    def int_id(self, obj: dict, key: str, where: str) -> int:
        v = self.field(obj, key, where)
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(f"{where}.{key}", f"expected an integer, got {v!r}")
        return v

    def numbers(self, v: Any, where: str, n: int | None = None) -> list:
        """A list of finite JSON numbers (Python's json accepts ``NaN`` and ``Infinity``: refused here)."""
        ok = isinstance(v, list) and all(type(x) in _NUMBER for x in v)  # JSON numbers: int or float
        if not ok or (n is not None and len(v) != n):
            self.fail(where, f"expected {n if n is not None else 'a list of'} numbers, got {_short(v)}")
        if not all(math.isfinite(x) for x in v):
            self.fail(where, f"non-finite number in {_short(v)}")
        return v

    def within(self, values: list, lo: float, hi: float, where: str, what: str) -> None:
        bad = next((x for x in values if not lo <= x <= hi), None)
        if bad is not None:
            self.fail(where, f"{what} {bad!r} is outside [{lo:g}, {hi:g}]")


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _margin(side: int) -> tuple[float, float]:
    """Coordinates a box or polygon may take along an image side: the image plus one side's slack on each
    end (COCO's own polygons overshoot by a pixel or so). Rasterizing cost grows with the coordinates, so
    this bound is also what keeps pycocotools' memory and time bounded."""
    return -float(side), 2.0 * side


def rle_counts(counts: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools ``rleFrString``: 6-bit chars from ``'0'``,
    5 data bits plus a continuation bit, sign bit on the last char, deltas from the run two back)."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("string ends inside a run length")
            c = ord(counts[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {counts[pos]!r} at {pos}")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"negative run length {value} (run {len(runs)})")
        runs.append(value)
    return runs


def _check_segmentation(c: _Checker, seg: Any, where: str, hw: tuple[int, int]) -> None:
    """Polygons ``[[x1, y1, ...], ...]`` or RLE ``{"size": [h, w], "counts": str | [int]}``."""
    if isinstance(seg, list):
        for j, poly in enumerate(seg):
            c.numbers(poly, f"{where}[{j}]")
            if len(poly) < 6 or len(poly) % 2:
                c.fail(
                    f"{where}[{j}]", f"a polygon needs an even number (>= 6) of coordinates, got {len(poly)}"
                )
            c.within(poly[0::2], *_margin(hw[1]), f"{where}[{j}]", "x")
            c.within(poly[1::2], *_margin(hw[0]), f"{where}[{j}]", "y")
    elif isinstance(seg, dict):
        size = c.field(seg, "size", where)
        c.numbers(size, f"{where}.size", 2)
        if tuple(size) != hw:
            c.fail(f"{where}.size", f"{list(size)} does not match the image's [height, width] {list(hw)}")
        counts = c.field(seg, "counts", where)
        if isinstance(counts, str):
            try:
                runs = rle_counts(counts)
            except ValueError as e:
                c.fail(f"{where}.counts", f"undecodable RLE string: {e}")
        elif isinstance(counts, list):
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in counts):
                c.fail(f"{where}.counts", f"expected non-negative integers, got {_short(counts)}")
            runs = counts
        else:
            c.fail(f"{where}.counts", f"expected a string or a list of integers, got {type(counts).__name__}")
        if sum(runs) != size[0] * size[1]:
            c.fail(f"{where}.counts", f"run lengths sum to {sum(runs)}, not h*w = {size[0] * size[1]}")
    else:
        c.fail(where, f"expected polygons (list) or RLE (object), got {type(seg).__name__}")


def check_relative(c: _Checker, name: str, where: str) -> None:
    """A file name must stay under its root: relative, no ``..`` part, no NUL."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or "\0" in name:
        c.fail(where, f"{name!r} leaves the dataset root (absolute or '..')")


def _check_images(c: _Checker, images: list[dict], lvis: bool) -> dict[int, tuple[int, int]]:
    """Each image's id, file name and size; returns ``{image id: (h, w)}``."""
    sizes: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(images):
        where = f"images[{i}]"
        iid = c.int_id(im, "id", where)
        if iid in sizes:
            c.fail(f"{where}.id", f"duplicate image id {iid}")
        name_key = "coco_url" if lvis and "file_name" not in im else "file_name"
        fname = c.field(im, name_key, where)
        if not isinstance(fname, str) or not fname:
            c.fail(f"{where}.{name_key}", f"expected a non-empty string, got {fname!r}")
        if name_key == "file_name":
            check_relative(c, fname, f"{where}.file_name")
        w, h = (c.field(im, k, where) for k in ("width", "height"))
        for k, v in (("width", w), ("height", h)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_SIDE:
                c.fail(f"{where}.{k}", f"expected a positive integer (at most {MAX_SIDE}), got {v!r}")
        sizes[iid] = (h, w)
    return sizes


def check_instances(data: Any, name: str, lvis: bool = False) -> dict:
    """Validate a COCO instances / LVIS dict; returns it unchanged. ``name`` is the file name for messages."""
    c = _Checker(name)
    if not isinstance(data, dict):
        c.fail("top level", f"expected an object, got {type(data).__name__}")
    images = c.list_of_dicts(data, "images")
    cats = c.list_of_dicts(data, "categories")
    anns = c.list_of_dicts(data, "annotations") if "annotations" in data or lvis else []
    sizes = _check_images(c, images, lvis)
    cat_ids = set()
    for i, cat in enumerate(cats):
        cid = c.int_id(cat, "id", f"categories[{i}]")
        if cid in cat_ids:
            c.fail(f"categories[{i}].id", f"duplicate category id {cid}")
        c.field(cat, "name", f"categories[{i}]")
        cat_ids.add(cid)
    ann_ids = set()
    for i, ann in enumerate(anns):
        where = f"annotations[{i}]"
        aid = c.int_id(ann, "id", where)
        c.context = f" (annotation id {aid})"
        if aid in ann_ids:
            c.fail(f"{where}.id", f"duplicate annotation id {aid}")
        ann_ids.add(aid)
        iid = c.int_id(ann, "image_id", where)
        if iid not in sizes:
            c.fail(f"{where}.image_id", f"{iid} is not in images")
        cid = c.int_id(ann, "category_id", where)
        if cid not in cat_ids:
            c.fail(f"{where}.category_id", f"{cid} is not in categories")
        bbox = c.numbers(c.field(ann, "bbox", where), f"{where}.bbox", 4)
        if bbox[2] < 0 or bbox[3] < 0:
            c.fail(f"{where}.bbox", f"negative width or height in {bbox}")
        h, w = sizes[iid]
        c.within([bbox[0], bbox[0] + bbox[2]], *_margin(w), f"{where}.bbox", "x")
        c.within([bbox[1], bbox[1] + bbox[3]], *_margin(h), f"{where}.bbox", "y")
        if "area" in ann:
            c.numbers([ann["area"]], f"{where}.area", 1)
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            c.fail(f"{where}.iscrowd", f"expected 0 or 1, got {crowd!r}")
        if "segmentation" in ann:
            _check_segmentation(c, ann["segmentation"], f"{where}.segmentation", sizes[iid])
    c.context = ""
    return data


def load_instances(path: str | Path, lvis: bool = False) -> dict:
    """Read and validate a COCO instances (or LVIS, ``lvis=True``) JSON file."""
    path = Path(path)
    return check_instances(read_json(path), path.name, lvis=lvis)


def load_panoptic(path: str | Path) -> dict:
    """Read and validate a COCO panoptic JSON (images, categories, annotations: file_name, segments_info)."""
    path = Path(path)
    data = read_json(path)
    c = _Checker(path.name)
    if not isinstance(data, dict):
        c.fail("top level", f"expected an object, got {type(data).__name__}")
    image_ids = {c.int_id(im, "id", f"images[{i}]") for i, im in enumerate(c.list_of_dicts(data, "images"))}
    cat_ids = {
        c.int_id(cat, "id", f"categories[{i}]") for i, cat in enumerate(c.list_of_dicts(data, "categories"))
    }
    for i, ann in enumerate(c.list_of_dicts(data, "annotations")):
        where = f"annotations[{i}]"
        if c.int_id(ann, "image_id", where) not in image_ids:
            c.fail(f"{where}.image_id", f"{ann['image_id']} is not in images")
        if not isinstance(c.field(ann, "file_name", where), str):
            c.fail(f"{where}.file_name", "expected a string")
        check_relative(c, ann["file_name"], f"{where}.file_name")
        segs = c.field(ann, "segments_info", where)
        if not isinstance(segs, list):
            c.fail(f"{where}.segments_info", f"expected a list, got {type(segs).__name__}")
        for j, seg in enumerate(segs):
            c.int_id(seg, "id", f"{where}.segments_info[{j}]")
            if "bbox" in seg:
                box = c.numbers(seg["bbox"], f"{where}.segments_info[{j}].bbox", 4)
                c.within(box, -float(MAX_SIDE), 2.0 * MAX_SIDE, f"{where}.segments_info[{j}].bbox", "value")
            if "area" in seg:
                c.numbers([seg["area"]], f"{where}.segments_info[{j}].area", 1)
            if c.int_id(seg, "category_id", f"{where}.segments_info[{j}]") not in cat_ids:
                c.fail(
                    f"{where}.segments_info[{j}].category_id", f"{seg['category_id']} is not in categories"
                )
    return data
