"""The options of ``maelab train`` and ``python -m maelab.train`` (which torchrun launches): argparse only,
so ``maelab --help`` stays fast."""

from __future__ import annotations

import argparse

ENV_HELP = "Kedro config env over conf/base (imagenet, coco, ade20k, benchmark); default: conf/local only"


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``maelab train`` (also ``python -m maelab.train``, which torchrun launches)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="recipe name in conf/*/parameters_pretrain.yml (e.g. mae, rmae)")
    src.add_argument(
        "--recipe-file", help="a resolved recipe as JSON (what the Kedro node passes to torchrun)"
    )
    p.add_argument("--env", default=None, help=ENV_HELP)
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe value, OmegaConf dotlist syntax (train.steps=10, masker.ratio=0.6); "
        "repeatable; an unknown key stops before any work",
    )
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/<recipe>/checkpoint.pt")
    p.add_argument("--manifest", default=None, help="manifest parquet (default: the recipe's data.manifest)")
    p.add_argument("--out-dir", default=None, help="folder for checkpoint.pt and encoder.safetensors")
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop after this global step (keeps the LR schedule)"
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not track the run in MLflow")
    p.add_argument(
        "--pictures",
        default=None,
        metavar="MODULE:FUNCTION",
        help="pictures to log, e.g. maelab.analysis.viz:training_pictures",
    )
    return p
