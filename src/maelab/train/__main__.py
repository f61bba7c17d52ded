"""``maelab train`` (or ``python -m maelab.train``) ``--recipe NAME [--env ENV] [--set K=V] [--resume]``.

Runs alone or under ``torchrun --nproc_per_node=N -m maelab.train`` (also multi-node with
``--rdzv-backend=c10d``). The options are ``maelab.train.options.add_train_arguments``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from maelab.config import load_recipe, mlflow_settings
from maelab.recipes import apply_dotlist
from maelab.schema import check_recipe
from maelab.train.options import add_train_arguments


def apply_sets(recipe: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``--set train.steps=10 ...`` applied to the recipe (OmegaConf dotlist; a bad item exits, naming it)."""
    try:
        return apply_dotlist(recipe, sets)
    except ValueError as err:
        raise SystemExit(f"--set {err}") from err


def load_function(spec: str) -> Any:
    """``package.module:function`` -> the function (a plug-in named on the command line)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--pictures {spec!r}: expected an importable MODULE:FUNCTION ({exc})") from exc


def build_parser() -> argparse.ArgumentParser:
    return add_train_arguments(argparse.ArgumentParser(prog="python -m maelab.train", description=__doc__))


def catalog_store(entry: str, source: str, env: str | None) -> str:
    """The folder of ``source`` in the store the catalog's ``entry`` names (region or teacher store)."""
    from maelab.config import load_config, project_root

    root = Path(load_config("catalog", env)[entry]["path"])
    return str((root if root.is_absolute() else project_root() / root) / source)


def main(argv: list[str] | None = None) -> int:
    return cli(build_parser().parse_args(argv))


def cli(args: argparse.Namespace) -> int:
    """Train ``args.recipe`` (or ``args.recipe_file``); rank 0 prints the report as JSON."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    if args.recipe_file:
        recipe = json.loads(Path(args.recipe_file).read_text())
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
    init_from = str(recipe["train"].get("init_from") or "")
    if init_from.startswith("models:/"):  # the engine reads files; the registry lives a layer above
        raise SystemExit(
            f"train.init_from={init_from}: a registry URI; run `maelab train` (it resolves the URI to the "
            "registered full-state file) or give that file's path"
        )

    from maelab.train import distributed
    from maelab.train.data import read_manifest
    from maelab.train.engine import train

    manifest = read_manifest(Path(args.manifest)) if args.manifest else None
    try:
        result = train(
            recipe,
            manifest,
            resume=args.resume or None,
            out_dir=Path(args.out_dir) if args.out_dir else None,
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
