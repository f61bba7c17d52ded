"""Kedro datasets maelab needs beyond kedro-datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from maelab.data.cocojson import read_json, write_json


class CompactJSONDataset(AbstractDataset[Any, Any]):
    """JSON without indentation, written atomically (tmp file + ``os.replace``).

    ``json.dump`` runs the pure-Python encoder; COCO-sized annotation files need the C encoder of
    ``json.dumps``. Catalog type: ``maelab.data.datasets.CompactJSONDataset`` (also in a PartitionedDataset).
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
