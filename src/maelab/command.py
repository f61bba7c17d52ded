"""The ``maelab`` command. Each subcommand lives next to the code it drives; this file only parses."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> "module:function"; the function takes the parsed argparse.Namespace and returns an exit code
HANDLERS = {
    "flops": "maelab.analysis.flops:cli",
    "bench train": "maelab.analysis.bench:train_cli",
    "bench regions": "maelab.regions.bench:cli",
    "bench data": "maelab.data.bench:cli",
    "registry": "maelab.orchestration.registry:cli",
    "export": "maelab.transfer.export:cli",
    "segment": "maelab.analysis.interactive:cli",
    "segment-eval": "maelab.analysis.interactive:eval_cli",
}


def _quiet_env() -> None:
    for key, value in {
        "KEDRO_DISABLE_TELEMETRY": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }.items():
        os.environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maelab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    flops = sub.add_parser("flops", help="multiply-accumulates of one training forward (fvcore convention)")
    flops.add_argument("--recipe", required=True)
    flops.add_argument("--env", default=None, help="Kedro config env, e.g. imagenet")
    flops.add_argument("--json", action="store_true")
    flops.add_argument(
        "--parts", action="store_true", help="also split the count by encoder / head sub-module"
    )

    bench = sub.add_parser("bench", help="throughput benchmarks (medians)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    train = bench_sub.add_parser("train", help="median images/s and peak memory of training steps")
    train.add_argument("--recipe", required=True)
    train.add_argument("--env", default=None)
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument(
        "--precision",
        default=None,
        help="auto | bf16 | fp16 | fp32, each optionally +compile, +ac=full|selective, +fsdp; several: "
        "fp32,bf16,bf16+compile",
    )
    train.add_argument(
        "--isolate", action="store_true", help="each variant in its own process (fair CPU peak memory)"
    )
    train.add_argument("--device", default=None)
    train.add_argument(
        "--against", default=None, help="a second recipe run side by side at the same image size (e.g. mae)"
    )
    train.add_argument("--json", action="store_true")
    data = bench_sub.add_parser("data", help="images/s per worker core of each decode path, cores per GPU")
    data.add_argument("--images", type=int, default=64)
    data.add_argument("--size", default="640x480", help="WxH of the generated JPEGs")
    data.add_argument("--crop", type=int, default=224)
    data.add_argument("--rounds", type=int, default=3)
    data.add_argument("--jpeg-dir", default=None, help="measure these JPEGs instead of generated ones")
    data.add_argument("--rate", type=float, action="append", help="training images/s of one GPU (repeatable)")
    data.add_argument("--json", action="store_true")
    regions = bench_sub.add_parser("regions", help="region store throughput and overhead over felzenszwalb")
    regions.add_argument("--env", default=None)
    regions.add_argument("--images", type=int, default=8)
    regions.add_argument("--json", action="store_true")

    registry = sub.add_parser("registry", help="MLflow model registry")
    reg_sub = registry.add_subparsers(dest="action", required=True)
    reg_sub.add_parser("list")
    get = reg_sub.add_parser("get")
    get.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    promote = reg_sub.add_parser("promote")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("alias")

    export = sub.add_parser("export", help="write an encoder in timm's or detectron2 ViTDet's key layout")
    export.add_argument("--encoder", required=True, help="safetensors path, models:/NAME@ALIAS or runs:/...")
    export.add_argument("--format", choices=["timm", "detectron2"], default="timm")
    export.add_argument("--out", required=True)
    export.add_argument("--env", default=None)

    seg = sub.add_parser("segment", help="interactive segmentation with a pre-trained R-MAE (paper §4.2)")
    seg.add_argument("--recipe", required=True)
    seg.add_argument("--env", default=None)
    seg.add_argument("--checkpoint", required=True)
    seg.add_argument("--image", required=True)
    seg.add_argument("--patches", required=True, help="prompt patch indices, raster order: i,j,...")
    seg.add_argument("--negative", default="", help="background patch indices")
    seg.add_argument("--image-visible", choices=["all", "prompt"], default="all")
    seg.add_argument("--out", required=True, help="PNG of the predicted region")

    ev = sub.add_parser("segment-eval", help="interactive-segmentation IoU against the prompt-union baseline")
    ev.add_argument("--recipe", required=True)
    ev.add_argument("--env", default=None)
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--annotations", default="data/03_primary/instances_scenes_val.json")
    ev.add_argument("--root", default="data/01_raw/scenes")
    ev.add_argument("--kind", choices=["clicks", "reveal"], default="clicks")
    ev.add_argument("--amount", type=float, default=2)
    ev.add_argument("--image-visible", choices=["all", "prompt"], default="all")
    ev.add_argument("--limit", type=int, default=100)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    _quiet_env()
    args = build_parser().parse_args(argv)
    key = args.command if args.command != "bench" else f"bench {args.bench}"
    module, func = HANDLERS[key].split(":")
    sys.exit(getattr(importlib.import_module(module), func)(args) or 0)


if __name__ == "__main__":
    main()
