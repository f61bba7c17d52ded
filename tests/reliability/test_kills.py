"""``kill -9`` of a regions build or an ingest decode at a random point: no worker outlives its parent by
more than 10 s, and the next run starts at once (no orphan holds the store lock) and completes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from maelab.data.decode import decode_all
from maelab.data.manifest import conform
from maelab.regions.build import build_source
from maelab.regions.sources import FHSource
from maelab.regions.store import SourceStore

PRELUDE = """
import os, sys, time
from pathlib import Path
PIDS = Path(sys.argv[1])

def note_pid():
    (PIDS / str(os.getpid())).touch()
"""

REGIONS = (
    PRELUDE
    + """
import pandas as pd
from maelab.regions.build import build_source
from maelab.regions.sources import FHSource
from maelab.regions.store import SourceStore

class SlowFH(FHSource):
    def compute(self, image, row):
        note_pid()
        time.sleep(0.2)
        return super().compute(image, row)

rows = pd.read_parquet(sys.argv[2])
build_source(SourceStore(sys.argv[3]), SlowFH("fh", scales=[100]), rows, workers=2, shard_size=1,
             progress=False)
"""
)

INGEST = (
    PRELUDE
    + """
import maelab.data.decode as decode
plain = decode.probe

def slow_probe(*a):
    note_pid()
    time.sleep(0.05)
    return plain(*a)

decode.probe = slow_probe  # workers are forked: they see the patched function
jobs = [(str(p), None) for p in sorted(Path(sys.argv[2]).glob("*.png"))]
decode.decode_all(jobs, None, workers=2)
"""
)


def _images(folder: Path, n: int) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows.append(
            {
                "image_id": f"k:{i}",
                "source": "k",
                "split": "train",
                "root": str(folder),
                "path": f"{i:03d}.png",
                "width": 24,
                "height": 24,
                "content_hash": f"h{i}",
            }
        )
    return conform(pd.DataFrame(rows))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _kill_and_watch(script: str, args: list[str], pids: Path) -> None:
    """Start ``script``, SIGKILL it at a random point once its workers run, and wait for the workers."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(pids), *args], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2:  # both workers have started work
            assert proc.poll() is None, f"the run ended before it was killed (rc {proc.returncode})"
            assert time.monotonic() < deadline, "workers never started"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    workers = [int(p.name) for p in pids.iterdir() if int(p.name) != proc.pid]
    assert len(workers) >= 2
    t0 = time.monotonic()
    while any(_alive(p) for p in workers) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    left = [p for p in workers if _alive(p)]
    for p in left:  # never leave orphans behind, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed parent by more than 10 s"


def test_killed_regions_build_leaves_no_worker_and_no_lock(tmp_path: Path) -> None:
    rows = _images(tmp_path / "images", 30)
    rows.to_parquet(tmp_path / "rows.parquet")
    pids = tmp_path / "pids"
    pids.mkdir()
    _kill_and_watch(REGIONS, [str(tmp_path / "rows.parquet"), str(tmp_path / "store")], pids)
    store = SourceStore(tmp_path / "store")
    t0 = time.monotonic()
    report = build_source(store, FHSource("fh", scales=[100]), rows, workers=2, shard_size=8, progress=False)
    assert report["stored"] == 30  # started at once: no orphan held the store lock
    assert time.monotonic() - t0 < 60


def test_killed_ingest_decode_leaves_no_worker(tmp_path: Path) -> None:
    _images(tmp_path / "images", 80)
    pids = tmp_path / "pids"
    pids.mkdir()
    _kill_and_watch(INGEST, [str(tmp_path / "images")], pids)
    jobs = [(str(p), None) for p in sorted((tmp_path / "images").glob("*.png"))]
    probes, counts = decode_all(jobs, None, workers=2)
    assert counts["decoded"] == 80 and all(p.ok for p in probes)
