"""Reading every map of a store with 3,000 shards works under ``ulimit -n 256`` (an LRU of shard fds)."""

from __future__ import annotations

import numpy as np

from maelab.regions.store import SourceStore, encode, make_records

READ_ALL = """
import resource, sys
import numpy as np
from maelab.regions.store import SourceStore
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
store = SourceStore(sys.argv[1])
for i in range(3000):
    m = store.get(f"img:{i:05d}")
    assert m.shape == (1, 4, 4) and int(m[0, 0, 0]) == i % 50000, i
print("read", 3000)
"""


def test_3000_shards_under_ulimit_n_256(tmp_path, capped) -> None:
    store = SourceStore(tmp_path / "fh")
    store.shard_dir.mkdir(parents=True)
    records = []
    for i in range(3000):  # one record per shard: 3,000 shard files (written plainly: no fsync, fast)
        maps = np.full((1, 4, 4), i % 50000, np.int32)
        blob, dtype = encode(maps, "zlib")
        (store.shard_dir / f"{i:05d}.bin").write_bytes(blob)
        records += make_records(
            f"{i:05d}.bin", [0], [(f"img:{i:05d}", "", maps, blob, dtype)], "fp", "zlib", []
        )
    store.commit(records)
    assert len(list(store.shard_dir.iterdir())) == 3000
    out = capped(READ_ALL, str(store.path), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "read 3000" in out.stdout
