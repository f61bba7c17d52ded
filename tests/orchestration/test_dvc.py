"""DVC: a tiny project reproduces, a 2nd repro does nothing, push/pull round-trips; dvc.yaml resolves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maelab.config import load_config

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _init(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _run(root, "git", "init", "-q")
    _run(root, DVC, "init", "-q")


TINY = """
vars:
  - params.yaml
stages:
  make:
    cmd: {py} -c "import yaml; open('data/a.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['n']))"
    deps:
      - src.txt
    params:
      - n
    outs:
      - data/a.txt
  double:
    foreach: ${{sizes}}
    do:
      cmd: {py} -c "open('data/b${{item}}.txt', 'w').write(str(${{item}} * int(open('data/a.txt').read())))"
      deps:
        - data/a.txt
      outs:
        - data/b${{item}}.txt
"""


def test_dvc_repro_twice_then_push_pull(tmp_path: Path):
    root = tmp_path / "proj"
    _init(root)
    (root / "data").mkdir()
    (root / "src.txt").write_text("v1")
    (root / "params.yaml").write_text("n: 3\nsizes: [2]\n")
    (root / "dvc.yaml").write_text(TINY.format(py=sys.executable))

    out = _run(root, DVC, "repro")
    assert "Running stage 'make'" in out and "Running stage 'double@2'" in out
    assert (root / "data" / "b2.txt").read_text() == "6" and (root / "dvc.lock").is_file()

    out = _run(root, DVC, "repro")  # nothing changed: nothing runs
    assert "Running stage" not in out and ("didn't change" in out or "up to date" in out), out

    (root / "params.yaml").write_text("n: 4\nsizes: [2]\n")  # a param change reruns both, in order
    out = _run(root, DVC, "repro")
    assert "Running stage 'make'" in out and (root / "data" / "b2.txt").read_text() == "8"

    remote = tmp_path / "remote"
    _run(root, DVC, "remote", "add", "-d", "local", str(remote))
    _run(root, DVC, "push")
    shutil.rmtree(root / ".dvc" / "cache")
    (root / "data" / "b2.txt").unlink()
    _run(root, DVC, "pull")
    assert (root / "data" / "b2.txt").read_text() == "8"


def test_project_dvc_yaml_lists_every_stage(tmp_path: Path):
    """The real dvc.yaml + params.yaml in a scratch repo, placeholder data: `dvc repro --dry` lists all."""
    root = tmp_path / "proj"
    _init(root)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())["kedro"]
    stage_names = {"config", "ingest", "regions", "teachers", "pretrain", "transfer", "report", "interactive"}
    assert stage_names <= set(spec["stages"])
    resolved = root / "data" / "02_intermediate" / "parameters_resolved.yml"  # what the config stage writes
    resolved.parent.mkdir(parents=True)
    resolved.write_text(yaml.safe_dump(load_config("parameters", params["env"], REPO / "conf")))

    def placeholder(path: str) -> None:
        path = path.replace("${kedro.env}", params["env"])
        p = root / path
        if p.exists():
            return
        if (REPO / path).is_dir() or "." not in Path(path).name:
            p.mkdir(parents=True)
            (p / "x").write_text("x")
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}")

    for stage in spec["stages"].values():
        body = stage.get("do", stage)
        items = params["recipes"] if "foreach" in stage else [None]
        for item in items:
            for dep in body.get("deps", []):
                placeholder(dep.replace("${item}", str(item)))

    out = _run(root, DVC, "repro", "--dry")
    stages = [
        "config",
        "ingest",
        "regions",
        "pretrain@mae",
        "pretrain@rmae",
        "transfer",
        "report",
        "interactive",
    ]
    for stage in stages:
        assert f"Running stage '{stage}'" in out, out
    order = [out.index(f"Running stage '{s}'") for s in stages]
    assert order[0] < order[1] < order[2] < min(order[3:5]) and max(order[3:5]) < order[5] < order[6]
    assert order[4] < order[7]  # interactive segmentation reads the R-MAE model
    assert f"kedro run --pipelines=pretrain_rmae --env={params['env']}" in out
    assert order[3] < out.index("Running stage 'teachers'")  # the teacher is the MAE encoder


@pytest.mark.parametrize("section", ["core", "remote"])
def test_default_remote_is_configured(section: str):
    config = (REPO / ".dvc" / "config").read_text()
    assert {"core": "remote = local", "remote": "url = ../../maelab-dvc-remote"}[section] in config


def test_dvc_yaml_tracks_what_stages_read_and_writes_what_dvc_shows() -> None:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    catalog = load_config("catalog", "base", REPO / "conf")
    stages = spec["stages"]
    resolved = "data/02_intermediate/parameters_resolved.yml"
    assert stages["config"]["outs"] == [resolved] and "conf/${kedro.env}" in stages["config"]["deps"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        if name != "config":  # parameters come key by key from the resolved file, never a whole conf folder
            assert [next(iter(p)) for p in body["params"]] == [resolved], name
            assert not any(d in ("conf", "conf/base", "conf/${kedro.env}") for d in body["deps"]), name
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in body.get("outs", [])]
        assert not any(o.endswith(("checkpoint.pt", "result.json")) or o.startswith("/") for o in outs), name
    assert stages["ingest"]["params"] == [{resolved: ["ingest"]}]
    pretrain_outs = stages["pretrain"]["do"]["outs"]
    losses = catalog["pretrain_{recipe}_losses"]["filepath"].replace("{recipe}", "${item}")
    assert losses in pretrain_outs and "data/06_models/pretrain/${item}/model.safetensors" in pretrain_outs
    # the transfer stage's own files, not their folder: the benchmark env and `compare` write beside them, and
    # DVC deletes an out before it re-runs a stage
    evaluate = load_config("parameters", "base", REPO / "conf")["transfer"]["evaluate"]
    mine = [catalog["transfer_{encoder}_metrics"]["filepath"].replace("{encoder}", e) for e in evaluate]
    assert sorted(stages["transfer"]["outs"]) == sorted(mine) and set(mine) <= set(stages["report"]["deps"])
    metrics_dir = str(Path(catalog["report_metrics_{encoder}"]["filepath"]).parent)
    assert spec["metrics"] == [metrics_dir] and metrics_dir in stages["report"]["outs"]
    plotted = spec["plots"][0]["pretraining_loss"]["y"]
    recipes = yaml.safe_load((REPO / "params.yaml").read_text())["kedro"]["recipes"]
    assert set(plotted) == {losses.replace("${item}", r) for r in recipes}
