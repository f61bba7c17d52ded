"""maelab: masked-autoencoder pre-training, transfer and analysis on the Kedro project in this directory.

Pipelines run with `kedro run --pipelines=NAME [--env ENV]` (see `kedro registry list`); this command
trains one recipe, prints the resolved config, benchmarks, and manages encoders. Config comes from
conf/base, then conf/<env>, then conf/local (machine-local paths and URIs, read over every env).
Shell completion: `eval "$(maelab completion bash)"` (or zsh).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from maelab.train.options import ENV_HELP, add_train_arguments

# subcommand -> "module:function"; the function takes the parsed argparse.Namespace and returns an exit code
HANDLERS = {
    "train": "maelab.command:train_cli",
    "config": "maelab.config:cli",
    "flops": "maelab.analysis.flops:cli",
    "bench train": "maelab.analysis.bench:train_cli",
    "bench regions": "maelab.regions.bench:cli",
    "bench data": "maelab.data.bench:cli",
    "registry": "maelab.orchestration.registry:cli",
    "export": "maelab.transfer.export:cli",
    "segment": "maelab.analysis.interactive:cli",
    "segment-eval": "maelab.analysis.interactive:eval_cli",
    "completion": "maelab.command:completion_cli",
    "serve": "maelab.serve.app:cli",
    "analyze relations": "maelab.analysis.relations:relations_cli",
}
JSON_HELP = "print one JSON object instead of a table"


def _quiet_env() -> None:
    for key, value in {
        "KEDRO_DISABLE_TELEMETRY": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }.items():
        os.environ.setdefault(key, value)


def _sub(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maelab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_train_arguments(
        _sub(sub, "train", "pre-train one recipe (alone, or under torchrun for several GPUs)")
    )

    config = _sub(sub, "config", "print the resolved parameters (conf/base + conf/<env> + conf/local)")
    config.add_argument("keys", nargs="*", metavar="KEY", help="top-level keys to print (default: all)")
    config.add_argument("--env", default=None, help=ENV_HELP)
    config.add_argument("--out", default=None, help="write the YAML to this file instead of stdout")

    flops = _sub(sub, "flops", "multiply-accumulates of one training forward (fvcore convention)")
    flops.add_argument("--recipe", required=True, help="recipe name")
    flops.add_argument("--env", default=None, help=ENV_HELP)
    flops.add_argument("--json", action="store_true", help=JSON_HELP)
    flops.add_argument(
        "--parts", action="store_true", help="also split the count by encoder / head sub-module"
    )

    bench = _sub(sub, "bench", "throughput benchmarks (medians)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    train = _sub(bench_sub, "train", "median images/s and peak memory of training steps")
    train.add_argument("--recipe", required=True, help="recipe name")
    train.add_argument("--env", default=None, help=ENV_HELP)
    train.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    train.add_argument("--batch-size", type=int, default=None, help="default: the recipe's train.batch_size")
    train.add_argument(
        "--precision",
        default=None,
        help="auto | bf16 | fp16 | fp32, each optionally +compile, +ac=full|selective, +fsdp; several: "
        "fp32,bf16,bf16+compile",
    )
    train.add_argument(
        "--isolate", action="store_true", help="each variant in its own process (fair CPU peak memory)"
    )
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the best available)")
    train.add_argument(
        "--against", default=None, help="a second recipe run side by side at the same image size (e.g. mae)"
    )
    train.add_argument("--json", action="store_true", help=JSON_HELP)
    train.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="edit the recipe"
    )
    data = _sub(bench_sub, "data", "images/s per worker core of each decode path, cores per GPU")
    data.add_argument("--images", type=int, default=64, help="JPEGs to decode per round")
    data.add_argument("--size", default="640x480", help="WxH of the generated JPEGs")
    data.add_argument("--crop", type=int, default=224, help="side of the training crop, px")
    data.add_argument("--rounds", type=int, default=3, help="timed rounds per path (median)")
    data.add_argument("--jpeg-dir", default=None, help="measure these JPEGs instead of generated ones")
    data.add_argument("--rate", type=float, action="append", help="training images/s of one GPU (repeatable)")
    data.add_argument("--json", action="store_true", help=JSON_HELP)
    regions = _sub(bench_sub, "regions", "region store throughput and overhead over felzenszwalb")
    regions.add_argument("--env", default=None, help=ENV_HELP)
    regions.add_argument("--images", type=int, default=8, help="images to time")
    regions.add_argument("--json", action="store_true", help=JSON_HELP)

    registry = _sub(sub, "registry", "MLflow model registry: registered encoders and their aliases")
    reg_sub = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    _sub(reg_sub, "list", "every registered encoder with its versions and aliases")
    get = _sub(reg_sub, "get", "one version's run, source and tags")
    get.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    promote = _sub(reg_sub, "promote", "point an alias (e.g. champion) at a version")
    promote.add_argument("name", help="registered model name, e.g. maelab-mae-vit_tiny")
    promote.add_argument("version", help="version number")
    promote.add_argument("alias", help="alias to set, e.g. champion")

    export = _sub(sub, "export", "write an encoder in timm's or detectron2 ViTDet's key layout")
    export.add_argument("--encoder", required=True, help="safetensors path, models:/NAME@ALIAS or runs:/...")
    export.add_argument("--format", choices=["timm", "detectron2"], default="timm", help="key layout")
    export.add_argument("--out", required=True, help="output file")
    export.add_argument("--env", default=None, help=ENV_HELP)

    seg = _sub(sub, "segment", "interactive segmentation with a pre-trained R-MAE (paper §4.2)")
    seg.add_argument("--recipe", default=None, help="recipe of a checkpoint file (a models:/ state has one)")
    seg.add_argument("--env", default=None, help=ENV_HELP)
    seg.add_argument(
        "--checkpoint", required=True, help="checkpoint.pt, or a registered full state models:/NAME@ALIAS"
    )
    seg.add_argument("--image", required=True, help="image file")
    seg.add_argument("--patches", required=True, help="prompt patch indices, raster order: i,j,...")
    seg.add_argument("--negative", default="", help="background patch indices")
    seg.add_argument(
        "--image-visible", choices=["all", "prompt"], default="all", help="image patches the decoder sees"
    )
    seg.add_argument("--out", required=True, help="PNG of the predicted region")

    ev = _sub(sub, "segment-eval", "interactive-segmentation IoU against the prompt-union baseline")
    ev.add_argument("--recipe", required=True, help="the R-MAE recipe the checkpoint was trained with")
    ev.add_argument("--env", default=None, help=ENV_HELP)
    ev.add_argument("--checkpoint", required=True, help="model.safetensors or checkpoint.pt of that recipe")
    ev.add_argument(
        "--annotations", default="data/03_primary/instances_scenes_val.json", help="COCO instances JSON"
    )
    ev.add_argument("--root", default="data/01_raw/scenes", help="folder the annotations' file names are in")
    ev.add_argument("--kind", choices=["clicks", "reveal"], default="clicks", help="how prompts are drawn")
    ev.add_argument("--amount", type=float, default=2, help="clicks per object, or the revealed fraction")
    ev.add_argument(
        "--image-visible", choices=["all", "prompt"], default="all", help="image patches the decoder sees"
    )
    ev.add_argument("--limit", type=int, default=100, help="at most this many images")
    ev.add_argument("--seed", type=int, default=0, help="seed of the prompt draws")
    ev.add_argument("--json", action="store_true", help=JSON_HELP)

    completion = _sub(sub, "completion", "print a shell completion script")
    completion.add_argument("shell", choices=["bash", "zsh"], help='e.g. eval "$(maelab completion bash)"')

    serve = _sub(sub, "serve", "a web page for interactive R-MAE segmentation from the registry")
    serve.add_argument("--env", default=None, help=ENV_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME@ALIAS to offer (repeatable; default: every "
        "alias of a registered model whose full state has a region head)",
    )
    serve.add_argument("--manifest", default=None, help="manifest whose held-out images to offer")
    serve.add_argument("--max-upload-mb", type=float, default=8.0, help="largest upload accepted, in MB")

    analyze = _sub(sub, "analyze", "analyses of pre-trained checkpoints")
    analyze_sub = analyze.add_subparsers(dest="analyze", required=True, metavar="ANALYSIS")
    rel = _sub(
        analyze_sub,
        "relations",
        "self-guided MAE's token-relation metrics (σ_F, σ_S, distance, NMI, variance, KL)",
    )
    rel.add_argument("--checkpoint", required=True, action="append", help="repeat, in training order")
    rel.add_argument("--recipe", default=None, help="default: the recipe the training checkpoint carries")
    rel.add_argument("--env", default=None, help=ENV_HELP)
    rel.add_argument("--images", required=True, nargs="+", help="image files or folders")
    rel.add_argument("--limit", type=int, default=16, help="at most this many images")
    rel.add_argument("--seed", type=int, default=0, help="seed of the decoder's random mask plan")
    rel.add_argument("--out", required=True, help="folder for relations.json and relations.png")
    rel.add_argument(
        "--tracking-uri", default=None, help="log both to MLflow (e.g. sqlite:///mlruns/mlflow.db)"
    )
    rel.add_argument("--experiment", default="maelab-analysis", help="MLflow experiment of the analysis run")
    return parser


def completion_cli(args: argparse.Namespace) -> int:
    """``maelab completion bash|zsh``: the completion script of this parser (generated by shtab)."""
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def train_cli(args: argparse.Namespace) -> int:
    """``maelab train``: ``python -m maelab.train``'s CLI, after resolving ``--set
    train.init_from=models:/NAME@ALIAS`` to the registered full-state file (the engine reads files only)."""
    from maelab.train.__main__ import cli

    sets = []
    for edit in args.sets:
        key, _, value = edit.partition("=")
        if key.strip() == "train.init_from" and value.strip().startswith("models:/"):
            from maelab.orchestration.registry import resolve_init_from

            uri = value.strip()
            train = resolve_init_from({"train": {"init_from": uri}}, args.env)["train"]
            sets += [f"train.init_from={train['init_from']}", f"train.init_from_uri={uri}"]
        else:
            sets.append(edit)
    args.sets = sets
    return cli(args)


def main(argv: list[str] | None = None) -> None:
    _quiet_env()
    args = build_parser().parse_args(argv)
    key = args.command
    if key in ("bench", "analyze"):  # two-word subcommands: "bench train", "analyze relations"
        key = f"{key} {getattr(args, key)}"
    module, func = HANDLERS[key].split(":")
    sys.exit(getattr(importlib.import_module(module), func)(args) or 0)


if __name__ == "__main__":
    main()
