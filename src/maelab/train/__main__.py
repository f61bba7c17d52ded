"""``python -m maelab.train --recipe NAME [--env ENV] [--set train.steps=10 ...] [--resume]``.

Runs alone or under ``torchrun --nproc_per_node=N`` (also multi-node with ``--rdzv-backend=c10d``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from maelab.config import load_recipe, mlflow_settings
from maelab.schema import check_recipe


def apply_sets(recipe: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``train.steps=10`` -> ``recipe["train"]["steps"] = 10`` (values parsed as YAML)."""
    for item in sets:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY.PATH=VALUE")
        key, raw = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {item!r}: {part!r} is not a mapping in the recipe")
        node[leaf] = yaml.safe_load(raw)
    return recipe


def load_function(spec: str) -> Any:
    """``package.module:function`` -> the function (a plug-in named on the command line)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--pictures {spec!r}: expected an importable MODULE:FUNCTION ({exc})") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maelab.train", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="recipe name in parameters_pretrain.yml")
    src.add_argument(
        "--recipe-file", type=Path, help="a resolved recipe as JSON (what the Kedro node passes)"
    )
    p.add_argument("--env", default=None, help="Kedro config env (imagenet, coco, local)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--manifest", type=Path, default=None, help="manifest parquet (default: data.manifest)")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop after this global step (keeps the schedule)"
    )
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument(
        "--pictures",
        default=None,
        metavar="MODULE:FUNCTION",
        help="pictures to log, e.g. maelab.analysis.viz:training_pictures",
    )
    return p


def catalog_store(entry: str, source: str, env: str | None) -> str:
    """The folder of ``source`` in the store the catalog's ``entry`` names (region or teacher store)."""
    from maelab.config import load_config, project_root

    root = Path(load_config("catalog", env)[entry]["path"])
    return str((root if root.is_absolute() else project_root() / root) / source)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    if args.recipe_file:
        recipe = json.loads(args.recipe_file.read_text())
    else:
        recipe = load_recipe(args.recipe, args.env)
    recipe = apply_sets(recipe, args.sets)
    regions = recipe.get("data", {}).get("regions")
    if regions and not regions.get("store"):  # outside Kedro: the folder of the catalog's region_store
        regions["store"] = catalog_store("region_store", regions.get("source", "fh"), args.env)
    teacher = recipe.get("data", {}).get("teacher") or {}
    if teacher.get("mode") == "store" and not teacher.get("store"):  # the catalog's teacher_store
        teacher["store"] = catalog_store("teacher_store", str(teacher.get("source")), args.env)
    check_recipe(recipe)  # a misspelt --set key or an out-of-range value stops here, naming it

    from maelab.train import distributed
    from maelab.train.data import read_manifest
    from maelab.train.engine import train

    manifest = read_manifest(args.manifest) if args.manifest else None
    try:
        result = train(
            recipe,
            manifest,
            resume=args.resume or None,
            out_dir=args.out_dir,
            stop_after=args.stop_after,
            mlflow=None if args.no_mlflow else mlflow_settings(args.env),
            pictures=load_function(args.pictures) if args.pictures else None,
        )
    finally:
        distributed.cleanup()
    if rank == 0:
        print(json.dumps(result.report()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
