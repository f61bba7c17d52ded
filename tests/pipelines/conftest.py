"""In-memory pipeline runs (Kedro spaceflights style): a ``DataCatalog`` of inputs, ``SequentialRunner``."""

from __future__ import annotations

from typing import Any

import pytest
from kedro.io import AbstractDataset, DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner


class KeptDataset(MemoryDataset):
    """A memory dataset the runner cannot release, so a test can read intermediate data after the run."""

    def _release(self) -> None:
        pass


def run_in_memory(
    pipeline: Pipeline, inputs: dict[str, Any], params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``pipeline`` on ``inputs`` (data or datasets) and ``params`` (``params:<key>`` entries); returns
    the data of every dataset a node wrote."""
    datasets = {k: v if isinstance(v, AbstractDataset) else MemoryDataset(v) for k, v in inputs.items()}
    for key, value in (params or {}).items():
        datasets[f"params:{key}"] = MemoryDataset(value)
    for name in pipeline.all_outputs():
        datasets.setdefault(name, KeptDataset(copy_mode="assign"))
    catalog = DataCatalog(datasets=datasets)
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog.load(name) for name in pipeline.all_outputs()}


@pytest.fixture
def run_memory():
    return run_in_memory
