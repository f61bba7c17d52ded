"""Tiny images + manifests for the region tests (everything under tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maelab.data.manifest import conform


def write_images(
    folder: Path, n: int, hw: tuple[int, int] = (40, 48), seed: int = 0, prefix: str = ""
) -> pd.DataFrame:
    """``n`` PNGs with a few flat blocks plus noise (FH finds several segments) and their manifest rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = np.zeros((*hw, 3), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, hw[0] - 8), rng.integers(0, hw[1] - 8)
            img[y : y + rng.integers(6, 20), x : x + rng.integers(6, 20)] = rng.integers(0, 256, 3)
        img = np.clip(img + rng.integers(0, 12, img.shape), 0, 255).astype(np.uint8)
        name = f"{prefix}{i:03d}.png"
        Image.fromarray(img).save(folder / name)
        rows.append(
            {
                "image_id": f"toy:train:{prefix}{i}",
                "source": "toy",
                "split": "train",
                "root": str(folder),
                "path": name,
                "width": hw[1],
                "height": hw[0],
                "content_hash": f"{prefix}{seed}-{i}",
            }
        )
    return conform(pd.DataFrame(rows))


@pytest.fixture
def toy_manifest(tmp_path: Path) -> pd.DataFrame:
    return write_images(tmp_path / "images", 7)


@pytest.fixture
def make_images():
    """The :func:`write_images` helper, as a fixture (test modules cannot import conftest)."""
    return write_images
