"""The serve app in-process: pixels to patches whatever the image size, upload checks, prompt errors,
nothing written outside the temporary folder; and ``maelab segment --checkpoint models:/...``."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from maelab.analysis.interactive import cli as segment_cli
from maelab.analysis.interactive import patch_at
from maelab.serve.app import BadImage, create_app, decode_upload, patches_mask


def encoded(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format=fmt
    )
    return buf.getvalue()


@pytest.mark.parametrize(("h", "w"), [(64, 64), (480, 640), (37, 101), (17, 9)])
def test_points_map_to_the_patches_of_the_grid_whatever_the_image_size(h, w) -> None:
    grid = (8, 8)
    assert patch_at(0, 0, (h, w), grid) == 0 and patch_at(w - 0.01, h - 0.01, (h, w), grid) == 63
    if h % 8 == 0 and w % 8 == 0:
        assert patch_at(w / 2, h / 2, (h, w), grid) == 4 * 8 + 4  # the centre is the first patch past it
    rng = np.random.default_rng(0)
    for x, y in zip(rng.uniform(0, w, 50), rng.uniform(0, h, 50), strict=True):
        pid = patch_at(x, y, (h, w), grid)
        assert patches_mask([pid], (h, w), grid)[int(y), int(x)]  # the same mapping, pixel by pixel
    assert patches_mask(list(range(64)), (h, w), grid).all()
    with pytest.raises(ValueError, match="outside"):
        patch_at(w, 0, (h, w), grid)


def test_uploads_are_decoded_or_refused_with_the_reason() -> None:
    assert decode_upload(encoded("PNG")).shape == (30, 40, 3)
    assert decode_upload(encoded("JPEG")).shape == (30, 40, 3)
    cases = [
        (b"hello, not an image", 415, "not an image"),
        (b"", 400, "empty"),
        (encoded("JPEG")[:-300], 400, "damaged or truncated"),
        (encoded("PNG", (200, 100)), 413, "200x100 pixels; the limit is 10,000"),
    ]
    for data, status, message in cases:
        with pytest.raises(BadImage, match=message) as err:
            decode_upload(data, max_pixels=10_000)
        assert err.value.status == status


def files_under(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_the_app_segments_refuses_bad_requests_and_writes_nothing_outside_its_temp_dir(
    rmae_project, monkeypatch, tmp_path
) -> None:
    for key, value in rmae_project.env.items():
        monkeypatch.setenv(key, value)
    import pandas as pd

    manifest = pd.read_parquet(rmae_project.root / "data/02_intermediate/manifest.parquet")
    before = files_under(rmae_project.root)
    workdir = tmp_path / "work"
    workdir.mkdir()
    app = create_app(
        manifest=manifest, workdir=workdir, project_root=rmae_project.root, max_upload_bytes=8192
    )
    with TestClient(app) as client:
        models = client.get("/api/models").json()["models"]
        name = rmae_project.model.split("@")[0]
        assert [m["ref"] for m in models] == [f"{name}@champion", f"{name}@candidate"]  # both on version 1
        assert [(m["version"], m["step"]) for m in models] == [(1, 3), (1, 3)]
        held_out = [i["id"] for i in client.get("/api/images").json()["images"]]
        assert held_out and all(i.startswith("m:scenes:val:") for i in held_out)

        big = client.post("/api/upload", content=bytes(9000), headers={"X-Filename": "big.png"})
        assert big.status_code == 413 and big.json()["detail"] == "the file is 8.8 KB; the limit is 8.0 KB"
        up = client.post("/api/upload", content=encoded("PNG", (50, 30)), headers={"X-Filename": "a%20b.png"})
        assert up.status_code == 200 and up.json()["name"] == "a b.png" and up.json()["width"] == 50

        body = {"model": rmae_project.model, "image": up.json()["id"],
                "points": [{"x": 49.5, "y": 29.5}, {"x": 0, "y": 0, "background": True}]}  # fmt: skip
        seg = client.post("/api/segment", json=body).json()
        assert seg["grid"] == [8, 8] and seg["foreground"] == [63] and seg["background"] == [0]
        assert len(seg["prob"]) == 64 * 64 and seg["baseline"] == [63]
        mask = client.post("/api/mask", json={**body, "threshold": 0.5})
        with Image.open(io.BytesIO(mask.content)) as im:
            assert im.size == (50, 30) and bool(np.array(im)[-1, -1])  # the clicked corner patch
        base = client.post("/api/mask", json={**body, "which": "baseline"})
        with Image.open(io.BytesIO(base.content)) as im:
            assert (np.array(im) > 0).sum() == patches_mask([63], (30, 50), (8, 8)).sum()

        only_bg = client.post("/api/segment", json={**body, "points": [{"x": 1, "y": 1, "background": True}]})
        assert only_bg.status_code == 400 and "at least one point on the object" in only_bg.json()["detail"]
        outside = client.post("/api/segment", json={**body, "points": [{"x": 50, "y": 1}]})
        assert outside.status_code == 400 and "outside the 50x30 image" in outside.json()["detail"]
        unknown = client.post("/api/segment", json={**body, "model": "maelab-nope@champion"})
        assert unknown.status_code == 404 and "not in the registry" in unknown.json()["detail"]
        assert client.get("/api/image", params={"id": "u:999"}).status_code == 404
        assert client.get("/api/image", params={"id": held_out[0]}).headers["content-type"] == "image/png"
    assert files_under(rmae_project.root) == before  # uploads stay in memory; the store is only read


def test_segment_cli_reads_the_registered_full_state(rmae_project, monkeypatch, tmp_path, capsys) -> None:
    for key, value in rmae_project.env.items():
        monkeypatch.setenv(key, value)
    image = tmp_path / "a.png"
    image.write_bytes(encoded("PNG", (64, 64)))
    args = argparse.Namespace(recipe=None, env=None, checkpoint=f"models:/{rmae_project.model}",
                              image=str(image), patches="9,10", negative="", image_visible="all",
                              out=str(tmp_path / "seg.png"))  # fmt: skip
    assert segment_cli(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["grid"] == [8, 8]
    with Image.open(tmp_path / "seg.png") as im:
        assert im.size[0] == 3 * im.size[1]
