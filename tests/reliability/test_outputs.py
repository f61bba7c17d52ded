"""Outputs survive kills and neighbours: stale temp files are removed (and ignored by DVC), identical runs
give identical encoder bytes (mode 0644), one output directory takes one training, resume warns on a new
schedule, the decision log keeps every concurrent record, and bad checkpoints get our own clear errors."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from fake_parts import build_pretrainer, tiny_recipe, write_images  # noqa: E402

from maelab.files import save_safetensors  # noqa: E402
from maelab.orchestration.decision import DecisionRecord, append_decision, decide, read_decisions  # noqa: E402
from maelab.pools import held_lock  # noqa: E402
from maelab.train.checkpoint import load_checkpoint  # noqa: E402
from maelab.train.engine import CHECKPOINT, ENCODER, train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _train(recipe, manifest, out, **kw):
    return train(
        recipe,
        manifest,
        out_dir=out,
        mlflow={"enabled": False},
        build_model=build_pretrainer,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


def test_identical_runs_identical_encoder_bytes_mode_0644(manifest, tmp_path) -> None:
    a = _train(tiny_recipe(steps=2), manifest, tmp_path / "a")
    b = _train(tiny_recipe(steps=2), manifest, tmp_path / "b")
    pa, pb = Path(a.encoder_path), Path(b.encoder_path)
    assert pa.read_bytes() == pb.read_bytes()
    assert stat.S_IMODE(pa.stat().st_mode) == 0o644


def test_safetensors_header_is_sorted(tmp_path) -> None:
    tensors = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(12)}
    meta = {f"k{i}": str(i) for i in range(8)}
    blobs = {save_safetensors(tmp_path / f"{i}.safetensors", tensors, meta).read_bytes() for i in range(6)}
    assert len(blobs) == 1


def test_stale_temp_files_removed_at_start_and_ignored_by_dvc(manifest, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".tmp-99999-1-{CHECKPOINT}"  # what the atomic writer leaves when killed
    stale.write_bytes(b"x" * 1000)
    _train(tiny_recipe(steps=1), manifest, out)
    assert not stale.exists()
    project = tmp_path / "dvcproj"
    project.mkdir()
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True, env=env)
    names = [f"m/.{CHECKPOINT}.tmp123", "m/.lock", "s/.tmp-1-2-index.parquet", "r/.retrain.jsonl.lock"]
    for n in names:
        (project / n).parent.mkdir(exist_ok=True)
        (project / n).touch()
    (project / "m" / ENCODER).touch()
    res = subprocess.run(
        [*dvc, "check-ignore", *names, f"m/{ENCODER}"], cwd=project, capture_output=True, text=True, env=env
    )
    assert sorted(res.stdout.split()) == sorted(names), res.stdout + res.stderr


def test_two_trainings_on_one_output_directory(manifest, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with held_lock(out / ".lock"), pytest.raises(RuntimeError, match="another training writes"):
        _train(tiny_recipe(steps=1), manifest, out)


def test_resume_with_a_new_schedule_warns(manifest, tmp_path, caplog) -> None:
    out = tmp_path / "out"
    _train(tiny_recipe(steps=4), manifest, out, stop_after=2)
    with caplog.at_level(logging.WARNING, logger="maelab.train.checkpoint"):
        _train(tiny_recipe(steps=6), manifest, out, resume=True, stop_after=3)
    assert any(
        "different schedule" in r.getMessage() and "total 4 -> 6" in r.getMessage() for r in caplog.records
    )


def test_checkpoint_without_optimizer_names_key_and_file(manifest, tmp_path) -> None:
    out = tmp_path / "out"
    _train(tiny_recipe(steps=4), manifest, out, stop_after=2)
    state = torch.load(out / CHECKPOINT, weights_only=True)
    del state["optimizer"]
    torch.save(state, out / CHECKPOINT)
    with pytest.raises(ValueError, match=rf"{CHECKPOINT}: checkpoint has no 'optimizer' key"):
        _train(tiny_recipe(steps=4), manifest, out, resume=True)


class Payload:
    pass


def test_pickled_objects_get_our_message(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "never unpickles" in str(e.value)
    assert "weights_only=False" not in str(e.value)


def _writer(path: str, n: int, who: int) -> None:
    for i in range(n):
        append_decision(DecisionRecord.of(decide(0.6, 0.5), f"m{who}", i + 1, None), path)


def test_decision_log_keeps_concurrent_appends(tmp_path) -> None:
    path = tmp_path / "decisions.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), 150, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    records = read_decisions(path)
    assert len(records) == 300
    assert sorted((r["model"], r["candidate_version"]) for r in records) == sorted(
        (f"m{w}", i + 1) for w in range(2) for i in range(150)
    )
