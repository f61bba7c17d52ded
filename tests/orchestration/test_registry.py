"""Registry against a local sqlite store: names, first-champion rule, promotion only if better, URIs, CLI."""

from __future__ import annotations

import argparse

import pytest
from safetensors.torch import load_file

from maelab.command import build_parser
from maelab.orchestration import registry
from maelab.orchestration.decision import read_decisions
from maelab.orchestration.retrain import compare_and_promote


def test_arch_name():
    assert registry.arch_name({"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 12}) == "vit-t8-64"
    assert (
        registry.arch_name({"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 6}) == "vit-t8-64-d6"
    )
    assert (
        registry.arch_name({"img_size": [224, 224], "patch_size": 16, "embed_dim": 768, "depth": 12})
        == "vit-b16-224"
    )
    assert (
        registry.arch_name({"img_size": 32, "patch_size": 4, "embed_dim": 256, "depth": 4})
        == "vit-w256p4-32-d4"
    )
    with pytest.raises(KeyError, match="patch_size"):
        registry.arch_name({"img_size": 64, "embed_dim": 192, "depth": 12})


def test_register_first_is_champion_then_promote_only_if_better(fake_run, mlflow_home):
    log = mlflow_home / "data" / "08_reporting" / "retrain_decisions.jsonl"
    run1, enc1 = fake_run(1)
    v1 = registry.register_encoder(run1, enc1, "rmae")
    name = "maelab-rmae-vit-t8-64"
    assert v1 == 1 and registry.register_encoder(run1, enc1, "rmae") == 1  # idempotent per run
    assert int(registry.get_version(f"{name}@champion").version) == 1
    assert int(registry.get_version(f"{name}@candidate").version) == 1
    first = read_decisions(log)[-1]
    assert (first["action"], first["source"], first["candidate_version"]) == ("promote", "register", 1)
    assert registry.client().get_model_version(name, "1").tags["decision.action"] == "promote"
    rec = compare_and_promote(name, v1, 0.40)
    assert rec.action == "keep" and registry.get_metric(name, 1, "linear_top1") == 0.40

    # a better candidate is promoted
    run2, enc2 = fake_run(2)
    v2 = registry.register_encoder(run2, enc2, "rmae")
    assert v2 == 2 and int(registry.get_version(f"{name}@champion").version) == 1  # not before evaluation
    rec = compare_and_promote(name, v2, 0.45)
    assert rec.action == "promote" and rec.champion_version == 1
    assert int(registry.get_version(f"{name}@champion").version) == 2

    # a worse one stays candidate only
    run3, enc3 = fake_run(3, log=False)  # the run never logged its encoder: register_encoder logs it
    v3 = registry.register_encoder(run3, enc3, "rmae")
    rec = compare_and_promote(name, v3, 0.44)
    assert rec.action == "keep" and "not higher" in rec.reason
    assert int(registry.get_version(f"{name}@champion").version) == 2
    assert int(registry.get_version(f"{name}@candidate").version) == 3
    tags = registry.client().get_model_version(name, "3").tags
    assert tags["decision.action"] == "keep" and tags["metric.linear_top1"] == "0.44"
    assert [r["action"] for r in read_decisions(log)] == ["promote", "keep", "promote", "keep"]

    # every URI form resolves to a local safetensors with the right weights
    for uri, enc in [
        (f"models:/{name}@champion", enc2),
        (f"models:/{name}/3", enc3),
        (f"runs:/{run1}/encoder/encoder.safetensors", enc1),
        (str(enc1), enc1),
        (f"file://{enc2}", enc2),
    ]:
        got = registry.resolve_encoder(uri, cache_dir=mlflow_home / "cache")
        assert got.is_file(), uri
        assert load_file(str(got))["w"].equal(load_file(str(enc))["w"]), uri
    with pytest.raises(LookupError, match="nope"):
        registry.resolve_encoder("models:/nope@champion")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        registry.resolve_encoder(mlflow_home / "missing.safetensors")


def test_cli_list_get_promote(fake_run, capsys):
    run1, enc1 = fake_run(1)
    run2, enc2 = fake_run(2, cfg={"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 6})
    registry.register_encoder(run1, enc1, "mae")
    registry.register_encoder(run2, enc2, "mae")  # other arch: another model, champion of its own
    parser = build_parser()

    def run(*argv: str) -> tuple[int, str]:
        code = registry.cli(parser.parse_args(["registry", *argv]))
        return code, capsys.readouterr().out

    code, out = run("list")
    assert (
        code == 0
        and "maelab-mae-vit-t8-64\tv1\tcandidate,champion" in out
        and "maelab-mae-vit-t8-64-d6" in out
    )
    code, out = run("get", "maelab-mae-vit-t8-64-d6@champion")
    assert code == 0 and "version: 1\n" in out
    path = out.split("path: ")[1].strip()
    assert load_file(path)["w"].equal(load_file(str(enc2))["w"])
    code, out = run("get", "maelab-mae-vit-t8-64@nothing")
    assert code == 1 and "error" in out

    run3, enc3 = fake_run(3)
    v3 = registry.register_encoder(run3, enc3, "mae")
    code, out = run("promote", "maelab-mae-vit-t8-64", str(v3), "champion")
    assert code == 0 and int(registry.get_version("maelab-mae-vit-t8-64@champion").version) == v3
    assert (
        registry.client().get_model_version("maelab-mae-vit-t8-64", str(v3)).tags["decision.source"]
        == "manual"
    )
    code, _ = run("promote", "maelab-mae-vit-t8-64", "99", "champion")
    assert code == 1
    assert isinstance(parser.parse_args(["registry", "list"]), argparse.Namespace)
