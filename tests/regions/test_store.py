from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest

from maelab.datasets import RegionStoreDataset
from maelab.regions.store import RegionStore, SourceStore


def _maps(rng: np.random.Generator, n_labels: int, shape=(2, 30, 40)) -> np.ndarray:
    return rng.integers(0, n_labels, size=shape).astype(np.int64)


@pytest.mark.parametrize("codec", ["lzma", "zlib"])
def test_round_trip_exact_past_uint8_and_uint16(tmp_path, codec):
    rng = np.random.default_rng(0)
    few, many = _maps(rng, 7), _maps(rng, 300)
    huge = np.arange(2 * 300 * 300, dtype=np.int64).reshape(2, 300, 300)  # 180000 labels > 65535
    huge[0, 0, 0] = 0
    store = SourceStore(tmp_path / "fh")
    store.append([("a", "ha", few), ("b", "hb", many)], codec=codec, scales=["500", "1000"])
    store.append([("c", "hc", huge)], codec=codec)
    fresh = SourceStore(tmp_path / "fh")  # reads from disk
    for key, want, dtype in (("a", few, np.uint16), ("b", many, np.uint16), ("c", huge, np.int32)):
        got = fresh.get(key)
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    row = fresh.index.set_index("image_id").loc["b"]
    assert row["scales"] == "500,1000" and row["dtype"] == "uint16" and row["content_hash"] == "hb"
    assert row["num_segments"] == ",".join(str(m.max()) for m in many)
    assert len(fresh) == 3 and "c" in fresh and "z" not in fresh
    with pytest.raises(KeyError, match="index.parquet.*'z'"):
        fresh.get("z")


def test_labels_compress_well(tmp_path):
    maps = np.repeat(np.arange(8), 64 * 64 // 8).reshape(1, 64, 64)
    store = SourceStore(tmp_path / "fh")
    store.append([("a", "", maps)])
    assert store.index["length"].iloc[0] < maps.size * 2 / 20


def test_corrupt_record_and_missing_shard_name_the_file(tmp_path):
    store = SourceStore(tmp_path / "fh")
    store.append([("a", "", np.ones((1, 8, 8), np.int64))])
    shard = store.shard_dir / store.index["shard"].iloc[0]
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match=r"\.bin.*crc32"):
        SourceStore(tmp_path / "fh").get("a")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="field 'shard'"):
        SourceStore(tmp_path / "fh").get("a")


def test_replace_and_gc(tmp_path):
    store = SourceStore(tmp_path / "fh")
    store.append([("a", "1", np.ones((1, 4, 4), np.int64))])
    store.append([("a", "2", np.full((1, 4, 4), 3))])  # replaces a's row; first shard now unreferenced
    (store.shard_dir / ".tmp-1-x.bin").write_bytes(b"half")  # what a killed writer leaves
    assert len(list(store.shard_dir.iterdir())) == 3
    assert store.gc() == 2
    assert len(list(store.shard_dir.iterdir())) == 1
    assert (store.get("a") == 3).all() and store.index["content_hash"].tolist() == ["2"]


def _read_in_child(store: SourceStore, q) -> None:
    q.put(int(store.get("a").sum()))


def test_handle_survives_pickle_and_fork(tmp_path):
    store = SourceStore(tmp_path / "fh")
    store.append([("a", "", np.full((1, 4, 4), 2))])
    assert store.get("a").sum() == 32  # opens a descriptor in the parent
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fds == {} and clone.get("a").sum() == 32
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(store, q))
    p.start()
    p.join(30)
    assert q.get(timeout=5) == 32


def test_lock_is_exclusive(tmp_path):
    store = SourceStore(tmp_path / "fh")
    with store.lock(), pytest.raises(RuntimeError, match="lock"), SourceStore(tmp_path / "fh").lock():
        pass


def test_kedro_dataset_load_save(tmp_path):
    ds = RegionStoreDataset(path=str(tmp_path / "regions"), codec="zlib")
    assert ds.exists()
    ds.save({"sam": [("x", "h", np.eye(5, dtype=np.int64)[None])]})
    store = ds.load()
    assert isinstance(store, RegionStore) and store.names() == ["sam"] and store.codec == "zlib"
    np.testing.assert_array_equal(store["sam"].get("x"), np.eye(5)[None])
    with pytest.raises(ValueError, match="codec"):
        RegionStoreDataset(path=str(tmp_path), codec="gzip")
