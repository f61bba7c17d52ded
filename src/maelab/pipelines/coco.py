"""Read one COCO-format file out of the ``coco_annotations`` dataset (a ``PartitionedDataset`` written by
ingest: ``instances_<source>_<split>`` -> a lazy loader; in-memory runs pass the dicts themselves)."""

from __future__ import annotations

from typing import Any

from maelab.data.cocojson import check_instances


def instances(coco_annotations: dict[str, Any], name: str, lvis: bool = False) -> dict[str, Any]:
    """Partition ``name`` of ``coco_annotations``, loaded and validated as COCO (or LVIS) instances."""
    if name not in coco_annotations:
        raise KeyError(f"coco_annotations: no partition {name!r} (have {sorted(coco_annotations)})")
    data = coco_annotations[name]
    return check_instances(data() if callable(data) else data, f"coco_annotations/{name}", lvis=lvis)
