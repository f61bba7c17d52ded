"""The one ``maelab`` command: every subcommand and option has help; completion; config; train's checks."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maelab.command import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, path: str = "maelab"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_subcommand_and_option_has_help() -> None:
    seen = dict(_parsers(build_parser()))
    assert {"maelab train", "maelab config", "maelab completion", "maelab bench train"} <= set(seen)
    for path, parser in seen.items():
        assert parser.description, f"{path}: no description"
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{path} {'/'.join(action.option_strings) or action.dest}: no help"
            else:
                assert all(a.help for a in action._choices_actions), f"{path}: a subcommand has no help"


def test_train_help_names_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--recipe", "--recipe-file", "--env", "--set", "--resume", "--stop-after", "--no-mlflow"):
        assert option in text


def test_completion_script_lists_subcommands_and_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["completion", "bash"])
    script = capsys.readouterr().out
    assert "complete" in script and "segment-eval" in script and "--recipe-file" in script


def test_config_prints_the_layered_parameters(tmp_path: Path, monkeypatch, capsys) -> None:
    project = tmp_path / "p"
    (project / "conf" / "local").mkdir(parents=True)
    for env in ("base", "coco"):
        (project / "conf" / env).mkdir()
        (project / "conf" / env / "parameters_ingest.yml").write_text(
            yaml.safe_dump({"ingest": {"workers": len(env), "cache": env}})
        )
    (project / "conf" / "local" / "parameters_ingest.yml").write_text("ingest: {workers: 0}\n")
    monkeypatch.setenv("MAELAB_PROJECT_ROOT", str(project))
    with pytest.raises(SystemExit):
        main(["config", "ingest", "--env", "coco", "--out", str(tmp_path / "out.yml")])
    text = (tmp_path / "out.yml").read_text()
    assert text.startswith("# resolved parameters: conf/base + conf/coco + conf/local")
    assert yaml.safe_load(text) == {"ingest": {"workers": 0, "cache": "coco"}}
    with pytest.raises(SystemExit):
        main(["config", "--env", "base"])
    assert yaml.safe_load(capsys.readouterr().out) == {"ingest": {"workers": 4, "cache": "base"}}
    with pytest.raises(SystemExit, match="no parameter 'ingestt'"):
        main(["config", "ingestt"])


def test_maelab_train_set_typo_is_named(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    cmd = [
        sys.executable,
        "-m",
        "maelab",
        "train",
        "--recipe",
        "mae",
        "--no-mlflow",
        "--set",
        "train.stepz=3",
    ]
    cmd += ["--out-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "train.stepz" in proc.stderr and not (tmp_path / "out").exists()


def test_maelab_train_resolves_a_registry_init_from_and_the_engine_cli_refuses_one(monkeypatch):
    import argparse

    import maelab.orchestration.registry as registry
    import maelab.train.__main__ as train_main
    from maelab.command import train_cli

    seen = {}
    monkeypatch.setattr(
        registry,
        "resolve_init_from",
        lambda recipe, env=None: {"train": {**recipe["train"], "init_from": "/states/state.pt"}},
    )
    monkeypatch.setattr(train_main, "cli", lambda args: seen.setdefault("sets", args.sets) and 0)
    args = argparse.Namespace(env=None, sets=["train.steps=3", "train.init_from=models:/m@champion"])
    train_cli(args)
    assert seen["sets"] == [
        "train.steps=3",
        "train.init_from=/states/state.pt",
        "train.init_from_uri=models:/m@champion",
    ]
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="maelab train"):  # the engine's own CLI reads files only
        train_main.main(["--recipe", "mae", "--set", "train.init_from=models:/m@champion", "--no-mlflow"])
