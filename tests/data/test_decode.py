"""Decoding: a generated corpus of corrupt and odd-mode files, the quarantine, and the decode cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maelab.data.decode import decode_all, load_rgb, probe, probe_many
from maelab.data.manifest import MANIFEST_COLUMNS
from maelab.pipelines.ingest import nodes


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_corpus(root: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Write good files in odd modes, and bad files.

    Returns ``{good name: upright (w, h)}`` and ``{bad name: start of its reason}``."""
    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, tuple[int, int]] = {}
    bad: dict[str, str] = {}

    _noise(48, 32).save(root / "rgb.jpg", quality=90)
    good["rgb.jpg"] = (48, 32)
    Image.new("CMYK", (32, 24), (0, 128, 255, 10)).save(root / "cmyk.jpg")
    good["cmyk.jpg"] = (32, 24)
    Image.fromarray(np.full((30, 40), 65535, np.uint16)).save(root / "gray16.png")  # I;16
    good["gray16.png"] = (40, 30)
    Image.fromarray(np.full((20, 20), 77, np.uint8)).save(root / "gray.png")
    good["gray.png"] = (20, 20)
    _noise(36, 36).convert("P").save(root / "palette.png")
    good["palette.png"] = (36, 36)
    p = Image.new("P", (24, 18))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.save(root / "palette_transparent.png", transparency=0)
    good["palette_transparent.png"] = (24, 18)
    Image.new("LA", (30, 20), (120, 200)).save(root / "la.png")
    good["la.png"] = (30, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _noise(40, 20, seed=1).save(root / "exif_rot.jpg", exif=exif)
    good["exif_rot.jpg"] = (20, 40)

    (root / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "empty file"
    for fmt, name in (("JPEG", "truncated.jpg"), ("PNG", "truncated.png")):
        _noise(64, 48, seed=2).save(root / name, format=fmt)
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
        bad[name] = "truncated"
    (root / "notimage.jpg").write_text("this is a text file, not a JPEG\n")
    bad["notimage.jpg"] = "not an image"
    _noise(4, 4).save(root / "tiny.png")
    bad["tiny.png"] = "too small"
    return good, bad


def _ingest_params(root: Path, cache: Path, workers: int = 0) -> dict:
    return {
        "workers": workers,
        "min_side": 16,
        "cache": str(cache),
        "sources": [{"type": "photos", "root": str(root), "split": "train", "skimage": []}],
    }


def _run_nodes(params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    prepared = nodes.prepare_sources(params)
    candidates, _ = nodes.list_images(params, prepared)
    decoded, stats = nodes.decode_images(candidates, params)
    manifest, quarantine = nodes.build_manifest(candidates, decoded)
    return manifest, quarantine, stats


def test_corrupt_corpus_quarantine_and_manifest(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    good, bad = make_corpus(root)
    manifest, quarantine, stats = _run_nodes(_ingest_params(root, tmp_path / "cache.parquet"))

    # the quarantine lists every bad file with its reason, and nothing else
    reasons = {Path(f).name: r for f, r in zip(quarantine["file"], quarantine["reason"], strict=True)}
    assert set(reasons) == set(bad)
    for name, start in bad.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    assert {"file", "source", "reason"} <= set(quarantine.columns)

    # the manifest holds exactly the good files, with upright RGB sizes
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert dict(manifest.dtypes.astype(str)) == MANIFEST_COLUMNS
    sizes = {
        p: (w, h) for p, w, h in zip(manifest["path"], manifest["width"], manifest["height"], strict=True)
    }
    assert sizes == good
    assert manifest["image_id"].is_unique
    assert manifest["content_hash"].str.len().eq(40).all()
    assert stats["decoded"] == len(good) + len(bad)

    for name, (w, h) in good.items():
        im = load_rgb(root / name)
        assert im.mode == "RGB" and im.size == (w, h)
    assert np.asarray(load_rgb(root / "gray16.png")).max() == 255  # 16-bit full scale -> 8-bit full scale
    assert np.asarray(load_rgb(root / "gray.png"))[0, 0].tolist() == [77, 77, 77]


def test_missing_file_is_quarantined(tmp_path: Path) -> None:
    p = probe(str(tmp_path / "nope.jpg"))
    assert not p.ok and p.reason == "missing file"


def test_decode_cache_skips_unchanged_files(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    good, bad = make_corpus(root)
    jobs = [(str(root / n), None) for n in sorted(good) + sorted(bad)]
    cache = tmp_path / "cache.parquet"

    first, c1 = decode_all(jobs, cache, workers=0)
    second, c2 = decode_all(jobs, cache, workers=0)
    assert c1 == {"decoded": len(jobs), "cached": 0}
    assert c2 == {"decoded": 0, "cached": len(jobs)}
    assert first == second

    # a changed file (new size and mtime) is decoded again, and only that one
    _noise(50, 30, seed=3).save(root / "rgb.jpg")
    st = os.stat(root / "rgb.jpg")
    os.utime(root / "rgb.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third, c3 = decode_all(jobs, cache, workers=0)
    assert c3 == {"decoded": 1, "cached": len(jobs) - 1}
    assert (third[jobs.index((str(root / "rgb.jpg"), None))].width, 50) == (50, 50)

    # min_side is judged after the cache: lowering it lets the 4x4 image through without decoding
    fourth, c4 = decode_all(jobs, cache, min_side=4, workers=0)
    assert c4["decoded"] == 0
    assert fourth[jobs.index((str(root / "tiny.png"), None))].ok


def test_parallel_decode_matches_serial(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(70):
        _noise(16 + i % 5, 16, seed=i).save(root / f"{i:03d}.png")
    (root / "000.png").write_bytes(b"")
    jobs = [(str(p), None) for p in sorted(root.iterdir())]
    serial = probe_many(jobs, workers=0)
    parallel = probe_many(jobs, workers=2)
    assert serial == parallel
    assert not parallel[0].ok and sum(p.ok for p in parallel) == 69


def test_mask_size_mismatch_is_rejected(tmp_path: Path) -> None:
    _noise(32, 32).save(tmp_path / "a.png")
    Image.new("L", (32, 32)).save(tmp_path / "a_mask.png")
    Image.new("L", (30, 32)).save(tmp_path / "b_mask.png")
    assert probe(str(tmp_path / "a.png"), str(tmp_path / "a_mask.png")).ok
    bad = probe(str(tmp_path / "a.png"), str(tmp_path / "b_mask.png"))
    assert not bad.ok and "mask size 30x32 != image size 32x32" in bad.reason
    missing = probe(str(tmp_path / "a.png"), str(tmp_path / "c_mask.png"))
    assert not missing.ok and missing.reason.startswith("missing mask")


@pytest.mark.parametrize("mode", ["I", "F"])
def test_to_rgb_wide_modes(tmp_path: Path, mode: str) -> None:
    arr = np.linspace(0, 65535 if mode == "I" else 1.0, 16 * 16).reshape(16, 16)
    im = Image.fromarray(arr.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    from maelab.data.decode import to_rgb

    out = np.asarray(to_rgb(im))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
