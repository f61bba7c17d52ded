"""A handful of real photos for demos, copied from the images bundled inside scikit-image (no network)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from maelab.files import atomic_write

log = logging.getLogger(__name__)

# bundled with scikit-image itself (skimage/data/), so they load offline; camera and coins are greyscale
DEFAULT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def copy_skimage_photos(root: str | Path, names: list[str] | tuple[str, ...] = DEFAULT_PHOTOS) -> list[str]:
    """Write ``<root>/<name>.png`` for each ``skimage.data.<name>()`` not already there; return the names.

    A name that does not load (unknown, or fetched on demand with no network) is skipped with a warning.
    """
    import skimage.data

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        out = root / f"{name}.png"
        if out.exists():
            written.append(out.name)
            continue
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception as e:  # AttributeError, or a download attempt with no network
            log.warning("photos: skipping skimage.data.%s: %s", name, e)
            continue
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) * (255.0 / max(float(arr.max()), 1.0))).astype(np.uint8)
        atomic_write(out, lambda tmp, arr=arr: Image.fromarray(arr).save(tmp, format="PNG"))
        written.append(out.name)
    return written
