"""Prefect: flows run in ephemeral mode; prefect.yaml deploys to a server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
PREFECT = str(Path(PY).with_name("prefect"))
DRIVER = Path(__file__).with_name("_flow_driver.py")


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A PREFECT_HOME of the module's own (one database for its ephemeral runs), no API URL, no analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect_home")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFECT_LOGGING_LEVEL="WARNING",
        COLUMNS="250",  # rich tables of the CLI are not truncated
        KEDRO_DISABLE_TELEMETRY="1",
        DVC_NO_ANALYTICS="1",
    )
    return env


def _driver(env: dict[str, str], project: Path, *args: str) -> dict:
    (project / "src").mkdir(exist_ok=True)  # bootstrap_project wants source_dir; maelab is installed
    env = {
        **env,
        "MAELAB_PROJECT_ROOT": str(project),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlruns/mlflow.db",
    }
    proc = subprocess.run(
        [PY, str(DRIVER), *args[:1], str(project), *args[1:]],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_retrain_flow_promotes_only_better(kedro_project, prefect_env):
    """rmae_retrain x3, Kedro faked: v1 champion by rule, v2 better -> promoted, v3 worse -> kept."""
    out = _driver(prefect_env, kedro_project, "retrain")
    got = [(r["version"], r["action"]) for r in out["results"]]
    assert got == [(1, "keep"), (2, "promote"), (3, "keep")], out["results"]
    assert "already is champion" in out["results"][0]["reason"]

    log = kedro_project / "data" / "08_reporting" / "retrain_decisions.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["source"], r["action"], r["candidate_version"]) for r in rows] == [
        ("register", "promote", 1),
        ("retrain", "keep", 1),
        ("retrain", "promote", 2),
        ("retrain", "keep", 3),
    ]
    keys = [a["key"] for a in out["artifacts"]]
    assert keys.count("retrain-decision-rmae") == 3 and keys.count("maelab-report") == 3
    assert any("**promote**" in a["data"] and "| 0.35 |" in a["data"] for a in out["artifacts"])
    # the report as a table artifact whose rmae row links to the MLflow run and the model version
    tables = [json.loads(a["data"]) for a in out["artifacts"] if a["key"] == "maelab-report-table"]
    assert len(tables) == 3 and all(t[0]["recipe"] == "rmae" for t in tables)
    for table in tables:
        row = table[0]
        assert "/#/experiments/" in row["mlflow_run"] and "/runs/" in row["mlflow_run"], row
        assert "/#/models/maelab-rmae-vit-t8-64/versions/" in row["model_version"], row
    versions = sorted(int(t[0]["model_version"].rsplit("/", 1)[1]) for t in tables)
    assert versions == [1, 2, 3]
    assert keys.count("mlflow-run") == 3 and keys.count("model-version") == 3

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{kedro_project}/mlruns/mlflow.db"  # fixture-set
    from maelab.orchestration import registry

    assert int(registry.get_version("maelab-rmae-vit-t8-64@champion").version) == 2
    assert int(registry.get_version("maelab-rmae-vit-t8-64@candidate").version) == 3


def test_kedro_flow_runs_ingest(kedro_project, prefect_env):
    """The real ingest pipeline as a Prefect task through KedroSession: its manifest is written."""
    if not (REPO / "src" / "maelab" / "pipelines" / "ingest" / "pipeline.py").is_file():
        pytest.skip("the ingest pipeline does not exist yet")
    scenes = {
        "type": "scenes",
        "root": "data/01_raw/scenes",
        "seed": 0,
        "size": 32,
        "splits": {"train": 6, "val": 2},
    }
    tiny = {"ingest": {"workers": 0, "sources": [scenes]}}
    (kedro_project / "conf" / "local" / "parameters_ingest.yml").write_text(json.dumps(tiny))
    out = _driver(prefect_env, kedro_project, "kedro", "ingest")
    assert "ingest" in out["results"][0]
    assert (kedro_project / "data" / "02_intermediate" / "manifest.parquet").is_file()


def test_a_retried_pretraining_resumes_from_its_last_checkpoint(kedro_project, prefect_env):
    """The first attempt of pretrain_mae dies after its step-2 checkpoint; Prefect's retry resumes there
    (steps 3-4 only, the same MLflow run) instead of starting over at step 0."""
    import yaml

    from maelab.config import deep_merge

    scenes = {"type": "scenes", "root": "data/01_raw/scenes", "seed": 0, "size": 32, "splits": {"train": 8}}
    local = kedro_project / "conf" / "local"
    (local / "parameters_ingest.yml").write_text(json.dumps({"ingest": {"workers": 0, "sources": [scenes]}}))
    base = yaml.safe_load((REPO / "conf" / "base" / "parameters_pretrain.yml").read_text())
    micro = {
        "encoder": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "data": {"num_workers": 0},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "ckpt_every": 2, "log_every": 1},
    }
    micro["train"].update(image_every=0, device="cpu")
    pretrain = {
        **base,
        "recipe_defaults": deep_merge(base["recipe_defaults"], micro),
        "recipes": {
            "mae": deep_merge(base["recipes"]["mae"], {"heads": {"pixel": {"embed_dim": 16, "depth": 1}}})
        },
    }
    (local / "parameters_pretrain.yml").write_text(yaml.safe_dump(pretrain))

    out = _driver(prefect_env, kedro_project, "resume")["results"][0]
    saved, report = out["saved"], out["report"]
    assert [(s["attempt"], s["step"]) for s in saved] == [(1, 2), (2, 4)], saved  # not (2, 2): no restart
    assert report["steps"] == 4, report
    assert saved[0]["run_id"] and saved[0]["run_id"] == saved[1]["run_id"] == report["mlflow_run_id"]


def test_retrain_precompute_runs_as_the_cpu_deployment(kedro_project, prefect_env):
    out = _driver(prefect_env, kedro_project, "precompute")["results"][0]
    params = {"env": "coco", "params": {"a": 1}, "ingest": True, "project": None}
    assert out["calls"] == [{"name": "regions-precompute/regions-precompute", "parameters": params}] * 2
    assert out["first"] == "deployment regions-precompute/regions-precompute (flow run run-1)"
    assert "ended Failed" in out["second"]  # a failed CPU run fails the retrain flow
    assert out["third"] == "in-process" and out["ran"] == ["ingest", "regions"]  # no deployment: here


def test_failed_task_and_flow_leave_failure_artifacts(kedro_project, prefect_env):
    out = _driver(prefect_env, kedro_project, "fail")
    assert out["results"] == [{"raised": "KeyError"}]
    failures = {a["key"]: a["data"] for a in out["artifacts"] if (a["key"] or "").startswith("failure-")}
    assert set(failures) == {"failure-task", "failure-flow"}, failures
    assert "no Kedro pipeline 'no_such_pipeline'" in failures["failure-task"]
    assert "Failed" in failures["failure-flow"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(env: dict[str, str], *args: str, cwd: Path, timeout: int = 180) -> str:
    proc = subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture
def prefect_server(tmp_path: Path, prefect_env: dict[str, str]):
    """``prefect server start`` on 127.0.0.1:<free port>; the whole process group is killed afterwards."""
    port = _free_port()
    env = {**prefect_env, "PREFECT_HOME": str(tmp_path / "server_home"), "PREFECT_UI_ENABLED": "false"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not come up in 180 s"
            time.sleep(0.5)
        yield {**env, "PREFECT_API_URL": url}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_prefect_yaml_deploys_and_a_worker_runs_it(prefect_server, tmp_path):
    flows_dir = tmp_path / "pipelines"
    flows_dir.mkdir()
    for name in ("flows.py", "prefect.yaml"):
        shutil.copy(REPO / "pipelines" / name, flows_dir / name)
    env = prefect_server
    _prefect(env, "work-pool", "create", "cpu", "--type", "process", cwd=tmp_path)
    template = str(REPO / "pipelines" / "gpu-pool.json")  # the Kubernetes GPU job: image, GPUs, deadline
    _prefect(
        env,
        "work-pool",
        "create",
        "gpu",
        "--type",
        "kubernetes",
        "--base-job-template",
        template,
        cwd=tmp_path,
    )
    _prefect(env, "--no-prompt", "deploy", "--all", cwd=flows_dir)

    listing = _prefect(env, "deployment", "ls", cwd=tmp_path)
    for name in (
        "regions-precompute/regions-precompute",
        "rmae-retrain/rmae-retrain",
        "maelab-kedro/kedro",
        "maelab-kedro/compare",
    ):
        assert name in listing, listing
    inspect = _prefect(env, "deployment", "inspect", "rmae-retrain/rmae-retrain", cwd=tmp_path)
    assert "0 2 * * 6" in inspect and "'gpu'" in inspect and "'recipe': 'rmae'" in inspect, inspect
    assert "'image': 'maelab:gpu'" in inspect and "'gpus': 8" in inspect, inspect  # job variables
    assert "'precompute_deployment': 'regions-precompute/regions-precompute'" in inspect, inspect
    inspect = _prefect(env, "deployment", "inspect", "maelab-kedro/compare", cwd=tmp_path)
    assert "0 3 * * 0" in inspect and "'pipelines': ['compare']" in inspect, inspect

    if not os.environ.get("MAELAB_TEST_PREFECT_WORKER"):
        return  # the worker round trip below adds ~45 s on 2 cores; MAELAB_TEST_PREFECT_WORKER=1 runs it
    # a worker on the cpu pool picks up one run of the generic flow (no Kedro pipelines: just the plumbing)
    _prefect(env, "deployment", "run", "maelab-kedro/kedro", "--param", "pipelines=[]", cwd=tmp_path)
    _prefect(env, "worker", "start", "--pool", "cpu", "--run-once", cwd=tmp_path, timeout=300)
    runs = _prefect(env, "flow-run", "ls", "--state", "COMPLETED", cwd=tmp_path)
    assert "maelab-kedro" in runs, runs
