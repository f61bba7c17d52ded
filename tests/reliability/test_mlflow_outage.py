"""MLflow outages: a server that accepts and never answers costs seconds, not minutes (one warning); a run
that loses tracking ends FAILED, not RUNNING; the report is returned (and so written) during an outage."""

from __future__ import annotations

import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from fake_parts import build_pretrainer, tiny_recipe, write_images  # noqa: E402

from maelab.mlflow_http import HTTP_LIMITS  # noqa: E402
from maelab.train.engine import train  # noqa: E402
from maelab.train.tracking import Tracker  # noqa: E402


@pytest.fixture
def silent_server():
    """127.0.0.1:PORT that accepts connections and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.fixture
def bounded_env(monkeypatch):
    for key in HTTP_LIMITS:  # the test measures our defaults, not whatever the caller's shell set
        monkeypatch.delenv(key, raising=False)


def test_training_reaches_step_one_against_a_silent_server(tmp_path, silent_server, bounded_env) -> None:
    manifest = write_images(tmp_path / "images")
    recipe = tiny_recipe(steps=1)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(
            recipe,
            manifest,
            out_dir=tmp_path / "out",
            mlflow={"tracking_uri": silent_server, "experiment": "x", "enabled": True},
            build_model=build_pretrainer,
            progress=False,
        )
    seconds = time.monotonic() - t0
    assert result.steps == 1
    assert seconds < 60, f"step 1 after {seconds:.0f} s"
    mlflow_warnings = [w for w in caught if "MLflow" in str(w.message)]
    assert len(mlflow_warnings) == 1, [str(w.message) for w in mlflow_warnings]


def test_run_that_loses_tracking_ends_failed(tmp_path) -> None:
    settings = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "x", "enabled": True}
    tracker = Tracker(settings)
    run_id = tracker.start("r", {"a": 1})
    assert run_id
    real = tracker.client.log_batch

    def broken(*a, **k):
        raise ConnectionError("tracking server went away")

    tracker.client.log_batch = broken
    with pytest.warns(RuntimeWarning, match="tracking is off"):
        tracker.log_metrics({"loss": 1.0}, 1)
    tracker.client.log_batch = real
    tracker.end("FINISHED")
    assert tracker.client.get_run(run_id).info.status == "FAILED"


def test_report_is_returned_during_an_outage(monkeypatch, bounded_env) -> None:
    from maelab.analysis import report as rep

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: connection refused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(rep, "pretrain_gmacs", lambda *a, **k: 1.0)
    results = {"mae": {"tasks": {"cls": {"top1": 50.0}}}}
    params = {"report": {"metrics": {"cls": ["cls", "top1"]}, "mlflow": True}, "transfer": {}}
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="report: MLflow logging failed"):
        report, table, csv, fig = rep.make_report(results, params)
    assert time.monotonic() - t0 < 30
    assert report["rows"] and table and len(csv)
