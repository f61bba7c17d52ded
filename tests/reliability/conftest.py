"""Helpers for the hostile-input tests: run a snippet in a subprocess under a 4 GiB address-space cap."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

CAP_BYTES = 4 << 30  # ulimit -v 4 GiB


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


def run_capped(
    code: str, *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -c code args`` with RLIMIT_AS = 4 GiB; a crash shows as a negative return code."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_cap,
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def capped():
    return run_capped
