"""Hostile files under an ImageFolder root end as quarantine lines naming the file, within bounded memory
(4 GiB address space) and time; the manifest keeps nothing silently wrong."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from maelab.data.decode import decode_all

INGEST = """
import json, sys
import pandas as pd
from maelab.pipelines.ingest.nodes import build_manifest, decode_images, list_images
ingest = {"workers": 0, "cache": sys.argv[2] + "/cache.parquet",
          "sources": [{"type": "imagefolder", "root": sys.argv[1]}]}
candidates, _ = list_images(ingest, {})
decoded, _ = decode_images(candidates, ingest)
manifest, quarantine = build_manifest(candidates, decoded)
manifest.to_parquet(sys.argv[2] + "/manifest.parquet")  # pyarrow must take every name
quarantine.to_csv(sys.argv[2] + "/quarantine.csv", index=False)
print(json.dumps({
    "manifest": sorted(zip(manifest["path"], manifest["label_name"], manifest["label"].astype(int).tolist())),
    "quarantine": dict(zip(quarantine["file"], quarantine["reason"])),
}))
"""


def _png_16bit(path: Path, side: int) -> None:
    """A valid ``side`` x ``side`` 16-bit grayscale PNG of zeros (tiny on disk, huge decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + 2 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _jpg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


def test_hostile_imagefolder(tmp_path: Path, capped) -> None:
    root = tmp_path / "data"
    train = root / "train"
    for c in ("cat", "dog"):
        (train / c).mkdir(parents=True)
        for i in range(2):
            _jpg(train / c / f"{i}.jpg", hash((c, i)) % 1000)
    (train / "empty").mkdir()  # takes no label
    os.mkfifo(train / "cat" / "fifo.jpg")  # would block a plain read forever
    (train / "cat" / "zero.jpg").symlink_to("/dev/zero")  # would read without end
    _png_16bit(train / "cat" / "huge16.png", 13000)  # ~330 KB on disk, GBs decoded
    bad_name = os.fsdecode(b"bad\xff\xfename.jpg")
    _jpg(train / "dog" / bad_name, 7)  # not valid UTF-8
    os.link(train / "dog" / "0.jpg", train / "dog" / "again.jpg")  # the same file under two ids
    (train / "loop").symlink_to(".")  # a directory symlink: would duplicate the set under a bogus class
    out = capped(INGEST, str(root), str(tmp_path), timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    labels = {name for _, name, _ in res["manifest"]}
    assert labels == {"cat", "dog"}, labels  # no "loop", no "empty"
    assert sorted({lab for *_, lab in res["manifest"]}) == [0, 1]  # 'empty' took no index
    q = {Path(f).name: r for f, r in res["quarantine"].items()}
    assert "not a regular file (FIFO)" in q["fifo.jpg"]
    assert "not a regular file (device)" in q["zero.jpg"]
    assert "over the decode budget" in q["huge16.png"]
    assert q["bad\\xff\\xfename.jpg"] == "file name is not valid UTF-8"
    assert q["again.jpg"] == "same file as imagefolder:train:dog/0.jpg"
    assert len(res["manifest"]) == 4, res["manifest"]


def test_decode_cache_sees_a_rewrite_with_restored_mtime(tmp_path: Path) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    cache = tmp_path / "cache.parquet"
    probes, _ = decode_all([(str(img), None)], cache, workers=0)
    assert probes[0].ok
    st = img.stat()
    img.write_bytes(b"\0" * st.st_size)  # same size, corrupt
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # what tar -x / cp -p do
    probes, counts = decode_all([(str(img), None)], cache, workers=0)
    assert counts["decoded"] == 1 and not probes[0].ok, (counts, probes)


def test_big_file_is_not_read(tmp_path: Path) -> None:
    from maelab.data.decode import Limits, probe

    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(3 << 20)  # sparse: 3 MiB
    p = probe(str(big), limits=Limits(max_file_bytes=1 << 20))
    assert not p.ok and "file too large" in p.reason
