from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage.segmentation import felzenszwalb

from maelab.regions.build import build_source
from maelab.regions.sources import FHSource, read_rgb
from maelab.regions.store import SourceStore

SCALES = [20, 60]


def snapshot(store: SourceStore) -> tuple[list[dict], dict[str, bytes]]:
    """Everything a store holds: its index rows and its shard files, byte for byte."""
    store.refresh()
    shards = {f.name: f.read_bytes() for f in sorted(store.shard_dir.iterdir())}
    return store.index.to_dict("records"), shards


def reference(tmp_path: Path, manifest: pd.DataFrame, shard_size: int) -> tuple[list[dict], dict[str, bytes]]:
    store = SourceStore(tmp_path / "reference" / "fh")
    build_source(store, FHSource("fh", SCALES), manifest, workers=0, shard_size=shard_size, progress=False)
    return snapshot(store)


class Counting(FHSource):
    """FH that records which images it computed, and can fail on one of them."""

    def __init__(self, *a, fail_on: str | None = None, interrupt_after: int | None = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen: list[str] = []
        self.fail_on, self.interrupt_after = fail_on, interrupt_after

    def compute(self, image, row):
        if row["image_id"] == self.fail_on:
            raise ValueError("injected failure")
        if self.interrupt_after is not None and len(self.seen) == self.interrupt_after:
            raise KeyboardInterrupt
        self.seen.append(row["image_id"])
        return super().compute(image, row)


def test_incremental_new_changed_removed_and_param_change(tmp_path, toy_manifest, make_images):
    store = SourceStore(tmp_path / "store" / "fh")
    src = Counting("fh", SCALES)
    rep = build_source(store, src, toy_manifest, workers=0, shard_size=3, progress=False)
    assert rep["computed"] == 7 and rep["shards_written"] == 3 and len(src.seen) == 7
    before = snapshot(store)

    src.seen.clear()
    rep = build_source(store, src, toy_manifest, workers=0, shard_size=3, progress=False)
    assert rep["computed"] == 0 and src.seen == [] and snapshot(store) == before

    # one image changes, two are new, one is quarantined (gone from the manifest)
    changed = toy_manifest.copy()
    row = changed.iloc[2]
    path = Path(row["root"]) / row["path"]
    img = read_rgb(path)
    img[:10] = 255 - img[:10]
    from PIL import Image

    Image.fromarray(img).save(path)
    changed.loc[2, "content_hash"] = "new"
    new = make_images(tmp_path / "more", 2, seed=5, prefix="n")
    manifest = pd.concat([changed.drop(index=4), new], ignore_index=True)
    rep = build_source(
        store, src, manifest, workers=0, shard_size=3, keep_ids=manifest["image_id"], progress=False
    )
    assert sorted(src.seen) == sorted([row["image_id"], *new["image_id"]])
    assert rep["computed"] == 3 and rep["dropped"] == 1 and len(store) == 8
    assert toy_manifest.loc[4, "image_id"] not in store
    np.testing.assert_array_equal(store.get(row["image_id"])[1], felzenszwalb(img, scale=60, min_size=60) + 1)

    # new source parameters: everything is stale
    src2 = Counting("fh", SCALES, sigma=0.5)
    rep = build_source(store, src2, manifest, workers=0, shard_size=3, progress=False)
    assert rep["computed"] == 8 and len(src2.seen) == 8 and store.meta["params"]["sigma"] == 0.5
    assert set(store.index["fingerprint"]) == {src2.fingerprint}
    assert rep["files_removed"] >= 3  # every old shard is now unreferenced


def test_keyboard_interrupt_then_resume_equals_uninterrupted(tmp_path, toy_manifest):
    want = reference(tmp_path, toy_manifest, shard_size=2)
    store = SourceStore(tmp_path / "store" / "fh")
    with pytest.raises(KeyboardInterrupt):
        build_source(
            store,
            Counting("fh", SCALES, interrupt_after=3),
            toy_manifest,
            workers=0,
            shard_size=2,
            progress=False,
        )
    assert len(SourceStore(store.path)) == 2  # the first shard (2 images) landed, the second did not
    rep = build_source(store, FHSource("fh", SCALES), toy_manifest, workers=0, shard_size=2, progress=False)
    assert rep["computed"] == 5
    assert snapshot(store) == want


def test_worker_error_names_the_file_and_keeps_finished_shards(tmp_path, toy_manifest):
    want = reference(tmp_path, toy_manifest, shard_size=1)
    store = SourceStore(tmp_path / "store" / "fh")
    bad = toy_manifest["image_id"].iloc[-1]
    with pytest.raises(RuntimeError, match=r"006\.png.*injected failure"):
        build_source(
            store,
            Counting("fh", SCALES, fail_on=bad),
            toy_manifest,
            workers=2,
            shard_size=1,
            progress=False,
            mp_context="fork",
        )
    assert 1 <= len(SourceStore(store.path)) <= 6 and bad not in SourceStore(store.path)
    build_source(store, FHSource("fh", SCALES), toy_manifest, workers=2, shard_size=1, progress=False)
    assert snapshot(store) == want


SLOW_BUILD = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    from maelab.regions.build import build_source
    from maelab.regions.sources import FHSource
    from maelab.regions.store import SourceStore

    class Slow(FHSource):
        def compute(self, image, row):
            time.sleep(0.4)
            return super().compute(image, row)

    manifest = pd.read_parquet(sys.argv[2])
    build_source(SourceStore(sys.argv[1]), Slow("fh", [20, 60]), manifest, workers=2, shard_size=1,
                 progress=False, mp_context="fork")
    """
)


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process group {pgid} still alive {timeout} s after SIGKILL")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, toy_manifest):
    want = reference(tmp_path, toy_manifest, shard_size=1)
    store_dir = tmp_path / "store" / "fh"
    (tmp_path / "slow.py").write_text(SLOW_BUILD)
    toy_manifest.to_parquet(tmp_path / "manifest.parquet")
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "slow.py"), str(store_dir), str(tmp_path / "manifest.parquet")],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (store_dir / "index.parquet").exists():  # first shard committed
            assert proc.poll() is None and time.monotonic() < deadline, (
                "build ended before it could be killed"
            )
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its pool workers, mid-write or not
        proc.wait()
        _wait_group_gone(proc.pid)  # orphaned workers die asynchronously and hold the store lock until then
    done = len(SourceStore(store_dir))
    assert 1 <= done < len(toy_manifest)
    rep = build_source(
        SourceStore(store_dir), FHSource("fh", SCALES), toy_manifest, workers=2, shard_size=1, progress=False
    )
    assert rep["computed"] == len(toy_manifest) - done
    assert snapshot(SourceStore(store_dir)) == want
    assert not [f for f in store_dir.rglob(".tmp-*")]


def test_bad_shard_size(tmp_path, toy_manifest):
    with pytest.raises(ValueError, match="shard_size"):
        build_source(SourceStore(tmp_path / "s"), FHSource(), toy_manifest, shard_size=0)


def test_concurrent_shard_runs_fill_one_store(tmp_path, toy_manifest):
    """``regions.shard``: runs on disjoint rows commit into one store at once and never undo each other."""
    from concurrent.futures import ThreadPoolExecutor

    from maelab.regions.build import shard_rows

    parts = [shard_rows(toy_manifest, i, 3) for i in range(3)]
    assert sorted(pd.concat(parts)["image_id"]) == sorted(toy_manifest["image_id"])  # a partition
    assert all(len(p) < len(toy_manifest) for p in parts)
    store = SourceStore(tmp_path / "store" / "fh")
    build_source(store, FHSource("fh", SCALES), parts[0], workers=0, shard_size=2, progress=False)

    def run(rows: pd.DataFrame) -> dict:
        own = SourceStore(store.path)  # each run has its own handle, as separate processes would
        return build_source(
            own,
            FHSource("fh", SCALES),
            rows,
            workers=0,
            shard_size=1,
            progress=False,
            keep_ids=rows["image_id"],
            exclusive=False,
        )

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(run, parts[1:]))
    assert [r["computed"] for r in reports] == [len(p) for p in parts[1:]]
    assert all(r["dropped"] == 0 and r["files_removed"] == 0 for r in reports)
    store.refresh()
    assert sorted(store.ids()) == sorted(toy_manifest["image_id"])
    ref = SourceStore(tmp_path / "reference" / "fh")
    build_source(ref, FHSource("fh", SCALES), toy_manifest, workers=0, progress=False)
    for image_id in toy_manifest["image_id"]:
        np.testing.assert_array_equal(store.get(image_id), ref.get(image_id))


def test_bad_shard_spec(toy_manifest):
    from maelab.regions.build import shard_rows

    with pytest.raises(ValueError, match="regions.shard"):
        shard_rows(toy_manifest, 2, 2)
