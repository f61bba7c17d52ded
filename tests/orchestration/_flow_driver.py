"""Run in a subprocess by test_flows.py (Prefect reads its settings at import, so each test gets a fresh one).

``python _flow_driver.py retrain PROJECT`` runs ``rmae_retrain`` three times in ephemeral mode with Kedro
replaced by a fake that writes what the real pipelines write; ``... kedro PROJECT PIPELINE`` runs
``kedro_flow`` on a real pipeline; ``... resume PROJECT`` runs ``kedro_flow`` on ingest + the real
``pretrain_mae`` with one retry, its first attempt killed (an exception, as a lost torchrun rank raises)
right after its first checkpoint; ``... fail PROJECT`` runs ``kedro_flow`` on a pipeline that does not
exist (the failure hooks). Prints one JSON line with results and the Prefect artifacts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "pipelines"))

import flows  # noqa: E402
from prefect import get_client  # noqa: E402

ENCODER_CFG = {"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 12, "num_heads": 3}


def fake_kedro(metrics: list[float]):
    """What pretrain_<recipe> and report write, without training: an MLflow run, an encoder, two JSONs."""
    state = {"i": 0}

    def run(name, env=None, params=None, project_path=None, namespaces=None):
        import mlflow
        import torch
        from safetensors.torch import save_file

        from maelab.orchestration import registry

        root = Path(project_path)
        rep = root / "data" / "08_reporting"
        rep.mkdir(parents=True, exist_ok=True)
        if name.startswith("pretrain_"):
            recipe = name.removeprefix("pretrain_")
            enc = root / "data" / "06_models" / "pretrain" / recipe / "encoder.safetensors"
            enc.parent.mkdir(parents=True, exist_ok=True)
            meta = {"encoder_config": json.dumps(ENCODER_CFG)}
            save_file({"w": torch.full((2, 2), float(state["i"]))}, str(enc), metadata=meta)
            registry.client(env)
            mlflow.set_experiment("maelab")
            with mlflow.start_run() as r:
                mlflow.log_artifact(str(enc), artifact_path="encoder")
            out = {
                "recipe": recipe,
                "mlflow_run_id": r.info.run_id,
                "encoder_path": str(enc.relative_to(root)),
            }
            (rep / f"pretrain_{recipe}.json").write_text(json.dumps(out))
        elif name == "report":
            row = {"recipe": "rmae", "linear_top1": metrics[state["i"]]}
            (rep / "report.json").write_text(json.dumps({"rows": [row]}))
            state["i"] += 1
        return [name]

    return run


def kill_after_first_checkpoint(saved: list[dict]):
    """Wrap the engine's checkpoint writer: record (attempt, step) of every save; the first save of the
    first attempt is written, then the worker 'dies'."""
    from prefect.runtime import task_run

    import maelab.train.engine as engine

    real = engine.save_training_state

    def save(path, state, *args, **kwargs):
        real(path, state, *args, **kwargs)
        attempt = int(task_run.run_count or 1)
        saved.append({"attempt": attempt, "step": state.step, "run_id": state.run_id})
        if attempt == 1:
            raise RuntimeError(f"simulated loss of the worker after the checkpoint of step {state.step}")

    engine.save_training_state = save


def artifacts() -> list[dict]:
    with get_client(sync_client=True) as client:
        return [{"key": a.key, "data": a.data} for a in client.read_artifacts()]


def main() -> None:
    mode, project = sys.argv[1], sys.argv[2]
    flows.kedro_task = flows.kedro_task.with_options(retries=0)  # a test failure should fail fast
    if mode == "retrain":
        flows.run_kedro_pipeline = fake_kedro([0.30, 0.35, 0.32])
        results = [
            flows.rmae_retrain(recipe="rmae", precompute=["ingest"], project=project) for _ in range(3)
        ]
    elif mode == "resume":
        flows.kedro_task = flows.kedro_task.with_options(retries=1, retry_delay_seconds=0)
        saved: list[dict] = []
        kill_after_first_checkpoint(saved)
        flows.kedro_flow(pipelines=["ingest", "pretrain_mae"], project=project)
        report = json.loads((Path(project) / "data/08_reporting/pretrain_mae.json").read_text())
        results = [{"saved": saved, "report": report}]
    elif mode == "precompute":  # the retrain flow hands ingest + regions to the CPU deployment
        import prefect.deployments
        from prefect import flow
        from prefect.states import Completed, Failed

        calls, ran = [], []
        flows.run_kedro_pipeline = lambda name, *a, **k: ran.append(name) or [name]

        def fake_run_deployment(name, parameters=None, **kwargs):
            calls.append({"name": name, "parameters": parameters})
            state = Completed() if len(calls) == 1 else Failed(message="worker lost")
            return type("FlowRun", (), {"id": f"run-{len(calls)}", "state": state})()

        prefect.deployments.run_deployment = fake_run_deployment

        @flow
        def probe(deployment):
            return flows.precompute_on_cpu(deployment, ["ingest", "regions"], "coco", {"a": 1}, project)

        first = probe("regions-precompute/regions-precompute")
        try:
            probe("regions-precompute/regions-precompute")
            second = None
        except RuntimeError as exc:
            second = str(exc)
        third = probe(None)
        results = [{"calls": calls, "first": first, "second": second, "third": third, "ran": ran}]
    elif mode == "fail":  # a pipeline that does not exist: the task fails, then the flow; both hooks fire
        try:
            flows.kedro_flow(pipelines=["no_such_pipeline"], project=project)
            results = [{"raised": None}]
        except Exception as exc:  # noqa: BLE001
            results = [{"raised": type(exc).__name__}]
    else:
        results = [flows.kedro_flow(pipelines=[sys.argv[3]], project=project)]
    print("RESULT " + json.dumps({"results": results, "artifacts": artifacts()}, default=str))


if __name__ == "__main__":
    main()
