"""Image sources, each read from its real on-disk layout into candidate manifest rows (+ COCO-format JSON).

``ingest.sources`` is a list of ``{type, root, [name], [splits], ...}``; :func:`read_source` dispatches on
``type``. ``root`` is kept as configured in the manifest; relative roots resolve against the project root.
Every reader returns a :class:`Listing`; nothing is decoded here (see ``maelab.data.decode``).

Layouts (what each reader expects under ``root``):

- ``scenes``: written by :mod:`maelab.data.scenes` (``images/<split>/``, ``masks/<split>/``).
- ``coco``: ``train2017/``, ``val2017/``, ``unlabeled2017/``, ``annotations/instances_<split>2017.json``
  (``image_info_unlabeled2017.json`` when present, else the folder is listed), and, when present,
  ``annotations/panoptic_<split>2017.json`` + ``annotations/panoptic_<split>2017/*.png``.
- ``lvis``: LVIS v1 ``lvis_v1_<split>.json`` (in ``annotations``, default ``<root>/annotations``); the
  images are COCO's, found under ``root`` from each image's ``coco_url`` (``.../train2017/000000391895.jpg``).
- ``imagefolder``: ``<split>/<class>/*`` (``train/n01440764/*.JPEG``); classes = sorted train folders.
- ``ade20k``: ``[ADEChallengeData2016/]images/{training,validation}/*.jpg`` + ``annotations/.../*.png``
  (+ ``sceneCategories.txt`` as the image-level label when present).
- ``flowers102``: ``jpg/image_XXXXX.jpg`` + ``imagelabels.mat`` (``labels``, 1-based) + ``setid.mat``
  (``trnid``/``valid``/``tstid``, 1-based image numbers).
- ``photos``: any folder of images (one split, no labels); the default copies a few from ``skimage.data``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maelab.data.cocojson import AnnotationError, load_instances, load_panoptic
from maelab.data.decode import is_image_name
from maelab.data.scenes import ScenesConfig
from maelab.paths import project_root

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "unlabeled")


@dataclass
class Listing:
    """Candidate rows of one source (manifest columns minus the decoded ones, plus absolute ``file`` and
    ``mask_file``, the JSON's ``json_width``/``json_height`` where stated, and ``reject``: a reason to
    quarantine the file unread, e.g. a name that is not UTF-8) and its COCO-format JSON."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    # output stem (e.g. "instances_coco_val") -> {"source", "split", "root", "kind", "data"}
    annotations: dict[str, dict[str, Any]] = field(default_factory=dict)
    _bases: dict[str, Path] = field(default_factory=dict, repr=False)  # resolved roots

    def add(
        self,
        cfg: dict,
        split: str,
        native_id: str | int,
        path: str,
        label: int | None = None,
        label_name: str | None = None,
        mask_path: str | None = None,
        ann_id: int | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        if str(cfg["root"]) not in self._bases:
            self._bases[str(cfg["root"])] = resolve_root(cfg["root"])
        base = self._bases[str(cfg["root"])]
        # a name that is not valid UTF-8 cannot enter a manifest (pyarrow): shown escaped, rejected by name
        reject = None if printable(path) == path else "file name is not valid UTF-8"
        native_id, path = printable(str(native_id)), printable(path)
        file = str(base / path)
        label_name = None if label_name is None else printable(label_name)
        self.rows.append(
            {
                "image_id": f"{source_name(cfg)}:{split}:{native_id}",
                "source": source_name(cfg),
                "split": split,
                "root": str(cfg["root"]),
                "path": path,
                "label": label,
                "label_name": label_name,
                "mask_path": mask_path,
                "ann_id": ann_id,
                "file": file,
                "mask_file": None if mask_path is None else str(base / mask_path),
                "json_width": None if size is None else size[0],
                "json_height": None if size is None else size[1],
                "reject": reject,
            }
        )

    def add_annotations(self, cfg: dict, split: str, kind: str, data: dict) -> None:
        key = f"{kind}_{source_name(cfg)}_{split}"
        self.annotations[key] = {
            "source": source_name(cfg),
            "split": split,
            "root": str(cfg["root"]),
            "kind": kind,
            "data": data,
        }


def printable(name: str) -> str:
    """A file name as valid UTF-8: bytes that are not (kept by Python as surrogates) shown as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def same_files(files: list[str]) -> dict[int, int]:
    """``{i: j}`` for each ``files[i]`` that is the same file as an earlier ``files[j]`` (same device and
    inode: hard links and symlinks included); missing files are skipped."""
    first: dict[tuple[int, int], int] = {}
    out = {}
    for i, f in enumerate(files):
        try:
            st = os.stat(f)
        except (OSError, ValueError):
            continue
        j = first.setdefault((st.st_dev, st.st_ino), i)
        if j != i:
            out[i] = j
    return out


def source_name(cfg: dict) -> str:
    return str(cfg.get("name") or cfg["type"])


def resolve_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    return root if root.is_absolute() else project_root() / root


def _need_dir(cfg: dict, path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{source_name(cfg)} source: {what} {path} not found (set `root` of this source in "
            f"conf/local/parameters_ingest.yml, read over every env: base, coco, imagenet, ...)"
        )
    return path


def _list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, sorted), relative to it, as posix strings."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        out += [(rel / f).as_posix() for f in sorted(filenames) if is_image_name(f) and not f.startswith(".")]
    return out


def _wanted(cfg: dict, available: list[str]) -> list[str]:
    """``cfg["splits"]`` (checked against ``available``) or every available split."""
    splits = cfg.get("splits")
    if splits is None:
        return available
    splits = list(splits)
    for s in splits:
        if s not in available:
            raise FileNotFoundError(
                f"{source_name(cfg)} source: split {s!r} not found under {cfg['root']} (found {available})"
            )
    return splits


# ------------------------------------------------------------------------------------------ readers
def read_scenes(cfg: dict) -> Listing:
    root, out = resolve_root(cfg["root"]), Listing()
    for split in ScenesConfig.from_params(cfg).splits:
        data = load_instances(root / "annotations" / f"instances_{split}.json")
        names = {c["id"]: c["name"] for c in data["categories"]}
        for i, im in enumerate(data["images"]):
            cls = im.get("scene_class")
            if cls not in names:
                raise AnnotationError(
                    f"instances_{split}.json: images[{i}].scene_class: {cls!r} is not a category"
                )
            out.add(
                cfg,
                split,
                im["id"],
                f"images/{split}/{im['file_name']}",
                label=cls - 1,
                label_name=names[cls],
                mask_path=im.get("semantic_mask"),
                ann_id=im["id"],
                size=(im["width"], im["height"]),
            )
        out.add_annotations(cfg, split, "instances", data)
    return out


def read_coco(cfg: dict) -> Listing:
    root, out = _need_dir(cfg, resolve_root(cfg["root"]), "root"), Listing()
    year = str(cfg.get("year", 2017))
    ann_dir = root / "annotations"
    present = [
        s
        for s in ("train", "val", "unlabeled", "test")
        if (root / f"{s}{year}").is_dir() or (ann_dir / f"instances_{s}{year}.json").exists()
    ]
    if not present:
        raise FileNotFoundError(f"coco source: no train{year}/, val{year}/ or unlabeled{year}/ under {root}")
    for split in _wanted(cfg, present):
        folder = f"{split}{year}"
        inst, info = ann_dir / f"instances_{folder}.json", ann_dir / f"image_info_{folder}.json"
        if inst.exists() or info.exists():
            data = load_instances(inst if inst.exists() else info)
            for im in data["images"]:
                size = (im["width"], im["height"])
                out.add(cfg, split, im["id"], f"{folder}/{im['file_name']}", ann_id=im["id"], size=size)
            if inst.exists():
                out.add_annotations(cfg, split, "instances", data)
        else:  # e.g. unlabeled2017 without its image_info json: list the folder, ids from the file names
            for rel in _list_images(root / folder):
                stem = Path(rel).stem
                out.add(cfg, split, stem, f"{folder}/{rel}", ann_id=int(stem) if stem.isdigit() else None)
        pan_json, pan_dir = ann_dir / f"panoptic_{folder}.json", ann_dir / f"panoptic_{folder}"
        if cfg.get("panoptic", True) and pan_json.exists() and pan_dir.is_dir():
            pan = load_panoptic(pan_json)
            for ann in pan["annotations"]:  # PNG paths relative to the source root
                ann["file_name"] = f"annotations/panoptic_{folder}/{ann['file_name']}"
            out.add_annotations(cfg, split, "panoptic", pan)
    return out


def _lvis_relpath(im: dict) -> str:
    """``train2017/000000391895.jpg`` from an LVIS v1 image's ``coco_url`` (or its ``file_name``)."""
    if "coco_url" in im:
        return "/".join(str(im["coco_url"]).rstrip("/").split("/")[-2:])
    return str(im["file_name"])


def read_lvis(cfg: dict) -> Listing:
    root, out = _need_dir(cfg, resolve_root(cfg["root"]), "image root"), Listing()
    ann_dir = resolve_root(cfg["annotations"]) if cfg.get("annotations") else root / "annotations"
    files = {s: ann_dir / f"lvis_v1_{s}.json" for s in ("train", "val")}
    files.update({s: resolve_root(p) for s, p in (cfg.get("files") or {}).items()})
    present = [s for s, p in files.items() if p.exists()]
    if not present:
        raise FileNotFoundError(f"lvis source: no lvis_v1_train.json or lvis_v1_val.json in {ann_dir}")
    for split in _wanted(cfg, present):
        data = load_instances(files[split], lvis=True)
        for im in data["images"]:
            rel = _lvis_relpath(im)
            im["file_name"] = rel
            out.add(cfg, split, im["id"], rel, ann_id=im["id"], size=(im["width"], im["height"]))
        out.add_annotations(cfg, split, "instances", data)
    return out


def _class_names(cfg: dict) -> dict[str, str]:
    """Optional ``class_names`` file: ``<folder> <name...>`` per line (ImageNet's LOC_synset_mapping.txt)."""
    if not cfg.get("class_names"):
        return {}
    path = resolve_root(cfg["class_names"])
    names = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            key, _, name = line.strip().partition(" ")
            if not name:
                raise ValueError(f"{path.name}: line {n}: expected '<folder> <name>', got {line!r}")
            names[key] = name.split(",")[0].strip()
    return names


def _class_dirs(split_dir: Path) -> list[Path]:
    """Class folders of a split, sorted: real directories (not symlinks) with at least one image."""
    found = []
    for d in sorted(split_dir.iterdir()):
        if d.is_symlink():
            log.warning("imagefolder source: %s is a symlink; not followed", printable(str(d)))
        elif d.is_dir() and not d.name.startswith(".") and _list_images(d):
            found.append(d)
    return found


def read_imagefolder(cfg: dict) -> Listing:
    root, out = _need_dir(cfg, resolve_root(cfg["root"]), "root"), Listing()
    folders = cfg.get("split_dirs") or {s: s for s in SPLITS if (root / s).is_dir()}
    splits = _wanted(cfg, list(folders))
    if not splits:
        raise FileNotFoundError(f"imagefolder source: no train/ or val/ folder under {root}")
    class_split = "train" if "train" in folders else splits[0]
    # a class is a real folder (a symlinked one, e.g. ``loop -> .``, is skipped) holding at least one image
    classes = sorted(d.name for d in _class_dirs(_need_dir(cfg, root / folders[class_split], "split")))
    if not classes:
        raise FileNotFoundError(f"imagefolder source: no class folders in {root / folders[class_split]}")
    index, names = {c: i for i, c in enumerate(classes)}, _class_names(cfg)
    for split in splits:
        base = _need_dir(cfg, root / folders[split], "split")
        for d in _class_dirs(base):
            if d.name not in index:
                raise ValueError(
                    f"imagefolder source: {folders[split]}/{d.name} is not a class of {class_split}/"
                )
            for rel in _list_images(d):
                path = f"{folders[split]}/{d.name}/{rel}"
                out.add(
                    cfg,
                    split,
                    f"{d.name}/{rel}",
                    path,
                    label=index[d.name],
                    label_name=names.get(d.name, d.name),
                )
    return out


def read_ade20k(cfg: dict) -> Listing:
    root, out = _need_dir(cfg, resolve_root(cfg["root"]), "root"), Listing()
    prefix = "ADEChallengeData2016/" if (root / "ADEChallengeData2016").is_dir() else ""
    base = root / prefix
    folders = {"train": "training", "val": "validation"}
    present = [s for s, f in folders.items() if (base / "images" / f).is_dir()]
    if not present:
        raise FileNotFoundError(f"ade20k source: no images/training or images/validation under {base}")
    scenes: dict[str, str] = {}
    if (base / "sceneCategories.txt").exists():
        for line in (base / "sceneCategories.txt").read_text().splitlines():
            if line.strip():
                stem, _, scene = line.strip().partition(" ")
                scenes[stem] = scene.strip()
    scene_index = {s: i for i, s in enumerate(sorted(set(scenes.values())))}
    for split in _wanted(cfg, present):
        f = folders[split]
        for rel in _list_images(base / "images" / f):
            stem = Path(rel).with_suffix("").as_posix()
            scene = scenes.get(Path(rel).stem)
            out.add(
                cfg,
                split,
                stem,
                f"{prefix}images/{f}/{rel}",
                label=scene_index.get(scene) if scene else None,
                label_name=scene,
                mask_path=f"{prefix}annotations/{f}/{stem}.png",  # a missing mask is quarantined by decode
            )
    return out


def _mat_vector(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"flowers102 source: {path} not found") from None
    except Exception as e:
        raise AnnotationError(f"{path.name}: not a readable .mat file ({e})") from None
    if key not in mat:
        raise AnnotationError(
            f"{path.name}: {key}: missing (found {sorted(k for k in mat if not k.startswith('__'))})"
        )
    v = np.asarray(mat[key]).ravel()
    if v.size == 0 or not np.issubdtype(v.dtype, np.number) or np.any(v != np.round(v)) or v.min() < 1:
        raise AnnotationError(f"{path.name}: {key}: expected positive integers (1-based), got {v[:5]!r}")
    return v.astype(np.int64)


def read_flowers102(cfg: dict) -> Listing:
    root, out = _need_dir(cfg, resolve_root(cfg["root"]), "root"), Listing()
    labels = _mat_vector(root / "imagelabels.mat", "labels")  # [N], 1-based class per image
    names = list(
        cfg.get("class_names") or []
    )  # optional: 102 names in label order (the .mat files have none)
    keys = {"train": "trnid", "val": "valid", "test": "tstid"}
    for split in _wanted(cfg, list(keys)):
        ids = _mat_vector(root / "setid.mat", keys[split])  # 1-based image numbers
        if ids.max() > len(labels):
            raise AnnotationError(f"setid.mat: {keys[split]}: image {ids.max()} > {len(labels)} labels")
        for i in ids:
            label = int(labels[i - 1]) - 1
            name = names[label] if label < len(names) else None
            out.add(cfg, split, int(i), f"jpg/image_{i:05d}.jpg", label=label, label_name=name)
    return out


def read_photos(cfg: dict) -> Listing:
    root, out = _need_dir(cfg, resolve_root(cfg["root"]), "root"), Listing()
    split = str(cfg.get("split", "unlabeled"))
    if split not in SPLITS:
        raise ValueError(f"{source_name(cfg)} source: split must be one of {SPLITS}, got {split!r}")
    for rel in _list_images(root):
        out.add(cfg, split, rel, rel)
    return out


READERS: dict[str, Callable[[dict], Listing]] = {
    "scenes": read_scenes,
    "coco": read_coco,
    "lvis": read_lvis,
    "imagefolder": read_imagefolder,
    "ade20k": read_ade20k,
    "flowers102": read_flowers102,
    "photos": read_photos,
}


def read_source(cfg: dict) -> Listing:
    """Dispatch on ``cfg["type"]``."""
    if not isinstance(cfg, dict) or "type" not in cfg or "root" not in cfg:
        raise ValueError(f"ingest.sources: every source needs `type` and `root`, got {cfg!r}")
    if cfg["type"] not in READERS:
        raise ValueError(f"ingest.sources: unknown type {cfg['type']!r}; known: {sorted(READERS)}")
    return READERS[cfg["type"]](cfg)


def instances_file(source: str, split: str, base: str | Path = "data/03_primary") -> Path:
    """Where ingest writes a detection source's COCO instances: image ids = the manifest's ``ann_id``,
    ``file_name`` = the manifest's ``path`` (relative to the source root, also in ``info.maelab_root``)."""
    return Path(base) / f"instances_{source}_{split}.json"
