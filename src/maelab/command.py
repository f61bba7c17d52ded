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
    "registry": "maelab.registry:cli",
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

    bench = sub.add_parser("bench", help="throughput benchmarks (medians)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    train = bench_sub.add_parser("train", help="median images/s and peak memory of training steps")
    train.add_argument("--recipe", required=True)
    train.add_argument("--env", default=None)
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--precision", default=None, help="auto | bf16 | fp16 | fp32; several: bf16,fp32")
    train.add_argument("--device", default=None)
    train.add_argument("--json", action="store_true")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    _quiet_env()
    args = build_parser().parse_args(argv)
    key = args.command if args.command != "bench" else f"bench {args.bench}"
    module, func = HANDLERS[key].split(":")
    sys.exit(getattr(importlib.import_module(module), func)(args) or 0)


if __name__ == "__main__":
    main()
