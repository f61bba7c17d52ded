"""The Kedro datasets maelab adds to kedro-datasets: the Kedro side of the data layer.

The libraries under them (``maelab.data.cocojson``, ``maelab.regions.store``) know nothing of Kedro, so
training and the region store run without it; only the catalog (``conf/*/catalog*.yml``) names these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset

from maelab.data.cocojson import read_json, write_json
from maelab.regions.store import RegionStore


class CompactJSONDataset(AbstractDataset[Any, Any]):
    """JSON without indentation, written atomically (tmp file + ``os.replace``).

    ``json.dump`` runs the pure-Python encoder; COCO-sized annotation files need the C encoder of
    ``json.dumps``. Catalog type: ``maelab.datasets.CompactJSONDataset`` (also in a PartitionedDataset).
    """

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> Any:
        return read_json(self._filepath)

    def save(self, data: Any) -> None:
        write_json(data, self._filepath)

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class RegionStoreDataset(AbstractDataset[Mapping[str, Iterable[tuple[str, str, np.ndarray]]], RegionStore]):
    """Kedro dataset for the region store.

    ``load()`` returns a :class:`RegionStore` handle (nothing is read until ``store[name].get(id)``); the
    ``regions`` node writes through it shard by shard so a long run is incremental and safe to kill.
    ``save({source: [(image_id, content_hash, maps), ...]})`` appends one shard per source; ``save(handle)``
    (the node returning the handle it wrote through) has nothing left to write.
    """

    def __init__(self, path: str, codec: str = "lzma", metadata: dict[str, Any] | None = None) -> None:
        RegionStore(path, codec)  # validates codec
        self._path = Path(path)
        self._codec = codec
        self.metadata = metadata

    def load(self) -> RegionStore:
        return RegionStore(self._path, self._codec)

    def save(self, data: RegionStore | Mapping[str, Iterable[tuple[str, str, np.ndarray]]]) -> None:
        if isinstance(data, RegionStore):  # the regions node wrote through this handle already
            if data.path.resolve() != self._path.resolve():
                raise ValueError(f"region store: a handle on {data.path} cannot be saved to {self._path}")
            return
        store = self.load()
        for name, items in data.items():
            with store[name].lock():
                store[name].append(items, codec=self._codec)

    def _exists(self) -> bool:
        return True  # an empty store is a valid (empty) input

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "codec": self._codec}


class TeacherStoreDataset(RegionStoreDataset):
    """Kedro dataset for the teacher-feature store (``maelab.teachers.store``): the region store's layout and
    handle, one folder per teacher, float16 features kept uncompressed (codec ``raw``)."""

    def __init__(self, path: str, codec: str = "raw", metadata: dict[str, Any] | None = None) -> None:
        super().__init__(path, codec, metadata)
