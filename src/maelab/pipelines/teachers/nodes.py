"""Nodes of the ``teachers`` pipeline (MR-MAE §3.2, the teacher run once ahead of training).

Each teacher in ``teachers.compute`` is brought up to date in the store by the region store's build
(``maelab.regions.build.build_source``: sharded, incremental, locked, atomic, safe to kill), then, when
``teachers.agreement.images`` > 0, its stored features are compared with the online teacher on the views a
recipe's training makes (``maelab.teachers.store.agreement``); an unchanged store, teacher and view settings
reuse the last measurement (``agreement.json`` in the teacher's folder), so a second run computes nothing.
The report goes to ``teachers_report``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pandas as pd

from maelab.data.manifest import select_rows
from maelab.files import atomic_write_text
from maelab.pipelines.regions.nodes import check_manifest
from maelab.recipes import resolve_recipe
from maelab.regions.build import build_source
from maelab.regions.store import RegionStore
from maelab.teachers.store import TeacherSource, agreement

KEYS = {
    "compute",
    "images",
    "teachers",
    "batch_size",
    "shard_size",
    "workers",
    "device",
    "dtype",
    "prune",
    "progress",
    "agreement",
}
AGREEMENT_KEYS = {"images", "recipe", "seed"}
AGREEMENT_FILE = "agreement.json"  # in the teacher's store folder: the last measurement and what it measured

log = logging.getLogger(__name__)


def check_params(params: dict[str, Any]) -> None:
    """Unknown keys fail at once, naming them (the strict-config rule of ``maelab.schema``)."""
    for key in params:
        if key not in KEYS:
            raise ValueError(f"parameters teachers.{key}: unknown key (allowed: {', '.join(sorted(KEYS))})")
    for key in params.get("agreement") or {}:
        if key not in AGREEMENT_KEYS:
            raise ValueError(
                f"parameters teachers.agreement.{key}: unknown key (allowed: {sorted(AGREEMENT_KEYS)})"
            )


def resolved_teacher(params: dict[str, Any], name: str, env: str | None) -> dict[str, Any]:
    """``teachers.teachers.<name>`` with its registry URI resolved to a local file."""
    from maelab.orchestration.teachers import resolve_weights  # the registry reads conf/

    configured = params.get("teachers") or {}
    if name not in configured:
        raise ValueError(
            f"teachers.compute: {name!r} has no block under teachers.teachers ({sorted(configured)})"
        )
    cfg = dict(configured[name] or {})
    if cfg.get("weights") is not None:
        cfg["weights"] = resolve_weights(cfg["weights"], env)
    return cfg


def compute_teacher_features(
    manifest: pd.DataFrame,
    teacher_store: RegionStore,
    params: dict[str, Any],
    recipes: dict[str, Any],
    recipe_defaults: dict[str, Any],
    run_env: str | None = None,
) -> tuple[RegionStore, dict[str, Any]]:
    """Bring every teacher in ``params["compute"]`` up to date for the selected images; measure agreement.
    Returns the store (written through this handle) and the report."""
    check_params(params)
    check_manifest(manifest)
    images = params.get("images") or {}
    rows = select_rows(manifest, images.get("sources"), images.get("splits"), allow_empty=True)
    report: dict[str, Any] = {"store": str(teacher_store.path), "teachers": {}}
    for name in params.get("compute") or []:
        source = TeacherSource(
            name,
            resolved_teacher(params, name, run_env),
            batch_size=int(params.get("batch_size", 32)),
            device=str(params.get("device") or "cpu"),
            dtype=str(params.get("dtype", "float16")),
        )
        store = teacher_store[name]
        entry = build_source(
            store,
            source,
            rows,
            workers=params.get("workers", 0),
            shard_size=int(params.get("shard_size", 64)),
            codec=teacher_store.codec,
            keep_ids=manifest["image_id"].tolist() if params.get("prune", True) else None,
            progress=bool(params.get("progress", True)),
        )
        check = params.get("agreement") or {}
        if int(check.get("images") or 0) > 0 and len(rows):
            entry["agreement"] = measure(source, store, rows, check, recipes, recipe_defaults)
        report["teachers"][name] = entry
    return teacher_store, report


def measure(
    source: TeacherSource,
    store: Any,
    rows: pd.DataFrame,
    check: dict[str, Any],
    recipes: dict[str, Any],
    recipe_defaults: dict[str, Any],
) -> dict[str, Any]:
    """Agreement of the stored features with the online teacher, on the views recipe ``check["recipe"]``
    trains on (its student grid, input size and crop scale)."""
    name = check.get("recipe", "mrmae")
    recipe = resolve_recipe({"recipes": recipes, "recipe_defaults": recipe_defaults}, name)
    enc = recipe["encoder"]
    size = enc["img_size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    grid = (hw[0] // enc["patch_size"], hw[1] // enc["patch_size"])
    crop_scale = tuple(recipe.get("data", {}).get("crop_scale", (0.2, 1.0)))
    store.refresh()
    index = store.index[["image_id", "content_hash", "fingerprint"]]
    what = [source.fingerprint, check, list(hw), list(grid), list(crop_scale), index.values.tolist()]
    key = hashlib.sha1(json.dumps(what, default=str).encode()).hexdigest()
    cached = store.path / AGREEMENT_FILE
    if cached.is_file():  # the same store, teacher and views as last time: nothing to compute
        previous = json.loads(cached.read_text())
        if previous.get("key") == key:
            log.info("teachers[%s]: agreement unchanged since the last run (%s)", source.name, cached)
            return previous["agreement"]
    out = agreement(
        source.teacher,
        store,
        rows,
        grid,
        hw,
        crop_scale,
        images=int(check["images"]),
        seed=int(check.get("seed", 0)),
        batch_size=source.batch_size,
    )
    result = {"recipe": name, **out}
    atomic_write_text(cached, json.dumps({"key": key, "agreement": result}, indent=1) + "\n")
    return result
