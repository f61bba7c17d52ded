"""The teacher-feature store: what is stored, how a view reads it back, incremental and kill-safe builds,
agreement with the online teacher, and the store read as a training sample extra."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from teacher_parts import TEACHER_ENC, save_teacher

from maelab.data.view import View
from maelab.models import build_pretrainer
from maelab.models.compat import IncompatibleRecipeError
from maelab.regions.build import build_source
from maelab.regions.store import SourceStore
from maelab.teachers import build_teacher
from maelab.teachers.store import (
    TeacherSource,
    agreement,
    check_store_matches,
    full_view,
    load_view_image,
    resample_view,
)
from maelab.train.data import PretrainDataset, sample_seed

GRID = (4, 4)


def cfg(path: Path) -> dict:
    return {"type": "maelab", "weights": str(path)}


def snapshot(store: SourceStore) -> tuple[list[dict], dict[str, bytes]]:
    store.refresh()
    return store.index.to_dict("records"), {f.name: f.read_bytes() for f in sorted(store.shard_dir.iterdir())}


def build(store_dir: Path, teacher_file: Path, manifest, **kw) -> dict:
    kw = {"workers": 0, "shard_size": 2, "codec": "raw", "progress": False, **kw}
    return build_source(
        SourceStore(store_dir), TeacherSource("tiny", cfg(teacher_file), batch_size=2), manifest, **kw
    )


def test_resample_view_samples_patch_centres_and_flips() -> None:
    """A stored map whose channels are the source x/y of each cell centre: any view reads back the source
    coordinates of the student's patch centres (bilinear is exact on a ramp), mirrored when flipped."""
    src, cells = (64, 48), (8, 6)  # H, W of the image; the stored grid (8 px cells)
    ys = (torch.arange(cells[0]) + 0.5) * 8.0
    xs = (torch.arange(cells[1]) + 0.5) * 8.0
    ramp = torch.stack([xs[None, :].expand(*cells), ys[:, None].expand(*cells)])  # [2, h, w]: (x, y)

    whole = resample_view(ramp, full_view(src, (64, 48)), src, cells)  # identity: the stored cells
    torch.testing.assert_close(whole, ramp.flatten(1).T)

    crop = View(top=16, left=8, height=32, width=24, size=(16, 16), flip=False)
    got = resample_view(ramp, crop, src, (4, 4)).reshape(4, 4, 2)
    want_x = 8 + (torch.arange(4) + 0.5) * 6.0  # student patch centres in source pixels
    want_y = 16 + (torch.arange(4) + 0.5) * 8.0
    torch.testing.assert_close(got[..., 0], want_x[None, :].expand(4, 4))
    torch.testing.assert_close(got[..., 1], want_y[:, None].expand(4, 4))

    flipped = resample_view(ramp, View(16, 8, 32, 24, (16, 16), True), src, (4, 4)).reshape(4, 4, 2)
    torch.testing.assert_close(flipped, got.flip(1))


def test_store_holds_the_teacher_on_the_whole_image_and_is_incremental(tmp_path, teacher_file, toy_manifest):
    store_dir = tmp_path / "store" / "tiny"
    rep = build(store_dir, teacher_file, toy_manifest)
    assert (rep["computed"], rep["shards_written"], rep["stored"]) == (5, 3, 5)
    store = SourceStore(store_dir)
    row = toy_manifest.iloc[3].to_dict()
    got = store.get(row["image_id"])
    assert got.dtype == np.float16 and got.shape == (TEACHER_ENC["embed_dim"], *GRID)
    teacher = build_teacher(cfg(teacher_file))
    image = load_view_image(row, full_view((40, 48), teacher.img_size))[None]
    want = teacher(image).features[0].T.reshape(-1, *GRID)  # [C, h, w]
    torch.testing.assert_close(torch.from_numpy(np.array(got)).float(), want, atol=2e-2, rtol=2e-3)

    before = snapshot(store)
    rep = build(store_dir, teacher_file, toy_manifest)  # nothing changed: nothing computed
    assert (rep["computed"], rep["up_to_date"], rep["shards_written"]) == (0, 5, 0)
    assert snapshot(SourceStore(store_dir)) == before

    other = save_teacher(tmp_path / "teacher2.safetensors", seed=1)  # new weights: every record is stale
    rep = build(store_dir, other, toy_manifest)
    assert rep["computed"] == 5 and rep["files_removed"] == 3
    assert store.refresh().meta["params"]["weights_sha256"] != before[0][0]["fingerprint"]


SLOW_BUILD = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    from maelab.regions.build import build_source
    from maelab.regions.store import SourceStore
    from maelab.teachers.store import TeacherSource

    class Slow(TeacherSource):
        def compute_batch(self, rows):
            time.sleep(0.5)
            return super().compute_batch(rows)

    manifest = pd.read_parquet(sys.argv[2])
    source = Slow("tiny", {"type": "maelab", "weights": sys.argv[3]}, batch_size=2)
    build_source(SourceStore(sys.argv[1]), source, manifest, workers=0, shard_size=1, codec="raw",
                 progress=False)
    """
)


def test_sigkill_mid_build_then_restart_equals_uninterrupted(tmp_path, teacher_file, toy_manifest):
    build(tmp_path / "reference", teacher_file, toy_manifest, shard_size=1)
    want = snapshot(SourceStore(tmp_path / "reference"))
    store_dir = tmp_path / "store" / "tiny"
    (tmp_path / "slow.py").write_text(SLOW_BUILD)
    toy_manifest.to_parquet(tmp_path / "manifest.parquet")
    args = [str(store_dir), str(tmp_path / "manifest.parquet"), str(teacher_file)]
    proc = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), *args], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (store_dir / "index.parquet").exists():  # the first shard is committed
            assert proc.poll() is None and time.monotonic() < deadline, "build ended before it was killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-compute or mid-write
        proc.wait()
    done = len(SourceStore(store_dir))
    assert 1 <= done < len(toy_manifest)
    rep = build(store_dir, teacher_file, toy_manifest, shard_size=1)
    assert rep["computed"] == len(toy_manifest) - done
    assert snapshot(SourceStore(store_dir)) == want
    assert not list(store_dir.rglob(".tmp-*"))


def test_agreement_high_for_identity_drops_for_a_wrong_flip(tmp_path, teacher_file, toy_manifest):
    store_dir = tmp_path / "store" / "tiny"
    build(store_dir, teacher_file, toy_manifest)
    teacher = build_teacher(cfg(teacher_file))
    out = agreement(teacher, SourceStore(store_dir), toy_manifest, GRID, (32, 32), images=5, batch_size=2)
    assert out["images"] == 5
    assert out["identity"]["mean_cosine"] > 0.999  # the store read at the identity view is the online teacher
    assert out["wrong_flip"]["mean_cosine"] < out["identity"]["mean_cosine"] - 0.05
    assert out["wrong_flip"]["mean_cosine"] < out["views"]["mean_cosine"] <= out["identity"]["mean_cosine"]


def store_recipe(store_dir: Path, teacher_file: Path, masker: dict | None = None) -> dict:
    enc = {**TEACHER_ENC, "depth": 1}
    return {
        "name": "mrmae_store_toy",
        "encoder": enc,
        "masker": masker or {"type": "random", "ratio": 0.75},
        "heads": {"mimic": {"type": "mimic", "weight": 1.0, "teacher": cfg(teacher_file)}},
        "data": {
            "sources": ["toy"],
            "crop_scale": [0.3, 1.0],
            "teacher": {"mode": "store", "source": "tiny", "store": str(store_dir)},
        },
    }


def test_store_feeds_samples_and_replaces_the_teacher_forward(tmp_path, teacher_file, toy_manifest):
    store_dir = tmp_path / "store" / "tiny"
    build(store_dir, teacher_file, toy_manifest)
    recipe = store_recipe(store_dir, teacher_file)
    model = build_pretrainer(recipe)
    ds = PretrainDataset(toy_manifest, recipe, seed=3, masker=model.masker)
    sample = ds[(0, 2)]
    feats = sample["teacher/mimic"]
    assert feats.shape == (16, TEACHER_ENC["embed_dim"]) and feats.dtype == torch.float16
    # the same view, recomputed: the extra applied the sample's own crop and flip
    g = torch.Generator().manual_seed(sample_seed(3, 0, 2))
    view = View.random_resized_crop((40, 48), (32, 32), (0.3, 1.0), generator=g)
    stored = torch.from_numpy(np.array(SourceStore(store_dir).get("toy:train:2")))
    torch.testing.assert_close(feats, resample_view(stored, view, (40, 48), GRID).half())

    head = model.heads["mimic"]
    calls = []
    head.teacher.register_forward_hook(lambda *a: calls.append(1))
    batch = {"image": sample["image"][None], "plan": sample["plan"].collate([sample["plan"]])}
    batch["teacher/mimic"] = feats[None]
    out = model(batch)
    assert calls == [] and torch.isfinite(out.loss)  # no teacher forward in the step
    batch["teacher/mimic"] = feats[None] * -1
    assert not torch.equal(model(batch).loss, out.loss)  # the loss reads the stored features
    with pytest.raises(ValueError, match="teacher/mimic: not in the batch"):
        model({k: v for k, v in batch.items() if k != "teacher/mimic"})


def test_a_store_of_another_teacher_is_refused_and_focused_needs_online(tmp_path, teacher_file, toy_manifest):
    store_dir = tmp_path / "store" / "tiny"
    build(store_dir, teacher_file, toy_manifest)
    other = save_teacher(tmp_path / "other.safetensors", seed=2)
    with pytest.raises(ValueError, match="the store holds another teacher"):
        check_store_matches(SourceStore(store_dir), cfg(other), "heads.mimic.teacher")
    with pytest.raises(ValueError, match="the store holds another teacher"):
        PretrainDataset(toy_manifest, store_recipe(store_dir, other))
    with pytest.raises(FileNotFoundError, match="run `kedro run --pipelines=teachers`"):
        PretrainDataset(toy_manifest, store_recipe(tmp_path / "nothing", teacher_file))
    with pytest.raises(IncompatibleRecipeError, match="focused"):
        build_pretrainer(store_recipe(store_dir, teacher_file, {"type": "focused", "ratio": 0.75}))
