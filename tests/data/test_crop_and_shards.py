"""The pre-training data path: crop-only JPEG decode, packed tar shards, and ``maelab bench data``."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from maelab.data.bench import bench_data, synthetic_jpegs
from maelab.data.decode import decode_crop, load_rgb
from maelab.data.manifest import conform
from maelab.data.shards import INDEX, ShardReader, write_shards
from maelab.data.view import View


def full_view(path: Path, view: View) -> np.ndarray:
    """The default path: decode whole, crop + resize in torch; [H, W, 3] in [0, 1]."""
    img = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1).float() / 255
    return view.apply(img).clamp(0, 1).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    return synthetic_jpegs(tmp_path_factory.mktemp("jpegs"), 3, (240, 320))


@pytest.mark.parametrize(
    ("box", "flip"),
    [((0, 0, 240, 320), False), ((20, 40, 200, 160), True), ((100, 200, 60, 50), False)],
)
def test_crop_only_decode_matches_the_full_decode(jpegs, box, flip):
    view = View(*box, (56, 56), flip)  # the first two boxes decode at 1/4 and 1/2 (DCT scaling)
    got = np.asarray(decode_crop(jpegs[0].read_bytes(), box, (56, 56), flip)) / 255
    want = full_view(jpegs[0], view)
    assert got.shape == want.shape == (56, 56, 3)
    assert np.abs(got - want).mean() < 0.03  # a box off by a few pixels or a wrong flip is far above
    shifted = np.asarray(
        decode_crop(jpegs[0].read_bytes(), (box[0], box[1] + 8, box[2], box[3] - 8), (56, 56), flip)
    )
    assert np.abs(shifted / 255 - want).mean() > np.abs(got - want).mean()


def test_crop_only_decode_of_an_exif_rotated_jpeg_uses_upright_coordinates(tmp_path, jpegs):
    upright = Image.open(jpegs[1])  # 320x240
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    assert load_rgb(path).size == (320, 240)
    box = (10, 30, 200, 250)
    view = View(*box, (48, 48), False)
    got = np.asarray(decode_crop(path.read_bytes(), box, (48, 48))) / 255
    assert np.abs(got - full_view(path, view)).mean() < 0.03


def manifest_of(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for i, p in enumerate(paths):
        w, h = Image.open(p).size
        rows.append(
            {"image_id": f"t:{i}", "source": "t", "split": "train", "root": str(p.parent), "path": p.name}
            | {"width": w, "height": h, "content_hash": str(i)}
        )
    return conform(pd.DataFrame(rows))


def test_shards_are_webdataset_tars_with_random_access_and_stable_bytes(tmp_path, jpegs):
    manifest = manifest_of(jpegs)
    index = write_shards(manifest, tmp_path / "s", images_per_shard=2)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        INDEX,
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg", "000000000.json", "000000001.jpg", "000000001.json"]
    reader = ShardReader(tmp_path / "s")
    for i, path in enumerate(jpegs):
        assert reader.read(f"t:{i}") == path.read_bytes()
    first = (tmp_path / "s" / "shard-000000.tar").read_bytes()
    write_shards(manifest, tmp_path / "s", images_per_shard=2)  # same input, same bytes (DVC hashes)
    assert (tmp_path / "s" / "shard-000000.tar").read_bytes() == first
    write_shards(manifest.iloc[:1], tmp_path / "s", images_per_shard=2)  # stale shards go
    assert not (tmp_path / "s" / "shard-000001.tar").exists()
    assert len(index) == 3
    with pytest.raises(KeyError, match="no image"):
        ShardReader(tmp_path / "s").read("t:2")


def test_dataset_reads_crop_only_from_shards_with_the_same_views(tmp_path, jpegs):
    from maelab.train.data import PretrainDataset

    manifest = manifest_of(jpegs)
    write_shards(manifest, tmp_path / "s")
    recipe = {"encoder": {"img_size": 64}, "data": {"crop_scale": [0.2, 1.0]}}
    full = PretrainDataset(manifest, recipe, seed=3)
    crop = PretrainDataset(
        manifest, {**recipe, "data": {"decode": "crop", "shards": str(tmp_path / "s")}}, seed=3
    )
    for i in range(len(manifest)):
        a, b = full[(0, i)]["image"], crop[(0, i)]["image"]
        assert a.shape == b.shape == (3, 64, 64)
        assert (a - b).abs().mean() < 0.15  # normalised units: the same view, another resampler


def test_bench_data_reports_each_path_and_cores_per_gpu(jpegs):
    out = bench_data(jpegs, crop=64, rounds=1, rates=(1000.0,), gpu=False)
    per_core = out["images_per_s_per_core"]
    assert set(per_core) == {"full", "crop", "shards+crop"} and all(v > 0 for v in per_core.values())
    assert out["cores_per_gpu"]["1000"]["full"] == pytest.approx(1000.0 / per_core["full"])
    assert out["crop_over_full"] == pytest.approx(per_core["crop"] / per_core["full"])


def test_crop_only_decode_asks_libjpeg_for_the_smallest_sufficient_scale(monkeypatch, jpegs):
    from PIL import JpegImagePlugin

    asked = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size, *args, **kwargs):
        asked.append(size)
        return real(self, mode, size, *args, **kwargs)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = jpegs[2].read_bytes()  # 320x240
    decode_crop(data, (0, 0, 240, 320), (56, 56))  # 240/56 = 4.3 source px per output px: 1/4
    decode_crop(data, (0, 0, 120, 120), (56, 56))  # 2.1: 1/2
    decode_crop(data, (0, 0, 100, 100), (56, 56))  # 1.8: whole resolution, no draft
    assert asked == [(80, 60), (160, 120)]
